"""Many vectors, one batch: evaluating K steering vectors one after another against side by side
(one sampler pass, each vector a row of the steering table), on the same problems.

    python bench/many_vectors.py --model /tmp/models/qwen2.5-coder-0.5b-instruct --run runs/gsm8k-s0,runs/gsm8k-of16-s0
    python bench/many_vectors.py --tiny                                         # seconds, for CI

For each K of --vectors, the K vectors (the newest K checkpoints of train.py runs with --run, else
random vectors of a trained vector's size) are evaluated by rl_task.Task.sample, the evaluation
eval.py and lens.py run, on the first --problems GSM8K test problems (--samples each at T = 1,
--max-new-tokens): once one after another (model.steering set to each in turn: eval.py
--sequential), once side by side (eval.py's default). Printed per K: wall seconds of each, seconds
per vector, the speed-up per vector, tokens/s, and the share of samples whose tokens agree between
the two (1.0 in fp32; in bf16 a batch of another shape may round a logit across a sampling
boundary, after which that sample's tokens differ). The device is named; on CUDA each pass starts
and ends synchronised (the sampler syncs every step), after a warm-up pass.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from the repo root

import adapters  # noqa: E402
import model as M  # noqa: E402
from rl_task import Task, math_task  # noqa: E402
from sample import Sampler  # noqa: E402


def checkpoints(run: Path) -> list[Path]:
    """A run's steering-step{N} files, oldest first."""
    steps = {step: f for f in run.iterdir() if (step := adapters.Steering.file_step(f.name)) is not None}
    return [steps[s] for s in sorted(steps)]


def setup(args):
    """(model, task, vectors (K_max, L, d)) as --tiny or --model / --run ask."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    most = max(args.vectors)
    if args.tiny:
        torch.manual_seed(0)
        cfg = M.Config.from_dict(dict(model_type="qwen2", vocab_size=256, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      tie_word_embeddings=True))
        model = M.Transformer(cfg).eval().requires_grad_(False)
        g = torch.Generator().manual_seed(1)
        prompts = [torch.randint(0, 256, (int(n),), generator=g).tolist()
                   for n in torch.randint(8, 33, (args.problems,), generator=g)]
        task = Task("toy", prompts, None, [], None, 0, lambda completions, owners: ([], []))
    else:
        model = M.Transformer.from_pretrained(args.model, dtype=args.dtype or M.auto_dtype(device), device=device)
        task = math_task(args.model, "gsm8k", "test", data_dir=args.data_dir or "", limit=args.problems,
                         lazy_pool=True)  # rows 0..problems-1, never graded here
    if args.run:  # every checkpoint of each run, oldest first: the newest `most` of them
        history = [f for run in args.run.split(",") for f in checkpoints(Path(run))]
        if len(history) < most:
            raise SystemExit(f"--run {args.run}: {len(history)} checkpoints, fewer than --vectors {most}")
        vectors = torch.stack([M.read_steering(f)[0] for f in history[-most:]])
    else:  # random, each layer's row of a trained vector's norm (~0.4 after a dozen steps at lr 3e-3)
        g = torch.Generator().manual_seed(2)
        vectors = torch.randn(most, *model.steering.shape, generator=g)
        vectors = 0.4 * vectors / vectors.norm(dim=-1, keepdim=True)
    return model, task, vectors.to(device)


def timed(model, fn):
    if model.embed_tokens.weight.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if model.embed_tokens.weight.device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def bench(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="", help="a checkpoint folder (Qwen2.5-Coder-0.5B-Instruct for README's table)")
    p.add_argument("--run", default="",
                   help="comma-separated train.py run directories: their checkpoints are the vectors")
    p.add_argument("--tiny", action="store_true", help="a tiny random model and prompts (CI)")
    p.add_argument("--vectors", default="1,8", help="comma-separated K")
    p.add_argument("--problems", type=int, default=16)
    p.add_argument("--samples", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--data-dir", default="")
    p.add_argument("--device", default="")
    p.add_argument("--dtype", default="", help="default: model.auto_dtype of the device")
    args = p.parse_args(argv)
    args.vectors = [int(k) for k in args.vectors.split(",")]
    if not args.tiny and not args.model:
        p.error("--model or --tiny")
    model, task, vectors = setup(args)
    longest = max(map(len, task.prompts)) + args.max_new_tokens
    sequences = max(args.vectors) * len(task.prompts) * args.samples
    sampler = Sampler(model, kv_cache_tokens=sequences * (longest + 16), vocab_size=task.vocab_size,
                      max_seq_len=longest + 16)
    how = dict(samples=args.samples, temperature=1.0, seed=0, max_new_tokens=args.max_new_tokens, max_len=None)
    device = model.embed_tokens.weight.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"device: {name}; {'tiny random model' if args.tiny else args.model} "
          f"({model.embed_tokens.weight.dtype}); {len(task.prompts)} problems x {args.samples} samples, T = 1, "
          f"{args.max_new_tokens} new tokens; vectors: {args.run or 'random'}")
    task.sample(sampler, **dict(how, max_new_tokens=4))  # warm-up: kernels, allocator, thread pool

    def one_after_another(k):
        done = []
        for v in vectors[:k]:
            with torch.no_grad():
                model.steering.copy_(v)
            done.append(task.sample(sampler, **how))
        with torch.no_grad():
            model.steering.zero_()
        return done

    def side_by_side(k):
        model.adapter.set_table(vectors[:k])
        done = task.sample(sampler, **how, vectors=list(range(1, k + 1)))
        return [[s for s in done if s.vector == row] for row in range(1, k + 1)]

    print(f"{'K':>3} {'apart s':>9} {'together s':>11} {'s/vector apart':>15} {'together':>9} {'speed-up':>9} "
          f"{'tok/s apart':>12} {'together':>9} {'same tokens':>12}")
    for k in args.vectors:
        apart, t_apart = timed(model, lambda: one_after_another(k))
        together, t_together = timed(model, lambda: side_by_side(k))
        tokens = sum(len(s.tokens) for run in apart for s in run)
        tokens_together = sum(len(s.tokens) for run in together for s in run)
        pairs = [(a.tokens, b.tokens) for ra, rb in zip(apart, together) for a, b in zip(ra, rb)]
        same = sum(a == b for a, b in pairs) / len(pairs)
        print(f"{k:>3} {t_apart:>9.1f} {t_together:>11.1f} {t_apart / k:>15.2f} {t_together / k:>9.2f} "
              f"{t_apart / t_together:>9.2f} {tokens / t_apart:>12.1f} {tokens_together / t_together:>9.1f} "
              f"{same:>12.2f}")


if __name__ == "__main__":
    bench()
