"""paged_attention.py: every Triton kernel (run by the interpreter on CPU tensors, TRITON_INTERPRET=1
set in conftest) against its PyTorch reference twin, in each cache dtype; and each compiled for
real, ahead of time, for sm_90 (what the interpreter never does)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import paged_attention

ROOT = Path(__file__).resolve().parents[1]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
def test_store_kv_kernel(dtype):
    torch.manual_seed(0)
    k_cache, v_cache = (torch.randn(5, 16, 2, 16).to(dtype) for _ in range(2))
    k, v = (torch.randn(6, 2, 16).to(dtype) for _ in range(2))
    slots = torch.tensor([0, 17, 15, 16, -1, 79])  # block boundaries, and a padding row (-1) that must be skipped
    want_k, want_v = k_cache.clone(), v_cache.clone()
    keep = slots >= 0
    paged_attention.store_kv_torch(want_k, want_v, k[keep], v[keep], slots[keep])
    paged_attention.store_kv_triton(k_cache, v_cache, k, v, slots)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads, kv_heads, splits", [(4, 2, 1), (7, 1, 3), (4, 4, 2)])
def test_paged_decode_attention_kernel(dtype, heads, kv_heads, splits):
    torch.manual_seed(0)
    D, bs, num_blocks = 16, 16, 12
    seq_lens = torch.tensor([1, 16, 17, 40, 0], dtype=torch.int32)  # ragged, at and across block edges, empty
    table = torch.stack([torch.randperm(num_blocks)[:3] for _ in seq_lens]).to(torch.int32)
    q = (torch.randn(5, heads, D) * 2).to(dtype)
    k_cache, v_cache = (torch.randn(num_blocks, bs, kv_heads, D).to(dtype) for _ in range(2))
    scale = D ** -0.5
    got = paged_attention.paged_decode_attention_triton(q, k_cache, v_cache, table, seq_lens, scale, num_splits=splits)
    want = paged_attention.paged_decode_attention_torch(q.float(), k_cache.float(), v_cache.float(), table.long(), seq_lens,
                                                scale)
    assert got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)
    assert torch.equal(got[4], torch.zeros_like(got[4])), "an empty sequence must give zeros, not NaN"


# The interpreter never compiles: a kernel can pass every test above and still fail to compile
# (a tl.dot shape, a type mismatch in a loop-carried value, the compiled-only branch of a
# constexpr). This compiles each kernel ahead of time for an H100/H200 (sm_90), as the sampler
# launches them, in a child process where TRITON_INTERPRET is unset; ptxas ships with triton.
AOT = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import paged_attention

def compile_kernel(fn, pointers, scalars, constexprs):
    sig = {**pointers, **scalars, **{name: "constexpr" for name in constexprs}}
    consts = {(fn.arg_names.index(name),): value for name, value in constexprs.items()}
    return triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32))

done = []
for case in json.loads(sys.argv[1]):
    kv, g, d, splits = case["cache"], case["group"], case["head_dim"], case["splits"]
    upcast = kv == "fp32"
    c = compile_kernel(paged_attention._paged_decode_kernel,
                       dict(q_ptr="*" + kv, k_cache_ptr="*" + kv, v_cache_ptr="*" + kv, block_tables_ptr="*i32",
                            seq_lens_ptr="*i32", out_ptr="*fp32", lse_ptr="*fp32"),
                       dict(scale="fp32", stride_bt="i32", blocks_per_split="i32"),
                       dict(KVH=case["kv_heads"], GROUP=g, GROUP_PAD=max(16, triton.next_power_of_2(g)), D=d, BLOCK=16,
                            NUM_SPLITS=splits, UPCAST=upcast, IEEE=upcast, WHILE_LOOP=False))
    m = compile_kernel(paged_attention._merge_splits_kernel, dict(part_ptr="*fp32", lse_ptr="*fp32", out_ptr="*" + kv), {},
                       dict(NUM_SPLITS=splits, SPLITS_PAD=max(2, triton.next_power_of_2(splits)), D=d))
    row = case["kv_heads"] * d
    s = compile_kernel(paged_attention._store_kv_kernel, dict(k_ptr="*" + kv, v_ptr="*" + kv, k_cache_ptr="*" + kv,
                                                      v_cache_ptr="*" + kv, slot_ptr="*i64"),
                       dict(stride_k="i32", stride_v="i32"), dict(ROW=row, ROW_PAD=triton.next_power_of_2(row)))
    done.append([len(k.asm["cubin"]) for k in (c, m, s)])
print(json.dumps(done))
"""


@pytest.mark.skipif(not paged_attention.HAS_TRITON, reason="triton is not installed")
def test_kernels_compile_for_sm90():
    """Qwen2.5-1.5B's decode (12 q / 2 kv heads, D 128) in bf16 at 4 splits, Qwen2.5-7B's (28 / 4) in
    fp16, and MHA at D 64 in fp32 (the upcast / IEEE variant): every kernel yields a cubin."""
    cases = [dict(cache="bf16", kv_heads=2, group=6, head_dim=128, splits=4),
             dict(cache="fp16", kv_heads=4, group=7, head_dim=128, splits=1),
             dict(cache="fp32", kv_heads=8, group=1, head_dim=64, splits=2)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", AOT, json.dumps(cases)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sizes = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(sizes) == len(cases) and all(size > 0 for row in sizes for size in row), sizes
