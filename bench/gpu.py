"""The GPU path's first real run, in one command: is it correct, then how near the hardware is it.

    PYTHONPATH=. python3 bench/gpu.py --out gpu.json     # one GPU, within --budget-s (default 480 s)
    python bench/gpu.py --tiny                           # CPU, tiny shapes, kernels in the Triton interpreter

Correctness (a PASS / FAIL / SKIP line each):
  suite    pytest on the GPU machine, in a child process beside the checks below (it works on the CPU)
  kernels  each Triton kernel compiled for real against its PyTorch twin: dtypes, GQA shapes, head dims, splits
  graphs   greedy tokens of CUDA-graph decode = eager Triton decode = the PyTorch path
  hf       logits of model.py loaded with from_pretrained vs HF transformers, bf16 and fp32
  frozen   a backward into steering leaves no base .grad and does no weight-gradient matmul (profiler)
  train    3 steps of train.py under torchrun (NCCL on a GPU, gloo on CPU)
Speed (random weights, real shapes; every figure names its shape, batch and context):
  decode   tokens/s at 64 / 256 / 1024 sequences, context 1K and 4K: ours vs HF generate vs the HBM roofline
  prefill  256 x 256-token prompts: tokens/s and FLOP/s against the measured bf16 matmul rate
  rl       one RL step at the paper's shape (128 prompts x 16 rollouts): seconds per phase, peak memory, MFU

Speed items are skipped (SKIP: budget) when their estimated time would pass --budget-s, so one call
always ends with the whole table. Figures are medians after a warm-up, timed with CUDA events or
with a host clock after a device synchronise.
"""
import argparse
import dataclasses
import gc
import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path

START = time.perf_counter()  # the budget counts the imports too: the device call's limit does

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

# paged_attention.py decides at import whether its kernels are compiled or interpreted: on CPU tensors
# (--tiny, or no GPU) they must run in the Triton interpreter, so this comes before the imports below
if "--tiny" in sys.argv or not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import paged_attention  # noqa: E402
import memory  # noqa: E402
import model as M  # noqa: E402
import rloo  # noqa: E402
import rollout_groups as RG  # noqa: E402
import sample  # noqa: E402


def load_bench_script(name: str):
    """A bench/ script as a module (bench/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


race = load_bench_script("sampler")  # random_model, hf_twin, hf_row, timed: shared with the sampler benchmark
race.SHAPES.update({  # random_model / hf_twin read their shapes from there
    "qwen2.5-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       tie_word_embeddings=False, rope_theta=1000000.0),
    # the correctness checks' models: small, but head_dim 64 like the real kernels see
    "check-qwen2": dict(model_type="qwen2", vocab_size=512, hidden_size=256, intermediate_size=512,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        tie_word_embeddings=True, rope_theta=1000000.0),
    "check-llama": dict(model_type="llama", vocab_size=512, hidden_size=256, intermediate_size=768,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                        tie_word_embeddings=False, rope_theta=500000.0),
})

CHECKS = ["suite", "kernels", "graphs", "hf", "frozen", "train"]
SPEED = ["decode", "prefill", "rl"]
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
TOLERANCE = {FP32: 1e-5, FP16: 2e-3, BF16: 2e-2}  # max |error| / max |reference| of the kernels
LOGIT_TOLERANCE = {FP32: 1e-4, BF16: 2e-2}  # the same for model logits vs HF

# -----------------------------------------------------------------------------
# What runs: the GPU plan, or the same steps at tiny size on CPU


@dataclasses.dataclass
class Plan:
    device: torch.device
    dtype: torch.dtype  # the speed items' model dtype
    suite_paths: list[str]
    kernel_dtypes: list[torch.dtype]
    gqa: list[tuple[int, int]]  # (query heads, KV heads)
    head_dims: list[int]
    splits: list[int]
    kernel_max_len: int
    greedy_budgets: list[int]  # new tokens per prompt in the decode-path check (different: the batch shrinks)
    train_dim: int
    train_layers: int
    shapes: list[str]
    batches: list[int]
    contexts: list[int]
    decode_steps: int
    hf_max_tokens: int  # HF generate only where batch x context is at most this (time and memory)
    prefill: tuple[int, int]  # prompts, tokens each
    rl_prompts: int
    rl_rollouts: int
    rl_new_tokens: int
    rl_prompt_len: int
    matmul_n: int
    copy_bytes: int
    repeats: int


GPU_PLAN = dict(suite_paths=["tests/"], kernel_dtypes=[FP16, BF16, FP32], gqa=[(12, 2), (28, 4), (8, 8), (14, 2)],
                head_dims=[64, 128], splits=[1, 2, 4, 8], kernel_max_len=1000,
                greedy_budgets=[24, 9, 17, 32, 5, 20], train_dim=512, train_layers=4,
                shapes=["qwen2.5-1.5b", "qwen2.5-7b"], batches=[64, 256, 1024], contexts=[1024, 4096],
                decode_steps=64, hf_max_tokens=2 ** 18, prefill=(256, 256), rl_prompts=128, rl_rollouts=16,
                rl_new_tokens=1024, rl_prompt_len=256, matmul_n=8192, copy_bytes=2 ** 31, repeats=3)
# the interpreter computes bf16 / fp16 wrongly, so the tiny run compares the kernels in fp32
TINY_PLAN = dict(suite_paths=["tests/test_rloo.py"], kernel_dtypes=[FP32], gqa=[(12, 2), (8, 8)], head_dims=[64],
                 splits=[1, 2], kernel_max_len=70, greedy_budgets=[6, 2, 4, 7, 1, 5], train_dim=64, train_layers=2,
                 shapes=["tiny"], batches=[4, 8], contexts=[16, 32], decode_steps=4, hf_max_tokens=2 ** 18,
                 prefill=(8, 16), rl_prompts=2, rl_rollouts=4, rl_new_tokens=8, rl_prompt_len=8, matmul_n=256,
                 copy_bytes=2 ** 24, repeats=1)


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on CPU (also what runs when there is no GPU)")
    ap.add_argument("--only", help=f"comma-separated subset of {','.join(CHECKS + SPEED)}")
    ap.add_argument("--out", help="write every check and figure to this JSON file")
    ap.add_argument("--budget-s", type=float, default=480.0,
                    help="skip speed items that would end past this (a device call's limit is 600 s, and the "
                         "estimates leave out compiles and graph captures)")
    ap.add_argument("--skip-suite", action="store_true", help="do not run pytest")
    ap.add_argument("--suite-timeout", type=float, default=240.0, help="seconds the suite may take from the start")
    ap.add_argument("--shapes", type=lambda text: text.split(","),
                    help="speed shapes, comma-separated (default qwen2.5-1.5b,qwen2.5-7b)")
    ap.add_argument("--batches", type=int_list, help="decode batch sizes, comma-separated (default 64,256,1024)")
    ap.add_argument("--contexts", type=int_list, help="decode contexts in tokens, comma-separated (default 1024,4096)")
    ap.add_argument("--rl-prompts", type=int, help="RL step prompts (default 128; halved until the step fits "
                                                   "the budget)")
    ap.add_argument("--rl-rollouts", type=int, help="RL step rollouts per prompt (default 16)")
    ap.add_argument("--rl-new-tokens", type=int, help="RL step completion length (default 1024)")
    ap.add_argument("--train-dim", type=int, help="hidden size of the torchrun check's random-tiny model "
                                                  "(default 512 on a GPU: head_dim 128 like the real models)")
    ap.add_argument("--train-layers", type=int, help="its layers (default 4 on a GPU)")
    args = ap.parse_args(argv)
    only = set(args.only.split(",")) if args.only else set(CHECKS + SPEED)
    unknown = only - set(CHECKS + SPEED)
    if unknown:
        ap.error(f"--only: unknown {sorted(unknown)} (known: {','.join(CHECKS + SPEED)})")
    args.only = only - ({"suite"} if args.skip_suite else set())
    return args


def make_plan(args) -> Plan:
    tiny = args.tiny or not torch.cuda.is_available()
    if tiny and not paged_attention.INTERPRET:
        raise SystemExit("--tiny runs the Triton kernels on CPU tensors: set TRITON_INTERPRET=1 before paged_attention.py "
                         "is imported")
    fields = dict(TINY_PLAN if tiny else GPU_PLAN)
    flags = ("shapes", "batches", "contexts", "rl_prompts", "rl_rollouts", "rl_new_tokens", "train_dim", "train_layers")
    fields.update({key: getattr(args, key) for key in flags if getattr(args, key) is not None})
    device = torch.device("cpu" if tiny else "cuda")
    return Plan(device=device, dtype=FP32 if tiny else BF16, **fields)

# -----------------------------------------------------------------------------
# The report: a line per check as it ends, a table of every figure at the end


class Report:
    def __init__(self, budget_s: float, out: str | None = None, device_name: str = ""):
        self.t0 = START
        self.budget_s = budget_s
        self.out, self.device_name = out, device_name  # --out: rewritten after every line (a kill loses nothing)
        self.checks: list[tuple[str, str, str]] = []  # (PASS / FAIL / SKIP, name, detail)
        self.figures: list[tuple[str, float, str, str]] = []  # (name, value, unit, note)

    def check(self, name: str, ok: bool, detail: str):
        self._line("PASS" if ok else "FAIL", name, detail)

    def skip(self, name: str, why: str):
        self._line("SKIP", name, why)

    def _line(self, status, name, detail):
        self.checks.append((status, name, detail))
        print(f"{status}  {name}: {detail}  [{self.elapsed():.0f} s]", flush=True)
        self.write_json()

    def figure(self, name: str, value: float, unit: str, note: str = ""):
        self.figures.append((name, value, unit, note))
        print(f"      {name}: {value:.4g} {unit}  {note}", flush=True)
        self.write_json()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def affords(self, name: str, estimate_s: float) -> bool:
        """Whether an item estimated at estimate_s still ends inside the budget; prints SKIP if not."""
        left = self.budget_s - self.elapsed()
        if estimate_s <= left:
            return True
        self.skip(name, f"budget (estimated {estimate_s:.0f} s, {max(left, 0):.0f} s left of --budget-s "
                        f"{self.budget_s:.0f})")
        return False

    @property
    def failed(self) -> int:
        return sum(status == "FAIL" for status, _, _ in self.checks)

    def print_table(self, device_name: str):
        counts = {s: sum(c[0] == s for c in self.checks) for s in ("PASS", "FAIL", "SKIP")}
        print(f"\n== results on {device_name}: {counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['SKIP']} SKIP "
              f"in {self.elapsed():.0f} s ==")
        for status, name, _ in self.checks:
            if status != "PASS":
                print(f"{status}  {name}")
        width = max([len(f[0]) for f in self.figures] + [6])
        print(f"{'figure':<{width}}  {'value':>11}  {'unit':<8}  note")
        for name, value, unit, note in self.figures:
            print(f"{name:<{width}}  {value:>11.4g}  {unit:<8}  {note}")

    def write_json(self):
        if not self.out:
            return
        rows = dict(device=self.device_name, elapsed_s=self.elapsed(),
                    checks=[dict(status=s, name=n, detail=d) for s, n, d in self.checks],
                    figures=[dict(name=n, value=v, unit=u, note=t) for n, v, u, t in self.figures])
        tmp = Path(f"{self.out}.tmp")
        tmp.write_text(json.dumps(rows, indent=2) + "\n")
        tmp.replace(self.out)


def guarded(report: Report, name: str, fn, *args):
    """Run one check or benchmark: an exception becomes a FAIL line (the traceback's end printed) and
    the run goes on, so one broken item never costs the rest of the table."""
    try:
        return fn(report, *args)
    except Exception as e:
        traceback.print_exc(limit=-4)
        report.check(name, False, f"{type(e).__name__}: {str(e)[:300]}")
    finally:
        free_memory()


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def relative_error(got, want) -> float:
    """max |got - want| / max |want|, in fp32: error relative to the output's scale."""
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-30)).item()


def sharp_model(name: str, dtype, device):
    """race.random_model with attention and logits sharp enough that a wrong rope, mask or cache shows,
    and greedy choices are rarely near a tie: its 0.02 init gives near-uniform attention and logits of
    std ~0.02 sqrt(d). q/k x5 give scores of std ~3; the embedding (and head) scaled to logits of std ~5."""
    m = race.random_model(name, dtype, device)
    head_scale = 5.0 / (0.02 * m.config.hidden_size ** 0.5)
    with torch.no_grad():
        for block in m.layers:
            block.self_attn.q_proj.weight.mul_(5.0)
            block.self_attn.k_proj.weight.mul_(5.0)
        m.embed_tokens.weight.mul_(head_scale)
        if m.lm_head is not None:
            m.lm_head.weight.mul_(head_scale)
    return m


def random_prompts(count: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (count, length), generator=g).tolist()

# -----------------------------------------------------------------------------
# 1a. The test suite, in a child process


class Suite:
    """pytest in a child process, started before the other checks so that it runs beside them, and
    collected before the speed items so that it does not disturb their timings. The suite is a CPU
    suite (Triton interpreted): the child sees no GPU, which it would otherwise fill (a benchmark's
    default device is cuda) and copy whole through the interpreter. On the GPU machine it checks
    this code under that machine's Python, torch and triton; tests/conftest.py skips what needs a
    package missing there (math-verify)."""

    def __init__(self, plan: Plan, tmp: Path, timeout: float):
        self.timeout, self.t0 = timeout, time.perf_counter()
        workers = min(8, (os.cpu_count() or 2) // 2)
        parallel = ["-n", str(workers)] if workers > 1 and importlib.util.find_spec("xdist") else []
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", *parallel, *plan.suite_paths, "-m", "not slow"]
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1", TRITON_INTERPRET="1",
                   OMP_NUM_THREADS="1" if parallel else "4")  # leave cores to this process, whose sampler is host-bound
        self.log = tmp / "suite.log"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)  # its own group: a timeout ends all of it
        self.command = shlex.join(cmd)

    def finish(self, report: Report):
        name = "suite"
        try:
            self.proc.wait(timeout=max(0.0, self.timeout - (time.perf_counter() - self.t0)))
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        text = self.log.read_text()
        counts = pytest_counts(text)
        summary = ", ".join(f"{n} {what}" for what, n in counts.items()) or "no summary line"
        if self.proc.returncode == -signal.SIGKILL:
            report.skip(name, f"timed out after {self.timeout:.0f} s ({summary} so far)")
        else:
            if self.proc.returncode != 0:
                print(text[-4000:])
            report.check(name, self.proc.returncode == 0, f"`{self.command}`: {summary}")
        for what, n in counts.items():
            report.figure(f"suite: {what}", n, "tests")


def pytest_counts(text: str) -> dict[str, int]:
    """Counts from pytest's summary line ("3 failed, 250 passed, 4 skipped in 90.1s"), else from the
    progress dots of a run that was cut short."""
    lines = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed|errors?|skipped)", ln)]
    if lines:
        return {what: int(n) for n, what in re.findall(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|"
                                                         r"deselected)", lines[-1])}
    dots = "".join(ln.split(" [")[0] for ln in text.splitlines() if re.match(r"^[.sFExX]+ *(\[ *\d+%\])?$", ln))
    found = {"passed": dots.count("."), "failed": dots.count("F"), "errors": dots.count("E"),
             "skipped": dots.count("s")}
    return {what: n for what, n in found.items() if n}

# -----------------------------------------------------------------------------
# 1b. Each Triton kernel against its PyTorch twin


def check_kernels(report: Report, plan: Plan):
    g = torch.Generator().manual_seed(0)
    for dtype in plan.kernel_dtypes:
        for kv_heads, head_dim in sorted({(kvh, d) for _, kvh in plan.gqa for d in plan.head_dims}):
            check_store_kv(report, plan.device, dtype, kv_heads, head_dim, g)
        for heads, kv_heads in plan.gqa:
            for head_dim in plan.head_dims:
                check_decode_attention(report, plan, dtype, heads, kv_heads, head_dim, g)


def check_store_kv(report, device, dtype, kv_heads, head_dim, g):
    """Keys and values taken as strided views of one (N, 2, KVH, D) tensor, as a fused projection would
    give them; slots at block edges, the pool's last slot, and -1 (a CUDA-graph padding row: skipped)."""
    num_blocks, block = 9, 16
    pool = torch.randn(2, num_blocks, block, kv_heads, head_dim, generator=g).to(device, dtype)  # (K/V, ...)
    kv = torch.randn(7, 2, kv_heads, head_dim, generator=g).to(device, dtype)
    slots = torch.tensor([0, 17, 15, 16, -1, num_blocks * block - 1, 40], device=device)
    want = pool.clone()
    rows = slots >= 0
    paged_attention.store_kv_torch(want[0], want[1], kv[rows, 0], kv[rows, 1], slots[rows])
    paged_attention.store_kv_triton(pool[0], pool[1], kv[:, 0], kv[:, 1], slots)
    synchronize(device)
    report.check(f"kernels: store_kv {dtype_name(dtype)} KVH={kv_heads} D={head_dim}", torch.equal(pool, want),
                 "pool equals the PyTorch path bit for bit")


def check_decode_attention(report, plan, dtype, heads, kv_heads, head_dim, g):
    """Paged decode attention at every split count against the PyTorch path on fp32 copies of the same
    inputs. Rows: empty (must give exact zeros), one token, a block edge, random lengths; block tables
    are random permutations of a shared pool."""
    device, block = plan.device, 16
    lens = torch.randint(1, plan.kernel_max_len + 1, (8,), generator=g)
    lens[:3] = torch.tensor([0, 1, 3 * block])
    width = -(-int(lens.max()) // block)
    num_blocks = 2 * width + 5
    tables = torch.stack([torch.randperm(num_blocks, generator=g)[:width] for _ in lens])  # (B, W)
    q = torch.randn(len(lens), heads, head_dim, generator=g) * 2  # (B, H, D); x2: attention not near uniform
    k_cache, v_cache = torch.randn(2, num_blocks, block, kv_heads, head_dim, generator=g)
    q, k_cache, v_cache = (x.to(dtype) for x in (q, k_cache, v_cache))
    want = paged_attention.paged_decode_attention_torch(q.float().to(device), k_cache.float().to(device),
                                                v_cache.float().to(device), tables.to(device), lens.to(device),
                                                head_dim ** -0.5)
    errors, zero_row = [], True
    for splits in plan.splits:
        got = paged_attention.paged_decode_attention_triton(q.to(device), k_cache.to(device), v_cache.to(device),
                                                    tables.to(device, torch.int32), lens.to(device, torch.int32),
                                                    head_dim ** -0.5, num_splits=splits)
        errors.append(relative_error(got, want))
        zero_row &= bool((got[0] == 0).all())
    tol = TOLERANCE[dtype]
    worst = max(errors)
    report.check(f"kernels: paged decode {dtype_name(dtype)} H/KVH={heads}/{kv_heads} D={head_dim}",
                 math.isfinite(worst) and worst <= tol and zero_row,
                 f"rel. error {' '.join(f'{e:.1e}' for e in errors)} at splits {plan.splits} (tol {tol:.0e}), "
                 f"lengths up to {int(lens.max())}, empty row {'zeros' if zero_row else 'NOT zeros'}")

# -----------------------------------------------------------------------------
# 1c. The sampler's decode paths agree


def check_decode_paths(report: Report, plan: Plan):
    """Greedy completions from the same model through the PyTorch path, eager Triton, and CUDA graphs,
    with per-prompt budgets (the batch shrinks: graph padding) and a pool small enough to pre-empt."""
    for dtype in (FP32,) if plan.device.type == "cpu" else (FP32, BF16):
        m = sharp_model("check-qwen2", dtype, plan.device)
        prompts = [random_prompts(1, n, m.config.vocab_size, seed=n)[0] for n in (5, 17, 33, 16, 40, 3)]
        variants = {"PyTorch path": dict(use_triton=False), "eager Triton": dict(use_triton=True, cuda_graphs=False)}
        if plan.device.type == "cuda":
            variants["CUDA graphs"] = dict(use_triton=True, cuda_graphs=True)
        else:
            report.skip(f"graphs: {dtype_name(dtype)} CUDA-graph decode", "needs CUDA (eager Triton, interpreted, is "
                                                                     "compared with the PyTorch path instead)")
        runs = {}
        for label, kw in variants.items():
            sampler = sample.Sampler(m, kv_cache_tokens=16 * 7, **kw)  # 7 blocks: the GPU budgets pre-empt
            out = sampler.generate(prompts, n=3, max_new_tokens=plan.greedy_budgets, temperature=0)
            runs[label] = [[c.tokens for c in group] for group in out]
            captured = sorted(size for _, size in sampler.graphs.graphs) if sampler.graphs else []
            note = f"{sampler.stats.preemptions} pre-emptions"
            if captured:
                note += f", graphs of batches {captured}"
            if label == "PyTorch path":
                continue
            if kw.get("cuda_graphs") and not captured:
                report.check(f"graphs: {dtype_name(dtype)} {label}", False, "no CUDA graph was captured")
                continue
            ok, detail = same_greedy_tokens(m, prompts, runs["PyTorch path"], runs[label], dtype)
            report.check(f"graphs: {dtype_name(dtype)} {label} = PyTorch path", ok, f"{detail}; {note}")


def same_greedy_tokens(m, prompts, want, got, dtype) -> tuple[bool, str]:
    """Identical greedy tokens, except that a completion may part ways at a near-tie, where the two top
    logits are within the dtype's rounding of each other (then the rest of it legitimately differs)."""
    total = sum(len(t) for group in want for t in group)
    ties = []
    for p, (want_group, got_group) in enumerate(zip(want, got)):
        for a, b in zip(want_group, got_group):
            if a == b:
                continue
            t = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            if t >= min(len(a), len(b)):
                return False, f"a completion of prompt {p} has {len(b)} tokens instead of {len(a)}"
            with torch.inference_mode():
                logits = m(torch.tensor([prompts[p] + a[:t]], device=m.embed_tokens.weight.device))[0, -1].float()
            margin = ((logits[a[t]] - logits[b[t]]).abs() / logits.abs().max()).item()
            if margin > LOGIT_TOLERANCE[dtype]:
                return False, f"tokens differ at step {t} of prompt {p}: their logits are {margin:.1e} apart, no tie"
            ties.append(t)
    if ties:
        return True, f"{total} tokens; {len(ties)} completion(s) part at a near-tie (steps {ties})"
    return True, f"{total} greedy tokens identical"

# -----------------------------------------------------------------------------
# 1d. Logits against HF transformers, through save_pretrained -> from_pretrained


def check_hf_logits(report: Report, plan: Plan, tmp: Path):
    import transformers
    transformers.utils.logging.disable_progress_bar()  # save_pretrained's shard bar
    for name in ("check-qwen2", "check-llama"):
        m = sharp_model(name, FP32, plan.device)
        hf = race.hf_twin(m, FP32, plan.device)
        folder = tmp / name
        hf.save_pretrained(folder)
        tokens = torch.randint(0, m.config.vocab_size, (2, 96), device=plan.device)
        for dtype in (FP32, BF16):  # fp32 first: .to() converts the HF model in place
            ours = M.Transformer.from_pretrained(folder, dtype=dtype_name(dtype), device=plan.device)
            with torch.inference_mode():
                err = relative_error(ours(tokens), hf.to(dtype)(tokens).logits)
            tol = LOGIT_TOLERANCE[dtype]
            report.check(f"hf: {name} {dtype_name(dtype)} logits vs HF transformers", err <= tol,
                         f"rel. error {err:.1e} (tol {tol:.0e}), from_pretrained of a save_pretrained folder, "
                         f"2 x 96 tokens on {plan.device.type}")

# -----------------------------------------------------------------------------
# 1e. Frozen base weights: what the backward does


def check_frozen_base(report: Report, plan: Plan):
    """train.py's backward on one rollout: no base weight may get a .grad, and the profiler must see no
    matmul contracting over the token dimension (x^T dy: a weight gradient). Making one weight
    trainable must make exactly such a matmul appear, or the detector is blind."""
    import train
    m = sharp_model("check-qwen2", plan.dtype, plan.device)
    m.steering.requires_grad_(True)
    cfg = train.TrainConfig()
    m.checkpoint_blocks = plan.device.type == "cuda"  # as train.py's memory plan chooses at real shapes
    prompt = random_prompts(1, 13, m.config.vocab_size)[0]
    completion = random_prompts(1, 25, m.config.vocab_size, seed=1)[0]
    group = RG.Group(prompt, [RG.Rollout(completion, 1.0, [0.0] * len(completion))])
    tokens = (len(prompt), len(completion) - 1)  # the prompt's and the completion's forward: 13, 24
    totals = dict(total_sequences=1, max_completion_len=len(completion), total_tokens=len(completion))

    def weight_grad_matmuls():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
            train.accumulate_gradient(m, [([group], totals, None)], cfg, None, plan.device, cfg.micro_batch_tokens)
            synchronize(plan.device)
        found = 0
        for ev in prof.events():
            mats = [s for s in ev.input_shapes if len(s) == 2][-2:]  # mm (a, b) @ (b, c); addmm's bias first
            found += ev.name in ("aten::mm", "aten::addmm") and len(mats) == 2 and mats[0][1] in tokens
        return found

    frozen = weight_grad_matmuls()
    base_grads = [n for n in m.base_weights() if m.base_weights()[n].grad is not None]
    steering_ok = bool(m.steering.grad.abs().sum() > 0) and bool(torch.isfinite(m.steering.grad).all())
    probe = m.layers[0].mlp.down_proj.weight.requires_grad_(True)
    trained = weight_grad_matmuls()
    probe.requires_grad_(False)
    report.check("frozen: backward touches steering only", not base_grads and frozen == 0 and trained >= 1
                 and steering_ok,
                 f"base params with .grad: {base_grads or 'none'}; weight-gradient matmuls {frozen} (detector sees "
                 f"{trained} with one weight trainable); steering grad nonzero and finite: {steering_ok}; "
                 f"recompute {'on' if m.checkpoint_blocks else 'off'}")

# -----------------------------------------------------------------------------
# 1f. train.py under torchrun


def check_train(report: Report, plan: Plan, tmp: Path):
    run_dir = tmp / "train-run"
    backend = "nccl" if plan.device.type == "cuda" else "gloo"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", str(ROOT / "train.py"),
           "--quickstart", "--device", plan.device.type, "--dtype", dtype_name(plan.dtype), "--max-steps", "3",
           "--tiny-dim", str(plan.train_dim), "--tiny-layers", str(plan.train_layers), "--out-dir", str(run_dir)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    timeout = max(30.0, min(300.0, report.budget_s - report.elapsed() - 60))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own group: a timeout ends the workers too
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        err += f"\n(killed after {timeout:.0f} s)"
    seconds = time.perf_counter() - t0
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.is_file() else []
    ok = proc.returncode == 0 and len(lines) == 3
    if not ok:
        print(out[-2000:], err[-4000:], sep="\n")
    last = json.loads(lines[-1]) if lines else dict(sample_s=math.nan, train_s=math.nan)
    report.check(f"train: torchrun 1 x {backend}", ok,
                 f"random-tiny d={plan.train_dim} L={plan.train_layers} {dtype_name(plan.dtype)} on "
                 f"{plan.device.type}: exit {proc.returncode}, {len(lines)} lines in metrics.jsonl, {seconds:.0f} s "
                 f"with start-up; last step: sample {last['sample_s']:.2f} s, train {last['train_s']:.2f} s")

# -----------------------------------------------------------------------------
# 2. Speed: the device's own limits first


def measure_device(report: Report, plan: Plan):
    """Copy bandwidth and the matmul rate in the speed dtype: the two ceilings the figures below are
    divided by."""
    rates = types.SimpleNamespace(bandwidth=copy_bandwidth(plan), matmul=matmul_rate(plan))
    report.figure("device: copy bandwidth", rates.bandwidth / 1e9, "GB/s", f"{plan.copy_bytes / 2 ** 30:.2f} GiB "
                  "copies, bytes read + written, median of 10")
    report.figure("device: matmul rate", rates.matmul / 1e12, "TFLOP/s",
                  f"{plan.matmul_n}^3 {dtype_name(plan.dtype)} on random data, median of 10")
    return rates


def copy_bandwidth(plan: Plan) -> float:
    x = torch.randn(plan.copy_bytes // 4, device=plan.device)
    y = torch.empty_like(x)
    seconds, _, _ = race.timed(lambda: y.copy_(x), lambda: y.copy_(x), plan.device, 10)
    return 2 * x.numel() * x.element_size() / seconds


def matmul_rate(plan: Plan) -> float:
    a, b = (torch.randn(plan.matmul_n, plan.matmul_n, device=plan.device).to(plan.dtype) for _ in range(2))
    seconds, _, _ = race.timed(lambda: a @ b, lambda: a @ b, plan.device, 10)
    return 2 * plan.matmul_n ** 3 / seconds


def block_params(model) -> int:
    """Parameters inside the blocks: the matmul work per token (the head is counted apart)."""
    return sum(p.numel() for name, p in model.named_parameters() if name.startswith("layers."))


def decode_step_bytes(model, batch: int, context: float) -> float:
    """Bytes one decode step must read: every weight once (of an untied embedding table only the batch's
    rows, left out), plus the KV cache of every sequence."""
    skip = "embed_tokens.weight" if model.lm_head is not None else None
    weights = sum(p.numel() * p.element_size() for name, p in model.named_parameters() if name != skip)
    return weights + batch * context * M.kv_bytes_per_token(model.config, model.embed_tokens.weight.dtype)


def prefill_estimate(model, tokens: int, rates) -> float:
    return 2 * block_params(model) * tokens / (0.3 * rates.matmul)  # seconds at a pessimistic 30 % of the rate


def decode_estimate(model, steps: int, batch: int, context: float, rates) -> float:
    """Seconds for `steps` decode steps: the bytes at half the bandwidth, plus host work per step and sequence."""
    return steps * (2 * decode_step_bytes(model, batch, context) / rates.bandwidth + 0.005 + 2e-5 * batch)


def device_free_bytes(device) -> float:
    if device.type != "cuda":
        return float("inf")
    free_memory()
    return torch.cuda.mem_get_info(device)[0]

# -----------------------------------------------------------------------------
# 2a. Decode: ours vs HF generate vs the HBM roofline


PREFILL_TOKENS = 65536  # decode points prefill with bigger packs than the default 8192: fewer admission waves


def bench_decode(report: Report, plan: Plan, rates, m, shape: str):
    for batch, context in sorted(((b, c) for b in plan.batches for c in plan.contexts), key=lambda bc: bc[0] * bc[1]):
        label = f"decode {shape} {batch} seqs ctx {context}"
        guarded(report, label, decode_point, plan, rates, m, label, batch, context)


def decode_point(report: Report, plan: Plan, rates, m, label: str, batch: int, context: int):
    """Our decode at full batch: prompts of `context` tokens are admitted in waves of PREFILL_TOKENS, so
    the batch fills up over the first steps and drains over the last; each step is timed and the median
    over full-batch steps reported. The steps are enough for full-batch steps to follow the ramp."""
    cfg = m.config
    waves = -(-batch * context // PREFILL_TOKENS)
    steps = plan.decode_steps + waves
    kv_tokens = batch * (context + steps + 32)
    pool_bytes = kv_tokens * M.kv_bytes_per_token(cfg, plan.dtype)
    reserve = 2 * 2 ** 30 + PREFILL_TOKENS * (3 * cfg.intermediate_size + 4 * cfg.hidden_size) * 2 \
        + batch * cfg.vocab_size * 16  # prefill activations; fp32 logits and the fp64 CDF of sampling
    free = device_free_bytes(plan.device)
    if pool_bytes + reserve > free:
        report.skip(label, f"KV pool {pool_bytes / 2 ** 30:.1f} GiB + {reserve / 2 ** 30:.1f} GiB working memory "
                           f"> {free / 2 ** 30:.1f} GiB free")
        return
    estimate = prefill_estimate(m, batch * context, rates) + decode_estimate(m, steps, batch, context, rates) + 5
    if not report.affords(label, estimate):
        return
    sampler = sample.Sampler(m, kv_cache_tokens=kv_tokens, max_num_seqs=batch, max_seq_len=context + steps + 16,
                             max_batch_tokens=PREFILL_TOKENS)
    log = time_decode_steps(sampler)
    # warm-up at full batch with short prompts: compiles the kernels and captures this batch's graph
    sampler.generate(random_prompts(batch, 16, cfg.vocab_size, seed=1), max_new_tokens=8, temperature=1.0, seed=1)
    log.clear()
    sampler.generate(random_prompts(batch, context, cfg.vocab_size), max_new_tokens=steps, temperature=1.0, seed=0)
    full = [seconds for b, seconds in log if b == batch]
    if not full:
        report.check(label, False, f"no decode step ran at the full batch of {batch}")
        return
    ours = batch / statistics.median(full)
    path = "CUDA graphs" if sampler.graphs is not None and batch <= sample.GRAPH_BATCH_SIZES[-1] else "eager"
    del sampler
    mean_context = context + steps / 2
    step_bytes = decode_step_bytes(m, batch, mean_context)
    roof = batch * rates.bandwidth / step_bytes
    report.figure(f"{label}: ours", ours, "tok/s", f"median of {len(full)} full-batch steps, {path}, temperature 1")
    report.figure(f"{label}: roofline", roof, "tok/s", f"{step_bytes / 2 ** 30:.2f} GiB per step (weights + KV "
                  f"at mean length {mean_context:.0f}) at copy bandwidth")
    report.figure(f"{label}: ours / roofline", ours / roof, "", "")
    hf = hf_decode(report, plan, rates, m, label, batch, context)
    if hf:
        report.figure(f"{label}: ours / HF", ours / hf, "", "")


def time_decode_steps(sampler) -> list[tuple[int, float]]:
    """Log (batch, seconds) of every decode step, so decode at a given batch is timed apart from the
    admission ramp and from prefill. The sampler synchronises the device at the end of each step."""
    log = []
    step = sampler._decode

    def logged_step():
        batch, t0 = len(sampler.running), time.perf_counter()
        step()
        log.append((batch, time.perf_counter() - t0))
    sampler._decode = logged_step
    return log


def hf_decode(report: Report, plan: Plan, rates, m, label: str, batch: int, context: int):
    """HF generate on the same model, batch and prompts: decode tok/s from a full run minus a 1-token run
    (race.hf_row). Skipped where its one-forward prefill or its concatenated cache would not fit."""
    cfg, name = m.config, f"{label}: HF generate"
    steps = plan.decode_steps
    weights = sum(p.numel() * p.element_size() for p in m.parameters())
    need = weights + 2 * batch * (context + steps) * M.kv_bytes_per_token(cfg, plan.dtype) \
        + batch * context * (3 * cfg.intermediate_size + 4 * cfg.hidden_size) * 2  # twin, cache + its copy, prefill
    if batch * context > plan.hf_max_tokens or need > device_free_bytes(plan.device):
        report.skip(name, f"{batch} x {context} prompt tokens in one prefill forward: over the plan's "
                          f"{plan.hf_max_tokens}, or ~{need / 2 ** 30:.0f} GiB with its cache > free memory")
        return None
    estimate = 3 * prefill_estimate(m, batch * context, rates) + steps * (0.04 + 4 * decode_step_bytes(
        m, batch, context) / rates.bandwidth) + 10
    if not report.affords(name, estimate):
        return None
    prompts = random_prompts(batch, context, cfg.vocab_size)
    args = types.SimpleNamespace(model=None, temperature=1.0, repeats=1)
    _, _, decode, _, peak = race.hf_row(args, m, plan.dtype, plan.device, prompts, 1, steps, 1, batch * context)
    report.figure(name, decode, "tok/s", f"(generate {steps} - generate 1 new token) / time, peak +{peak:.1f} GiB")
    return decode

# -----------------------------------------------------------------------------
# 2b. Prefill against the matmul rate


def bench_prefill(report: Report, plan: Plan, rates, m, shape: str):
    prompts, length = plan.prefill
    label = f"prefill {shape} {prompts} x {length} tokens"
    if not report.affords(label, (plan.repeats + 1) * prefill_estimate(m, prompts * length, rates) + 5):
        return
    sampler = sample.Sampler(m, kv_cache_tokens=prompts * (length + 32), max_num_seqs=prompts)
    batch = random_prompts(prompts, length, m.config.vocab_size)

    def run():  # one new token: the prefill, and the first token sampled from its logits
        return sampler.generate(batch, max_new_tokens=1, temperature=1.0, seed=0)
    seconds, peak, _ = race.timed(run, run, plan.device, plan.repeats)
    tokens = prompts * length
    flops = 2 * block_params(m) * tokens + 2 * m.config.hidden_size * m.config.vocab_size * prompts
    report.figure(f"{label}: ours", tokens / seconds, "tok/s", f"median of {plan.repeats}, packs of "
                  f"{sampler.max_batch_tokens} tokens, peak +{peak:.1f} GiB")
    report.figure(f"{label}: achieved", flops / seconds / 1e12, "TFLOP/s", "2 x block params per token + the head "
                  "on each prompt's last token")
    report.figure(f"{label}: of matmul rate", flops / seconds / rates.matmul, "", "")

# -----------------------------------------------------------------------------
# 2c. One RL step at the paper's shape


def bench_rl_step(report: Report, plan: Plan, rates):
    """One step the way train.rl_step takes it, timed per phase, on a one-process group (what
    cluster.init makes without torchrun): sample -> reward (random: the update's cost does not depend
    on the values) -> backward over micro-batches (train.accumulate_gradient) -> all-reduce + AdamW
    (train.reduce_and_step). Completions never stop early, so every one is --rl-new-tokens long."""
    import cluster
    import train
    shape, rollouts, new_tokens, prompt_len = plan.shapes[0], plan.rl_rollouts, plan.rl_new_tokens, plan.rl_prompt_len
    prompts = plan.rl_prompts
    share = 0.6 if len(plan.shapes) > 1 else 1.0  # leave the larger model's items some of the budget
    while prompts > 1 and rl_estimate(plan, rates, prompts) > share * (report.budget_s - report.elapsed()):
        prompts //= 2  # scaled down to what the budget allows (the figure names say the size that ran)
    if prompts < plan.rl_prompts:
        print(f"rl: {plan.rl_prompts} prompts would pass the budget; running {prompts}", flush=True)
    label = f"rl {shape} {prompts} prompts x {rollouts} x {new_tokens} new tokens"
    if not report.affords(label, rl_estimate(plan, rates, prompts)):
        return
    available = memory.available_bytes(plan.device)  # before the weights: the plan counts them
    m = race.random_model(shape, plan.dtype, plan.device)
    m.steering.requires_grad_(True)
    cfg = train.TrainConfig(prompts_per_step=prompts, rollouts=rollouts, max_new_tokens=new_tokens,
                            max_len=prompt_len + new_tokens)
    # the KV pool, the backward's micro-batch and recompute as train.setup takes them: the memory plan's
    mem = memory.plan(m.config, plan.dtype, plan.device, available=available, trainable=m.steering.numel(),
                      sequences=prompts * rollouts, longest=cfg.max_len, gpu_memory_fraction=cfg.gpu_memory_fraction)
    print(mem.summary(), flush=True)
    m.checkpoint_blocks = mem.recompute
    cfg = dataclasses.replace(cfg, micro_batch_tokens=mem.micro_batch_tokens)
    own_group = not torch.distributed.is_initialized()
    if own_group:
        cluster.init(plan.device.type)
    try:
        sampler = sample.Sampler(m, kv_cache_tokens=mem.kv_cache_tokens, max_seq_len=cfg.max_len)
        optimizer = torch.optim.AdamW([m.steering], lr=cfg.lr)
        batch = random_prompts(prompts, prompt_len, m.config.vocab_size)
        # warm-up: a short step at full decode batch (512 sequences) compiles kernels and captures graphs
        warm = dataclasses.replace(cfg, max_new_tokens=min(16, new_tokens))
        seconds, peak, (phases, groups) = race.timed(
            lambda: rl_step(m, sampler, optimizer, cfg, batch),
            lambda: rl_step(m, sampler, optimizer, warm, batch[:max(1, 512 // rollouts)]), plan.device, 1)
        report_rl_step(report, plan, rates, m, sampler, label, seconds, peak, phases, groups)
    finally:
        if own_group:
            cluster.close()


def rl_estimate(plan: Plan, rates, prompts: int) -> float:
    """Seconds of the RL step and its warm-up: decode in batches of 512 (the sampler's max_num_seqs),
    then 6 x P FLOPs per token (forward, recomputed forward, input gradients)."""
    with torch.device("meta"):  # parameter counts and bytes without memory
        m = M.Transformer(M.Config.from_dict(race.SHAPES[plan.shapes[0]])).to(plan.dtype)
    sequences = prompts * plan.rl_rollouts
    steps = plan.rl_new_tokens * -(-sequences // 512)
    tokens = sequences * (plan.rl_prompt_len + plan.rl_new_tokens)
    context = plan.rl_prompt_len + plan.rl_new_tokens / 2
    return (decode_estimate(m, steps, min(512, sequences), context, rates)
            + 6 * block_params(m) * tokens / (0.3 * rates.matmul) + 20)


def rl_step(m, sampler, optimizer, cfg, prompts):
    """Returns the seconds of (sampling, reward, forward-backward, all-reduce + optimizer), and the
    groups the backward forwarded."""
    import train
    device = m.embed_tokens.weight.device
    marks = [time.perf_counter()]

    def mark():
        synchronize(device)
        marks.append(time.perf_counter())
    groups = sampler.generate(prompts, n=cfg.rollouts, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                              seed=0)
    mark()
    advantages = rloo.advantages(torch.randint(0, 2, (len(prompts), cfg.rollouts)).float() * 2 - 1)  # (P, N) of +-1
    mark()
    batch = [RG.Group(p, [RG.Rollout(c.tokens, a, c.logprobs) for c, a in zip(group, row)])
             for p, group, row in zip(prompts, groups, advantages.tolist())]
    totals = dict(total_sequences=sum(len(g.rollouts) for g in batch), max_completion_len=cfg.max_new_tokens,
                  total_tokens=sum(len(r.completion) for g in batch for r in g.rollouts))
    batch = RG.with_signal(batch)  # what the backward forwards: zero advantages skipped
    [record] = train.accumulate_gradient(m, [(batch, totals, None)], cfg, None, device, cfg.micro_batch_tokens)
    mark()
    train.reduce_and_step(m, optimizer, cfg, [cfg.lr], record.bad_loss)
    mark()
    return [b - a for a, b in zip(marks, marks[1:])], batch


def report_rl_step(report, plan, rates, m, sampler, label, seconds, peak, phases, groups):
    base_grads = [n for n in m.base_weights() if m.base_weights()[n].grad is not None]
    report.check(f"{label}: frozen base", not base_grads and m.steering.grad is not None,
                 f"base params with .grad after the step: {base_grads or 'none'}")
    for phase, s in zip(("sampling", "reward (random)", "forward-backward", "all-reduce + AdamW"), phases):
        report.figure(f"{label}: {phase}", s, "s", "")
    report.figure(f"{label}: step", seconds, "s", f"{sampler.stats.decode_tokens} decoded tokens, "
                  f"{sampler.stats.preemptions} pre-emptions, pool {sampler.blocks.num_blocks * sampler.block_size} "
                  "tokens")
    report.figure(f"{label}: sampling rate", sampler.stats.decode_tokens / phases[0], "tok/s",
                  "decoded tokens / sampling seconds")
    recompute = f"recompute {'on' if m.checkpoint_blocks else 'off'}"
    if plan.device.type == "cuda":
        report.figure(f"{label}: peak memory", torch.cuda.max_memory_allocated(plan.device) / 2 ** 30, "GiB",
                      f"allocated; +{peak:.1f} GiB over weights and KV pool; {recompute}")
    else:
        report.figure(f"{label}: peak memory", peak, "GiB", f"host RSS rise during the step; {recompute}")
    tokens = sum(g.tokens() for g in groups)  # forwarded: each prompt once, each completion but its last token
    completion = sum(len(r.completion) for g in groups for r in g.rollouts)
    # forward + input gradients: 2 + 2 FLOPs per weight and token (no weight gradients: frozen); the head
    # runs on completion positions only, forward plus its saved expected-row matmul
    flops = 4 * block_params(m) * tokens + 4 * m.config.hidden_size * m.config.vocab_size * completion
    report.figure(f"{label}: forward-backward MFU", flops / phases[2] / rates.matmul, "",
                  f"4 x block params x {tokens} tokens + head, / measured matmul rate")

# -----------------------------------------------------------------------------
# The run


def header(plan: Plan) -> str:
    if plan.device.type == "cuda":
        props = torch.cuda.get_device_properties(plan.device)
        name = f"{props.name} ({props.total_memory / 2 ** 30:.0f} GiB, {props.multi_processor_count} SMs)"
    else:
        name = f"cpu ({torch.get_num_threads()} threads), tiny plan, Triton interpreter"
    import transformers
    triton = paged_attention.triton.__version__ if paged_attention.HAS_TRITON else "absent"
    return f"{name}; torch {torch.__version__}, triton {triton}, transformers {transformers.__version__}"


def main(argv=None) -> int:
    args = parse_args(argv)
    plan = make_plan(args)
    device_name = header(plan)
    print(f"device: {device_name}\nbudget {args.budget_s:.0f} s; checks: "
          f"{','.join(c for c in CHECKS + SPEED if c in args.only)}", flush=True)
    report = Report(args.budget_s, args.out, device_name)
    tmp = Path(tempfile.mkdtemp(prefix="steer-gpu-"))
    try:
        suite = Suite(plan, tmp, args.suite_timeout) if "suite" in args.only else None
        steps = dict(kernels=(check_kernels,), graphs=(check_decode_paths,), hf=(check_hf_logits, tmp),
                     frozen=(check_frozen_base,), train=(check_train, tmp))
        for name, (fn, *extra) in steps.items():
            if name in args.only:
                guarded(report, name, fn, plan, *extra)
        if suite:
            guarded(report, "suite", lambda rep: suite.finish(rep))
        if args.only & set(SPEED):
            run_speed(report, plan, args.only)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report.print_table(device_name)
    report.write_json()
    return 1 if report.failed else 0


def run_speed(report: Report, plan: Plan, only: set[str]):
    rates = guarded(report, "device", measure_device, plan)
    if rates is None:
        return
    for i, shape in enumerate(plan.shapes):
        if only & {"decode", "prefill"} and report.affords(f"{shape} model", 20):
            guarded(report, shape, bench_shape, plan, rates, shape, only)
        if i == 0 and "rl" in only:  # the paper's shape, before the larger model's items
            guarded(report, "rl", bench_rl_step, plan, rates)


def bench_shape(report: Report, plan: Plan, rates, shape: str, only: set[str]):
    m = race.random_model(shape, plan.dtype, plan.device)
    if "decode" in only:
        bench_decode(report, plan, rates, m, shape)
    if "prefill" in only:
        guarded(report, f"prefill {shape}", bench_prefill, plan, rates, m, shape)


if __name__ == "__main__":
    sys.exit(main())
