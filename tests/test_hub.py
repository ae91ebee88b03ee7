"""hub.py with the hub client patched (no network): what resolve() asks hf_hub_download for and
what each failure says; what push() commits (the file as steering.safetensors, a model card
built from the file's metadata, the run's config.json and the eval table)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import constants, errors
from safetensors.torch import save_file

import hub


def http_error(cls, message):
    """A hub HTTP error without an HTTP response (their constructors want one from the HTTP client)."""
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    return error


def steering_file(path, layers=3, width=8, **meta):
    meta = {"format": "steer", "base_model": "Qwen/Qwen2.5-0.5B-Instruct", "base_fingerprint": "0123abcd4567ef89",
            "num_layers": str(layers), "hidden_size": str(width), **meta}
    save_file({"steering": torch.randn(layers, width)}, str(path), metadata=meta)
    return path


def test_local_files_stay_and_a_run_directory_means_its_steering_file(tmp_path):
    f = steering_file(tmp_path / "steering.safetensors")
    assert hub.resolve(str(f)) == f
    assert hub.resolve(str(tmp_path)) == f
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="is a directory without a steering.safetensors"):
        hub.resolve(str(tmp_path / "empty"))


@pytest.fixture
def downloads(monkeypatch, tmp_path):
    """hf_hub_download replaced: records its calls, serves files from a fake repo table."""
    calls, repos = [], {}

    def fake(repo_id, filename, **kw):
        calls.append((repo_id, filename))
        if repo_id not in repos:
            raise http_error(errors.RepositoryNotFoundError, "404 repo")
        if filename not in repos[repo_id]:
            raise errors.EntryNotFoundError("404 entry")
        return str(repos[repo_id][filename])
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    return calls, repos


def test_hub_specs_download_the_named_file(downloads, tmp_path):
    calls, repos = downloads
    a, b = steering_file(tmp_path / "a.safetensors"), steering_file(tmp_path / "b.safetensors")
    repos["org/vec"] = {"steering.safetensors": a, "seed1.safetensors": b}
    assert hub.resolve("org/vec") == a
    assert hub.resolve("org/vec:seed1.safetensors") == b
    assert calls == [("org/vec", "steering.safetensors"), ("org/vec", "seed1.safetensors")]


def test_hub_failures_name_the_repo_and_file(downloads, monkeypatch):
    calls, repos = downloads
    repos["org/vec"] = {}
    with pytest.raises(FileNotFoundError, match="hub repo org/vec, file x.safetensors: the repo has no such file"):
        hub.resolve("org/vec:x.safetensors")
    with pytest.raises(FileNotFoundError, match="hub repo org/missing, file steering.safetensors: no such repo"):
        hub.resolve("org/missing")

    def offline(repo_id, filename, **kw):
        raise errors.LocalEntryNotFoundError("cannot find the requested files in the local cache")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(FileNotFoundError, match="hub repo org/vec, file steering.safetensors: not in the local "
                                                "cache and the hub cannot be reached"):
        hub.resolve("org/vec")


def test_the_real_client_offline_gives_the_same_one_line_error(monkeypatch, tmp_path):
    """No patch of the download itself: huggingface_hub in offline mode with an empty cache."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    with pytest.raises(FileNotFoundError, match="hub repo org/vec, file steering.safetensors: not in the local cache"):
        hub.resolve("org/vec")


@pytest.mark.parametrize("spec", ["runs/x.safetensors", "./x", "a/b/c.safetensors", "nope"])
def test_missing_local_files_never_reach_the_hub(downloads, spec):
    calls, _ = downloads
    with pytest.raises(FileNotFoundError, match=f"--steering: {spec} is not a file"):
        hub.resolve(spec)
    assert calls == []


@pytest.fixture
def commits(monkeypatch):
    """HfApi.create_repo / create_commit replaced: records what would be sent."""
    sent = dict(repos=[], commits=[])
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo",
                        lambda self, repo_id, **kw: sent["repos"].append((repo_id, kw)))

    def create_commit(self, repo_id, operations, **kw):
        sent["commits"].append((repo_id, {op.path_in_repo: op.path_or_fileobj for op in operations}, kw))
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
    return sent


def test_push_uploads_the_file_card_recipe_and_eval_table(commits, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    f = steering_file(run / "final.safetensors", step="8", task="arithmetic")
    config = dict(model="Qwen/Qwen2.5-0.5B-Instruct", lr=0.005, rollouts=4, prompts_per_step=16)
    (run / "config.json").write_text(json.dumps(config))
    (tmp_path / "eval").mkdir()
    table = "| Setup | Arithmetic | Avg. |\n|---|:---:|:---:|\n| base (greedy) | 2.0 ± 0.0 | 2.0 ± 0.0 |\n"
    (tmp_path / "eval" / "results.md").write_text(table)

    hub.main(["push", str(f), "--repo", "me/arith-vec", "--private", "--eval", str(tmp_path / "eval")])
    assert commits["repos"] == [("me/arith-vec", dict(private=True, exist_ok=True))]
    (repo, files, kw), = commits["commits"]
    assert repo == "me/arith-vec" and set(files) == {"steering.safetensors", "README.md", "config.json"}
    assert files["steering.safetensors"] == f.read_bytes()  # stored under the name resolve() looks for
    assert json.loads(files["config.json"]) == config
    card = files["README.md"].decode()
    assert card.startswith("---\ntags:\n- steering-vector\n- steer\nbase_model: Qwen/Qwen2.5-0.5B-Instruct\n---\n")
    assert "(3 × 8 numbers)" in card and "| base_fingerprint | `0123abcd4567ef89` |" in card
    assert "| step | `8` |" in card and "| task | `arithmetic` |" in card
    assert json.dumps(config, indent=2) in card and table.strip() in card
    assert "--steering me/arith-vec" in card
    assert "uploaded to https://huggingface.co/me/arith-vec" in capsys.readouterr().err


def test_push_without_run_config_or_eval_and_dry_run(commits, tmp_path, capsys):
    f = steering_file(tmp_path / "v.safetensors", base_model="/tmp/models/local-model")
    hub.main(["push", str(f), "--repo", "me/v", "--dry-run"])
    assert commits == dict(repos=[], commits=[])
    card = capsys.readouterr().out
    assert "## Recipe" not in card and "## Evaluation" not in card
    assert "base_model:" not in card  # a local path is no hub link
    hub.main(["push", str(f), "--repo", "me/v"])
    (_, files, _), = commits["commits"]
    assert set(files) == {"steering.safetensors", "README.md"}
    assert commits["repos"] == [("me/v", dict(private=False, exist_ok=True))]


def test_push_errors_are_one_line(commits, tmp_path, monkeypatch):
    f = steering_file(tmp_path / "v.safetensors")
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    cases = [
        (["push", str(tmp_path / "nope.safetensors"), "--repo", "me/v"], "nope.safetensors is not a file"),
        (["push", str(f), "--repo", "not a repo"], "--repo 'not a repo' is not a hub repo id"),
        (["push", str(tmp_path / "other.safetensors"), "--repo", "me/v"], "expected one tensor 'steering'"),
        (["push", str(tmp_path / "junk.safetensors"), "--repo", "me/v"], "not a readable safetensors file"),
        (["push", str(f), "--repo", "me/v", "--eval", str(tmp_path)], "no results.md there"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_:
            hub.main(argv)
        text = str(exit_.value.code)
        assert message in text and "\n" not in text and text.startswith("hub.py: "), (argv, text)

    def unauthorized(self, repo_id, **kw):
        raise http_error(errors.HfHubHTTPError, "401 Client Error: Unauthorized")
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", unauthorized)
    with pytest.raises(SystemExit) as exit_:
        hub.main(["push", str(f), "--repo", "me/v"])
    assert "push to me/v failed (HfHubHTTPError: 401" in str(exit_.value.code) and "HF_TOKEN" in str(exit_.value.code)


def test_push_without_a_network_is_one_line(tmp_path):
    """The real client against a hub that does not answer (a closed local port): one line saying so, exit 2."""
    f = steering_file(tmp_path / "v.safetensors")
    env = dict(os.environ, HF_ENDPOINT="http://127.0.0.1:9", HF_TOKEN="hf_not_a_token", HF_HUB_ETAG_TIMEOUT="5",
               HF_HOME=str(tmp_path / "hf"))
    hub_py = Path(hub.__file__)
    proc = subprocess.run([sys.executable, str(hub_py), "push", str(f), "--repo", "me/v"], cwd=hub_py.parent,
                          capture_output=True, text=True, timeout=120, env=env)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("error: hub.py: push to me/v failed: the hub cannot be reached ("), lines[0]
