"""Sampling on a CPU that something else is using: tokens/s with 0 and 1 competing processes,
with the thread count pinned to every core (PyTorch's default, what the project did before
cluster.CpuShare) and with CpuShare choosing it.

    python bench/cpu_contention.py --model /tmp/models/smollm2-135m-instruct
    python bench/cpu_contention.py --tiny                                      # seconds, for CI

Each cell is a fresh process (so one setting never inherits another's thread pool) that loads
the model, then times Sampler.generate on the same prompts (greedy, so every cell decodes the same
tokens). The competitor is what a laptop always has: one busy single-threaded process (a Python
loop), started before the timed process and stopped after it. "pinned" sets OMP_NUM_THREADS to
the core count, which also turns CpuShare off; "CpuShare" leaves it unset.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from the repo root

import model as M  # noqa: E402
from sample import Sampler  # noqa: E402

BUSY = "while True: pass"


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def measure(args) -> dict:
    """In the timed process: generate, and report tokens/s and the threads torch ended with."""
    if args.tiny:
        torch.manual_seed(0)
        cfg = M.Config.from_dict(dict(model_type="qwen2", vocab_size=256, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      tie_word_embeddings=True))
        model = M.Transformer(cfg).eval().requires_grad_(False)
    else:
        model = M.Transformer.from_pretrained(args.model, dtype=M.auto_dtype("cpu"))
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, min(model.config.vocab_size, 32000), (args.prompts, 32), generator=g).tolist()
    sampler = Sampler(model, kv_cache_tokens=args.prompts * (32 + args.max_new_tokens + 32))
    t0 = time.perf_counter()
    results = sampler.generate(prompts, n=1, max_new_tokens=args.max_new_tokens, temperature=0)
    seconds = time.perf_counter() - t0
    tokens = sum(len(c.tokens) for r in results for c in r)
    return dict(tokens=tokens, seconds=seconds, threads=torch.get_num_threads())


def cell(args, pinned: bool, competitors: int) -> dict:
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    if pinned:
        env["OMP_NUM_THREADS"] = str(cores())
    busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(competitors)]
    try:
        time.sleep(0.5 if competitors else 0)  # the competitor is running before we start
        child = [sys.executable, __file__, "--child", "--prompts", str(args.prompts), "--max-new-tokens",
                 str(args.max_new_tokens)] + (["--tiny"] if args.tiny else ["--model", args.model])
        out = subprocess.run(child, env=env, capture_output=True, text=True, check=True, timeout=3600)
    finally:
        for p in busy:
            p.kill()
            p.wait()
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="checkpoint folder")
    what.add_argument("--tiny", action="store_true", help="a tiny random model (CI)")
    ap.add_argument("--prompts", type=int, default=4, help="sequences decoded together")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args)))
        return
    name = "tiny" if args.tiny else Path(args.model).name
    print(f"{name}: {args.prompts} sequences x {args.max_new_tokens} new tokens, greedy, {cores()} cores, "
          f"torch {torch.__version__}")
    print(f"{'threads':<22} {'competitors':>11} {'threads used':>12} {'seconds':>8} {'tok/s':>8} {'vs quiet':>8}")
    for pinned in (True, False):
        quiet = None
        for competitors in (0, 1):
            r = cell(args, pinned, competitors)
            rate = r["tokens"] / max(r["seconds"], 1e-9)
            quiet = quiet or rate
            label = f"pinned to {cores()} (before)" if pinned else "CpuShare (now)"
            print(f"{label:<22} {competitors:>11} {r['threads']:>12} {r['seconds']:>8.2f} {rate:>8.1f} "
                  f"{rate / quiet:>8.2f}")


if __name__ == "__main__":
    main()
