"""memory.py's estimate of a backward's peak against what a real one takes, on CPU.

    python bench/memory.py --model /tmp/models/qwen2.5-coder-0.5b-instruct [--shapes 1x1024,4x1024,8x512]
    python bench/memory.py --model ... --return-freed   # with memory.return_freed_host_memory()

Each (shape, recompute) runs in a fresh interpreter: load the model, a tiny warm-up backward,
reset the peak RSS (/proc/self/clear_refs), then one backward of loss = sum of
chunked_logprobs(hidden_states(x), head, x) into the steering vectors. Printed per row: what
autograd saved (summed by a saved_tensors_hooks over distinct non-parameter storages) beside
memory.saved_bytes_per_token x tokens, and the peak RSS growth beside memory's peak estimate
(activation_bytes_per_token x tokens + head_bytes). RSS counts what glibc keeps cached too: freed
tensors below its (dynamic, up to 32 MiB) mmap threshold stay in the heap, so the default
allocator's peak exceeds the live bytes; --return-freed calls memory.return_freed_host_memory()
first (what train.py does on CPU), after which RSS tracks them.
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from the repo root

import memory  # noqa: E402
import model as M  # noqa: E402

MiB = 2 ** 20


def rss(key: str) -> int:
    """VmRSS / VmHWM of this process in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def child(folder: str, dtype: str, batch: int, length: int, recompute: bool, return_freed: bool) -> dict:
    """One backward, measured in this (fresh) process: bytes autograd saved, peak RSS growth."""
    if return_freed:
        memory.return_freed_host_memory()
    model = M.Transformer.from_pretrained(folder, dtype=dtype)
    model.checkpoint_blocks = recompute
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    gen = torch.Generator().manual_seed(0)

    def backward(B, T, pack=lambda t: t):
        x = torch.randint(0, model.config.vocab_size, (B, T), generator=gen)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = M.chunked_logprobs(model.hidden_states(x), model.head_weight, x).sum()
        loss.backward()
        model.steering.grad = None

    backward(1, 16)  # threads, kernels, lazy imports: not part of the measured peak
    saved = {}

    def pack(t):  # distinct storages, parameters excluded (they exist before the backward)
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    base = rss("VmRSS")
    backward(batch, length, pack)
    return dict(saved=sum(saved.values()), growth=rss("VmHWM") - base)


def measure(folder, dtype: str, batch: int, length: int, recompute: bool, return_freed: bool = False) -> dict:
    """child() in a fresh interpreter (its peak is this shape's alone)."""
    args = [sys.executable, __file__, "--child", "--model", str(folder), "--dtype", dtype,
            "--shapes", f"{batch}x{length}", "--recompute", "on" if recompute else "off"] + ["--return-freed"] * return_freed
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def estimate(cfg: M.Config, dtype: str, tokens: int, recompute: bool) -> dict:
    dt = M.resolve_dtype(dtype, None)
    return dict(saved=tokens * memory.saved_bytes_per_token(cfg, dt, recompute),
                peak=tokens * memory.activation_bytes_per_token(cfg, dt, recompute)
                + memory.head_bytes(cfg, dt, tokens))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="/tmp/models/qwen2.5-coder-0.5b-instruct")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--shapes", default="1x1024,4x1024,8x512", help="batch x length, comma-separated")
    p.add_argument("--recompute", default="off,on", help="off, on or off,on")
    p.add_argument("--return-freed", action="store_true", help="call memory.return_freed_host_memory() first")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
    modes = [m == "on" for m in args.recompute.split(",")]
    if args.child:
        print(json.dumps(child(args.model, args.dtype, *shapes[0], modes[0], args.return_freed)))
        return
    folder = M.resolve_checkpoint(args.model)
    cfg = M.Config.from_json(folder / "config.json")
    allocator = "memory.return_freed_host_memory()" if args.return_freed else "glibc's default allocator"
    print(f"{args.model}, {args.dtype}, CPU, {allocator}")
    print(f"{'shape':>9} {'recompute':>9} {'saved est':>10} {'saved':>10} {'peak est':>10} {'peak RSS':>10} {'est/RSS':>8}")
    for B, T in shapes:
        for rec in modes:
            est, got = estimate(cfg, args.dtype, B * T, rec), measure(folder, args.dtype, B, T, rec, args.return_freed)
            print(f"{B:>4}x{T:<4} {'on' if rec else 'off':>9} {est['saved'] / MiB:>7.0f} MiB {got['saved'] / MiB:>6.0f} MiB "
                  f"{est['peak'] / MiB:>6.0f} MiB {got['growth'] / MiB:>6.0f} MiB {est['peak'] / got['growth']:>8.2f}",
                  flush=True)


if __name__ == "__main__":
    import cluster
    cluster.run_cli(main)
