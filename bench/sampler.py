"""The sampler against HF transformers `generate` on the same model and batch, and on CUDA against
the HBM roofline: prefill / decode / overall tokens per second and peak memory.

    python bench/sampler.py --tiny                   # tiny random model, CPU, seconds
    python bench/sampler.py --model DIR              # a checkpoint: GSM8K test prompts in its chat template
    python bench/sampler.py --shape qwen2.5-1.5b     # random weights with a real model's shapes

Sequences never stop early (no stop ids, HF with eos_token_id=None), so both engines generate
exactly the same number of tokens. Prefill tok/s counts the prompt tokens served (n x prompt
tokens): our sampler prefills a shared prompt once, HF once per rollout.
"""
import argparse
import os
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from the repo root

import data  # noqa: E402
import model as M  # noqa: E402
from sample import Sampler  # noqa: E402

SHAPES = {  # random weights with a real model's shapes
    "qwen2.5-1.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         tie_word_embeddings=True, rope_theta=1000000.0),
    "tiny": dict(model_type="qwen2", vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
}


def parse_args(argv):
    ap = argparse.ArgumentParser(description="Benchmark the sampler (prefill / decode tokens/s, peak memory) "
                                             "against HF transformers generate on the same model and batch.")
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="checkpoint folder (with tokenizer.json): GSM8K prompts in its chat template")
    what.add_argument("--shape", choices=[s for s in SHAPES if s != "tiny"], help="random weights, real shapes")
    what.add_argument("--tiny", action="store_true", help="a tiny random model: runs on CPU in seconds")
    ap.add_argument("--prompts", type=int, help="number of prompts (default 8 with --model, 256 with --shape)")
    ap.add_argument("--n", type=int, help="rollouts per prompt (default 4 with --model, 1 otherwise)")
    ap.add_argument("--prompt-len", type=int, default=256, help="random prompt length without --model")
    ap.add_argument("--max-new-tokens", type=int, help="default 256 (--model), 1024 (--shape), 32 (--tiny)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--dtype", choices=sorted(M.DTYPES),
                    help="default: bfloat16 on CUDA and on CPUs that multiply bf16 natively, else float32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--kv-cache-tokens", type=int, help="pool size (default: from memory)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs after a warm-up (median reported)")
    ap.add_argument("--data-dir", help=f"folder with gsm8k_test.jsonl (default ${data.ENV_VAR}, else ../shared/data)")
    ap.add_argument("--no-hf", action="store_true", help="skip the HF transformers reference")
    ap.add_argument("--threads", type=int, help="CPU threads for both engines (1 avoids OpenMP thrashing on a "
                                                 "machine shared with other jobs)")
    return ap.parse_args(argv)

# -----------------------------------------------------------------------------
# What runs: a model and its prompts


def checkpoint_prompts(args):
    """A checkpoint with the first GSM8K test problems in its chat template (token ids), and the
    tokenizer's vocabulary size (the sampler never draws the padding rows past it)."""
    rows = data.load("gsm8k", split="test", data_dir=data.default_dir(args.data_dir))[:args.prompts]
    tok = data.Tokenizer.from_dir(args.model)
    return [tok.encode_prompt(r["problem"]) for r in rows], tok.vocab_size


def random_model(name, dtype, device):
    """Random weights with the shapes of SHAPES[name]: base weights in `dtype`, steering fp32 (as
    from_pretrained gives them)."""
    cfg = M.Config.from_dict(SHAPES[name], source=name)
    with torch.device(device):
        m = M.Transformer(cfg).eval()
    for pname, p in m.named_parameters():
        if not pname.startswith("adapter."):
            # small-variance init so activations stay sane through 28 layers
            p.data = (torch.randn_like(p) * 0.02 if p.dim() > 1 else p.data).to(dtype)
    return m.requires_grad_(False)


def hf_twin(model, dtype, device, path=None):
    """An HF transformers model holding the same weights as ours (the reference to race against)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    if path:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    cfg = model.config
    hf_cfg = AutoConfig.for_model(cfg.model_type, vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                                  intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                                  num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                                  rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
                                  tie_word_embeddings=cfg.tie_word_embeddings, max_position_embeddings=32768)
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype).eval()
    # our names are HF's without the "model." prefix; lm_head is HF's own top-level module
    state = {("" if k.startswith("lm_head") else "model.") + k: v for k, v in model.base_weights().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in k or "rotary" in k for k in missing), (missing, unexpected)
    return hf

# -----------------------------------------------------------------------------
# Measuring


class PeakRSS:
    """Peak resident memory above the starting level while the block runs (CPU), sampled every 5 ms."""

    def __enter__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.start = self.peak = self._rss()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _rss(self):
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _watch(self):
        while not self.done.wait(0.005):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.gib = (max(self.peak, self._rss()) - self.start) / 2 ** 30


def timed(fn, warmup, device, repeats):
    """Median seconds over `repeats` calls of fn after one call of warmup, the peak extra memory
    (GiB), and the last call's result."""
    warmup()
    times, peak = [], 0.0
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
            peak = max(peak, (torch.cuda.max_memory_allocated(device) - base) / 2 ** 30)
        else:
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                out = fn()
                times.append(time.perf_counter() - t0)
            peak = max(peak, mem.gib)
    times.sort()
    return times[len(times) // 2], peak, out


def copy_bandwidth(device):
    """Device-to-device copy bandwidth in bytes/s (reads + writes), the HBM roofline's denominator."""
    x = torch.empty(2 ** 29, dtype=torch.float32, device=device)  # 2 GiB
    y = torch.empty_like(x)
    y.copy_(x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        y.copy_(x)
    end.record()
    torch.cuda.synchronize(device)
    return 10 * 2 * x.numel() * 4 / (start.elapsed_time(end) / 1e3)

# -----------------------------------------------------------------------------
# The race


def hf_row(args, m, dtype, device, prompts, n, max_new, warm_new, served):
    """HF generate on the same left-padded batch: (name, prefill tok/s, decode tok/s, overall tok/s, peak GiB)."""
    hf = hf_twin(m, dtype, device, args.model)
    batch, width = len(prompts) * n, max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)  # (P, width)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    sampling = dict(do_sample=True, temperature=args.temperature, top_k=0, top_p=1.0) \
        if args.temperature > 0 else dict(do_sample=False)

    def run(new):
        with torch.inference_mode():
            return hf.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                               num_return_sequences=n, pad_token_id=0, eos_token_id=None, **sampling)
    # HF prefill = generate with 1 new token; HF decode = the rest of a full run
    prefill_s, _, _ = timed(lambda: run(1), lambda: run(1), device, args.repeats)
    total_s, peak, out = timed(lambda: run(max_new), lambda: run(warm_new), device, args.repeats)
    assert out.shape == (batch, width + max_new), out.shape
    return ("HF generate", served / prefill_s, batch * (max_new - 1) / (total_s - prefill_s),
            batch * max_new / total_s, peak)


def print_roofline(m, dtype, device, prompts, n, max_new, decode_tok_s):
    """Each decode step reads every weight once plus the KV of all running sequences: at copy
    bandwidth that bounds decode tokens/s."""
    batch = len(prompts) * n
    weight_bytes = sum(p.numel() * p.element_size() for p in m.parameters())
    mean_len = sum(map(len, prompts)) / len(prompts) + max_new / 2
    step_bytes = weight_bytes + batch * mean_len * M.kv_bytes_per_token(m.config, dtype)
    bw = copy_bandwidth(device)
    roof = batch * bw / step_bytes
    print(f"HBM roofline: {step_bytes / 2 ** 30:.2f} GiB per decode step (weights {weight_bytes / 2 ** 30:.2f} "
          f"+ KV at mean length {mean_len:.0f}) at copy bandwidth {bw / 1e9:.0f} GB/s -> {roof:.0f} tok/s; "
          f"ours reaches {decode_tok_s / roof:.0%}")


def bench(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = M.DTYPES[args.dtype or M.auto_dtype(device)]
    torch.manual_seed(0)

    vocab_size = None  # the model's own, for random weights
    if args.model:
        m = M.Transformer.from_pretrained(args.model, dtype=dtype, device=device)
        args.prompts = args.prompts or 8
        prompts, vocab_size = checkpoint_prompts(args)
        n, max_new = args.n or 4, args.max_new_tokens or 256
    else:
        m = random_model("tiny" if args.tiny else args.shape, dtype, device)
        count = args.prompts or (4 if args.tiny else 256)
        length = 16 if args.tiny and args.prompt_len == 256 else args.prompt_len
        prompts = torch.randint(0, m.config.vocab_size, (count, length)).tolist()
        n, max_new = args.n or 1, args.max_new_tokens or (32 if args.tiny else 1024)

    cfg = m.config
    batch = len(prompts) * n
    print(f"model {cfg.name or args.shape or 'tiny'}: L={cfg.num_layers} d={cfg.hidden_size} "
          f"heads={cfg.num_heads}/{cfg.num_kv_heads} V={cfg.vocab_size} {dtype} on {device}; "
          f"{len(prompts)} prompts x n={n} = {batch} sequences, prompt tokens {sum(map(len, prompts))}, "
          f"{max_new} new tokens each (stop ids ignored), temperature {args.temperature}, "
          f"{torch.get_num_threads()} CPU threads")
    kv_tokens = args.kv_cache_tokens
    if kv_tokens is None and device.type == "cpu":  # room for everything at once, not the 2 GiB default
        kv_tokens = batch * (max(map(len, prompts)) + max_new + 16)
    sampler = Sampler(m, kv_cache_tokens=kv_tokens, vocab_size=vocab_size, max_num_seqs=max(batch, 1))

    def run(new):
        return sampler.generate(prompts, n=n, max_new_tokens=new, temperature=args.temperature, seed=0)
    warm_new = max_new if device.type == "cuda" else min(max_new, 8)  # GPU: compile + capture every batch size
    seconds, peak, _ = timed(lambda: run(max_new), lambda: run(warm_new), device, args.repeats)
    st = sampler.stats
    served = n * sum(map(len, prompts))  # prompt tokens served; a shared prompt is computed once
    rows = [("ours", served / st.prefill_seconds, st.decode_tokens / st.decode_seconds,
             batch * max_new / seconds, peak)]
    print(f"ours: pool {sampler.blocks.num_blocks} blocks x {sampler.block_size} tokens, peak blocks used "
          f"{st.peak_blocks_used}, pre-emptions {st.preemptions}, decode steps {st.decode_steps}")
    if not args.no_hf:
        rows.append(hf_row(args, m, dtype, device, prompts, n, max_new, warm_new, served))

    print(f"{'engine':<12} {'prefill tok/s':>14} {'decode tok/s':>13} {'overall new tok/s':>18} {'peak mem GiB':>13}")
    for name, pre, dec, overall, mem in rows:
        print(f"{name:<12} {pre:>14.1f} {dec:>13.1f} {overall:>18.1f} {mem:>13.2f}")
    if not args.no_hf:
        print("prefill tok/s = prompt tokens served (n x prompt tokens) / prefill time; HF prefill = generate "
              "with 1 new token over the left-padded batch, HF decode = the rest")
    if device.type == "cuda":
        print_roofline(m, dtype, device, prompts, n, max_new, rows[0][2])


if __name__ == "__main__":
    import cluster
    cluster.run_cli(bench)
