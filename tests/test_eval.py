"""eval.py: metrics against hand-computed values, the evaluation core with a fake sampler and
grader (known correctness patterns), setup/protocol resolution, and a run end to end on a
tiny random model with the real Qwen2.5 tokenizer and 5 real MATH500 problems."""
import json
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch

import eval as ev
from rl_task import Task, completion_budget
from conftest import DATA_DIR
import model as M

# -----------------------------------------------------------------------------
# Metrics


def test_pass_at_1_and_avg_at_k_by_hand():
    assert ev.pass_at_1([[1.0], [0.0], [1.0], [1.0]]) == 0.75
    # per-problem means 1/2, 1, 1/4 -> 7/12 (not the 4/8 of pooling all samples)
    assert ev.pass_at_1([[1, 0], [1, 1], [1, 0, 0, 0]]) == pytest.approx(7 / 12)
    assert ev.avg_at_k([[1, 0, 0, 0], [1, 1, 1, 0]], k=4) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="exactly 4 samples"):
        ev.avg_at_k([[1, 0, 0, 0], [1, 1]], k=4)
    with pytest.raises(ValueError):
        ev.pass_at_1([])
    assert ev.metric_name(1) == "pass@1" and ev.metric_name(32) == "avg@32"


def test_mean_std_is_the_sample_std_or_the_papers_population_std():
    mean, std = ev.mean_std([75.0, 25.0])
    assert mean == 50.0 and std == pytest.approx(35.35534, rel=1e-6)  # population std would be 25
    assert ev.mean_std([10.0, 20.0, 60.0]) == (30.0, pytest.approx(26.457513, rel=1e-6))
    assert ev.mean_std([42.0]) == (42.0, 0.0)
    # np.std (ddof=0), the paper's: sqrt(((10-30)^2 + (20-30)^2 + (60-30)^2) / 3)
    assert ev.mean_std([10.0, 20.0, 60.0], population=True) == (30.0, pytest.approx(21.602469, rel=1e-6))
    assert ev.mean_std([75.0, 25.0], population=True) == (50.0, 25.0)
    assert ev.apply_protocol(ev.EvalConfig(model="m", protocol="paper")).std == "population"
    assert ev.apply_protocol(ev.EvalConfig(model="m")).std == "sample"

# -----------------------------------------------------------------------------
# The core with fakes: problem "p" has a fixed correctness pattern per seed (call) and sample.


@dataclass
class FakeCompletion:
    tokens: list
    finish_reason: str = "stop"
    logprobs: list = None


class FakeTokenizer:
    stop_token_ids = [99]

    def encode_prompt(self, problem):
        return [int(problem)]

    def decode(self, ids, skip_special_tokens=False):
        return f"so \\boxed{{{ids[0]}}}"


class FakeSampler:
    """Answers prompt p on its i-th call (= i-th seed) with PATTERN[p][i] (1 = correct)."""

    def __init__(self, pattern):
        self.pattern, self.calls, self.requests = pattern, {}, []

    def generate(self, prompts, n, max_new_tokens, temperature, top_p, stop_token_ids, seed, prompt_ids, vectors=None):
        self.requests.append(dict(n=n, temperature=temperature, stop=list(stop_token_ids), seed=seed[0],
                                  offset=prompt_ids[0]))
        out = []
        for (p,) in prompts:
            i = self.calls.get(p, 0)
            self.calls[p] = i + 1
            row = self.pattern[p][i] if self.pattern[p] else [1] * n
            assert len(row) == n
            out.append([FakeCompletion([7 if c else 3]) for c in row])
        return out


def fake_grade(texts, answers):
    return [float(t.endswith(f"\\boxed{{{a}}}")) for t, a in zip(texts, answers)]


def fake_tasks(benches) -> dict:
    """rl_task.Task objects over the fake benchmarks, graded by fake_grade (what math_task builds)."""
    tok = FakeTokenizer()
    tasks = {}
    for name, rows in benches.items():
        def score(completions, owners, rows=rows):
            ok = fake_grade([tok.decode(c) for c in completions], [rows[i]["answer"] for i in owners])
            return ok, ok
        tasks[name] = Task(name, [tok.encode_prompt(r["problem"]) for r in rows], [r["answer"] for r in rows],
                           tok.stop_token_ids, None, 0, score, rows=rows, decode=tok.decode)
    return tasks


PATTERN = {0: [[1, 0], [0, 0]],  # seed 0: 1/2, seed 1: 0
           1: [[1, 1], [1, 0]],  # seed 0: 1,   seed 1: 1/2
           2: [[1, 1], [1, 1]]}  # the second benchmark: always right
BENCHES = {"b1": [dict(id="a/0", problem="0", answer="7"), dict(id="a/1", problem="1", answer="7")],
           "b2": [dict(id="b/0", problem="2", answer="7")]}


def sampled_cfg(**kw):
    return ev.apply_protocol(ev.EvalConfig(model="m", samples=2, seeds=2, temperature=1.0, batch_prompts=1, **kw))


def test_core_metrics_end_to_end_with_fakes():
    cfg = sampled_cfg()
    setup = ev.make_setups(replace(cfg, base=False, steering=__file__))[0]
    assert setup.seeds == [0, 1] and setup.temperature == 1.0
    sampler = FakeSampler(PATTERN)
    records = ev.evaluate_setups(sampler, [setup], fake_tasks(BENCHES), cfg)
    assert len(records) == (2 + 1) * 2 * 2  # problems x seeds x samples
    assert sorted({r["extracted"] for r in records}) == ["3", "7"]  # reward.extract_boxed on the decoded text
    assert {req["stop"][0] for req in sampler.requests} == {99}
    # every problem its own random stream: (seed, its index) differ between calls, per benchmark
    assert len({(req["seed"], req["offset"]) for req in sampler.requests}) == len(sampler.requests)

    results = ev.summarize(records, [setup.name], ["b1", "b2"])[setup.name]
    b1, b2 = results["benchmarks"]["b1"], results["benchmarks"]["b2"]
    assert b1["per_seed"] == [75.0, 25.0] and b1["mean"] == 50.0 and b1["std"] == pytest.approx(35.3553, rel=1e-5)
    assert b1["metric"] == "avg@2" and b1["problems"] == 2 and b1["seeds"] == [0, 1]
    assert b2["per_seed"] == [100.0, 100.0] and b2["std"] == 0.0
    assert results["avg"]["per_seed"] == [87.5, 62.5]
    assert results["avg"]["mean"] == 75.0 and results["avg"]["std"] == pytest.approx(17.6777, rel=1e-5)

    # the first sample alone: b1 seed 0 -> both problems right (100), seed 1 -> one of two (50)
    assert b1["first_sample"]["per_seed"] == [100.0, 50.0] and b1["first_sample"]["mean"] == 75.0
    # the headroom: seed 0 -> [1, 1], [1, 0]; seed 1 -> [1, 0], [0, 0] (b2: every sample right)
    assert b1["headroom"] == {"pass@2": 75.0, "all_right": 25.0, "all_wrong": 25.0}
    assert b2["headroom"] == {"pass@2": 100.0, "all_right": 100.0, "all_wrong": 0.0}
    table = ev.markdown_table({setup.name: results}, [setup], ["b1", "b2"], "tiny")
    assert table.splitlines()[0] == "| Setup | b1 | b1 1st | b2 | b2 1st | Avg. |"
    assert "| 50.0 ± 35.4 | 75.0 ± 35.4 | 100.0 ± 0.0 | 100.0 ± 0.0 | 75.0 ± 17.7 |" in table
    assert "sample std (n-1)" in table
    assert "  - b1: pass@2 75.0; every sample right on 25.0 % of the problems, every one wrong on 25.0 %" in table
    paper = ev.summarize(records, [setup.name], ["b1", "b2"], population=True)
    assert paper[setup.name]["benchmarks"]["b1"]["std"] == 25.0
    assert "population std (n, np.std" in ev.markdown_table(paper, [setup], ["b1", "b2"], "tiny", population=True)


def test_ranks_split_problems_and_agree_with_one_process():
    cfg = sampled_cfg()
    setup = ev.Setup("s", "s", 1.0, [0, 1])
    single = ev.evaluate_setups(FakeSampler(PATTERN), [setup], fake_tasks(BENCHES), cfg)
    parts = [ev.evaluate_setups(FakeSampler(PATTERN), [setup], fake_tasks(BENCHES), cfg, rank, 2)
             for rank in range(2)]
    assert {r["index"] for r in parts[0]} == {0} and {r["id"] for r in parts[1]} == {"a/1"}
    merged = parts[0] + parts[1]
    assert ev.summarize(merged, ["s"], ["b1", "b2"]) == ev.summarize(single, ["s"], ["b1", "b2"])


def test_greedy_runs_once_with_one_sample():
    cfg = ev.apply_protocol(ev.EvalConfig(model="m", samples=4, seeds=3, temperature=0.0))
    setup = ev.make_setups(cfg)[0]
    assert setup.name == "base" and setup.seeds == [0]
    sampler = FakeSampler({0: [[1]], 1: [[0]], 2: [[1]]})
    records = ev.evaluate_setups(sampler, [setup], fake_tasks(BENCHES), cfg)
    assert [req["n"] for req in sampler.requests] == [1, 1] and {req["temperature"] for req in sampler.requests} == {0}
    results = ev.summarize(records, ["base"], ["b1", "b2"])["base"]
    assert results["benchmarks"]["b1"] == dict(metric="pass@1", problems=2, seeds=[0], per_seed=[50.0],
                                               mean=50.0, std=0.0)
    assert results["avg"]["mean"] == 75.0


def test_setups_and_paper_protocol(tmp_path):
    f1, f2 = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    f1.touch()
    f2.touch()
    paper = ev.apply_protocol(ev.EvalConfig(model="m", steering=f"{f1},{f2}", protocol="paper"))
    assert paper.bench == "aime24,aime25,amc23,math500,minerva,olympiadbench" and paper.seeds == 3
    setups = ev.make_setups(paper)
    assert [s.steering for s in setups] == [None, str(f1), str(f2)]
    assert [s.temperature for s in setups] == [0.0, 1.0, 1.0] and setups[1].seeds == [0, 1, 2]
    assert [ev.samples_per_problem(paper, b, 1.0) for b in ("aime24", "aime25", "amc23", "math500")] == [32, 32, 32, 1]
    assert ev.samples_per_problem(paper, "aime24", 0.0) == 1  # greedy: one sample stands for all
    # 'none' names the base row explicitly; --no-base drops it
    explicit = ev.make_setups(ev.apply_protocol(ev.EvalConfig(model="m", steering=f"none,{f1}")))
    assert [s.name for s in explicit] == ["base", str(f1)]
    only = ev.make_setups(ev.apply_protocol(ev.EvalConfig(model="m", steering=str(f1), base=False)))
    assert [s.name for s in only] == [str(f1)]
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        ev.make_setups(ev.apply_protocol(ev.EvalConfig(model="m", steering="missing.safetensors")))
    with pytest.raises(ValueError, match="--seeds must be >= 1"):
        ev.apply_protocol(ev.EvalConfig(model="m", seeds=0))
    with pytest.raises(ValueError, match="protocol"):
        ev.apply_protocol(ev.EvalConfig(model="m", protocol="nope"))


def test_run_directories_and_their_checkpoints(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(dict(adapter="steering", lr=1e-3)))
    for name in ("steering.safetensors", "steering-step2.safetensors", "steering-step10.safetensors",
                 "steering-step4.safetensors"):
        (run / name).touch()
    pick = lambda which: ev.make_setups(ev.apply_protocol(ev.EvalConfig(model="m", steering=str(run),
                                                                        checkpoints=which)))
    assert [(s.name, s.step) for s in pick("last")] == [("base", None), (str(run / "steering.safetensors"), 10)]
    assert [s.step for s in pick("all")[1:]] == [2, 4, 10]  # oldest first, by number not by name
    assert [s.step for s in pick("10,2")[1:]] == [10, 2]
    with pytest.raises(FileNotFoundError, match=r"no checkpoint at step\(s\) \[3\]; it has \[2, 4, 10\]"):
        pick("3")
    with pytest.raises(ValueError, match="--checkpoints 'latest'"):
        pick("latest")
    # best: the highest Avg. among the run's rows, never the base row
    setups = pick("best")
    results = {s.name: dict(avg=dict(mean=m)) for s, m in zip(setups, [90.0, 10.0, 30.0, 20.0])}
    assert ev.best_checkpoints(results, setups) == {str(run): str(run / "steering-step4.safetensors")}


def budgets(cfg, prompts):
    """rl_task.completion_budget under eval.py's resolved lengths, as Task.evaluate applies it."""
    return [completion_budget(len(p), cfg.max_new_tokens or 4096, cfg.max_len) for p in prompts]


def test_length_caps_follow_the_context_and_the_paper():
    plain = ev.apply_protocol(ev.EvalConfig(model="m"))
    assert (ev.resolve_lengths(plain, 4096).max_len, ev.resolve_lengths(plain, 4096).max_new_tokens) == (4096, 4096)
    assert budgets(ev.resolve_lengths(plain, 4096), [[1] * 600, [1] * 10]) == [3496, 4086]
    paper = ev.apply_protocol(ev.EvalConfig(model="m", protocol="paper"))
    assert ev.resolve_lengths(paper, 4096).max_len == 4096  # Qwen2.5-Math: its 4K context
    assert ev.resolve_lengths(paper, 131072).max_len == 32768  # Llama-3.1: the paper's 32K cap
    capped = ev.resolve_lengths(paper, 131072)
    assert budgets(capped, [[1] * 768]) == [32768 - 768]
    small = ev.resolve_lengths(ev.apply_protocol(ev.EvalConfig(model="m", max_new_tokens=100, max_len=512)), 4096)
    assert budgets(small, [[1] * 500, [1] * 20, [1] * 600]) == [12, 100, 0]
    with pytest.raises(ValueError, match="beyond the model's context of 4096"):
        ev.resolve_lengths(ev.apply_protocol(ev.EvalConfig(model="m", max_len=8192)), 4096)


def test_cli_flags_are_the_config_fields(capsys):
    cfg = ev.parse_args(["--model", "m", "--samples", "4", "--no-base", "--temperature", "0.7",
                         "--max-new-tokens", "16", "--steering-scale", "2"])
    assert cfg == ev.EvalConfig(model="m", samples=4, base=False, temperature=0.7, max_new_tokens=16,
                                steering_scale=2.0)
    with pytest.raises(SystemExit):
        ev.parse_args([])  # --model is required
    with pytest.raises(SystemExit) as exit_:
        ev.parse_args(["--help"])
    assert exit_.value.code == 0 and "--max-new-tokens" in capsys.readouterr().out

# -----------------------------------------------------------------------------
# End to end: tiny random model, real tokenizer and problems, base + steered.


def test_end_to_end_tiny_model(tiny_with_tokenizer, tmp_path, capsys):
    if not (DATA_DIR / "math500.jsonl").is_file():
        pytest.skip(f"{DATA_DIR}/math500.jsonl is absent (the shared data)")
    model = M.Transformer.from_pretrained(tiny_with_tokenizer)
    with torch.no_grad():
        model.steering.copy_(torch.randn_like(model.steering))
    model.save_steering(tmp_path / "steer.safetensors")

    out = tmp_path / "out"
    ev.main(["--model", str(tiny_with_tokenizer), "--steering", str(tmp_path / "steer.safetensors"),
             "--protocol", "paper", "--bench", "math500", "--limit", "5", "--samples", "2", "--seeds", "2",
             "--max-new-tokens", "4", "--data-dir", str(DATA_DIR), "--out", str(out), "--grade-workers", "1",
             "--kv-cache-tokens", "4096"])

    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 5 + 5 * 2 * 2  # base: greedy, once; steered: 2 seeds x 2 samples
    fields = {"setup", "bench", "index", "id", "seed", "sample", "answer", "extracted", "reward",
              "finish_reason", "n_tokens", "completion"}
    assert all(set(r) == fields for r in rows)
    first_ids = [json.loads(line)["id"] for line in (DATA_DIR / "math500.jsonl").open().readlines()[:5]]
    assert [r["id"] for r in rows[:5]] == first_ids and {r["setup"] for r in rows[:5]} == {"base"}
    assert all(1 <= r["n_tokens"] <= 4 and r["finish_reason"] in ("stop", "length") for r in rows)
    assert all(r["reward"] in (0.0, 1.0) for r in rows)

    results = json.loads((out / "results.json").read_text())
    base, steered = results["setups"]
    assert base["temperature"] == 0.0 and base["benchmarks"]["math500"]["seeds"] == [0]
    assert steered["temperature"] == 1.0 and steered["benchmarks"]["math500"]["metric"] == "avg@2"
    assert len(steered["benchmarks"]["math500"]["per_seed"]) == 2

    table = (out / "results.md").read_text()
    assert table.splitlines()[0] == "| Setup | MATH500 | MATH500 1st | Avg. |"  # avg@2: the first sample too
    assert len([line for line in table.splitlines() if line.startswith("| ")]) == 3  # header + 2 setups
    printed = capsys.readouterr()
    assert table in printed.out
    # stderr is no terminal here: one progress line per generate call, ending at every sample done
    assert "math500 seed 1: 25/25 samples, " in printed.err and " tok/s" in printed.err, printed.err


def test_without_out_the_results_go_to_a_folder_named_by_the_flags(tiny_with_tokenizer, tmp_path, monkeypatch):
    """No eval_out/ dropped into the checkout: runs/eval-<hash of the flags> under the working
    directory, the same folder for the same command, another for other flags."""
    if not (DATA_DIR / "gsm8k_test.jsonl").is_file():
        pytest.skip(f"{DATA_DIR}/gsm8k_test.jsonl is absent (the shared data)")
    monkeypatch.chdir(tmp_path)
    args = ["--model", str(tiny_with_tokenizer), "--bench", "gsm8k", "--limit", "2", "--max-new-tokens", "2",
            "--data-dir", str(DATA_DIR), "--grade-workers", "1", "--kv-cache-tokens", "256"]
    for extra in ([], [], ["--limit", "1"]):
        ev.main(args + extra)
    folders = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(folders) == 2 and all(f.startswith("eval-") for f in folders), folders
    assert all((tmp_path / "runs" / f / "results.md").is_file() for f in folders)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


def test_torchrun_two_ranks_match_one_process(tiny_with_tokenizer, tmp_path):
    """Two CPU ranks (gloo) split the problems and rank 0 gathers them: greedy completions and
    scores are those of a single process."""
    if not (DATA_DIR / "gsm8k_test.jsonl").is_file():
        pytest.skip(f"{DATA_DIR}/gsm8k_test.jsonl is absent (the shared data)")
    args = ["--model", str(tiny_with_tokenizer), "--bench", "gsm8k", "--limit", "5", "--max-new-tokens", "4",
            "--data-dir", str(DATA_DIR), "--grade-workers", "1", "--kv-cache-tokens", "2048"]
    ev.main(args + ["--out", str(tmp_path / "one")])
    repo = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(repo / "eval.py"), *args, "--out", str(tmp_path / "two")],
                         cwd=repo, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    one, two = [[json.loads(line) for line in (tmp_path / d / "samples.jsonl").read_text().splitlines()]
                for d in ("one", "two")]
    assert len(two) == 5 and two == one  # same rows, same order (rank 0 sorts what it gathers)
    assert (tmp_path / "two" / "results.md").read_text() == (tmp_path / "one" / "results.md").read_text()


def test_lora_files_and_full_folders_are_rows_and_the_base_comes_back(tiny_with_tokenizer, tmp_path):
    """Any adapter is a row: a LoRA file, a full fine-tuning folder. A full row changes the base
    weights in place; the rows after it must see the base again (here: the LoRA row equals the
    same LoRA evaluated alone)."""
    if not (DATA_DIR / "gsm8k_test.jsonl").is_file():
        pytest.skip(f"{DATA_DIR}/gsm8k_test.jsonl is absent (the shared data)")
    model = M.Transformer.from_pretrained(tiny_with_tokenizer)
    torch.manual_seed(0)
    model.set_adapter("lora", lora_rank=2)
    with torch.no_grad():
        model.adapter.lora_B.normal_(0, 30.0)  # large: the tiny model's logits are dominated by its embedding
    model.save_adapter(tmp_path / "lora.safetensors")
    model.set_adapter("full")
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(0.5 * torch.randn_like(p))
        model.norm.weight.copy_(3 * torch.randn_like(model.norm.weight))  # fp32: the weights train themselves
    model.trainable_to_weights()
    model.save_adapter(tmp_path / "full")
    common = ["--model", str(tiny_with_tokenizer), "--bench", "gsm8k", "--limit", "3", "--max-new-tokens", "6",
              "--data-dir", str(DATA_DIR), "--grade-workers", "1", "--dtype", "float32", "--device", "cpu"]
    ev.main(common + ["--steering", f"{tmp_path / 'full'},{tmp_path / 'lora.safetensors'}",
                      "--out", str(tmp_path / "all")])
    ev.main(common + ["--no-base", "--steering", str(tmp_path / "lora.safetensors"), "--out", str(tmp_path / "alone")])
    rows = [json.loads(line) for line in (tmp_path / "all" / "samples.jsonl").read_text().splitlines()]
    alone = [json.loads(line) for line in (tmp_path / "alone" / "samples.jsonl").read_text().splitlines()]
    by_setup = {s: [r["completion"] for r in rows if r["setup"] == s] for s in dict.fromkeys(r["setup"] for r in rows)}
    assert list(by_setup) == ["base", str(tmp_path / "full"), str(tmp_path / "lora.safetensors")]
    assert by_setup[str(tmp_path / "lora.safetensors")] == [r["completion"] for r in alone]
    assert by_setup[str(tmp_path / "full")] != by_setup["base"] != by_setup[str(tmp_path / "lora.safetensors")]


def test_a_runs_history_runs_side_by_side_as_it_would_one_at_a_time(tiny_with_tokenizer, tmp_path, capsys):
    """--checkpoints all: the base and every checkpoint of a run in ONE sampler pass (one row of
    the steering table each) give exactly the samples of evaluating them one after another
    (--sequential): the same tokens, the same scores. One file trained a layer subset and holds
    stray numbers in its other rows, which the forward never adds: neither may the table."""
    if not (DATA_DIR / "gsm8k_test.jsonl").is_file():
        pytest.skip(f"{DATA_DIR}/gsm8k_test.jsonl is absent (the shared data)")
    model = M.Transformer.from_pretrained(tiny_with_tokenizer)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(dict(adapter="steering")))
    torch.manual_seed(0)
    for step, layers in ((1, None), (2, "0"), (3, None)):
        model.set_adapter("steering", layers=layers)
        with torch.no_grad():
            model.steering.copy_(torch.randn_like(model.steering) * 2.0)  # every row, listed or not
        model.save_steering(run / f"steering-step{step}.safetensors", step=step)
    common = ["--model", str(tiny_with_tokenizer), "--bench", "gsm8k", "--limit", "3", "--max-new-tokens", "6",
              "--temperature", "1", "--samples", "2", "--steering", str(run), "--checkpoints", "all",
              "--data-dir", str(DATA_DIR), "--grade-workers", "1", "--dtype", "float32", "--device", "cpu"]
    ev.main(common + ["--out", str(tmp_path / "together")])
    assert "4 setups gsm8k seed 0: 24/24 samples" in capsys.readouterr().err  # one pass: all 4 rows at once
    ev.main(common + ["--sequential", "--out", str(tmp_path / "apart")])
    together, apart = [(tmp_path / d / "samples.jsonl").read_text().splitlines() for d in ("together", "apart")]
    assert len(together) == 4 * 3 * 2 and together == apart
    completions = {}
    for r in map(json.loads, together):
        completions.setdefault(r["setup"], []).append(r["completion"])
    assert len({tuple(c) for c in completions.values()}) == 4  # every vector changes the text
    assert (tmp_path / "together" / "results.md").read_text() == (tmp_path / "apart" / "results.md").read_text()


def test_side_by_side_groups_what_can_share_a_batch(tiny_with_tokenizer, tmp_path):
    """One pass holds the base and the steering files sampled alike at one --steer-at point; a file
    steering post-attn, a LoRA file and a setup sampled otherwise (the paper's greedy base) do not."""
    model = M.Transformer.from_pretrained(tiny_with_tokenizer)
    files = {}
    for name, kind, options in (("a", "steering", {}), ("b", "steering", dict(steer_at="post-attn")),
                                ("c", "lora", {}), ("d", "steering", {})):
        model.set_adapter(kind, **options)
        files[name] = str(tmp_path / f"{name}.safetensors")
        model.save_adapter(files[name])
    setups = lambda **kw: ev.make_setups(ev.apply_protocol(ev.EvalConfig(  # noqa: E731
        model="m", steering=",".join(files.values()), **kw)))
    names = lambda groups: [[Path(s.name).stem for s in g] for g in groups]  # noqa: E731
    assert names(ev.side_by_side(setups(temperature=1.0))) == [["base", "a", "d"], ["b"], ["c"]]
    assert names(ev.side_by_side(setups(protocol="paper"))) == [["base"], ["a", "d"], ["b"], ["c"]]
    assert names(ev.side_by_side(setups(temperature=1.0), sequential=True)) == [["base"], ["a"], ["b"], ["c"], ["d"]]


@pytest.mark.parametrize("flags,says", [
    (["--temperature", "nan"], "--temperature nan: must be a finite number >= 0"),
    (["--top-p", "2"], "--top-p 2.0: must be in (0, 1]"),
    (["--steering-scale", "nan"], "--steering-scale nan: must be a finite number"),
    (["--max-new-tokens", "-1"], "--max-new-tokens must be >= 1, got -1"), (["--samples", "0"], "--samples must be >= 1")])
def test_a_number_that_cannot_work_is_one_line_before_the_model_loads(tmp_path, flags, says):
    """The model path does not exist: the flag's error comes first, in one line, exit 2."""
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "eval.py"), "--model", str(tmp_path / "no-model"), *flags],
                          cwd=root, capture_output=True, text=True, timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and says in lines[0], proc.stderr[-2000:]
