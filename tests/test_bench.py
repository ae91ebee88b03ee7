"""bench/: each benchmark runs at a tiny size and prints its figures, so the scripts stay alive
in CI (their real runs are by hand, on real models and a GPU). No test checks a timing's value:
on a busy machine a difference of two timings can even come out negative."""
import importlib.util
from pathlib import Path

import pytest
from conftest import DATA_DIR, needs_math_verify

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_script(name: str):
    """A bench/ script as a module under another name: bench/ is a folder of scripts, not a
    package, and bench/reward.py must not shadow the reward module it measures."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def figures(line: str) -> list[float]:
    """The numbers at the end of a table row (after its name, which may hold spaces and digits)."""
    numbers = []
    for word in reversed(line.split()):
        try:
            numbers.append(float(word))
        except ValueError:
            break
    return numbers[::-1]


def test_sampler_benchmark_runs_at_tiny_size(capsys):
    # HF decode = generate(16 tokens) - generate(1 token), medians of 3: with one run of 8 tokens a busy
    # machine's jitter could make the difference negative
    load_script("sampler").bench(["--tiny", "--repeats", "3", "--max-new-tokens", "16", "--prompt-len", "16"])
    out = capsys.readouterr().out
    assert "ours" in out and "HF generate" in out and "decode tok/s" in out
    rows = {line.split()[0]: figures(line) for line in out.splitlines() if line.startswith(("ours ", "HF generate"))}
    assert set(rows) == {"ours", "HF"}
    for name, numbers in rows.items():  # prefill, decode, overall tok/s, peak GiB: printed, values not checked
        assert len(numbers) == 4, (name, out)


@needs_math_verify
@pytest.mark.skipif(not (DATA_DIR / "math_train.jsonl.gz").exists(),
                    reason=f"{DATA_DIR}/math_train.jsonl.gz absent (the reward benchmark grades MATH solutions)")
@pytest.mark.filterwarnings("ignore:.*math_train.jsonl.gz. skipped 2 bad row:UserWarning")  # MATH's empty answers
def test_reward_benchmark_runs_at_tiny_size(capsys):
    load_script("reward").main(["--data-dir", str(DATA_DIR), "--n", "20", "--workers", "1"])
    out = capsys.readouterr().out
    for method in ("fork", "forkserver", "spawn"):
        assert f"  {method} " in out
    rows = [figures(line) for line in out.splitlines() if line.startswith("  (")]
    assert len(rows) == 5, out
    for sent, timeouts, *timings in rows:  # seconds, items/s, CPU ms: printed, values not checked
        assert 0 <= timeouts <= sent <= 20 and len(timings) == 3
    assert "(a) >= 300 completions/s:" in out


def test_gpu_benchmark_runs_at_tiny_size(capsys):
    """bench/gpu.py --tiny: every check and speed item at tiny size on CPU (Triton kernels in the
    interpreter, torchrun on gloo), ending with the table of figures."""
    failed = load_script("gpu").main(["--tiny"])
    out = capsys.readouterr().out
    assert failed == 0 and not [line for line in out.splitlines() if line.startswith("FAIL")], out
    for name in ("kernels: paged decode", "graphs: float32 eager Triton", "hf: check-llama bfloat16", "frozen:",
                 "train: torchrun", "suite:"):
        assert f"PASS  {name}" in out, (name, out)
    table = out[out.index("\n== results on cpu"):]
    for figure in ("device: matmul rate", "decode tiny 8 seqs ctx 32: ours / HF",
                   "prefill tiny 8 x 16 tokens: achieved",
                   "rl tiny 2 prompts x 4 x 8 new tokens: forward-backward MFU"):
        row = next(line for line in table.splitlines() if line.startswith(figure))
        float(row[len(figure):].split()[0])  # a number is printed; timings on a busy machine may be anything


def test_cpu_step_benchmark_runs_at_tiny_size(capsys):
    """bench/cpu_step.py --tiny: sampling and the backward, naive and ours, against the matmul rate.
    Half the prompts are flat: ours forwards each prompt once, and only the other half's rollouts."""
    load_script("cpu_step").main(["--tiny", "--prompts", "2", "--rollouts", "2", "--max-new-tokens", "8",
                                  "--flat", "0.5"])
    out = capsys.readouterr().out
    assert "GFLOP/s" in out.splitlines()[1]
    rows = {" ".join(line.split()[:-5]): figures(line.rstrip("%")) for line in out.splitlines()
            if line.startswith(("sampling ", "backward naive ", "backward ours "))}
    assert set(rows) == {"sampling", "backward naive", "backward ours"}, out
    assert all(len(numbers) == 5 for numbers in rows.values()), out  # seconds, tokens, tok/s, GFLOP/s, share
    naive, ours = rows["backward naive"][1], rows["backward ours"][1]
    assert naive == 4 * (24 + rows["sampling"][1] / 4 - 1)  # every rollout: 24 prompt tokens + its completion - 1
    assert 0 < ours < naive / 2  # one prompt of two, forwarded once
    assert "1 of 2 prompts flat" in out and "x faster" in out


def test_adapter_costs_follow_the_formulas(capsys):
    """bench/adapters.py: steering L d, LoRA r L (ffn + d), full every weight; AdamW 2 fp32 moments
    (+ fp32 masters for a bf16 full fine-tune); the all-reduce is 4 bytes per trainable number. The
    paper: Llama-3.1-8B steering adds ~0.0016 % (its abstract), Qwen2.5-14B 245,760 numbers."""
    bench = load_script("adapters")
    bench.main(["--tiny"])
    assert "| tiny | steering | 128 |" in capsys.readouterr().out  # 2 layers x d 64
    for name, shape in bench.SHAPES.items():
        _, d, ffn, layers, *_ = shape
        rows = {r["setup"]: r for r in bench.costs(shape)}
        assert rows["steering"]["trainable"] == layers * d
        assert rows["LoRA-1"]["trainable"] == layers * (ffn + d)
        assert rows["LoRA-4"]["trainable"] == 4 * layers * (ffn + d)
        for setup, r in rows.items():
            masters = 4 * r["trainable"] if setup == "full" else 0
            assert r["optimizer"] == 8 * r["trainable"] + masters and r["allreduce"] == 4 * r["trainable"]
        assert rows["full"]["share"] == 1.0
    assert bench.costs(bench.SHAPES["Qwen2.5-14B"])[0]["trainable"] == 245_760
    llama = bench.costs(bench.SHAPES["Llama-3.1-8B"])[0]
    assert round(100 * llama["share"], 4) == 0.0016


def test_cpu_contention_benchmark_runs_at_tiny_size(capsys):
    load_script("cpu_contention").main(["--tiny", "--prompts", "2", "--max-new-tokens", "8"])
    out = capsys.readouterr().out
    rows = [figures(line) for line in out.splitlines() if line.startswith(("pinned", "CpuShare"))]
    assert len(rows) == 4, out
    for competitors, threads, seconds, rate, ratio in rows:  # printed, values not checked
        assert competitors in (0, 1) and threads >= 1


def test_many_vectors_benchmark_runs_at_tiny_size(capsys):
    """bench/many_vectors.py --tiny: K vectors one after another and side by side, with the share
    of samples whose tokens agree (fp32: all of them, the table's promise)."""
    load_script("many_vectors").bench(["--tiny", "--vectors", "1,3", "--problems", "3", "--max-new-tokens", "6"])
    out = capsys.readouterr().out
    rows = [figures(line) for line in out.splitlines() if line.split()[:1] in (["1"], ["3"])]
    assert [row[0] for row in rows] == [1, 3] and all(len(row) == 9 for row in rows), out
    assert all(row[-1] == 1.0 for row in rows), out  # the same tokens side by side as one at a time
