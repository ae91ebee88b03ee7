"""Rollout engine: many sampled completions per prompt from model.py's own (steered) forward.

    Sampler(model).generate(prompts, n=16, max_new_tokens=4096, temperature=1.0, seed=0)
    python sample.py --model M [--steering FILE] "question"   # the generation CLI (bottom of the file)

The parts, top to bottom, along nano-vllm's seams: a Sequence (one rollout and its block table);
the BlockManager (the pool's blocks and every sequence's block table); the Scheduler (waiting and
running sequences: admission, pre-emption, retirement); the ModelRunner (the KV pool and the
prefill / decode forwards, CUDA graphs included); and the Sampler, which drives them and samples.

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
- paged_attention.py's Triton kernels on CUDA (KV store through a slot mapping, paged decode attention
  with split-KV), decode captured in CUDA graphs; its pure-PyTorch path does the same on CPU and
  is the reference the kernels are tested against.

Many vectors, one batch: generate(..., vectors=[row per prompt]) runs each prompt's rollouts with
its own row of the steering adapter's table of vectors (adapters.Steering.set_table; row 0 = no
steering). The row is an index per token in prefill and per sequence in decode, so a CUDA graph
reads the table's current contents and the rows from static buffers. A prompt's blocks are only
shared by its own rollouts, so sequences under different vectors (whose prompt keys and values
differ) never share KV.

Sampling is reproducible per sequence: token t of rollout r of prompt p is drawn by inverse-CDF
with one uniform number hashed from (seed, p's id, r, t). It depends on nothing else, so results do
not change with batch composition, pre-emption or the vector: the same prompt id under K vectors
in one call draws what each would draw alone (bit for bit on CPU in fp32; on GPU the logits
themselves move by float rounding with batch shape, which can flip a draw at a CDF boundary). Returned log-probs are
log_softmax(logits[:vocab_size] / temperature) at the sampled token in fp32, over the FULL
distribution (not the top-p-truncated one) -- the same formula as model.chunked_logprobs, which
the trainer scores with. For temperature 0 (greedy) they are the untempered log-softmax.
"""
import argparse
import json
import math
import random
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import cluster
import memory
import model as M
from paged_attention import (HAS_TRITON, paged_decode_attention_torch, paged_decode_attention_triton,
                             store_kv_torch, store_kv_triton)


@dataclass
class Completion:
    tokens: list[int]  # generated ids; the stop id is included when finish_reason == "stop"
    logprobs: list[float]  # log p(token) under the full tempered distribution, fp32
    finish_reason: str  # "stop" or "length"


PROGRESS_SECONDS = 30.0  # how often a long generate() call reports (Sampler.on_progress)


@dataclass
class Stats:
    """Counters of the last generate() call (tests and benchmarks read them)."""
    preemptions: int = 0
    prefill_tokens: int = 0  # tokens run through prefill (re-prefills of pre-empted sequences included)
    decode_tokens: int = 0
    decode_steps: int = 0
    sequences: int = 0  # the call's sequences (prompts x n)
    finished: int = 0  # sequences done (stopped or at their budget)
    peak_blocks_used: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0


@dataclass(frozen=True)
class SamplingParams:
    """What one generate() call asks of every sequence it runs."""
    temperature: float  # 0 = greedy
    top_p: float
    stop_token_ids: frozenset[int]
    seeds: tuple[int, ...]  # per prompt of the call: the seed its draws are hashed with
    prompt_ids: tuple[int, ...]  # per prompt of the call: the id its draws are hashed with

# -----------------------------------------------------------------------------
# Sequences and their blocks


def cdiv(a: int, b: int) -> int:
    """Ceil division: the number of b-token blocks that hold a tokens."""
    return -(-a // b)


@dataclass
class Sequence:
    """One rollout of one prompt: its tokens, their log-probs and the block table of its KV cache."""
    prompt: int  # index of its prompt in the generate() call
    rollout: int
    tokens: list[int]  # prompt + generated; the last one is not yet in the cache
    num_prompt: int
    max_new_tokens: int  # its prompt's completion budget
    vector: int | None = None  # its row of the steering table (generate's `vectors`); None: the model's adapter
    logprobs: list[float] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)  # token i lives in block blocks[i // block_size]
    finish_reason: str | None = None  # None while it runs

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - self.num_prompt

    def append(self, token: int, logprob: float, stop_token_ids: frozenset[int]):
        self.tokens.append(token)
        self.logprobs.append(logprob)
        if token in stop_token_ids:
            self.finish_reason = "stop"
        elif self.num_generated >= self.max_new_tokens:
            self.finish_reason = "length"

    def completion(self) -> Completion:
        return Completion(self.tokens[self.num_prompt:], self.logprobs, self.finish_reason)


class BlockManager:
    """The pool's blocks: a free list and a reference count per block, and the block table of
    each sequence. A prompt's full blocks are shared by its rollouts; a block is free again when
    no sequence holds it."""

    def __init__(self, num_blocks: int, block_size: int = 16):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.ref_counts = [0] * num_blocks
        self.free_blocks = deque(range(num_blocks))
        self.peak_used = 0  # most blocks held at once

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    # ---- single blocks ----

    def allocate(self) -> int:
        if not self.free_blocks:
            raise RuntimeError("KV cache pool exhausted (the scheduler should have pre-empted first)")
        block = self.free_blocks.popleft()
        self.ref_counts[block] = 1
        self.peak_used = max(self.peak_used, self.num_blocks - self.num_free)
        return block

    def share(self, block: int):
        assert self.ref_counts[block] > 0, f"sharing free block {block}"
        self.ref_counts[block] += 1

    def release(self, block: int):
        assert self.ref_counts[block] > 0, f"double free of block {block}"
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            self.free_blocks.append(block)

    # ---- a sequence's block table ----

    def allocate_prompt(self, seq: Sequence):
        """Blocks for all of the sequence's tokens: a prefill writes them all."""
        seq.blocks = [self.allocate() for _ in range(cdiv(len(seq.tokens), self.block_size))]

    def fork(self, parent: Sequence, child: Sequence) -> tuple[int, int] | None:
        """Give `child`, another rollout of `parent`'s tokens, parent's cache: it shares the full
        blocks (rollouts never write into a full block, so no copy-on-write is needed) and gets
        its own block for the partial last one, which it will write into. Returns (parent's
        partial block, child's block) for the caller to copy the KV, or None if there is none."""
        full = len(parent.tokens) // self.block_size
        for block in parent.blocks[:full]:
            self.share(block)
        child.blocks = parent.blocks[:full]
        if full == len(parent.blocks):
            return None
        copy = self.allocate()
        child.blocks.append(copy)
        return parent.blocks[full], copy

    def free(self, seq: Sequence):
        """Give back the sequence's blocks (a prompt block shared with other rollouts stays theirs)."""
        for block in seq.blocks:
            self.release(block)
        seq.blocks = []

    def needs_block(self, seq: Sequence) -> bool:
        """Whether the pending token's slot (len - 1) lies past the sequence's blocks."""
        return len(seq.tokens) - 1 >= len(seq.blocks) * self.block_size

    def append_block(self, seq: Sequence):
        seq.blocks.append(self.allocate())

# -----------------------------------------------------------------------------
# Scheduling


class Scheduler:
    """Which sequences run. Waiting work is a queue of groups of sequences with identical tokens,
    prefilled together: a prompt's n fresh rollouts, or one pre-empted sequence. Groups are
    admitted while blocks, prefill tokens and sequence slots allow. When a decode step needs more
    fresh blocks than are free, the newest running sequences are pre-empted: their blocks are
    freed and they wait again, to be re-prefilled from prompt + generated tokens."""

    def __init__(self, blocks: BlockManager, max_batch_tokens: int, max_num_seqs: int, waiting=()):
        self.blocks = blocks
        self.max_batch_tokens, self.max_num_seqs = max_batch_tokens, max_num_seqs
        self.waiting: deque[list[Sequence]] = deque(waiting)
        self.running: list[Sequence] = []  # in admission order: the last is pre-empted first
        self.preemptions = 0

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def admit(self) -> list[list[Sequence]]:
        """Take waiting groups while blocks, prefill tokens and sequence slots allow. One free block per
        running sequence is kept in reserve so the next decode step does not pre-empt what was just
        admitted (which would loop). The admitted sequences run from now on; each group's first one
        gets the blocks its prefill fills (the others fork them after the prefill)."""
        admitted, tokens = [], 0
        free = self.blocks.num_free
        num_seqs = len(self.running)
        while self.waiting:
            group = self.waiting[0]
            length = len(group[0].tokens)
            full, partial = divmod(length, self.blocks.block_size)
            room = self.max_num_seqs - num_seqs
            if room <= 0 or (admitted and tokens + length > self.max_batch_tokens):
                break
            k = min(len(group), room)
            idle = num_seqs == 0 and not admitted  # nothing else could free blocks: admit what fits at all
            while k > 0 and full + k * (partial > 0) + (0 if idle else num_seqs + k) > free:
                k -= 1
            if k == 0:
                break
            if k < len(group):  # split a prompt's rollouts: the rest stays waiting (prefilled again later)
                self.waiting[0] = group[k:]
                group = group[:k]
            else:
                self.waiting.popleft()
            admitted.append(group)
            tokens += length
            free -= full + k * (partial > 0)
            num_seqs += k
        for group in admitted:
            self.blocks.allocate_prompt(group[0])
            self.running += group
        return admitted

    def schedule_decode(self) -> list[Sequence]:
        """The running sequences, each with a slot for its pending token. Some pending tokens open a
        fresh block: the newest sequences are pre-empted until the pool has them."""
        need = sum(map(self.blocks.needs_block, self.running))
        while need > self.blocks.num_free:
            victim = self.running.pop()  # the most recently admitted
            need -= self.blocks.needs_block(victim)
            self.preempt(victim)
        for seq in self.running:
            if self.blocks.needs_block(seq):
                self.blocks.append_block(seq)
        return self.running

    def preempt(self, seq: Sequence):
        self.blocks.free(seq)
        self.waiting.appendleft([seq])
        self.preemptions += 1

    def append_tokens(self, seqs, tokens, logprobs, stop_token_ids) -> list[Sequence]:
        """Append each sequence's sampled token; the finished ones stop running and give back their
        blocks at once. Returns those."""
        finished = []
        for seq, token, logprob in zip(seqs, tokens, logprobs):
            seq.append(token, logprob, stop_token_ids)
            if seq.finish_reason is not None:
                self.blocks.free(seq)
                finished.append(seq)
        self.running = [seq for seq in self.running if seq.finish_reason is None]
        return finished

# -----------------------------------------------------------------------------
# Sampling


def _mix32(x):
    """lowbias32 integer hash on int64 tensors holding 32-bit values (wrapping multiply keeps the low bits)."""
    m = 0xFFFFFFFF
    x = x & m
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & m
    x = ((x ^ (x >> 15)) * 0x846CA68B) & m
    return x ^ (x >> 16)


def sequence_uniforms(seed, prompt, rollout, step):
    """One uniform in (0, 1) per (seed, prompt id, rollout index, step); int64 tensors (B,) (seed: or
    one int for all) -> float64 (B,)."""
    seed = torch.as_tensor(seed, dtype=torch.long, device=prompt.device).expand_as(prompt)
    h = _mix32((seed & 0xFFFFFFFF) ^ 0x5BD1E995)
    h = _mix32(h ^ _mix32((seed >> 32) & 0xFFFFFFFF))
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
# The model runner


GRAPH_BATCH_SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 384, 512]


def kv_pool_blocks(model, block_size, kv_cache_tokens, gpu_memory_fraction, cpu_cache_gib) -> int:
    """The KV pool's size in blocks: kv_cache_tokens when given, else gpu_memory_fraction of the free GPU
    memory (after the weights) on CUDA, cpu_cache_gib on CPU."""
    weight = model.embed_tokens.weight
    bytes_per_block = M.kv_bytes_per_token(model.config, weight.dtype) * block_size
    if kv_cache_tokens is not None:
        num_blocks = kv_cache_tokens // block_size
    elif weight.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(weight.device)
        num_blocks = int(free * gpu_memory_fraction) // bytes_per_block
    else:
        num_blocks = int(cpu_cache_gib * 2 ** 30) // bytes_per_block
    if num_blocks < 1:
        raise ValueError(f"KV cache of {kv_cache_tokens} tokens holds no block of {block_size} tokens")
    return num_blocks


class ModelRunner:
    """The forwards over the paged KV pool: a packed prefill and a decode step (eager, or replayed
    from a CUDA graph). model.hidden_states does the model; the attend closures given to it store
    each layer's k/v into the pool and attend."""

    def __init__(self, model, num_blocks, block_size, vocab_size, max_seq_len, use_triton, cuda_graphs):
        cfg = model.config
        self.model = model
        self.device = model.embed_tokens.weight.device
        self.block_size, self.vocab_size, self.max_seq_len = block_size, vocab_size, max_seq_len
        self.use_triton = use_triton
        self.scale = cfg.head_dim ** -0.5
        with torch.inference_mode():  # (L, 2, num_blocks, block_size, KVH, D): k and v of every layer
            self.pool = torch.zeros(cfg.num_layers, 2, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim,
                                    dtype=model.embed_tokens.weight.dtype, device=self.device)
        # graphs need the Triton path: its kernels skip the padding rows (slot -1, length 0)
        self.graphs = _DecodeGraphs(self) if cuda_graphs and self.device.type == "cuda" and use_triton else None

    @property
    def head_weight(self):
        return self.model.head_weight[:self.vocab_size]  # rows past the tokenizer's vocabulary never get sampled

    def copy_block(self, src: int, dst: int):
        self.pool[:, :, dst] = self.pool[:, :, src]  # every layer's k and v

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ---- prefill: the sequences' tokens packed in one row ----

    def prefill(self, seqs: list[Sequence]):
        """Every token of every sequence into its blocks; logits at each sequence's last token (S, V)."""
        bs = self.block_size
        tokens, positions, slots, bounds, vectors = [], [], [], [], []
        for seq in seqs:
            length = len(seq.tokens)
            bounds.append((len(tokens), len(tokens) + length))
            tokens += seq.tokens
            positions += range(length)
            slots += [seq.blocks[i // bs] * bs + i % bs for i in range(length)]
            vectors += [seq.vector] * length
        dev = self.device
        tok = torch.tensor(tokens, device=dev)[None]  # (1, N)
        pos = torch.tensor(positions, device=dev)[None]  # (1, N)
        slot = torch.tensor(slots, device=dev)  # (N,)
        ids = None if seqs[0].vector is None else torch.tensor(vectors, device=dev)[None]  # (1, N): per token
        h = self.model.hidden_states(tok, pos, self._prefill_attend(slot, bounds), ids)[0]  # (N, d)
        last = torch.tensor([end - 1 for _, end in bounds], device=dev)
        return F.linear(h[last], self.head_weight)  # (S, V)

    def _prefill_attend(self, slots, bounds):
        store = store_kv_triton if self.use_triton else store_kv_torch

        def attend(layer, q, k, v):  # q (1, N, H, D), k/v (1, N, KVH, D)
            store(self.pool[layer, 0], self.pool[layer, 1], k[0], v[0], slots)
            # each sequence attends causally to itself only (no cached prefix: prefill always starts at 0)
            outs = [M.causal_attention(layer, q[:, s:e], k[:, s:e], v[:, s:e]) for s, e in bounds]
            return torch.cat(outs, dim=1)
        return attend

    # ---- decode: one token per sequence, attending through the block tables ----

    def decode(self, seqs: list[Sequence]):
        """Each sequence's pending token into its slot; the logits after it (B, V)."""
        bs = self.block_size
        dev = self.device
        lens = [len(s.tokens) for s in seqs]
        width = max(len(s.blocks) for s in seqs)
        tok = torch.tensor([s.tokens[-1] for s in seqs], device=dev)[:, None]  # (B, 1)
        pos = torch.tensor(lens, device=dev)[:, None] - 1  # (B, 1)
        slot = torch.tensor([s.blocks[(n - 1) // bs] * bs + (n - 1) % bs for s, n in zip(seqs, lens)], device=dev)
        table = torch.tensor([s.blocks + [0] * (width - len(s.blocks)) for s in seqs], dtype=torch.int32, device=dev)
        seq_lens = torch.tensor(lens, dtype=torch.int32, device=dev)
        ids = None if seqs[0].vector is None else torch.tensor([s.vector for s in seqs], device=dev)[:, None]
        if self.graphs is not None and len(seqs) <= GRAPH_BATCH_SIZES[-1]:
            return self.graphs.run(tok, pos, slot, table, seq_lens, ids)
        return self.decode_logits(tok, pos, slot, table, seq_lens, vector_ids=ids)

    @torch.inference_mode()
    def decode_logits(self, tok, pos, slot, table, seq_lens, num_splits=1, vector_ids=None):
        """One decode forward: tok/pos (B, 1), slot (B,), table int32 (B, W), seq_lens int32 (B,),
        vector_ids (B, 1) or None -> logits (B, V)."""
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
        h = self.model.hidden_states(tok, pos, attend, vector_ids)  # (B, 1, d)
        return F.linear(h[:, 0], self.head_weight)


class _DecodeGraphs:
    """CUDA graphs of decode_logits for padded batch sizes 1, 2, 4, ..., 512, captured lazily.
    Inputs live in static buffers; padding rows have slot -1 (the store kernel skips them) and
    length 0 (attention writes zeros). The block table has a fixed width (max_seq_len / block_size)
    so launch grids never change. A capture bakes in the adapter (its kind, options, Python floats
    such as steering_scale, and the addresses of the tensors it reads): model.adapter_key() names
    all of it, and the graphs are re-captured when it changes. The tensors' values are read at
    replay, so in-place optimizer updates (every adapter, full fine-tuning included) are seen, and
    so are a steering table's new contents (Steering.set_table keeps its storage). A batch with one
    vector per sequence replays graphs captured with the rows as a static input (padding: row 0)."""

    def __init__(self, runner: ModelRunner):
        self.runner = runner
        dev = runner.device
        n = GRAPH_BATCH_SIZES[-1]
        self.width = cdiv(runner.max_seq_len, runner.block_size)
        self.tok = torch.zeros(n, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(n, 1, dtype=torch.long, device=dev)
        self.slot = torch.full((n,), -1, dtype=torch.long, device=dev)
        self.table = torch.zeros(n, self.width, dtype=torch.int32, device=dev)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=dev)
        self.vector_ids = torch.zeros(n, 1, dtype=torch.long, device=dev)
        self.graphs, self.outputs, self.mempool, self.key = {}, {}, None, None
        self.sm_count = torch.cuda.get_device_properties(dev).multi_processor_count

    def _splits(self, batch):
        # enough programs to fill the GPU twice over; split-KV only helps small batches
        programs = batch * self.runner.model.config.num_kv_heads
        return max(1, min(16, self.width, (2 * self.sm_count) // programs))

    def _capture(self, key: tuple[bool, int]):
        per_sequence, batch = key
        args = (self.tok[:batch], self.pos[:batch], self.slot[:batch], self.table[:batch], self.seq_lens[:batch])
        ids = self.vector_ids[:batch] if per_sequence else None
        splits = self._splits(batch)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up compiles the kernels outside the capture
            self.runner.decode_logits(*args, num_splits=splits, vector_ids=ids)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.mempool):
            self.outputs[key] = self.runner.decode_logits(*args, num_splits=splits, vector_ids=ids)
        self.mempool = graph.pool()
        self.graphs[key] = graph

    def run(self, tok, pos, slot, table, seq_lens, vector_ids=None):
        model = self.runner.model
        key = model.adapter_key()
        if key != self.key:  # captured graphs hold an old adapter, scale or tensor address
            self.graphs, self.outputs, self.key = {}, {}, key
        b = tok.shape[0]
        batch = next(x for x in GRAPH_BATCH_SIZES if x >= b)
        self.tok[:b], self.pos[:b], self.slot[:b], self.seq_lens[:b] = tok, pos, slot, seq_lens
        self.tok[b:batch], self.pos[b:batch], self.slot[b:batch], self.seq_lens[b:batch] = 0, 0, -1, 0
        self.table[:b, :table.shape[1]] = table
        if vector_ids is not None:
            self.vector_ids[:b], self.vector_ids[b:batch] = vector_ids, 0
        graph = (vector_ids is not None, batch)  # one graph per padded size, with and without per-sequence rows
        if graph not in self.graphs:
            self._capture(graph)
        self.graphs[graph].replay()
        return self.outputs[graph][:b]

# -----------------------------------------------------------------------------
# The sampler


class Sampler:
    """generate() drives the parts: the scheduler admits waiting work and the runner prefills it,
    then every running sequence decodes one token per step; each sequence's next token is drawn
    from its logits here, and the finished ones become completions."""

    def __init__(self, model, kv_cache_tokens=None, block_size=16, gpu_memory_fraction=0.5, vocab_size=None,
                 max_batch_tokens=memory.SAMPLER_MAX_BATCH_TOKENS, max_num_seqs=memory.SAMPLER_MAX_NUM_SEQS,
                 max_seq_len=16384, cpu_cache_gib=2.0, use_triton=None, cuda_graphs=True):
        """kv_cache_tokens: pool size in tokens; default = gpu_memory_fraction of free GPU memory (after
        the weights) on CUDA, cpu_cache_gib on CPU. vocab_size: the tokenizer's real vocabulary (ids
        >= it are never sampled); default = the model's. max_batch_tokens: tokens per packed prefill.
        use_triton: default = the model is on CUDA (tests force it on CPU under TRITON_INTERPRET=1)."""
        cfg = model.config
        self.model = model
        vocab_size = vocab_size or cfg.vocab_size
        if not 0 < vocab_size <= cfg.vocab_size:
            raise ValueError(f"vocab_size {vocab_size} must be in 1..{cfg.vocab_size} (the model's vocabulary)")
        if use_triton is None:
            use_triton = model.embed_tokens.weight.device.type == "cuda"
        if use_triton and not HAS_TRITON:
            raise RuntimeError("use_triton needs the triton package")
        num_blocks = kv_pool_blocks(model, block_size, kv_cache_tokens, gpu_memory_fraction, cpu_cache_gib)
        self.block_size = block_size
        self.max_batch_tokens, self.max_num_seqs, self.max_seq_len = max_batch_tokens, max_num_seqs, max_seq_len
        self.runner = ModelRunner(model, num_blocks, block_size, vocab_size, max_seq_len, use_triton, cuda_graphs)
        self.scheduler = Scheduler(BlockManager(num_blocks, block_size), max_batch_tokens, max_num_seqs)
        self.stats = Stats()
        # a command line's heartbeat: on_progress(stats) every PROGRESS_SECONDS of a long generate() call
        self.on_progress = None
        # decode on a CPU is thousands of small ops: the thread count follows the cores left free
        self.cpu_share = cluster.cpu_share() if model.embed_tokens.weight.device.type == "cpu" else None

    # ---- the parts' state that tests and benchmarks read ----

    @property
    def blocks(self) -> BlockManager:
        return self.scheduler.blocks

    @property
    def running(self) -> list[Sequence]:
        return self.scheduler.running

    @property
    def pool(self):
        return self.runner.pool

    @property
    def graphs(self):
        return self.runner.graphs

    def decode_logits(self, tok, pos, slot, table, seq_lens, num_splits=1, vector_ids=None):
        return self.runner.decode_logits(tok, pos, slot, table, seq_lens, num_splits, vector_ids)

    # ---- public entry point ----

    @torch.inference_mode()
    def generate(self, prompts, n=1, max_new_tokens=256, temperature=1.0, top_p=1.0, stop_token_ids=(),
                 seed=None, prompt_ids=None, vectors=None) -> list[list[Completion]]:
        """`max_new_tokens` is one budget for all prompts or a list with one per prompt (the trainer
        gives each prompt max_len - its length). `prompt_ids`: the id each prompt's draws are hashed
        with (default 0, 1, ...): a caller that splits one batch of prompts over several processes
        passes each part's own ids, so every prompt draws what it would draw in the whole batch.
        `seed`: one for the call, or one per prompt (train.py's runs side by side, each its own seed).
        `vectors`: per prompt, its row of the steering adapter's table (adapters.Steering.set_table;
        0 = no steering); None runs every prompt with the model's adapter as it is."""
        limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        prompt_ids = tuple(range(len(prompts)) if prompt_ids is None else prompt_ids)
        self._check(prompts, n, limits, temperature, top_p, prompt_ids, vectors)
        self.stats = Stats()
        seed = random.getrandbits(63) if seed is None else seed
        seeds = tuple(seed) if isinstance(seed, (list, tuple)) else (seed,) * len(prompts)
        # the hash reads a seed's low 64 bits: held as the int64 with those bits, any Python int fits a tensor
        seeds = tuple(((s & 0xFFFFFFFFFFFFFFFF) ^ 1 << 63) - (1 << 63) for s in seeds)
        if len(seeds) != len(prompts):
            raise ValueError(f"seed has {len(seeds)} seeds for {len(prompts)} prompts")
        self.params = SamplingParams(temperature, top_p, frozenset(stop_token_ids), seeds, prompt_ids)
        self.results = [[None if limit else Completion([], [], "length") for _ in range(n)] for limit in limits]
        # waiting work: each prompt's n rollouts, prefilled together. A fresh scheduler and block
        # manager: the pool is whole again even if a previous call was interrupted
        groups = [[Sequence(p, r, list(tokens), len(tokens), limits[p], None if vectors is None else vectors[p])
                   for r in range(n)] for p, tokens in enumerate(prompts) if limits[p] > 0]
        self.stats.sequences = sum(map(len, groups))
        blocks = BlockManager(self.blocks.num_blocks, self.block_size)
        self.scheduler = Scheduler(blocks, self.max_batch_tokens, self.max_num_seqs, groups)
        beat = time.monotonic()
        while self.scheduler.has_work:
            if self.cpu_share:
                self.cpu_share.adjust()
            admitted = self.scheduler.admit()
            if admitted:
                self._prefill(admitted)
            if self.scheduler.running:
                self._decode()
            if self.on_progress and time.monotonic() - beat >= PROGRESS_SECONDS:
                beat = time.monotonic()
                self.on_progress(self.stats)
        assert blocks.num_free == blocks.num_blocks, "blocks leaked"
        # the parts count these as they go
        self.stats.preemptions, self.stats.peak_blocks_used = self.scheduler.preemptions, blocks.peak_used
        return self.results

    def _check(self, prompts, n, limits, temperature, top_p, prompt_ids, vectors):
        if len(limits) != len(prompts):
            raise ValueError(f"max_new_tokens has {len(limits)} budgets for {len(prompts)} prompts")
        if len(prompt_ids) != len(prompts):
            raise ValueError(f"prompt_ids has {len(prompt_ids)} ids for {len(prompts)} prompts")
        if vectors is not None:
            rows = self.model.adapter.table_rows()
            if len(vectors) != len(prompts):
                raise ValueError(f"vectors has {len(vectors)} rows for {len(prompts)} prompts")
            if rows == 0:
                raise ValueError(f"vectors given, but the model's '{self.model.adapter.kind}' adapter holds no table "
                                 "of vectors (adapters.Steering.set_table; LoRA and full fine-tuning run one adapter "
                                 "per batch)")
            if vectors and not 0 <= min(vectors) <= max(vectors) < rows:
                raise ValueError(f"vectors: rows {min(vectors)}..{max(vectors)} outside the table's 0..{rows - 1}")
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

    # ---- the steps ----

    def _prefill(self, groups: list[list[Sequence]]):
        """One packed prefill of each admitted group's first sequence; the group's other sequences
        then fork its cache, and all of them draw their next token from its logits."""
        t0 = time.perf_counter()
        firsts = [group[0] for group in groups]
        self.stats.prefill_tokens += sum(len(seq.tokens) for seq in firsts)
        logits = self.runner.prefill(firsts)  # (groups, V)
        for group in groups:
            for seq in group[1:]:
                copy = self.blocks.fork(group[0], seq)
                if copy is not None:
                    self.runner.copy_block(*copy)
        seqs = [seq for group in groups for seq in group]
        rows = torch.tensor([i for i, group in enumerate(groups) for _ in group], device=logits.device)
        self._sample_next(seqs, logits[rows])
        self.runner.sync()
        self.stats.prefill_seconds += time.perf_counter() - t0

    def _decode(self):
        """One token for every running sequence (bench/gpu.py times decode by wrapping this method)."""
        t0 = time.perf_counter()
        seqs = self.scheduler.schedule_decode()
        self._sample_next(seqs, self.runner.decode(seqs))
        self.stats.decode_tokens += len(seqs)
        self.stats.decode_steps += 1
        self.runner.sync()
        self.stats.decode_seconds += time.perf_counter() - t0

    def _sample_next(self, seqs: list[Sequence], logits):
        """Draw each sequence's next token from its logits (B, V); the finished sequences' completions
        go into the results."""
        params = self.params
        meta = torch.tensor([[params.seeds[s.prompt], params.prompt_ids[s.prompt], s.rollout, s.num_generated]
                             for s in seqs], device=logits.device)  # (B, 4)
        u = sequence_uniforms(meta[:, 0], meta[:, 1], meta[:, 2], meta[:, 3])
        tokens, logprobs = sample_tokens(logits.float(), params.temperature, params.top_p, u)
        for seq in self.scheduler.append_tokens(seqs, tokens.tolist(), logprobs.tolist(), params.stop_token_ids):
            self.results[seq.prompt][seq.rollout] = seq.completion()
            self.stats.finished += 1

# -----------------------------------------------------------------------------
# Command line: try a (steered) model, as nanoGPT's sample.py. Only this part reads the
# tokenizer, the grader and the hub (imported in main), so the engine depends on model.py (and
# memory.py's batch limits) alone.

CLI_DOC = """Generate from a model, with or without a steering vector:

    python sample.py --model M [--steering FILE | none,FILE] "question" ["question" ...]
    python sample.py --model M --steering org/name --file problems.jsonl   # JSONL: "problem" [, "answer"]
    echo "What is 482 + 917?" | python sample.py --model M --steering runs/x

Each question is wrapped in the model's chat template with the paper's system prompt (the
prompt training used), unless --raw. --steering takes comma-separated setups, each a file, a
run directory, a hub repo org/name[:file] (hub.resolve), or 'none' (the base model); each
question's completions are printed one setup after the other. With answers (--answer, one per
question, or a JSONL "answer" field) every completion is graded like training's reward and the
accuracy is printed per setup. Base and steered setups draw the same random numbers."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # a user error is one line, no usage dump
        raise SystemExit(f"{self.prog}: {message} (see --help)")


def parse_cli(argv=None) -> argparse.Namespace:
    p = _Parser(prog="sample.py", description=CLI_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("questions", nargs="*", help="questions (default: --file, else stdin)")
    p.add_argument("--model", required=True, help="checkpoint folder or hub id of the base model")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the model's)")
    p.add_argument("--steering", default="none", help="comma-separated setups: file, run dir, org/name[:file], none")
    p.add_argument("--steering-scale", type=float, default=1.0, help="alpha in h + alpha * steering[l]")
    p.add_argument("--any-base", action="store_true",
                   help="load steering files made for other base weights (same shapes): a vector's transfer")
    p.add_argument("--file", help="questions, one per line, or JSONL with a 'problem' (and 'answer') field")
    p.add_argument("--answer", action="append", help="reference answer, once per question, in order")
    p.add_argument("--raw", action="store_true", help="encode each question as is (no chat template)")
    p.add_argument("--n", type=int, default=1, help="completions per question and setup")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    p.add_argument("--max-new-tokens", type=int, default=512, help="completion length cap (tokens)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto = model.auto_dtype (bfloat16 on CUDA and on CPUs with native bf16 matmuls)")
    p.add_argument("--device", help="default cuda when available, else cpu")
    p.add_argument("--kv-cache-tokens", type=int, help="KV cache size in tokens (default: the sampler's)")
    p.add_argument("--batch", type=int, default=16,
                   help="questions per generate call, each under every --steering setup (progress moves per call)")
    args = p.parse_args(argv)
    for name, low in (("n", 1), ("max_new_tokens", 1), ("batch", 1), ("kv_cache_tokens", 1)):
        value = getattr(args, name)
        if value is not None and value < low:
            p.error(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
    if not (0 <= args.temperature < math.inf and 0 < args.top_p <= 1):  # (NaN fails every comparison)
        p.error(f"need a finite --temperature >= 0 and 0 < --top-p <= 1 (got {args.temperature}, {args.top_p})")
    if not math.isfinite(args.steering_scale):
        p.error(f"--steering-scale {args.steering_scale}: must be a finite number")
    return args


def read_questions(text: str, source: str) -> list[tuple[str, str | None]]:
    """(question, answer or None) per line of `text`: plain lines, or JSONL objects with a
    'problem' and optionally an 'answer' field (JSONL when the first line starts with '{')."""
    lines = [(i, line) for i, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines or not lines[0][1].lstrip().startswith("{"):
        return [(line.strip(), None) for _, line in lines]
    rows = []
    for i, line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source} line {i}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("problem"), str):
            raise ValueError(f"{source} line {i}: a JSONL question needs a string 'problem' field")
        rows.append((row["problem"], None if row.get("answer") is None else str(row["answer"])))
    return rows


def gather_questions(args) -> tuple[list[str], list[str | None]]:
    items = [(q, None) for q in args.questions]
    if args.file:
        if not Path(args.file).is_file():
            raise FileNotFoundError(f"--file {args.file}: no such file")
        items += read_questions(Path(args.file).read_text(encoding="utf-8"), args.file)
    elif not items and not sys.stdin.isatty():
        items = read_questions(sys.stdin.read(), "stdin")
    if not items:
        raise ValueError("no question given: pass questions as arguments, --file FILE, or pipe them on stdin")
    empty = [i + 1 for i, (q, _) in enumerate(items) if not q.strip()]
    if empty:
        raise ValueError(f"question {empty[0]} of {len(items)} is empty: nothing to answer")
    questions, answers = [q for q, _ in items], [a for _, a in items]
    if args.answer is not None:
        if len(args.answer) != len(questions):
            raise ValueError(f"--answer given {len(args.answer)} times for {len(questions)} questions")
        answers = list(args.answer)
    return questions, answers


def steering_setups(model, specs: str, scale: float = 1.0, any_base: bool = False) -> list[tuple[str, torch.Tensor]]:
    """(label, steering tensor (L, d) as the forward adds it) per comma-separated setup, repeats
    dropped; 'none' is the zero vector. They run side by side in one batch, so they must steer at
    one point (--steer-at of their runs); the model's adapter is left steering there."""
    import hub
    setups, points = [], {}
    for spec in dict.fromkeys(s.strip() for s in specs.split(",") if s.strip()) or ["none"]:
        if spec.lower() == "none":
            setups.append(("base", torch.zeros_like(model.steering)))
        else:
            model.load_steering(hub.resolve(spec), check_base=not any_base)
            alpha = "" if scale == 1 else f" (alpha {scale:g})"
            setups.append((f"steered {spec}{alpha}", model.adapter.in_force()))
            points.setdefault(model.adapter.steer_at, spec)
    if len(points) > 1:
        raise ValueError(f"--steering: {' and '.join(f'{f} steers {at}' for at, f in points.items())}; one batch "
                         "holds vectors of one --steer-at point: run them in separate calls")
    return setups


def encode_questions(tokenizer, args, questions) -> list[list[int]]:
    """Token ids of each question: in the chat template with the paper's system prompt, or as is (--raw)."""
    return [tokenizer.encode(q) if args.raw else tokenizer.encode_prompt(q) for q in questions]


def generate_all(model, sampler, tokenizer, args, questions, answers, setups, emit=print, progress=None) -> list[dict]:
    """Every completion of every setup, batch by batch, printed as each batch ends; one record each.
    The setups run side by side: one generate call per batch of questions, each setup's copy of a
    question steered by its own row of the table, and drawing what it would draw alone."""
    prompts = encode_questions(tokenizer, args, questions)
    model.adapter.set_table(torch.stack([vector for _, vector in setups]))  # setup k: row k + 1
    records, started, generated = [], time.perf_counter(), 0
    for start in range(0, len(prompts), args.batch):
        batch = prompts[start:start + args.batch]
        ids = range(start, start + len(batch))
        out = sampler.generate(batch * len(setups), n=args.n, max_new_tokens=args.max_new_tokens,
                               temperature=args.temperature, top_p=args.top_p,
                               stop_token_ids=tokenizer.stop_token_ids, seed=args.seed,
                               prompt_ids=[*ids] * len(setups),
                               vectors=[k + 1 for k in range(len(setups)) for _ in batch])
        outputs = [out[k * len(batch):(k + 1) * len(batch)] for k in range(len(setups))]  # per setup, per question
        generated += sum(len(c.tokens) for group in out for c in group)
        if progress is not None:
            progress.set_postfix_str(f"{generated / (time.perf_counter() - started):.0f} tok/s", refresh=False)
            progress.update(len(batch) * len(setups))
        batch_records = [dict(question=start + i, setup=label, sample=j, tokens=c.tokens, finish_reason=c.finish_reason,
                              text=tokenizer.decode(c.tokens, skip_special_tokens=True), answer=answers[start + i])
                         for i in range(len(batch)) for (label, _), out in zip(setups, outputs)
                         for j, c in enumerate(out[i])]
        graded = [r for r in batch_records if r["answer"] is not None]
        if graded:
            import reward  # only grading needs math-verify
            texts, golds = [r["text"] for r in graded], [r["answer"] for r in graded]
            for r, score in zip(graded, reward.score_batch(texts, golds)):
                r["reward"] = score
        for r in batch_records:
            if r["setup"] == setups[0][0] and r["sample"] == 0:
                emit(f"=== [{r['question'] + 1}/{len(questions)}] {questions[r['question']]}")
            emit(f"--- {completion_label(r, args)} ---\n{r['text']}")
        records += batch_records
    return records


def completion_label(r: dict, args) -> str:
    parts = [r["setup"]] + ([f"sample {r['sample'] + 1}/{args.n}"] if args.n > 1 else [])
    if r["finish_reason"] == "length":
        parts.append(f"truncated at {args.max_new_tokens} tokens")
    if "reward" in r:
        import reward
        verdict = "correct" if r["reward"] == 1.0 else f"wrong: boxed {reward.extract_boxed(r['text'])!r}"
        parts.append(f"{verdict}, answer {r['answer']!r}")
    return ", ".join(parts)


def accuracy_lines(records: list[dict], setups) -> list[str]:
    lines = []
    for label, _ in setups:
        scores = [r["reward"] for r in records if r["setup"] == label and "reward" in r]
        if scores:
            lines.append(f"accuracy {label}: {sum(scores):g}/{len(scores)} = {100 * sum(scores) / len(scores):.1f}%")
    return lines


def main(argv=None) -> list[dict]:
    args = parse_cli(argv)
    try:
        return _run(args)
    except (ValueError, FileNotFoundError) as e:  # user errors: one line, no traceback
        raise SystemExit(f"sample.py: {e}") from None


def _run(args) -> list[dict]:
    from tqdm import tqdm
    questions, answers = gather_questions(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {args.device!r} is not a torch device") from None
    available = memory.available_bytes(device)  # before the weights load: the plan counts them
    model, tokenizer = M.load_for_cli(args.model, args.tokenizer, args.dtype, device)
    setups = steering_setups(model, args.steering, args.steering_scale, args.any_base)
    model.steering_scale = args.steering_scale
    # the KV pool from the memory plan: one batch of questions x n at once, at most 90 % of what the
    # weights leave (no backward here); an explicit --kv-cache-tokens that cannot fit is refused
    longest = max(map(len, encode_questions(tokenizer, args, questions))) + args.max_new_tokens
    plan = memory.plan(model.config, model.embed_tokens.weight.dtype, device, available=available, trainable=0,
                       sequences=min(args.batch, len(questions)) * args.n * len(setups), longest=longest,
                       backward=False,
                       kv_cache_tokens=args.kv_cache_tokens, gpu_memory_fraction=0.9)
    sampler = Sampler(model, vocab_size=tokenizer.vocab_size, kv_cache_tokens=plan.kv_cache_tokens,
                      max_seq_len=max(longest, 16))
    sampler.on_progress = lambda st: print(  # a long call says how far it is, every PROGRESS_SECONDS
        f"sample.py: {st.finished}/{st.sequences} answers done, {st.decode_tokens:,} tokens at "
        f"{st.decode_tokens / max(st.decode_seconds + st.prefill_seconds, 1e-9):.0f} tok/s", file=sys.stderr, flush=True)
    # a bar (on stderr) only for an interactive run of several generate calls; printing goes
    # through it so the bar is redrawn below the text
    progress = tqdm(total=len(questions) * len(setups), unit="question", file=sys.stderr,
                    disable=not sys.stdout.isatty() or len(questions) <= args.batch)
    emit = (lambda s: progress.write(s, file=sys.stdout)) if not progress.disable else print
    records = generate_all(model, sampler, tokenizer, args, questions, answers, setups, emit, progress)
    progress.close()
    for line in accuracy_lines(records, setups):
        print(line)
    return records


if __name__ == "__main__":
    cluster.run_cli(main)
