"""Rollout engine: many sampled completions per prompt from model.py's own (steered) forward.

    Sampler(model).generate(prompts, n=16, max_new_tokens=4096, temperature=1.0, seed=0)

- Paged KV cache: one preallocated pool [L, 2, num_blocks, block_size, KVH, D]; each sequence
  owns a block table (list of block ids). Blocks are reference-counted (BlockManager).
- Prompt sharing: a prompt is prefilled once; its full blocks are shared by its n rollouts and
  only the last, partial block is copied per rollout (rollouts never write into a full block,
  so no copy-on-write is needed).
- Continuous batching: a finished sequence frees its blocks at once and waiting work is
  admitted. When the pool runs dry a running sequence is pre-empted: its blocks are freed and
  it is later re-prefilled from prompt + generated tokens.
- The forward is model.hidden_states(..., attend=closure): model.py does embedding, RoPE,
  projections, MLP and steering; the closure only stores k/v into the pool and attends.
  Prefill packs variable-length sequences into one row (causal per sequence); decode feeds one
  token per running sequence and attends through the block tables.
- Triton kernels on CUDA (KV store through a slot mapping, paged decode attention with
  split-KV), decode captured in CUDA graphs; a pure-PyTorch path does the same on CPU and is
  the reference the kernels are tested against.

Sampling is reproducible per sequence: token t of rollout r of prompt p is drawn by inverse-CDF
with one uniform number hashed from (seed, p, r, t). It depends on nothing else, so results do
not change with batch composition or pre-emption (bit for bit on CPU in fp32; on GPU the logits
themselves move by float rounding with batch shape, which can flip a draw at a CDF boundary). Returned log-probs are
log_softmax(logits[:vocab_size] / temperature) at the sampled token in fp32, over the FULL
distribution (not the top-p-truncated one) -- the same formula as model.chunked_logprobs, which
the trainer scores with. For temperature 0 (greedy) they are the untempered log-softmax.
"""
import argparse
import os
import random
import time
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import model as model_lib

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without triton still get the PyTorch path
    triton = None


@dataclass
class Completion:
    tokens: list[int]  # generated ids; the stop id is included when finish_reason == "stop"
    logprobs: list[float]  # log p(token) under the full tempered distribution, fp32
    finish_reason: str  # "stop" or "length"


@dataclass
class Stats:
    """Counters of the last generate() call (tests and benchmarks read them)."""
    preemptions: int = 0
    prefill_tokens: int = 0  # tokens run through prefill (re-prefills of pre-empted sequences included)
    decode_tokens: int = 0
    decode_steps: int = 0
    peak_blocks_used: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

# -----------------------------------------------------------------------------
# Blocks


class BlockManager:
    """A free list and a reference count per block of the pool."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.free_blocks = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    def allocate(self) -> int:
        if not self.free_blocks:
            raise RuntimeError("KV cache pool exhausted (the scheduler should have pre-empted first)")
        block = self.free_blocks.popleft()
        self.ref_counts[block] = 1
        return block

    def share(self, block: int):
        assert self.ref_counts[block] > 0, f"sharing free block {block}"
        self.ref_counts[block] += 1

    def release(self, block: int):
        assert self.ref_counts[block] > 0, f"double free of block {block}"
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            self.free_blocks.append(block)


@dataclass
class _Seq:
    prompt: int  # index of its prompt in the generate() call
    rollout: int
    tokens: list[int]  # prompt + generated; the last one is not yet in the cache
    num_prompt: int
    logprobs: list[float] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - self.num_prompt

# -----------------------------------------------------------------------------
# Attention on the paged cache, PyTorch reference path


def store_kv_torch(k_cache, v_cache, k, v, slots):
    """k_cache/v_cache (num_blocks, block_size, KVH, D); k/v (N, KVH, D); slots (N,) = block*bs + offset."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v)


def paged_decode_attention_torch(q, k_cache, v_cache, block_tables, seq_lens, scale):
    """q (B, H, D); block_tables (B, max_blocks); seq_lens (B,) -> (B, H, D).
    Gathers every sequence's blocks into a padded (B, S, KVH, D) view and masks past its length.
    The query heads sharing a KV head are grouped into one matmul, so K/V are never repeated
    per query head. A row with length 0 gives zeros."""
    B, H, D = q.shape
    bs, kvh = k_cache.shape[1], k_cache.shape[2]
    S = block_tables.shape[1] * bs
    k = k_cache[block_tables].view(B, S, kvh, D)
    v = v_cache[block_tables].view(B, S, kvh, D)
    scores = q.view(B, kvh, H // kvh, D) @ k.permute(0, 2, 3, 1)  # (B, KVH, G, S)
    mask = torch.arange(S, device=q.device)[None, :] < seq_lens[:, None]  # (B, S)
    scores = scores.float().mul_(scale).masked_fill_(~mask[:, None, None, :], float("-inf"))
    probs = scores.softmax(-1).nan_to_num_(0.0)  # an empty row is all -inf: NaN -> 0
    out = probs.to(v.dtype) @ v.permute(0, 2, 1, 3)  # (B, KVH, G, D)
    return out.view(B, H, D)

# -----------------------------------------------------------------------------
# Triton kernels (GPU hot paths; run on CPU tensors under TRITON_INTERPRET=1 in tests)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

if triton is not None:

    @triton.jit
    def _store_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, stride_k, stride_v,
                         ROW: tl.constexpr, ROW_PAD: tl.constexpr):
        # one program per new token: copy its KVH*D key and value row into the pool slot
        t = tl.program_id(0).to(tl.int64)
        slot = tl.load(slot_ptr + t).to(tl.int64)
        if slot >= 0:  # slot -1 = padding row of a CUDA-graph batch
            offs = tl.arange(0, ROW_PAD)
            mask = offs < ROW
            k = tl.load(k_ptr + t * stride_k + offs, mask=mask)
            v = tl.load(v_ptr + t * stride_v + offs, mask=mask)
            tl.store(k_cache_ptr + slot * ROW + offs, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
            tl.store(v_cache_ptr + slot * ROW + offs, v.to(v_cache_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _paged_decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, out_ptr, lse_ptr,
                             scale, stride_bt, blocks_per_split,
                             KVH: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr,
                             BLOCK: tl.constexpr, NUM_SPLITS: tl.constexpr, UPCAST: tl.constexpr,
                             IEEE: tl.constexpr):
        # grid (B, KVH, NUM_SPLITS): the GROUP query heads sharing one KV head form the M side of
        # tl.dot (padded to GROUP_PAD >= 16 rows, masked); each split walks its range of blocks
        # with an online softmax and writes a partial output + log-sum-exp for the merge kernel.
        b = tl.program_id(0).to(tl.int64)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        H = KVH * GROUP
        seq_len = tl.load(seq_lens_ptr + b)
        g = tl.arange(0, GROUP_PAD)
        gmask = g < GROUP
        heads = kvh * GROUP + g
        d = tl.arange(0, D)
        q = tl.load(q_ptr + b * (H * D) + heads[:, None] * D + d[None, :], mask=gmask[:, None], other=0.0)
        if UPCAST:  # the interpreter computes bf16/fp16 arithmetic wrongly: work in fp32
            q = q.to(tl.float32)
        m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, D], tl.float32)
        first = split * blocks_per_split
        last = tl.minimum(first + blocks_per_split, tl.cdiv(seq_len, BLOCK))
        toks = tl.arange(0, BLOCK)
        for j in range(first, last):
            block = tl.load(block_tables_ptr + b * stride_bt + j).to(tl.int64)
            valid = j * BLOCK + toks < seq_len
            offs = (block * BLOCK + toks)[:, None] * (KVH * D) + kvh * D + d[None, :]
            k = tl.load(k_cache_ptr + offs, mask=valid[:, None], other=0.0)
            v = tl.load(v_cache_ptr + offs, mask=valid[:, None], other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # (GROUP_PAD, BLOCK) fp32
            else:
                s = tl.dot(q, tl.trans(k)) * scale
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every visited block has a valid key
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if IEEE:
                pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        # a split with no keys (short sequence, padding row) has l_i == 0: write 0 and lse -inf
        has = l_i > 0
        out = tl.where(has[:, None], acc / tl.where(has, l_i, 1.0)[:, None], 0.0)
        lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
        row = (b * H + heads) * NUM_SPLITS + split  # partials laid out (B, H, NUM_SPLITS, D)
        tl.store(out_ptr + row[:, None] * D + d[None, :], out, mask=gmask[:, None])
        tl.store(lse_ptr + row, lse, mask=gmask)

    @triton.jit
    def _merge_splits_kernel(part_ptr, lse_ptr, out_ptr, NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
                             D: tl.constexpr):
        # grid (B * H,): combine the split partials with their log-sum-exps
        row = tl.program_id(0).to(tl.int64)
        s = tl.arange(0, SPLITS_PAD)
        smask = s < NUM_SPLITS
        d = tl.arange(0, D)
        lse = tl.load(lse_ptr + row * NUM_SPLITS + s, mask=smask, other=float("-inf"))
        part = tl.load(part_ptr + (row * NUM_SPLITS + s)[:, None] * D + d[None, :], mask=smask[:, None], other=0.0)
        m = tl.max(lse, axis=0)
        m = tl.where(m == float("-inf"), 0.0, m)  # fully masked row: all weights 0, output 0
        w = tl.exp(lse - m)
        total = tl.sum(w, axis=0)
        out = tl.sum(w[:, None] * part, axis=0) / tl.where(total > 0, total, 1.0)
        tl.store(out_ptr + row * D + d, out.to(out_ptr.dtype.element_ty))


def store_kv_triton(k_cache, v_cache, k, v, slots):
    """Same contract as store_kv_torch; slots < 0 are skipped."""
    n = k.shape[0]
    k, v = k.reshape(n, -1), v.reshape(n, -1)
    assert k.stride(1) == 1 and v.stride(1) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    row = k.shape[1]
    _store_kv_kernel[(n,)](k, v, k_cache, v_cache, slots, k.stride(0), v.stride(0),
                           ROW=row, ROW_PAD=triton.next_power_of_2(row))


def paged_decode_attention_triton(q, k_cache, v_cache, block_tables, seq_lens, scale, num_splits=1):
    """Same contract as paged_decode_attention_torch. block_tables int32 (B, max_blocks)."""
    B, H, D = q.shape
    block, kvh = k_cache.shape[1], k_cache.shape[2]
    group = H // kvh
    assert block >= 16 and D >= 16 and D & (D - 1) == 0, "tl.dot needs block_size >= 16 and a power-of-2 head_dim >= 16"
    q = q.contiguous()
    parts = torch.empty(B, H, num_splits, D, dtype=torch.float32, device=q.device)
    lse = torch.empty(B, H, num_splits, dtype=torch.float32, device=q.device)
    blocks_per_split = triton.cdiv(block_tables.shape[1], num_splits)
    upcast = INTERPRET or q.dtype == torch.float32
    _paged_decode_kernel[(B, kvh, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, parts, lse, scale, block_tables.stride(0), blocks_per_split,
        KVH=kvh, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), D=D, BLOCK=block,
        NUM_SPLITS=num_splits, UPCAST=upcast, IEEE=upcast)
    out = torch.empty(B, H, D, dtype=q.dtype, device=q.device)
    _merge_splits_kernel[(B * H,)](parts, lse, out, NUM_SPLITS=num_splits,
                                   SPLITS_PAD=max(2, triton.next_power_of_2(num_splits)), D=D)
    return out

# -----------------------------------------------------------------------------
# Sampling


def _mix32(x):
    """lowbias32 integer hash on int64 tensors holding 32-bit values (wrapping multiply keeps the low bits)."""
    m = 0xFFFFFFFF
    x = x & m
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & m
    x = ((x ^ (x >> 15)) * 0x846CA68B) & m
    return x ^ (x >> 16)


def sequence_uniforms(seed: int, prompt, rollout, step):
    """One uniform in (0, 1) per (seed, prompt index, rollout index, step); int64 tensors (B,) -> float64 (B,)."""
    h = _mix32(torch.full_like(prompt, seed & 0xFFFFFFFF) ^ 0x5BD1E995)
    h = _mix32(h ^ _mix32(torch.full_like(prompt, (seed >> 32) & 0xFFFFFFFF)))
    for x in (prompt, rollout, step):
        h = _mix32(h ^ _mix32(x + 0x9E3779B9))
    return (h.double() + 0.5) / 2.0 ** 32


def sample_tokens(logits, temperature, top_p, uniforms):
    """logits (B, V) fp32 already cut to the tokenizer vocabulary; uniforms (B,) float64.
    Returns token ids (B,) and their log-probs under the full tempered distribution (B,)."""
    if temperature == 0:
        tokens = logits.argmax(-1)
        return tokens, logits.log_softmax(-1).gather(-1, tokens[:, None])[:, 0]
    logp = (logits / temperature).log_softmax(-1)
    probs = logp.exp()
    if top_p < 1.0:
        # keep the smallest prefix of the sorted distribution whose mass reaches top_p
        probs, order = probs.sort(-1, descending=True)
        probs = probs * ((probs.cumsum(-1) - probs) < top_p)
    # fp64: in fp32 the tail's tiny probabilities would vanish into the running sum
    cdf = probs.cumsum(-1, dtype=torch.float64)
    # inverse CDF: the first index whose cdf exceeds u * total. u <= 1 - 2^-33 keeps u * total strictly
    # below the total in fp64, so the index lands on an id with nonzero probability
    idx = torch.searchsorted(cdf, (uniforms * cdf[:, -1])[:, None], right=True).clamp_(max=cdf.shape[1] - 1)
    tokens = (order.gather(-1, idx) if top_p < 1.0 else idx)[:, 0]
    return tokens, logp.gather(-1, tokens[:, None])[:, 0]

# -----------------------------------------------------------------------------
# The sampler


GRAPH_BATCH_SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 384, 512]


class Sampler:
    def __init__(self, model, kv_cache_tokens=None, block_size=16, gpu_memory_fraction=0.5, vocab_size=None,
                 max_batch_tokens=8192, max_num_seqs=512, max_seq_len=16384, cpu_cache_gib=2.0,
                 use_triton=None, cuda_graphs=True):
        """kv_cache_tokens: pool size in tokens; default = gpu_memory_fraction of free GPU memory (after
        the weights) on CUDA, cpu_cache_gib on CPU. vocab_size: the tokenizer's real vocabulary (ids
        >= it are never sampled); default = the model's. max_batch_tokens: tokens per packed prefill.
        use_triton: default = the model is on CUDA (tests force it on CPU under TRITON_INTERPRET=1)."""
        cfg = model.config
        self.model = model
        self.device = model.embed_tokens.weight.device
        self.dtype = model.embed_tokens.weight.dtype
        self.block_size = block_size
        self.vocab_size = vocab_size or cfg.vocab_size
        if not 0 < self.vocab_size <= cfg.vocab_size:
            raise ValueError(f"vocab_size {vocab_size} must be in 1..{cfg.vocab_size} (the model's vocabulary)")
        self.max_batch_tokens, self.max_num_seqs, self.max_seq_len = max_batch_tokens, max_num_seqs, max_seq_len
        self.use_triton = self.device.type == "cuda" if use_triton is None else use_triton
        if self.use_triton and triton is None:
            raise RuntimeError("use_triton needs the triton package")
        self.scale = cfg.head_dim ** -0.5

        bytes_per_block = cfg.num_layers * 2 * block_size * cfg.num_kv_heads * cfg.head_dim * self.dtype.itemsize
        if kv_cache_tokens is not None:
            num_blocks = kv_cache_tokens // block_size
        elif self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            num_blocks = int(free * gpu_memory_fraction) // bytes_per_block
        else:
            num_blocks = int(cpu_cache_gib * 2 ** 30) // bytes_per_block
        if num_blocks < 1:
            raise ValueError(f"KV cache of {kv_cache_tokens} tokens holds no block of {block_size} tokens")
        with torch.inference_mode():
            self.pool = torch.zeros(cfg.num_layers, 2, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim,
                                    dtype=self.dtype, device=self.device)
        self.blocks = BlockManager(num_blocks)
        self.stats = Stats()
        # graphs need the Triton path: its kernels skip the padding rows (slot -1, length 0)
        self.graphs = _DecodeGraphs(self) if cuda_graphs and self.device.type == "cuda" and self.use_triton else None

    @property
    def head_weight(self):
        return self.model.head_weight[:self.vocab_size]  # rows past the tokenizer's vocabulary never get sampled

    # ---- public entry point ----

    @torch.inference_mode()
    def generate(self, prompts, n=1, max_new_tokens=256, temperature=1.0, top_p=1.0, stop_token_ids=(),
                 seed=None, prompt_offset=0) -> list[list[Completion]]:
        """`max_new_tokens` is one budget for all prompts or a list with one per prompt (the trainer
        gives each prompt max_len - its length). `prompt_offset`: a caller that splits one batch of
        prompts over several processes passes each part's start, so every prompt draws what it
        would draw in the whole batch."""
        limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        self._check(prompts, n, limits, temperature, top_p)
        self.stats = Stats()
        self.blocks = BlockManager(self.blocks.num_blocks)  # whole again even if a previous call was interrupted
        seed = random.getrandbits(63) if seed is None else seed
        self.request = dict(max_new=limits, temperature=temperature, top_p=top_p,
                            stop=set(stop_token_ids), seed=seed, prompt_offset=prompt_offset)
        self.results = [[None if limit else Completion([], [], "length") for _ in range(n)] for limit in limits]
        # waiting work: lists of sequences with identical tokens, prefilled together (a prompt's
        # n fresh rollouts, or a single pre-empted sequence)
        self.waiting = deque([[_Seq(p, r, list(tokens), len(tokens)) for r in range(n)]
                              for p, tokens in enumerate(prompts) if limits[p] > 0])
        self.running: list[_Seq] = []
        while self.waiting or self.running:
            admitted = self._admit()
            if admitted:
                self._prefill(admitted)
            if self.running:
                self._decode()
        assert self.blocks.num_free == self.blocks.num_blocks, "blocks leaked"
        return self.results

    def _check(self, prompts, n, limits, temperature, top_p):
        if len(limits) != len(prompts):
            raise ValueError(f"max_new_tokens has {len(limits)} budgets for {len(prompts)} prompts")
        if n < 1 or min(limits, default=0) < 0 or temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"need n >= 1, max_new_tokens >= 0, temperature >= 0, 0 < top_p <= 1 "
                             f"(got n={n}, max_new_tokens={min(limits, default=0)}, temperature={temperature}, "
                             f"top_p={top_p})")
        for i, (p, max_new_tokens) in enumerate(zip(prompts, limits)):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty")
            if max(p) >= self.model.config.vocab_size or min(p) < 0:
                raise ValueError(f"prompt {i} has token ids outside 0..{self.model.config.vocab_size - 1}")
            total = len(p) + max_new_tokens
            need = -(-total // self.block_size)
            if need > self.blocks.num_blocks or total > self.max_seq_len:
                raise ValueError(f"prompt {i}: {len(p)} prompt tokens + max_new_tokens {max_new_tokens} = {total} "
                                 f"tokens need {need} KV blocks of {self.block_size}, but the pool has "
                                 f"{self.blocks.num_blocks} blocks and max_seq_len is {self.max_seq_len}; "
                                 "raise kv_cache_tokens / gpu_memory_fraction or shorten the request")

    # ---- scheduling ----

    def _admit(self):
        """Take waiting work while blocks, prefill tokens and sequence slots allow. One free block per
        running sequence is kept in reserve so the next decode step does not pre-empt what was just
        admitted (which would loop)."""
        admitted, tokens = [], 0
        free = self.blocks.num_free
        num_seqs = len(self.running)
        while self.waiting:
            item = self.waiting[0]
            length = len(item[0].tokens)
            full, partial = divmod(length, self.block_size)
            room = self.max_num_seqs - num_seqs
            if room <= 0 or (admitted and tokens + length > self.max_batch_tokens):
                break
            k = min(len(item), room)
            idle = num_seqs == 0 and not admitted  # nothing else could free blocks: admit what fits at all
            while k > 0 and full + k * (partial > 0) + (0 if idle else num_seqs + k) > free:
                k -= 1
            if k == 0:
                break
            if k < len(item):  # split a prompt's rollouts: the rest stays waiting (prefilled again later)
                self.waiting[0] = item[k:]
                item = item[:k]
            else:
                self.waiting.popleft()
            admitted.append(item)
            tokens += length
            free -= full + k * (partial > 0)
            num_seqs += k
        return admitted

    def _preempt(self, seq):
        for b in seq.blocks:
            self.blocks.release(b)
        seq.blocks = []
        self.waiting.appendleft([seq])
        self.stats.preemptions += 1

    def _finish_or_keep(self, seqs, tokens, logprobs):
        """Append the sampled token to each sequence; retire finished ones (their blocks go back at once)."""
        req = self.request
        keep = []
        for seq, tok, lp in zip(seqs, tokens.tolist(), logprobs.tolist()):
            seq.tokens.append(tok)
            seq.logprobs.append(lp)
            reason = "stop" if tok in req["stop"] else "length" if seq.num_generated >= req["max_new"][seq.prompt] else None
            if reason is None:
                keep.append(seq)
                continue
            for b in seq.blocks:
                self.blocks.release(b)
            seq.blocks = []
            self.results[seq.prompt][seq.rollout] = Completion(seq.tokens[seq.num_prompt:], seq.logprobs, reason)
        return keep

    def _sample(self, seqs, logits):
        req = self.request
        meta = torch.tensor([[s.prompt + req["prompt_offset"], s.rollout, s.num_generated] for s in seqs],
                            device=logits.device)
        u = sequence_uniforms(req["seed"], meta[:, 0], meta[:, 1], meta[:, 2])
        return sample_tokens(logits.float(), req["temperature"], req["top_p"], u)

    def _track_peak(self):
        used = self.blocks.num_blocks - self.blocks.num_free
        self.stats.peak_blocks_used = max(self.stats.peak_blocks_used, used)

    # ---- prefill: every admitted item's tokens packed in one row ----

    def _prefill(self, items):
        t0 = time.perf_counter()
        bs = self.block_size
        tokens, positions, slots, bounds = [], [], [], []
        for item in items:
            seq = item[0]
            length = len(seq.tokens)
            seq.blocks = [self.blocks.allocate() for _ in range(-(-length // bs))]
            bounds.append((len(tokens), len(tokens) + length))
            tokens += seq.tokens
            positions += range(length)
            slots += [seq.blocks[i // bs] * bs + i % bs for i in range(length)]
        dev = self.device
        tok = torch.tensor(tokens, device=dev)[None]  # (1, N)
        pos = torch.tensor(positions, device=dev)[None]
        slot = torch.tensor(slots, device=dev)
        attend = self._prefill_attend(slot, bounds)
        h = self.model.hidden_states(tok, pos, attend)[0]  # (N, d)
        last = torch.tensor([end - 1 for _, end in bounds], device=dev)
        logits = F.linear(h[last], self.head_weight)  # (items, V)

        # the item's other sequences share its full blocks and copy its partial last block
        for item in items:
            first = item[0]
            full = len(first.tokens) // bs
            for seq in item[1:]:
                for b in first.blocks[:full]:
                    self.blocks.share(b)
                seq.blocks = first.blocks[:full]
                if full < len(first.blocks):
                    copy = self.blocks.allocate()
                    self.pool[:, :, copy] = self.pool[:, :, first.blocks[full]]
                    seq.blocks = seq.blocks + [copy]
        self._track_peak()
        seqs = [s for item in items for s in item]
        rows = torch.tensor([i for i, item in enumerate(items) for _ in item], device=dev)
        new_tokens, logprobs = self._sample(seqs, logits[rows])
        self.running += self._finish_or_keep(seqs, new_tokens, logprobs)
        self.stats.prefill_tokens += len(tokens)
        self._sync()
        self.stats.prefill_seconds += time.perf_counter() - t0

    def _prefill_attend(self, slots, bounds):
        store = store_kv_triton if self.use_triton else store_kv_torch

        def attend(layer, q, k, v):  # q (1, N, H, D), k/v (1, N, KVH, D)
            store(self.pool[layer, 0], self.pool[layer, 1], k[0], v[0], slots)
            # each sequence attends causally to itself only (no cached prefix: prefill always starts at 0)
            outs = [model_lib.causal_attention(layer, q[:, s:e], k[:, s:e], v[:, s:e]) for s, e in bounds]
            return torch.cat(outs, dim=1)
        return attend

    # ---- decode: one token per running sequence ----

    def _decode(self):
        t0 = time.perf_counter()
        bs = self.block_size
        # the pending (last) token of each sequence goes to slot len-1: some need a fresh block
        need = sum(1 for s in self.running if len(s.tokens) - 1 >= len(s.blocks) * bs)
        while need > self.blocks.num_free:
            victim = self.running.pop()  # the most recently admitted
            if len(victim.tokens) - 1 >= len(victim.blocks) * bs:
                need -= 1
            self._preempt(victim)
        for s in self.running:
            if len(s.tokens) - 1 >= len(s.blocks) * bs:
                s.blocks.append(self.blocks.allocate())
        self._track_peak()
        seqs = self.running
        dev = self.device
        lens = [len(s.tokens) for s in seqs]
        width = max(len(s.blocks) for s in seqs)
        tok = torch.tensor([s.tokens[-1] for s in seqs], device=dev)[:, None]  # (B, 1)
        pos = torch.tensor(lens, device=dev)[:, None] - 1
        slot = torch.tensor([s.blocks[(n - 1) // bs] * bs + (n - 1) % bs for s, n in zip(seqs, lens)], device=dev)
        table = torch.tensor([s.blocks + [0] * (width - len(s.blocks)) for s in seqs], dtype=torch.int32, device=dev)
        seq_lens = torch.tensor(lens, dtype=torch.int32, device=dev)
        if self.graphs is not None and len(seqs) <= GRAPH_BATCH_SIZES[-1]:
            logits = self.graphs.run(tok, pos, slot, table, seq_lens)
        else:
            logits = self.decode_logits(tok, pos, slot, table, seq_lens)
        new_tokens, logprobs = self._sample(seqs, logits)
        self.running = self._finish_or_keep(seqs, new_tokens, logprobs)
        self.stats.decode_tokens += len(seqs)
        self.stats.decode_steps += 1
        self._sync()
        self.stats.decode_seconds += time.perf_counter() - t0

    @torch.inference_mode()
    def decode_logits(self, tok, pos, slot, table, seq_lens, num_splits=1):
        """One decode forward: tok/pos (B, 1), slot (B,), table int32 (B, W), seq_lens int32 (B,) -> logits (B, V)."""
        table_long = None if self.use_triton else table.long()  # torch indexing wants int64

        def attend(layer, q, k, v):  # q (B, 1, H, D), k/v (B, 1, KVH, D)
            k_cache, v_cache = self.pool[layer, 0], self.pool[layer, 1]
            if self.use_triton:
                store_kv_triton(k_cache, v_cache, k[:, 0], v[:, 0], slot)
                out = paged_decode_attention_triton(q[:, 0], k_cache, v_cache, table, seq_lens, self.scale, num_splits)
            else:
                store_kv_torch(k_cache, v_cache, k[:, 0], v[:, 0], slot)
                out = paged_decode_attention_torch(q[:, 0], k_cache, v_cache, table_long, seq_lens, self.scale)
            return out[:, None]
        h = self.model.hidden_states(tok, pos, attend)  # (B, 1, d)
        return F.linear(h[:, 0], self.head_weight)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class _DecodeGraphs:
    """CUDA graphs of decode_logits for padded batch sizes 1, 2, 4, ..., 512, captured lazily.
    Inputs live in static buffers; padding rows have slot -1 (the store kernel skips them) and
    length 0 (attention writes zeros). The block table has a fixed width (max_seq_len / block_size)
    so launch grids never change. steering_scale is a Python float baked into a capture, so graphs
    are re-captured when it changes; the steering tensor itself is read at replay (in-place
    optimizer updates are seen)."""

    def __init__(self, sampler: Sampler):
        self.s = sampler
        dev = sampler.device
        n = GRAPH_BATCH_SIZES[-1]
        self.width = -(-sampler.max_seq_len // sampler.block_size)
        self.tok = torch.zeros(n, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(n, 1, dtype=torch.long, device=dev)
        self.slot = torch.full((n,), -1, dtype=torch.long, device=dev)
        self.table = torch.zeros(n, self.width, dtype=torch.int32, device=dev)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=dev)
        self.graphs, self.outputs, self.mempool, self.key = {}, {}, None, None
        self.sm_count = torch.cuda.get_device_properties(dev).multi_processor_count

    def _splits(self, batch):
        # enough programs to fill the GPU twice over; split-KV only helps small batches
        programs = batch * self.s.model.config.num_kv_heads
        return max(1, min(16, self.width, (2 * self.sm_count) // programs))

    def _capture(self, batch):
        args = (self.tok[:batch], self.pos[:batch], self.slot[:batch], self.table[:batch], self.seq_lens[:batch])
        splits = self._splits(batch)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up compiles the kernels outside the capture
            self.s.decode_logits(*args, num_splits=splits)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.mempool):
            self.outputs[batch] = self.s.decode_logits(*args, num_splits=splits)
        self.mempool = graph.pool()
        self.graphs[batch] = graph

    def run(self, tok, pos, slot, table, seq_lens):
        model = self.s.model
        key = (model.steering_scale, model.steering.data_ptr())
        if key != self.key:  # captured graphs hold the old scale / steering address
            self.graphs, self.outputs, self.key = {}, {}, key
        b = tok.shape[0]
        batch = next(x for x in GRAPH_BATCH_SIZES if x >= b)
        self.tok[:b], self.pos[:b], self.slot[:b], self.seq_lens[:b] = tok, pos, slot, seq_lens
        self.tok[b:batch], self.pos[b:batch], self.slot[b:batch], self.seq_lens[b:batch] = 0, 0, -1, 0
        self.table[:b, :table.shape[1]] = table
        if batch not in self.graphs:
            self._capture(batch)
        self.graphs[batch].replay()
        return self.outputs[batch][:b]

# -----------------------------------------------------------------------------
# Benchmark: python sample.py --tiny | --model PATH | --shape qwen2.5-1.5b

SHAPES = {  # random weights with a real model's shapes
    "qwen2.5-1.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         tie_word_embeddings=True, rope_theta=1000000.0),
    "tiny": dict(model_type="qwen2", vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
}


def _bench_prompts(args, folder):
    """GSM8K problems rendered with the checkpoint's chat template (token ids), and its vocab size."""
    import json
    from pathlib import Path
    shared = Path(os.environ.get("STEER_DATA_DIR", Path(__file__).resolve().parent.parent / "shared" / "data"))
    path = Path(args.data_dir or shared) / "gsm8k_test.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path} not found: pass --data-dir (the folder with gsm8k_test.jsonl)")
    problems = [json.loads(line)["problem"] for line in path.read_text().splitlines()[:args.prompts]]
    from data import Tokenizer
    tok = Tokenizer.from_dir(folder)
    return [tok.encode_prompt(p) for p in problems], tok.vocab_size


def _hf_twin(model, dtype, device, path=None):
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
    state = {("" if k.startswith("lm_head") else "model.") + k: v for k, v in model.state_dict().items()
             if k != "steering"}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in k or "rotary" in k for k in missing), (missing, unexpected)
    return hf


class _PeakRSS:
    """Peak resident memory above the starting level while the block runs (CPU), sampled every 5 ms."""

    def __enter__(self):
        import threading
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


def _timed(fn, warmup, device, repeats):
    """Median seconds over `repeats` calls of fn after one call of warmup, and the peak extra memory (GiB)."""
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
            with _PeakRSS() as mem:
                t0 = time.perf_counter()
                out = fn()
                times.append(time.perf_counter() - t0)
            peak = max(peak, mem.gib)
    times.sort()
    return times[len(times) // 2], peak, out


def _copy_bandwidth(device):
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


def bench(argv=None):
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
    ap.add_argument("--dtype", choices=sorted(model_lib.DTYPES), help="default float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--kv-cache-tokens", type=int, help="pool size (default: from memory)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs after a warm-up (median reported)")
    ap.add_argument("--data-dir", help="folder with gsm8k_test.jsonl (default ../shared/data or $STEER_DATA_DIR)")
    ap.add_argument("--no-hf", action="store_true", help="skip the HF transformers reference")
    ap.add_argument("--threads", type=int, help="CPU threads for both engines (1 avoids OpenMP thrashing on a "
                                                 "machine shared with other jobs)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = model_lib.DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    torch.manual_seed(0)

    vocab_size = None
    if args.model:
        m = model_lib.Transformer.from_pretrained(args.model, dtype=dtype, device=device)
        args.prompts = args.prompts or 8
        prompts, vocab_size = _bench_prompts(args, args.model)
        n, max_new = args.n or 4, args.max_new_tokens or 256
    else:
        name = "tiny" if args.tiny else args.shape
        cfg = model_lib.Config.from_dict(SHAPES[name], source=name)
        with torch.device(device):
            m = model_lib.Transformer(cfg).eval()
        for pname, p in m.named_parameters():  # base weights in `dtype`, steering stays fp32 (as from_pretrained)
            if pname != "steering":
                # small-variance init so activations stay sane through 28 layers
                p.data = (torch.randn_like(p) * 0.02 if p.dim() > 1 else p.data).to(dtype)
        m.requires_grad_(False)
        count = args.prompts or (4 if args.tiny else 256)
        length = 16 if args.tiny and args.prompt_len == 256 else args.prompt_len
        prompts = torch.randint(0, cfg.vocab_size, (count, length)).tolist()
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
    seconds, peak, _ = _timed(lambda: run(max_new), lambda: run(warm_new), device, args.repeats)
    st = sampler.stats
    served = n * sum(map(len, prompts))  # prompt tokens served; a shared prompt is computed once
    rows = [("ours", served / st.prefill_seconds, st.decode_tokens / st.decode_seconds,
             batch * max_new / seconds, peak)]
    print(f"ours: pool {sampler.blocks.num_blocks} blocks x {sampler.block_size} tokens, peak blocks used "
          f"{st.peak_blocks_used}, pre-emptions {st.preemptions}, decode steps {st.decode_steps}")

    if not args.no_hf:
        hf = _hf_twin(m, dtype, device, args.model)
        width = max(map(len, prompts))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        sampling = dict(do_sample=True, temperature=args.temperature, top_k=0, top_p=1.0) \
            if args.temperature > 0 else dict(do_sample=False)

        def hf_run(new):
            with torch.inference_mode():
                return hf.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                   num_return_sequences=n, pad_token_id=0, eos_token_id=None, **sampling)
        prefill_s, _, _ = _timed(lambda: hf_run(1), lambda: hf_run(1), device, args.repeats)
        total_s, hf_peak, out = _timed(lambda: hf_run(max_new), lambda: hf_run(warm_new), device, args.repeats)
        assert out.shape == (batch, width + max_new), out.shape
        rows.append(("HF generate", served / prefill_s, batch * (max_new - 1) / (total_s - prefill_s),
                     batch * max_new / total_s, hf_peak))

    print(f"{'engine':<12} {'prefill tok/s':>14} {'decode tok/s':>13} {'overall new tok/s':>18} {'peak mem GiB':>13}")
    for name, pre, dec, overall, mem in rows:
        print(f"{name:<12} {pre:>14.1f} {dec:>13.1f} {overall:>18.1f} {mem:>13.2f}")
    if args.no_hf is False:
        print("prefill tok/s = prompt tokens served (n x prompt tokens) / prefill time; HF prefill = generate "
              "with 1 new token over the left-padded batch, HF decode = the rest")
    if device.type == "cuda":
        # each decode step reads every weight once plus the KV of all running sequences
        weight_bytes = sum(p.numel() * p.element_size() for p in m.parameters())
        kv_per_token = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * dtype.itemsize
        mean_len = sum(map(len, prompts)) / len(prompts) + max_new / 2
        step_bytes = weight_bytes + batch * mean_len * kv_per_token
        bw = _copy_bandwidth(device)
        roof = batch * bw / step_bytes
        print(f"HBM roofline: {step_bytes / 2 ** 30:.2f} GiB per decode step (weights {weight_bytes / 2 ** 30:.2f} "
              f"+ KV at mean length {mean_len:.0f}) at copy bandwidth {bw / 1e9:.0f} GB/s -> {roof:.0f} tok/s; "
              f"ours reaches {rows[0][2] / roof:.0%}")


if __name__ == "__main__":
    bench()
