"""What each adapter costs at the paper's model shapes: trainable numbers, optimizer memory and
the bytes all-reduced per step (the paper's Tables 3 / 5, from our own code).

    python bench/adapters.py            # markdown table on stdout
    python bench/adapters.py --tiny     # a tiny shape (CI keeps this alive)

The models are built on the meta device from each checkpoint's published config.json numbers,
so nothing is allocated or downloaded; adapters.py's adapters report their own sizes
(num_trainable, trainable_bytes). Optimizer state is AdamW's two fp32 moments; full fine-tuning
of a bf16 model also keeps fp32 master weights. The all-reduce is train.py's one flat fp32
gradient buffer per step.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import model as M  # noqa: E402

# config.json numbers of the hub checkpoints (hidden, ffn, layers, heads, kv heads, vocab, tied)
SHAPES = {
    "Qwen2.5-1.5B": ("qwen2", 1536, 8960, 28, 12, 2, 151936, True),
    "Qwen2.5-7B": ("qwen2", 3584, 18944, 28, 28, 4, 152064, False),
    "Qwen2.5-14B": ("qwen2", 5120, 13824, 48, 40, 8, 152064, False),
    "Llama-3.1-8B": ("llama", 4096, 14336, 32, 32, 8, 128256, False),
}
TINY = {"tiny": ("qwen2", 64, 128, 2, 4, 2, 96, True)}
SETUPS = (("steering", "steering", {}), ("LoRA-1", "lora", dict(lora_rank=1)), ("LoRA-4", "lora", dict(lora_rank=4)),
          ("full", "full", {}))  # (row name, --adapter, its options)


def meta_model(shape) -> M.Transformer:
    kind, d, ffn, layers, heads, kv, vocab, tied = shape
    cfg = M.Config.from_dict(dict(model_type=kind, hidden_size=d, intermediate_size=ffn, num_hidden_layers=layers,
                                  num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                                  tie_word_embeddings=tied))
    with torch.device("meta"):
        model = M.Transformer(cfg).to(torch.bfloat16)  # the paper trains in bf16
    model.fingerprint = lambda: "meta"  # meta tensors have no values to hash (full fine-tuning asks)
    return model


def costs(shape) -> list[dict]:
    rows = []
    for name, kind, options in SETUPS:
        model = meta_model(shape)
        model.set_adapter(kind, **options)
        size = model.trainable_bytes()
        base = sum(p.numel() for p in model.base_weights().values())
        rows.append(dict(setup=name, trainable=model.num_trainable(), share=model.num_trainable() / base,
                         optimizer=size["optimizer"] + size["masters"], allreduce=size["grads"]))
    return rows


def human(n: float) -> str:
    """Bytes with binary prefixes: 1 KiB = 1024 B."""
    for prefix in ("", "Ki", "Mi", "Gi", "Ti"):
        if abs(n) < 1024 or prefix == "Ti":
            return f"{n:.3g} {prefix}B" if prefix else f"{n:.0f} B"
        n /= 1024


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny shape only (CI)")
    args = ap.parse_args(argv)
    print("| model | setup | trainable | share of the base | optimizer state | all-reduce / step |")
    print("|---|---|---:|---:|---:|---:|")
    for model_name, shape in (TINY if args.tiny else SHAPES).items():
        for r in costs(shape):
            print(f"| {model_name} | {r['setup']} | {r['trainable']:,} | {100 * r['share']:.4f} % | "
                  f"{human(r['optimizer'])} | {human(r['allreduce'])} |")


if __name__ == "__main__":
    import cluster
    cluster.run_cli(main)
