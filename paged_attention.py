"""Attention on the paged KV cache: storing new keys/values into their slots and single-token
(decode) attention through block tables. Each operation comes twice, with one contract:

- `*_torch`: plain PyTorch, the CPU path and the reference the kernels are tested against;
- `*_triton`: Triton kernels, the GPU hot path (tests run them on CPU tensors under
  TRITON_INTERPRET=1, set before this module is imported).

Layout shared with sample.py: one layer's cache is k_cache / v_cache (num_blocks, block_size,
KVH, D); token i of a sequence lives at slot = block_table[i // block_size] * block_size +
i % block_size. Prefill attention needs no kernel here: sample.py runs each packed sequence
through model.causal_attention.
"""
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without triton still get the PyTorch path
    triton = None

HAS_TRITON = triton is not None

# -----------------------------------------------------------------------------
# PyTorch reference path


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

if HAS_TRITON:

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
    def _attend_block(q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, block_tables_ptr, b, stride_bt, j, seq_len, kvh,
                      scale, KVH: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, UPCAST: tl.constexpr,
                      IEEE: tl.constexpr):
        # one block of the sequence's keys: scores, online-softmax update of (m_i, l_i, acc)
        toks = tl.arange(0, BLOCK)
        d = tl.arange(0, D)
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
        return m_new, l_i, acc * alpha[:, None] + pv

    @triton.jit
    def _paged_decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, out_ptr, lse_ptr,
                             scale, stride_bt, blocks_per_split,
                             KVH: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr,
                             BLOCK: tl.constexpr, NUM_SPLITS: tl.constexpr, UPCAST: tl.constexpr,
                             IEEE: tl.constexpr, WHILE_LOOP: tl.constexpr):
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
        if WHILE_LOOP:  # the interpreter of triton <= 3.6 cannot take a runtime bound in range()
            j = first
            while j < last:
                m_i, l_i, acc = _attend_block(q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, block_tables_ptr, b,
                                              stride_bt, j, seq_len, kvh, scale, KVH, D, BLOCK, UPCAST, IEEE)
                j += 1
        else:  # compiled: a for loop, which Triton can software-pipeline
            for j in range(first, last):
                m_i, l_i, acc = _attend_block(q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, block_tables_ptr, b,
                                              stride_bt, j, seq_len, kvh, scale, KVH, D, BLOCK, UPCAST, IEEE)
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
        NUM_SPLITS=num_splits, UPCAST=upcast, IEEE=upcast, WHILE_LOOP=INTERPRET)
    out = torch.empty(B, H, D, dtype=q.dtype, device=q.device)
    _merge_splits_kernel[(B * H,)](parts, lse, out, NUM_SPLITS=num_splits,
                                   SPLITS_PAD=max(2, triton.next_power_of_2(num_splits)), D=D)
    return out
