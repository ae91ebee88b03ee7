"""Steering vectors on the Hugging Face hub: fetch one by name, publish one with a model card.

    hub.resolve("runs/x/steering.safetensors")   # a local file: itself
    hub.resolve("org/name")                      # org/name's steering.safetensors, downloaded (cached)
    hub.resolve("org/name:seed1.safetensors")    # another file of that repo

    python hub.py push runs/x/steering.safetensors --repo org/name [--private] [--eval runs/x/eval]

Every `--steering` flag (sample.py, eval.py, lens.py) goes through resolve(), so a shared vector
is used exactly like a local one. A pushed repo holds steering.safetensors (whatever the local
file was called, so `org/name` alone finds it), README.md (the model card: base model and
fingerprint from the file's metadata, the training recipe = the run's config.json when it sits
beside the file, the eval table = results.md of --eval) and that config.json. The token is
huggingface_hub's usual one (`hf auth login` or $HF_TOKEN).
"""
import argparse
import json
import re
import sys
from pathlib import Path

import model as M

DEFAULT_FILE = "steering.safetensors"
# org/name, each part starting with a letter or digit (so "./x" or "../x" is never a repo id)
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def resolve(spec: str) -> Path:
    """A steering file given as a local path (a run directory means its steering.safetensors) or
    as a hub repo `org/name[:file]`; returns a local file or raises FileNotFoundError."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if (path / DEFAULT_FILE).is_file():
            return path / DEFAULT_FILE
        raise FileNotFoundError(f"--steering: {spec} is a directory without a {DEFAULT_FILE}")
    repo, _, filename = spec.partition(":")
    # "runs/x.safetensors" would pass as a repo id: a name ending in a file type is a missing file
    if not _REPO_ID.fullmatch(repo) or repo.endswith(".safetensors"):
        raise FileNotFoundError(f"--steering: {spec} is not a file (nor a hub repo 'org/name[:file]')")
    return _download(repo, filename or DEFAULT_FILE)


def _download(repo: str, filename: str) -> Path:
    import huggingface_hub
    from huggingface_hub import errors
    where = f"hub repo {repo}, file {filename}"
    try:
        return Path(huggingface_hub.hf_hub_download(repo, filename))
    except errors.LocalEntryNotFoundError:  # offline (or the hub unreachable) and not in the cache
        raise FileNotFoundError(f"--steering: {where}: not in the local cache and the hub cannot be reached "
                                "(offline, or HF_HUB_OFFLINE=1)") from None
    except errors.EntryNotFoundError:
        raise FileNotFoundError(f"--steering: {where}: the repo has no such file") from None
    except errors.RepositoryNotFoundError:
        raise FileNotFoundError(f"--steering: {where}: no such repo, or it is private/gated "
                                "(log in with `hf auth login` or set HF_TOKEN)") from None
    except Exception as e:  # connection errors (the HTTP client's own), revision, server errors
        raise FileNotFoundError(f"--steering: {where}: download failed ({type(e).__name__}: {first_line(e)})") from None

# -----------------------------------------------------------------------------
# Publishing


def model_card(repo: str, meta: dict, shape: tuple[int, ...], config: dict | None, eval_table: str | None) -> str:
    """README.md of a steering repo: what it is, how to use it, and where it came from."""
    base = meta.get("base_model", "")
    # the card's base_model field links the repo to its base on the hub, when the base is a hub id
    head = ["---", "tags:", "- steering-vector", "- steer"]
    if _REPO_ID.fullmatch(base) and not Path(base).exists():
        head.append(f"base_model: {base}")
    head.append("---")
    layers, width = shape
    lines = head + [
        "", f"# {repo}", "",
        f"One steering vector per transformer layer ({layers} × {width} numbers), added to the residual "
        f"stream after every block of **{base or 'an unnamed base model'}**, whose weights stay frozen. "
        "Trained with RL on a verifiable reward by [steer](https://arxiv.org/abs/2505.18706) "
        "(bias-only adaptation).", "",
        "## Use", "", "```bash",
        f'python sample.py --model {base or "BASE_MODEL"} --steering {repo} "What is 482 + 917?"',
        f"python eval.py --model {base or 'BASE_MODEL'} --steering {repo} --bench math500",
        "```", "",
        "## Base model", "",
        "| field | value |", "|---|---|",
        *(f"| {k} | `{v}` |" for k, v in sorted(meta.items())), "",
        "`base_fingerprint` hashes the base weights: loading the vector into another model is refused.", ""]
    if config is not None:
        lines += ["## Recipe", "", "The training run's config.json:", "", "```json",
                  json.dumps(config, indent=2), "```", ""]
    if eval_table is not None:
        lines += ["## Evaluation", "", eval_table.strip(), ""]
    return "\n".join(lines)


def push(file: str, repo: str, private: bool = False, eval_dir: str | None = None, dry_run: bool = False) -> list[str]:
    """Upload a steering file, its model card and its run's config.json to `repo` in one commit;
    returns the paths written in the repo. dry_run prints the card instead of uploading."""
    path = Path(file)
    vectors, meta = M.read_steering(path)  # refuses anything but a steering file
    shape = tuple(vectors.shape)
    if not _REPO_ID.fullmatch(repo):
        raise ValueError(f"--repo {repo!r} is not a hub repo id 'org/name'")
    config_file = path.parent / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else None
    eval_table = None
    if eval_dir is not None:
        table = Path(eval_dir) / "results.md"
        if not table.is_file():
            raise FileNotFoundError(f"--eval {eval_dir}: no results.md there (eval.py --out writes it)")
        eval_table = table.read_text()
    card = model_card(repo, meta, shape, config, eval_table)
    files = {DEFAULT_FILE: path.read_bytes(), "README.md": card.encode()}
    if config is not None:
        files["config.json"] = config_file.read_bytes()
    if dry_run:
        print(card)
        return list(files)

    import huggingface_hub
    from huggingface_hub import errors
    api = huggingface_hub.HfApi()
    try:
        api.create_repo(repo, private=private, exist_ok=True)
        api.create_commit(repo, [huggingface_hub.CommitOperationAdd(name, content) for name, content in files.items()],
                          commit_message=f"steering vector for {meta.get('base_model', 'its base model')}")
    except errors.HfHubHTTPError as e:  # the hub answered: refused, or failed
        raise ValueError(f"push to {repo} failed ({type(e).__name__}: {first_line(e)}); log in with `hf auth "
                         "login` or set HF_TOKEN, with write access to the repo") from None
    except Exception as e:  # the hub did not answer: the HTTP client's own errors (httpx's are no OSError)
        raise ValueError(f"push to {repo} failed: the hub cannot be reached ({type(e).__name__}: {first_line(e)}); "
                         "check the network, or HF_ENDPOINT / the proxy settings, and push again") from None
    return list(files)


def first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("push", help="upload a steering file with a model card")
    up.add_argument("file", help="steering file (safetensors, tensor 'steering' (L, d))")
    up.add_argument("--repo", required=True, help="hub repo id org/name (created if absent)")
    up.add_argument("--private", action="store_true", help="create the repo private")
    up.add_argument("--eval", dest="eval_dir", help="eval.py --out folder: its results.md goes into the card")
    up.add_argument("--dry-run", action="store_true", help="print the model card, upload nothing")
    args = p.parse_args(argv)
    try:
        written = push(args.file, args.repo, args.private, args.eval_dir, args.dry_run)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"hub.py: {e}") from None
    verb = "would upload" if args.dry_run else f"uploaded to https://huggingface.co/{args.repo}:"
    print(f"{verb} {', '.join(written)}", file=sys.stderr)


if __name__ == "__main__":
    import cluster
    cluster.run_cli(main)
