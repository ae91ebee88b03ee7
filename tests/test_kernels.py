"""kernels.py: every Triton kernel (run by the interpreter on CPU tensors, TRITON_INTERPRET=1
set in conftest) against its PyTorch reference twin, in each cache dtype."""
import pytest
import torch

import kernels

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
def test_store_kv_kernel(dtype):
    torch.manual_seed(0)
    k_cache, v_cache = (torch.randn(5, 16, 2, 16).to(dtype) for _ in range(2))
    k, v = (torch.randn(6, 2, 16).to(dtype) for _ in range(2))
    slots = torch.tensor([0, 17, 15, 16, -1, 79])  # block boundaries, and a padding row (-1) that must be skipped
    want_k, want_v = k_cache.clone(), v_cache.clone()
    keep = slots >= 0
    kernels.store_kv_torch(want_k, want_v, k[keep], v[keep], slots[keep])
    kernels.store_kv_triton(k_cache, v_cache, k, v, slots)
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
    got = kernels.paged_decode_attention_triton(q, k_cache, v_cache, table, seq_lens, scale, num_splits=splits)
    want = kernels.paged_decode_attention_torch(q.float(), k_cache.float(), v_cache.float(), table.long(), seq_lens,
                                                scale)
    assert got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)
    assert torch.equal(got[4], torch.zeros_like(got[4])), "an empty sequence must give zeros, not NaN"
