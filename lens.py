"""Logit lens for steering vectors: which tokens does each layer's vector point at?

For every layer l the vector steering[l] (d,) is compared with every row of the unembedding
matrix W (V, d) by cosine similarity; the k most similar tokens are what adding the vector
pushes towards, the k most negative what it pushes away from. With --after-norm the vector
first goes through the final RMSNorm (its per-channel weights included), i.e. we look at the
direction in logit space the vector would produce if it reached the head on its own. The
paper finds "Because / Therefore"-like clusters at the late layers this way.

    python lens.py --steering runs/x/steering.safetensors [--model M] [--top-k 10] [--after-norm] [--out lens.json]

The base model defaults to the `base_model` named in the steering file's metadata. Only the
tokenizer's real tokens are ranked (Qwen's padding rows past 151,665 are not tokens). A layer
whose vector is zero (never trained) has no direction: it is printed as such and its scores
are all 0.
"""
import argparse
import json
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import data
import model as M


@dataclass
class Lens:
    norms: torch.Tensor  # (L,) |steering[l]|, before any normalisation
    top_ids: torch.Tensor  # (L, k) the most similar token ids, best first
    top_scores: torch.Tensor  # (L, k) their cosines
    bottom_ids: torch.Tensor  # (L, k) the most negative token ids, most negative first
    bottom_scores: torch.Tensor  # (L, k)


@torch.no_grad()
def logit_lens(steering: torch.Tensor, unembedding: torch.Tensor, k: int = 10, norm=None,
               vocab_size: int | None = None, chunk_rows: int = 16384) -> Lens:
    """steering (L, d), unembedding (V, d) -> per layer the top / bottom k tokens by cosine.
    `norm` (e.g. model.norm) is applied to the vectors first; `vocab_size` keeps only the first
    rows of the unembedding. Rows are read in chunks, so no fp32 copy of W is ever made."""
    vecs = steering.detach().float()
    if norm is not None:
        vecs = norm(vecs.to(unembedding.device)).float()
    vecs = F.normalize(vecs, dim=-1).to(unembedding.device)  # (L, d); a zero vector stays zero
    weight = unembedding[:vocab_size] if vocab_size else unembedding
    if not 1 <= k <= weight.shape[0]:
        raise ValueError(f"top-k must be between 1 and the vocabulary size {weight.shape[0]}, got {k}")
    cos = torch.cat([F.normalize(weight[i:i + chunk_rows].float(), dim=-1) @ vecs.T
                     for i in range(0, weight.shape[0], chunk_rows)])  # (V, L)
    top = cos.topk(k, dim=0)  # values, indices (k, L)
    bottom = cos.topk(k, dim=0, largest=False)
    return Lens(norms=steering.detach().float().norm(dim=-1).cpu(),
                top_ids=top.indices.T.cpu(), top_scores=top.values.T.cpu(),
                bottom_ids=bottom.indices.T.cpu(), bottom_scores=bottom.values.T.cpu())

# -----------------------------------------------------------------------------
# Presentation: tokens with visible whitespace, columns aligned across layers.


def show_token(text: str, width: int = 14) -> str:
    """A token as it reads: spaces as ␣, newlines/tabs as \\n/\\t, other control chars as \\xNN."""
    out = []
    for ch in text:
        if ch == " ":
            out.append("␣")
        elif ch in "\n\t\r":
            out.append({"\n": "\\n", "\t": "\\t", "\r": "\\r"}[ch])
        elif not ch.isprintable():
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 256 else f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    shown = "".join(out) or "∅"
    return shown if len(shown) <= width else shown[:width - 1] + "…"


def width(text: str) -> int:
    """Columns `text` takes in a terminal: CJK and other wide characters take two."""
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def pad(text: str, columns: int) -> str:
    return text + " " * (columns - width(text))


def show_score(score: float) -> str:
    return f"{score:.2f}".replace("0.", ".", 1)  # 0.41 -> .41, -0.12 -> -.12


def lens_rows(lens: Lens, decode) -> list[dict]:
    """The lens as JSON-ready rows, one per layer, tokens decoded."""
    rows = []
    for layer in range(lens.norms.shape[0]):
        def entries(ids, scores):
            return [dict(id=int(i), token=decode(int(i)), score=round(float(s), 4))
                    for i, s in zip(ids[layer], scores[layer])]
        rows.append(dict(layer=layer, norm=round(float(lens.norms[layer]), 4),
                         top=entries(lens.top_ids, lens.top_scores),
                         bottom=entries(lens.bottom_ids, lens.bottom_scores)))
    return rows


def format_table(rows: list[dict]) -> str:
    """Two lines per layer (+ top tokens, − bottom tokens), each rank's column aligned."""
    def cells(side):
        return [[f"{show_token(e['token'])} {show_score(e['score'])}" for e in r[side]] for r in rows]

    top, bottom = cells("top"), cells("bottom")
    widths = [max(width(c[i]) for c in top + bottom) for i in range(len(top[0]))]
    norm_w = max(len(f"{r['norm']:.2f}") for r in rows)
    lines = []
    for r, t, b in zip(rows, top, bottom):
        head = f"L{r['layer']:<3d} |v|={r['norm']:>{norm_w}.2f} "
        if r["norm"] == 0:
            lines.append(head + " (zero vector: no direction)")
            continue
        lines.append(head + " + " + " | ".join(pad(c, w) for c, w in zip(t, widths)).rstrip())
        lines.append(" " * len(head) + " − " + " | ".join(pad(c, w) for c, w in zip(b, widths)).rstrip())
    return "\n".join(lines)

# -----------------------------------------------------------------------------
# CLI


def steering_metadata(path) -> dict:
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"steering file {path}: unreadable or corrupt ({e})") from None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steering", required=True, help="steering file (safetensors, tensor 'steering' (L, d))")
    p.add_argument("--model", help="base model folder or hub id (default: base_model in the file's metadata)")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the model's)")
    p.add_argument("--top-k", type=int, default=10, help="tokens shown per side and layer")
    p.add_argument("--after-norm", action="store_true", help="apply the final RMSNorm to each vector first")
    p.add_argument("--out", help="write the lens as JSON here")
    args = p.parse_args(argv)

    if not Path(args.steering).is_file():
        raise FileNotFoundError(f"--steering: {args.steering} is not a file")
    meta = steering_metadata(args.steering)
    model_id = args.model or meta.get("base_model")
    if not model_id:
        raise ValueError(f"{args.steering} names no base_model in its metadata: pass --model")
    model = M.Transformer.from_pretrained(model_id)
    model.load_steering(args.steering)
    tokenizer = data.Tokenizer.from_dir(args.tokenizer or M.resolve_checkpoint(model_id))
    vocab_size = min(tokenizer.vocab_size, model.config.vocab_size)
    lens = logit_lens(model.steering, model.head_weight, args.top_k,
                      norm=model.norm if args.after_norm else None, vocab_size=vocab_size)
    rows = lens_rows(lens, lambda i: tokenizer.decode([i]))

    print(f"logit lens of {args.steering} on {model_id} ({'after' if args.after_norm else 'before'} the final "
          f"norm; cosine with the unembedding rows, top {args.top_k} (+) and bottom {args.top_k} (−))")
    print(format_table(rows))
    if args.out:
        out = dict(steering=args.steering, model=model_id, after_norm=args.after_norm, top_k=args.top_k,
                   metadata=meta, layers=rows)
        Path(args.out).write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
