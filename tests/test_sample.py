"""sample.py against references: naive full-recompute decoding with model.py, HF generate,
model.py's log-softmax, the softmax distribution itself, and the sampler's PyTorch path for its
Triton path (kernels run by the interpreter on CPU tensors; the kernels alone: test_kernels.py)."""
import math

import pytest
import torch

import model as M
import sample
from conftest import hf_model, token_logprobs


@pytest.fixture(scope="module")
def qwen(tiny_qwen):
    return M.Transformer.from_pretrained(tiny_qwen, dtype=torch.float32)


@pytest.fixture(scope="module")
def flat():
    """A random model whose next-token distribution is broad (logits of std ~1), so sampling
    statistics see many tokens; the HF fixtures are deliberately sharp."""
    cfg = M.Config.from_dict(dict(model_type="qwen2", vocab_size=96, hidden_size=64, intermediate_size=128,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          tie_word_embeddings=True))
    torch.manual_seed(0)
    m = M.Transformer(cfg).eval()
    with torch.no_grad():
        m.embed_tokens.weight.mul_(0.15)
    return m


def random_prompts(lengths, vocab=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def naive_greedy(m, prompt, steps):
    """Full recompute of the whole sequence for every new token: the simplest possible decoder."""
    tokens = list(prompt)
    for _ in range(steps):
        tokens.append(m(torch.tensor([tokens]))[0, -1].argmax().item())
    return tokens[len(prompt):]


def reference_logprobs(m, prompt, completion, temperature=1.0, vocab_size=None):
    """log_softmax(model(prompt + completion) / T) at the completion's tokens, via model.py."""
    seq = torch.tensor([prompt + completion.tokens])
    return token_logprobs(m, seq[:, :-1], seq[:, 1:], temperature, vocab_size)[0, len(prompt) - 1:]


def assert_pool_whole(sampler):
    assert all(c == 0 for c in sampler.blocks.ref_counts)
    assert sorted(sampler.blocks.free_blocks) == list(range(sampler.blocks.num_blocks))

# -----------------------------------------------------------------------------
# Decoding equals the references


def test_greedy_matches_naive_decoding_with_preemption(qwen):
    prompts = random_prompts([3, 17, 31, 5, 40, 16, 1])
    sampler = sample.Sampler(qwen, kv_cache_tokens=16 * 14, block_size=16)
    results = sampler.generate(prompts, n=3, max_new_tokens=20, temperature=0)
    assert sampler.stats.preemptions > 0, "the pool was meant to be too small for all sequences at once"
    for prompt, rollouts in zip(prompts, results):
        want = naive_greedy(qwen, prompt, 20)
        assert len(rollouts) == 3
        for c in rollouts:
            assert c.tokens == want and c.finish_reason == "length"
            torch.testing.assert_close(torch.tensor(c.logprobs), reference_logprobs(qwen, prompt, c),
                                       atol=1e-4, rtol=0)
    assert_pool_whole(sampler)


def test_stop_tokens_end_a_completion_and_are_included(qwen):
    prompt = random_prompts([9], seed=3)[0]
    full = naive_greedy(qwen, prompt, 12)
    stop = full[5]
    first = full.index(stop)
    (c,), = sample.Sampler(qwen, kv_cache_tokens=512).generate([prompt], n=1, max_new_tokens=12, temperature=0,
                                                                stop_token_ids=[stop])
    assert c.tokens == full[:first + 1] and c.finish_reason == "stop" and len(c.logprobs) == first + 1


@pytest.mark.parametrize("family", ["qwen2-tied", "llama31"])
def test_greedy_matches_hf_generate(tmp_path, family):
    hf = hf_model(family)
    hf.generation_config.eos_token_id = None  # run the full length, as our sampler does without stop ids
    hf.save_pretrained(tmp_path)
    ours = M.Transformer.from_pretrained(tmp_path, dtype=torch.float32)
    prompts = random_prompts([4, 19, 33])
    results = sample.Sampler(ours, kv_cache_tokens=1024).generate(prompts, n=2, max_new_tokens=16, temperature=0)
    for prompt, rollouts in zip(prompts, results):
        x = torch.tensor([prompt])
        with torch.no_grad():  # an explicit mask: otherwise HF masks prompt ids equal to the pad id
            want = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=16,
                               pad_token_id=0)[0, len(prompt):].tolist()
        assert [c.tokens for c in rollouts] == [want, want]


def test_logprobs_match_model_with_steering_and_temperature(qwen):
    torch.manual_seed(0)
    try:
        with torch.no_grad():
            qwen.steering.normal_(0, 1.0)
        prompts = random_prompts([6, 21, 16], seed=1)
        sampler = sample.Sampler(qwen, kv_cache_tokens=16 * 10)
        results = sampler.generate(prompts, n=3, max_new_tokens=24, temperature=0.7, top_p=0.9, seed=5)
        assert sampler.stats.preemptions > 0
        for prompt, rollouts in zip(prompts, results):
            for c in rollouts:
                ref = reference_logprobs(qwen, prompt, c, temperature=0.7)
                torch.testing.assert_close(torch.tensor(c.logprobs), ref, atol=1e-4, rtol=0)
        # the steering must matter, or this test would not see a sampler that ignores it
        with torch.no_grad():
            qwen.steering.zero_()
        c = results[0][0]
        unsteered = reference_logprobs(qwen, prompts[0], c, temperature=0.7)
        assert (unsteered - torch.tensor(c.logprobs)).abs().max() > 1e-2
    finally:
        with torch.no_grad():
            qwen.steering.zero_()

# -----------------------------------------------------------------------------
# Sampling


def chi_square_critical(df, z=3.09):
    """Upper 0.1 % point of chi-square (Wilson-Hilferty approximation)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def test_sampling_at_temperature_one_matches_softmax(flat):
    prompt = random_prompts([5], seed=7)[0]
    draws = 3000
    results = sample.Sampler(flat, kv_cache_tokens=16 * 1024).generate([prompt], n=draws, max_new_tokens=1,
                                                                       temperature=1.0, seed=11)
    counts = torch.bincount(torch.tensor([c.tokens[0] for c in results[0]]), minlength=96).double()
    with torch.no_grad():
        probs = flat(torch.tensor([prompt]))[0, -1].double().softmax(-1)
    expected = probs * draws
    # pool the rare tokens into one bin so every bin expects >= 5 draws
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    assert big.sum() >= 30, "the test distribution is too peaked to say anything"
    chi2 = ((obs - exp) ** 2 / exp).sum().item()
    assert chi2 < chi_square_critical(len(obs) - 1), f"chi2 {chi2:.1f} over {len(obs) - 1} dof"


def test_top_p_cuts_the_tail_and_reports_full_logprobs(flat):
    prompt = random_prompts([5], seed=7)[0]
    top_p = 0.6
    with torch.no_grad():
        logp = flat(torch.tensor([prompt]))[0, -1].log_softmax(-1)
    probs, order = logp.exp().sort(descending=True)
    nucleus = set(order[(probs.cumsum(0) - probs) < top_p].tolist())
    sampler = sample.Sampler(flat, kv_cache_tokens=16 * 1024)
    cut = [c for c in sampler.generate([prompt], n=400, max_new_tokens=1, top_p=top_p, seed=1)[0]]
    free = [c.tokens[0] for c in sampler.generate([prompt], n=400, max_new_tokens=1, seed=1)[0]]
    assert {c.tokens[0] for c in cut} <= nucleus
    assert not set(free) <= nucleus, "without top_p the tail should show up"
    for c in cut:  # the log-prob is of the full distribution, not the renormalised nucleus
        assert abs(c.logprobs[0] - logp[c.tokens[0]].item()) < 1e-5


def test_seed_reproducible_and_independent_of_preemption(flat):
    prompts = random_prompts([7, 18, 30], seed=2)
    kw = dict(n=4, max_new_tokens=20, temperature=1.0, top_p=0.95)
    big = sample.Sampler(flat, kv_cache_tokens=4096)
    small = sample.Sampler(flat, kv_cache_tokens=16 * 10)
    a = big.generate(prompts, seed=123, **kw)
    b = big.generate(prompts, seed=123, **kw)
    c = small.generate(prompts, seed=123, **kw)
    d = big.generate(prompts, seed=124, **kw)
    assert small.stats.preemptions > 0
    tokens = lambda res: [[x.tokens for x in r] for r in res]  # noqa: E731
    assert tokens(a) == tokens(b) == tokens(c)
    assert tokens(a) != tokens(d)
    assert len({tuple(x) for x in tokens(a)[0]}) > 1, "rollouts of one prompt should differ"
    assert_pool_whole(small)


def test_ids_past_tokenizer_vocab_never_sampled(flat):
    prompts = random_prompts([4, 12], vocab=50, seed=4)  # the reference below scores prompt ids too
    sampler = sample.Sampler(flat, kv_cache_tokens=2048, vocab_size=50)
    results = sampler.generate(prompts, n=8, max_new_tokens=16, temperature=3.0, seed=0)
    seen = {t for r in results for c in r for t in c.tokens}
    assert max(seen) < 50 and len(seen) > 20
    c = results[1][0]
    ref = reference_logprobs(flat, prompts[1], c, temperature=3.0, vocab_size=50)
    torch.testing.assert_close(torch.tensor(c.logprobs), ref, atol=1e-4, rtol=0)

# -----------------------------------------------------------------------------
# Blocks and scheduling


def test_block_manager_ref_counts():
    bm = sample.BlockManager(3)
    a, b = bm.allocate(), bm.allocate()
    bm.share(a)
    bm.release(a)
    assert bm.num_free == 1 and bm.ref_counts[a] == 1
    bm.release(a)
    bm.release(b)
    assert bm.num_free == 3
    with pytest.raises(AssertionError):
        bm.release(a)


@pytest.mark.parametrize("length, max_new, peak", [
    (40, 1, 2 + 8),  # 2 full blocks shared once, the partial third block copied per rollout
    (32, 1, 2),  # no partial block: all 8 rollouts read the same 2 blocks
    (32, 2, 2 + 8),  # ... and the first decode step opens one block per rollout
])
def test_prompt_blocks_shared_by_rollouts(qwen, length, max_new, peak):
    sampler = sample.Sampler(qwen, kv_cache_tokens=16 * 64, block_size=16)
    sampler.generate(random_prompts([length]), n=8, max_new_tokens=max_new, seed=0)
    assert sampler.stats.peak_blocks_used == peak
    assert sampler.stats.prefill_tokens == length, "the prompt must be prefilled once for all rollouts"
    assert_pool_whole(sampler)


def test_oversized_request_raises_before_any_work(qwen, monkeypatch):
    sampler = sample.Sampler(qwen, kv_cache_tokens=64, block_size=16)
    calls = []
    monkeypatch.setattr(qwen, "hidden_states", lambda *a, **k: calls.append(1))
    with pytest.raises(ValueError, match="prompt 1: 30 prompt tokens"):
        sampler.generate(random_prompts([5, 30]), n=2, max_new_tokens=40)
    assert calls == [] and sampler.blocks.num_free == 4

# -----------------------------------------------------------------------------
# The sampler on the Triton kernels (TRITON_INTERPRET=1, see conftest)


def test_sampler_triton_path_matches_torch_path(qwen):
    prompts = random_prompts([15, 17], seed=9)  # decoding crosses the first block boundary
    kw = dict(n=2, max_new_tokens=4, temperature=1.0, seed=3)
    want = sample.Sampler(qwen, kv_cache_tokens=256).generate(prompts, **kw)
    got = sample.Sampler(qwen, kv_cache_tokens=256, use_triton=True).generate(prompts, **kw)
    for w, g in zip(want, got):
        for a, b in zip(w, g):
            assert a.tokens == b.tokens
            torch.testing.assert_close(torch.tensor(b.logprobs), torch.tensor(a.logprobs), atol=1e-4, rtol=0)


@torch.inference_mode()  # the pool is an inference tensor
def test_padded_decode_rows_are_inert(qwen):
    """What a CUDA-graph replay computes: a batch padded with rows of slot -1 and length 0, and a
    fixed-width block table, gives the real rows' logits and leaves the rest of the pool alone."""
    torch.manual_seed(0)
    sampler = sample.Sampler(qwen, kv_cache_tokens=16 * 8, use_triton=True)
    sampler.pool.copy_(torch.randn_like(sampler.pool))
    pool = sampler.pool.clone()
    tok, pos = torch.tensor([[5], [7]]), torch.tensor([[20], [3]])
    slot = torch.tensor([2 * 16 + 4, 5 * 16 + 3])
    table = torch.tensor([[0, 2], [5, 0]], dtype=torch.int32)
    lens = torch.tensor([21, 4], dtype=torch.int32)
    want = sampler.decode_logits(tok, pos, slot, table, lens)
    written = sampler.pool.clone()
    sampler.pool.copy_(pool)
    pad = lambda x, value: torch.cat([x, torch.full((2, *x.shape[1:]), value, dtype=x.dtype)])  # noqa: E731
    wide = torch.zeros(4, 6, dtype=torch.int32)
    wide[:2, :2] = table
    got = sampler.decode_logits(pad(tok, 0), pad(pos, 0), pad(slot, -1), wide, pad(lens, 0), num_splits=2)
    torch.testing.assert_close(got[:2], want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sampler.pool, written, atol=1e-5, rtol=1e-5)  # batch size changes matmul rounding
    flat = lambda p: p.view(p.shape[0], 2, -1, *p.shape[-2:])  # noqa: E731  (L, 2, slots, KVH, D)
    untouched = torch.ones(flat(pool).shape[2], dtype=torch.bool)
    untouched[slot] = False
    assert torch.equal(flat(sampler.pool)[:, :, untouched], flat(pool)[:, :, untouched])


def test_per_prompt_budgets_equal_separate_calls(qwen):
    """A list of budgets gives each prompt exactly what a call with its own budget gives."""
    sampler = sample.Sampler(qwen, kv_cache_tokens=512, block_size=16)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9]]
    budgets = [5, 0, 9]
    together = sampler.generate(prompts, n=2, max_new_tokens=budgets, temperature=1.0, seed=3)
    for i, (prompt, budget) in enumerate(zip(prompts, budgets)):
        alone = sampler.generate([prompt], n=2, max_new_tokens=budget, temperature=1.0, seed=3, prompt_offset=i)[0]
        assert [c.tokens for c in together[i]] == [c.tokens for c in alone]
        assert all(len(c.tokens) <= budget for c in together[i])
    assert together[1][0].tokens == [] and together[1][0].finish_reason == "length"
    with pytest.raises(ValueError, match="budgets for 3 prompts"):
        sampler.generate(prompts, n=1, max_new_tokens=[4, 4])
