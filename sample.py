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
- kernels.py's Triton kernels on CUDA (KV store through a slot mapping, paged decode attention
  with split-KV), decode captured in CUDA graphs; its pure-PyTorch path does the same on CPU and
  is the reference the kernels are tested against.

Sampling is reproducible per sequence: token t of rollout r of prompt p is drawn by inverse-CDF
with one uniform number hashed from (seed, p, r, t). It depends on nothing else, so results do
not change with batch composition or pre-emption (bit for bit on CPU in fp32; on GPU the logits
themselves move by float rounding with batch shape, which can flip a draw at a CDF boundary). Returned log-probs are
log_softmax(logits[:vocab_size] / temperature) at the sampled token in fp32, over the FULL
distribution (not the top-p-truncated one) -- the same formula as model.chunked_logprobs, which
the trainer scores with. For temperature 0 (greedy) they are the untempered log-softmax.
"""
import random
import time
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import model as M
from kernels import (HAS_TRITON, paged_decode_attention_torch, paged_decode_attention_triton, store_kv_torch,
                     store_kv_triton)


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


@dataclass(frozen=True)
class SamplingParams:
    """What one generate() call asks of every sequence it runs."""
    temperature: float  # 0 = greedy
    top_p: float
    stop_token_ids: frozenset[int]
    seed: int
    prompt_offset: int  # index of prompt 0 in the caller's whole batch (an input of the per-token hash)

# -----------------------------------------------------------------------------
# Blocks


def cdiv(a: int, b: int) -> int:
    """Ceil division: the number of b-token blocks that hold a tokens."""
    return -(-a // b)


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
    max_new_tokens: int  # its prompt's completion budget
    logprobs: list[float] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - self.num_prompt

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
        if self.use_triton and not HAS_TRITON:
            raise RuntimeError("use_triton needs the triton package")
        self.scale = cfg.head_dim ** -0.5

        bytes_per_block = M.kv_bytes_per_token(cfg, self.dtype) * block_size
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
        self.params = SamplingParams(temperature, top_p, frozenset(stop_token_ids), seed, prompt_offset)
        self.results = [[None if limit else Completion([], [], "length") for _ in range(n)] for limit in limits]
        # waiting work: lists of sequences with identical tokens, prefilled together (a prompt's
        # n fresh rollouts, or a single pre-empted sequence)
        self.waiting = deque([[_Seq(p, r, list(tokens), len(tokens), limits[p]) for r in range(n)]
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
            need = cdiv(total, self.block_size)
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

    def _free(self, seq):
        """Give back the sequence's blocks (a prompt block shared with other rollouts stays theirs)."""
        for b in seq.blocks:
            self.blocks.release(b)
        seq.blocks = []

    def _needs_block(self, seq) -> bool:
        """Whether the pending token's slot (len - 1) lies past the sequence's blocks."""
        return len(seq.tokens) - 1 >= len(seq.blocks) * self.block_size

    def _preempt(self, seq):
        self._free(seq)
        self.waiting.appendleft([seq])
        self.stats.preemptions += 1

    def _finish_or_keep(self, seqs, tokens, logprobs):
        """Append the sampled token to each sequence; retire finished ones (their blocks go back at once)."""
        keep = []
        for seq, tok, lp in zip(seqs, tokens.tolist(), logprobs.tolist()):
            seq.tokens.append(tok)
            seq.logprobs.append(lp)
            reason = ("stop" if tok in self.params.stop_token_ids else
                      "length" if seq.num_generated >= seq.max_new_tokens else None)
            if reason is None:
                keep.append(seq)
                continue
            self._free(seq)
            self.results[seq.prompt][seq.rollout] = Completion(seq.tokens[seq.num_prompt:], seq.logprobs, reason)
        return keep

    def _sample(self, seqs, logits):
        params = self.params
        meta = torch.tensor([[s.prompt + params.prompt_offset, s.rollout, s.num_generated] for s in seqs],
                            device=logits.device)  # (B, 3)
        u = sequence_uniforms(params.seed, meta[:, 0], meta[:, 1], meta[:, 2])
        return sample_tokens(logits.float(), params.temperature, params.top_p, u)

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
            seq.blocks = [self.blocks.allocate() for _ in range(cdiv(length, bs))]
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
            outs = [M.causal_attention(layer, q[:, s:e], k[:, s:e], v[:, s:e]) for s, e in bounds]
            return torch.cat(outs, dim=1)
        return attend

    # ---- decode: one token per running sequence ----

    def _decode(self):
        t0 = time.perf_counter()
        bs = self.block_size
        # some pending tokens open a fresh block: pre-empt the newest sequences until the pool has them
        need = sum(map(self._needs_block, self.running))
        while need > self.blocks.num_free:
            victim = self.running.pop()  # the most recently admitted
            need -= self._needs_block(victim)
            self._preempt(victim)
        for s in self.running:
            if self._needs_block(s):
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
        self.width = cdiv(sampler.max_seq_len, sampler.block_size)
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
