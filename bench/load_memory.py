"""Host memory and time of `Transformer.from_pretrained` on a ~300 MB random bf16 checkpoint.

The loader promises to stay near one copy of the weights (built on the meta device, filled
tensor by tensor). This writes a Qwen2-shaped random checkpoint as ONE safetensors file
(streamed tensor by tensor, so the writer itself stays small, and one file is the worst case
for the reader's mmap), then loads it in a fresh interpreter per dtype and prints: file size,
RSS after `import torch, model` and after torch's one-time meta-device imports (the baseline),
peak RSS (ru_maxrss), peak - baseline and its ratio to the file size, load seconds, and the
peaks of anonymous vs file-backed RSS sampled during the load (file-backed = pages of the
mmapped checkpoint: clean, reclaimable by the kernel, but counted by ru_maxrss). Then every
weight is read once, since weights that view the mmap only come off the disk when touched.

    python bench/load_memory.py [--folder /tmp/steer_bench_ckpt] [--keep]
"""
import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

CONFIG = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=24000, hidden_size=1024,
              intermediate_size=2048, num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=4,
              rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=4096, tie_word_embeddings=False,
              hidden_act="silu", torch_dtype="bfloat16")


def tensor_shapes(cfg) -> dict[str, tuple]:
    d, f, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = d // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (V, d)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (q, d), p + "self_attn.q_proj.bias": (q,),
            p + "self_attn.k_proj.weight": (kv, d), p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (d, q),
            p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d), p + "mlp.down_proj.weight": (d, f),
        })
    shapes.update({"model.norm.weight": (d,), "lm_head.weight": (V, d)})
    return shapes


def write_checkpoint(folder: Path):
    """Stream a bf16 safetensors file: 8-byte header length, JSON header, then raw tensor bytes in
    header order. Each tensor is made, written and dropped, so the writer holds one at a time."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(CONFIG, indent=1))
    shapes = tensor_shapes(CONFIG)
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes.items():
        nbytes = 2 * math.prod(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header to 8-byte alignment
    gen = torch.Generator().manual_seed(0)
    with open(folder / "model.safetensors", "wb") as out:
        out.write(len(blob).to_bytes(8, "little") + blob)
        for name, shape in shapes.items():
            t = torch.ones(shape) if name.endswith("norm.weight") else 0.02 * torch.randn(shape, generator=gen)
            out.write(t.to(torch.bfloat16).view(torch.int16).numpy().tobytes())


def rss_parts() -> dict[str, int]:
    """Current RssAnon / RssFile in bytes, from /proc/self/status."""
    parts = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("RssAnon:", "RssFile:")):
            key, kb = line.split()[:2]
            parts[key.rstrip(":")] = int(kb) * 1024
    return parts


def measure(folder: str, dtype: str):
    """Runs in a fresh interpreter: one load, figures printed as one JSON line."""
    import model  # imported before the baseline: its import cost is not the loader's
    warm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    # The first random init on the meta device imports ~900 modules of torch's meta kernels (sympy
    # among them), a one-time cost that training pays anyway (checkpointed backward imports the
    # same): paid here so the baseline isolates the loader, and reported on its own.
    with torch.device("meta"):
        torch.nn.Embedding(2, 2)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peaks, done = {"RssAnon": 0, "RssFile": 0}, threading.Event()

    def sample():  # ru_maxrss has no breakdown, so watch the two kinds of pages while loading
        while not done.is_set():
            for k, v in rss_parts().items():
                peaks[k] = max(peaks[k], v)
            time.sleep(0.002)

    before = rss_parts()
    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    t0 = time.perf_counter()
    m = model.Transformer.from_pretrained(folder, dtype=getattr(torch, dtype))
    seconds = time.perf_counter() - t0
    done.set()
    watcher.join()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    after = rss_parts()
    params = sum(p.numel() * p.element_size() for p in m.parameters())
    # safetensors hands out tensors that view its mmap when no cast is needed: those weights stay
    # file-backed and are only read from disk when first touched (here: by summing them)
    mapped = mapped_by(m.embed_tokens.weight.data_ptr())
    t0 = time.perf_counter()
    with torch.no_grad():
        for p in m.parameters():
            p.sum()  # in the weight's dtype: no fp32 copy to blur the figure
    touch = time.perf_counter() - t0
    print(json.dumps(dict(warm=warm, baseline=baseline, peak=peak, seconds=seconds, params_bytes=params,
                          anon_before=before["RssAnon"], file_before=before["RssFile"],
                          anon_peak=peaks["RssAnon"], file_peak=peaks["RssFile"], after=after, mapped=mapped,
                          touch_seconds=touch, touched=rss_parts(),
                          peak_touched=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)))


def mapped_by(address: int) -> str:
    """The file (or anonymous memory) behind an address, from /proc/self/maps."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if lo <= address < hi:
            return fields[5] if len(fields) > 5 else "anonymous memory"
    return "?"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", default="/tmp/steer_bench_ckpt")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint folder afterwards")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: the child process
    parser.add_argument("--dtype", default="bfloat16", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        return measure(args.measure, args.dtype)

    folder = Path(args.folder)
    if not (folder / "model.safetensors").is_file():
        write_checkpoint(folder)
    size = (folder / "model.safetensors").stat().st_size
    mb = 2 ** 20
    print(f"checkpoint {folder}/model.safetensors: {size / mb:.1f} MiB (bf16, one file)")
    for dtype in ("bfloat16", "float32"):
        root = str(Path(__file__).resolve().parents[1])  # where model.py lives
        child = subprocess.run([sys.executable, __file__, "--measure", str(folder), "--dtype", dtype],
                               capture_output=True, text=True, env={**os.environ, "PYTHONPATH": root})
        if child.returncode:
            sys.exit(f"measuring {dtype} failed:\n{child.stderr}")
        r = json.loads(child.stdout.strip().splitlines()[-1])
        grown = r["peak"] - r["baseline"]
        print(f"\nload as {dtype}: model {r['params_bytes'] / mb:.1f} MiB, {r['seconds']:.2f} s")
        print(f"  RSS after import torch, model         {r['warm'] / mb:8.1f} MiB")
        print(f"  RSS baseline (+ torch's meta imports) {r['baseline'] / mb:8.1f} MiB")
        print(f"  RSS peak (ru_maxrss)                  {r['peak'] / mb:8.1f} MiB")
        print(f"  peak - baseline                       {grown / mb:8.1f} MiB = {grown / size:.2f} x file size")
        print(f"  sampled peak anonymous RSS growth     {(r['anon_peak'] - r['anon_before']) / mb:8.1f} MiB "
              f"= {(r['anon_peak'] - r['anon_before']) / size:.2f} x file size")
        print(f"  sampled peak file-backed RSS growth   {(r['file_peak'] - r['file_before']) / mb:8.1f} MiB "
              f"(mmapped checkpoint pages)")
        print(f"  after load: anonymous {r['after']['RssAnon'] / mb:.1f} MiB, file-backed "
              f"{r['after']['RssFile'] / mb:.1f} MiB; embed_tokens.weight lives in {r['mapped']}")
        print(f"  after touching every weight ({r['touch_seconds']:.2f} s): anonymous "
              f"{r['touched']['RssAnon'] / mb:.1f} MiB, file-backed {r['touched']['RssFile'] / mb:.1f} MiB, "
              f"peak - baseline {(r['peak_touched'] - r['baseline']) / mb:.1f} MiB "
              f"= {(r['peak_touched'] - r['baseline']) / size:.2f} x file size")
    if not args.keep:
        shutil.rmtree(folder)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import cluster
    cluster.run_cli(main)
