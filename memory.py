"""One memory plan for a run: weights, training state, the sampler's KV pool and the backward's
activations, against the memory the device has, so that defaults never get a run killed.

    avail = memory.available_bytes(device)          # BEFORE the model loads: the plan counts weights
    plan = memory.plan(cfg, dtype, device, available=avail, adapter="steering", trainable=L * d,
                       sequences=64, longest=512)   # None (auto) for micro_batch_tokens, recompute, kv_cache_tokens
    print(plan.summary())                            # memory plan (cpu, 22.1 GiB available): ...

The backward's peak over a micro-batch of N padded tokens is modelled as
    N * (what autograd saves per token + the backward's transient per token) + the head's chunk
(see `activation_bytes_per_token`; tests/test_memory.py checks it against what autograd saves and
against peak RSS). A run sees two phases that never overlap: sampling (KV pool + logits of the
running sequences) and the backward (KV pool, still allocated, + activations).
"""
import inspect
import json
import math
import os
from dataclasses import asdict, dataclass

import torch

import model as M
from adapters import Steering, adapter_class

GiB, KiB = 2 ** 30, 2 ** 10
HEADROOM = 0.15  # share of available memory never planned: estimate error (< 10 %), allocator caches, NCCL
# the sampler's batch limits (sample.Sampler's defaults), which size its transient: tokens in one
# packed prefill, and sequences decoded at once
SAMPLER_MAX_BATCH_TOKENS = 8192
SAMPLER_MAX_NUM_SEQS = 512
HEAD_CHUNK = inspect.signature(M.chunked_logprobs).parameters["chunk_size"].default  # head rows at a time


class MemoryPlanError(ValueError):
    pass


def available_bytes(device) -> int:
    """Free memory on `device`: CUDA's free bytes, or on CPU the kernel's MemAvailable (what a new
    allocation can take without swapping)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def return_freed_host_memory() -> bool:
    """Make freed tensors leave the process at once (glibc, Linux). glibc serves blocks below its
    mmap threshold from the heap and keeps them when freed; the threshold grows (up to 32 MiB) to the
    largest block freed, so a backward's many 1-32 MiB tensors end in a heap that does not shrink:
    peak RSS 1.2-1.8x the live bytes this plan counts (bench/memory.py). Fixing the threshold at
    1 MiB maps every tensor from 1 MiB up on its own and unmaps it when freed; the cost is a page
    fault per 4 KiB of new tensor. Returns whether it took effect (False off glibc)."""
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_MMAP_THRESHOLD = -3  # malloc.h
    return libc.mallopt(M_MMAP_THRESHOLD, 2 ** 20) == 1


def weight_count(cfg: M.Config) -> int:
    """Base parameters of `cfg` (checked against a loaded model in tests/test_memory.py)."""
    d, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    attn = d * (q + 2 * kv) + (q + 2 * kv) * cfg.qkv_bias + q * d
    block = attn + 3 * d * cfg.intermediate_size + 2 * d
    return cfg.num_layers * block + cfg.vocab_size * d * (1 if cfg.tie_word_embeddings else 2) + d


def saved_bytes_per_token(cfg: M.Config, dtype: torch.dtype, recompute: bool, adapter=Steering) -> int:
    """Bytes autograd keeps per token until the backward reaches them (base linears are frozen and
    save no input). Per block: SDPA's q, k, v, output and fp32 logsumexp; the MLP's gate,
    silu(gate) and up; each RMSNorm's fp32 input; plus what the adapter's gradient needs
    (Adapter.block_saved_bytes), in the blocks that see a trainable input (Adapter.saved_blocks).
    Once: the final norm's fp32 input, rope's cos and sin, the head's E_p[W] (d) and its int64
    indices. With recompute only each block's input stays (and the once-terms). `adapter`: an
    adapter kind's name or class (adapters.py), here and below."""
    size, f32 = dtype.itemsize, torch.promote_types(dtype, torch.float32).itemsize
    d, D = cfg.hidden_size, cfg.head_dim
    once = f32 * d + 2 * D * size + d * size + 24
    if recompute:
        return cfg.num_layers * d * size + once
    adapter = adapter_class(adapter)
    return adapter.saved_blocks(cfg) * block_bytes_per_token(cfg, dtype, adapter) + once


def block_bytes_per_token(cfg: M.Config, dtype: torch.dtype, adapter=Steering) -> int:
    """What one block saves per token (see saved_bytes_per_token)."""
    size, f32 = dtype.itemsize, torch.promote_types(dtype, torch.float32).itemsize
    d, ffn = cfg.hidden_size, cfg.intermediate_size
    attn = (2 * cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim * size + 4 * cfg.num_heads
    return attn + 3 * ffn * size + 2 * f32 * d + adapter_class(adapter).block_saved_bytes(cfg, dtype)


def activation_bytes_per_token(cfg: M.Config, dtype: torch.dtype, recompute: bool, adapter=Steering) -> int:
    """Peak bytes per padded token of a backward micro-batch (the head's chunk comes on top): what is
    saved, plus a block's backward (~3 ffn-sized gradients at once), plus with recompute the
    activations of the one block being redone."""
    transient = 3 * cfg.intermediate_size * dtype.itemsize
    if recompute:
        transient += block_bytes_per_token(cfg, dtype, adapter)
    return saved_bytes_per_token(cfg, dtype, recompute, adapter) + transient


def head_bytes(cfg: M.Config, dtype: torch.dtype, tokens: int, adapter=Steering) -> int:
    """The head's transient: one chunk of rows at a time, each row's bytes as the adapter says
    (Adapter.head_bytes_per_row: a frozen head, or a trained one)."""
    rows = min(HEAD_CHUNK, tokens)
    return rows * adapter_class(adapter).head_bytes_per_row(cfg, dtype, tokens > HEAD_CHUNK)


def sampling_bytes(cfg: M.Config, dtype: torch.dtype, sequences: int, prefill_tokens=SAMPLER_MAX_BATCH_TOKENS,
                   max_seqs=SAMPLER_MAX_NUM_SEQS) -> int:
    """The sampler's transient beside its KV pool: a packed prefill's MLP (~3 ffn per token, one layer at
    a time) or the running sequences' logits, log-probs, probabilities and fp64 CDF (~6 fp32 rows of V)."""
    return max(prefill_tokens * 3 * cfg.intermediate_size * dtype.itemsize, min(sequences, max_seqs) * 24 * cfg.vocab_size)


@dataclass
class Plan:
    device: str
    available: int  # bytes free when measured (before the weights loaded)
    usable: int  # available minus HEADROOM, split between the processes sharing it
    weights: int
    training_state: int  # trainable fp32 tensors, their gradients, AdamW's moments (+ fp32 masters)
    kv_cache_tokens: int
    kv_bytes: int
    block_size: int
    micro_batch_tokens: int | None  # None: no backward (evaluation, sampling)
    recompute: bool | None
    activation_bytes_per_token: int
    activation_bytes: int  # the largest micro-batch's peak, head included

    def summary(self) -> str:
        gib = lambda b: f"{b / GiB:.2f} GiB"  # noqa: E731
        head = (f"memory plan ({self.device}, {self.available / GiB:.1f} GiB available, {gib(self.usable)} usable): "
                f"weights {gib(self.weights)}, adapter+optimizer {gib(self.training_state)}, "
                f"KV pool {gib(self.kv_bytes)} = {self.kv_cache_tokens:,} tokens "
                f"(# KV blocks: {self.kv_cache_tokens // self.block_size} of {self.block_size})")
        at_most = self.weights + self.training_state + self.kv_bytes
        if self.micro_batch_tokens is None:
            return f"{head}; at most {gib(at_most)} in use"
        return (f"{head}, activations {self.activation_bytes_per_token / KiB:.0f} KiB/token "
                f"{'with' if self.recompute else 'without'} recompute -> micro-batch {self.micro_batch_tokens:,} "
                f"tokens ({gib(self.activation_bytes)}), recompute {'on' if self.recompute else 'off'}; "
                f"at most {gib(at_most + self.activation_bytes)} in use")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        return cls(**json.loads(text))


def plan(cfg: M.Config, dtype, device, *, available: int, adapter=Steering, trainable: int,
         sequences: int, longest: int, backward: bool = True, micro_batch_tokens: int | None = None,
         recompute: bool | None = None, kv_cache_tokens: int | None = None, gpu_memory_fraction: float = 0.5,
         block_size: int = 16, share: int = 1) -> Plan:
    """Size the KV pool, the micro-batch and recompute for one rank, or refuse explicit settings that
    cannot fit (MemoryPlanError, one line with the numbers and the flag to change).

    sequences: sequences sampled per step on this rank; longest: the longest prompt + completion.
    None means auto for micro_batch_tokens, recompute and kv_cache_tokens. The KV pool takes one
    step's need, at most gpu_memory_fraction of what weights and training state leave (vLLM's rule;
    on CPU too). Recompute, when auto: on CPU only when a longest row would not fit without it (it
    costs ~1/3 of the backward; small micro-batches cost a CPU little); on CUDA off only when the
    micro-batch (the whole step, when auto) fits without it. `share`: processes on this memory."""
    dtype, device = M.resolve_dtype(dtype, None), torch.device(device)
    usable = int(available * (1 - HEADROOM)) // share
    weights = weight_count(cfg) * dtype.itemsize
    adapter = adapter_class(adapter)
    state = trainable * adapter.state_bytes_per_trainable(dtype)  # (param or master) + grad + 2 moments
    left = usable - weights - state
    where = f"{device.type}, {available / GiB:.1f} GiB available, {usable / GiB:.1f} GiB usable"
    if left <= 0:
        raise MemoryPlanError(f"memory ({where}): weights {weights / GiB:.2f} GiB + adapter/optimizer state "
                              f"{state / GiB:.2f} GiB do not fit: use a smaller model, --adapter steering or a larger device")

    kv_per_token = M.kv_bytes_per_token(cfg, dtype)
    one_seq = math.ceil(longest / block_size) * block_size
    # the sampler keeps one free block per running sequence in reserve (so a decode step never
    # pre-empts what it just admitted): a step's rollouts all run at once with one block each to spare
    step_tokens = sequences * (one_seq + block_size)
    if kv_cache_tokens is None:
        kv_cache_tokens = min(step_tokens, int(gpu_memory_fraction * left) // kv_per_token) // block_size * block_size
        if kv_cache_tokens < one_seq:
            raise MemoryPlanError(f"memory ({where}): a KV pool of {gpu_memory_fraction:.0%} of the {left / GiB:.2f} GiB "
                                  f"beside the weights holds {kv_cache_tokens:,} tokens, not one sequence of {longest:,}: "
                                  f"raise --gpu-memory-fraction, lower --max-len, or use a larger device")
    elif kv_cache_tokens < one_seq:
        raise MemoryPlanError(f"--kv-cache-tokens {kv_cache_tokens:,} cannot hold one sequence of {longest:,} tokens "
                              f"({one_seq:,} in blocks of {block_size}): raise it, or lower --max-len")
    kv = kv_cache_tokens * kv_per_token
    left -= kv

    def peak(tokens, rec):
        return tokens * activation_bytes_per_token(cfg, dtype, rec, adapter) + head_bytes(cfg, dtype, tokens, adapter)

    def largest(rec):  # the largest micro-batch the activations allow (head past one chunk), capped at the step
        per_token = activation_bytes_per_token(cfg, dtype, rec, adapter)
        return min(sequences * longest, (left - head_bytes(cfg, dtype, HEAD_CHUNK + 1, adapter)) // per_token)

    sampling = sampling_bytes(cfg, dtype, sequences)
    if sampling > left:
        raise MemoryPlanError(f"memory ({where}): the KV pool of {kv_cache_tokens:,} tokens ({kv / GiB:.2f} GiB) "
                              f"leaves {left / GiB:.2f} GiB, less than sampling needs ({sampling / GiB:.2f} GiB): "
                              "lower --kv-cache-tokens")
    if not backward:
        return Plan(device.type, available, usable, weights, state, kv_cache_tokens, kv, block_size, None, None, 0, 0)

    if recompute is None:
        wanted = micro_batch_tokens or (longest if device.type == "cpu" else sequences * longest)
        recompute = peak(max(wanted, longest), False) > left
    if micro_batch_tokens is None:
        micro_batch_tokens = max(largest(recompute) // 64 * 64, longest)
    need = peak(max(micro_batch_tokens, longest), recompute)  # a row longer than the budget goes alone
    if need > left:
        can = largest(recompute)
        fix = (f"lower --micro-batch-tokens to {can:,}" if can >= longest else
               "turn on --activation-checkpointing" if not recompute else "lower --max-len")
        raise MemoryPlanError(f"memory ({where}): a micro-batch of {max(micro_batch_tokens, longest):,} tokens needs "
                              f"{need / GiB:.2f} GiB of activations (recompute {'on' if recompute else 'off'}), but "
                              f"{left / GiB:.2f} GiB is left beside weights, optimizer state and the KV pool "
                              f"({kv_cache_tokens:,} tokens): {fix}, or lower --kv-cache-tokens")
    return Plan(device.type, available, usable, weights, state, kv_cache_tokens, kv, block_size, micro_batch_tokens,
                recompute, activation_bytes_per_token(cfg, dtype, recompute, adapter), need)
