"""Where an RL step's time goes on a CPU, against this machine's own matmul rate (its roofline).

    python bench/cpu_step.py --model /tmp/models/qwen2.5-coder-0.5b-instruct   # a real checkpoint
    python bench/cpu_step.py --tiny                                            # seconds, for CI

One run prints: the measured bf16 (or fp32) matmul rate; sampling of P prompts x N rollouts
(tokens/s, and the FLOP/s that implies: 2 x params touched per generated token); the
forward + backward of those rollouts, naive (one forward per rollout, prompt included) and as
train.py runs it (zero-advantage rollouts skipped, each prompt forwarded once), with the same
gradient (tokens/s, FLOP/s at 4 x body params per forwarded token -- forward and input gradients,
no weight gradients since the base is frozen -- plus the head on completion tokens); and each as
a share of the matmul rate. The prompts are generated
arithmetic problems (data/arithmetic.py) when the checkpoint has a tokenizer, else random ids.
"""
import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from the repo root

import data  # noqa: E402
import model as M  # noqa: E402
import rollout_groups as RG  # noqa: E402
from sample import Sampler  # noqa: E402


def load_train():
    """train.py's own backward (micro-batching, chunked head, the RLOO loss), as a module."""
    spec = importlib.util.spec_from_file_location("train_for_bench", ROOT / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    return train


def matmul_rate(dtype, n=2048, repeats=5) -> float:
    """FLOP/s of an (n x n) @ (n x n) matmul in `dtype`, median of `repeats` after a warm-up."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / sorted(times)[len(times) // 2]


def body_params(cfg: M.Config) -> int:
    """Weights a token's forward multiplies through, without the embedding lookup and the head."""
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    per_layer = cfg.hidden_size * (2 * q + 2 * kv) + 3 * cfg.hidden_size * cfg.intermediate_size
    return cfg.num_layers * per_layer


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="checkpoint folder")
    what.add_argument("--tiny", action="store_true", help="a tiny random model (CI)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--rollouts", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--dtype", default="auto", help="auto (model.auto_dtype), float32 or bfloat16")
    ap.add_argument("--micro-batch-tokens", type=int, default=4096)
    ap.add_argument("--flat", type=float, default=0.47,
                    help="share of prompts whose rollouts all scored the same (GSM8K, real 0.5B, 512 tokens: 0.47)")
    args = ap.parse_args(argv)
    dtype = M.DTYPES[M.auto_dtype("cpu") if args.dtype == "auto" else args.dtype]

    vocab_size, stop = None, []
    if args.tiny:
        torch.manual_seed(0)
        cfg = M.Config.from_dict(dict(model_type="qwen2", vocab_size=256, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      tie_word_embeddings=True))
        model = M.Transformer(cfg).to(dtype).eval().requires_grad_(False)
        model.set_adapter("steering")  # fp32 zeros, trainable (the cast above rounded the adapter too)
        model.inv_freq = M.rope_inv_freq(cfg)  # .to(dtype) rounded the rotary frequencies
        prompts = torch.randint(0, cfg.vocab_size, (args.prompts, 24)).tolist()
    else:
        model = M.Transformer.from_pretrained(args.model, dtype=dtype)
        cfg = model.config
        tok = data.Tokenizer.from_dir(args.model)
        vocab_size, stop = tok.vocab_size, tok.stop_token_ids
        prompts = [tok.encode_prompt(r["problem"]) for r in data.load("arithmetic", split="train")[:args.prompts]]
    rate = matmul_rate(dtype)
    print(f"{cfg.name or 'tiny'}: {cfg.num_layers} layers, d {cfg.hidden_size}, {dtype}, "
          f"{torch.get_num_threads()} threads; {args.prompts} prompts x {args.rollouts} rollouts, "
          f"{args.max_new_tokens} new tokens")
    print(f"matmul rate ({dtype}, 2048^3): {rate / 1e9:.0f} GFLOP/s")

    sampler = Sampler(model, kv_cache_tokens=args.prompts * args.rollouts * (max(map(len, prompts))
                                                                            + args.max_new_tokens + 16),
                      vocab_size=vocab_size)
    sampler.generate(prompts[:2], n=2, max_new_tokens=4, seed=0)  # warm-up
    t0 = time.perf_counter()
    groups = sampler.generate(prompts, n=args.rollouts, max_new_tokens=args.max_new_tokens, seed=0,
                              stop_token_ids=stop)
    sample_s = time.perf_counter() - t0
    new_tokens = sum(len(c.tokens) for g in groups for c in g)
    head = (vocab_size or cfg.vocab_size) * cfg.hidden_size
    sample_flops = 2 * (body_params(cfg) + head) * new_tokens  # prefill of the shared prompts left out

    # the step's backward twice on the same rollouts: naive (every rollout forwarded alone, prompt
    # included, zero advantages too) and as train.py runs it (RG.with_signal: zero advantages
    # skipped, each prompt forwarded once for its rollouts). A share --flat of the prompts gets
    # all-zero advantages (a group whose rollouts all scored the same), the others +-1.
    train = load_train()
    tcfg = train.TrainConfig(micro_batch_tokens=args.micro_batch_tokens, loss_norm="token")
    flat = round(args.flat * len(prompts))
    grouped = [RG.Group(p, [RG.Rollout(c.tokens, 0.0 if i < flat else (1.0 if k % 2 else -1.0), c.logprobs)
                               for k, c in enumerate(g) if c.tokens])
               for i, (p, g) in enumerate(zip(prompts, groups))]
    naive = [RG.Group(g.prompt, [r]) for g in grouped for r in g.rollouts]
    totals = dict(total_sequences=len(naive), max_completion_len=args.max_new_tokens, total_tokens=float(new_tokens))
    cpu, budget = torch.device("cpu"), tcfg.micro_batch_tokens
    train.accumulate_gradient(model, [(naive[:2], totals, None)], tcfg, vocab_size, cpu, budget)  # warm-up
    rows = [("sampling", sample_s, new_tokens, sample_flops)]
    for name, batch in (("backward naive", naive), ("backward ours", RG.with_signal(grouped))):
        t0 = time.perf_counter()
        [record] = train.accumulate_gradient(model, [(batch, totals, None)], tcfg, vocab_size, cpu, budget)
        seconds = time.perf_counter() - t0
        # forward + input gradients through the body for every forwarded token; the head (forward
        # and the expected-row matmul of model._HeadLogprobs) only for completion tokens
        rows.append((name, seconds, record.forwarded_tokens,
                     4 * body_params(cfg) * record.forwarded_tokens + 4 * head * record.gap_tokens))
    print(f"{flat} of {len(prompts)} prompts flat (zero advantage); {len(naive)} rollouts")
    print(f"{'phase':<16} {'seconds':>8} {'tokens':>7} {'tok/s':>7} {'GFLOP/s':>8} {'of matmul rate':>15}")
    for name, seconds, count, flops in rows:
        print(f"{name:<16} {seconds:>8.3f} {count:>7d} {count / seconds:>7.0f} {flops / seconds / 1e9:>8.0f} "
              f"{flops / seconds / rate:>15.0%}")
    naive_s, ours_s = rows[1][1], rows[2][1]
    print(f"backward: ours {ours_s:.3f} s vs naive {naive_s:.3f} s: {naive_s / ours_s:.2f}x faster, "
          f"{rows[2][2] / rows[1][2]:.0%} of the naive tokens")

if __name__ == "__main__":
    import cluster
    cluster.run_cli(main)
