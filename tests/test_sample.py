"""sample.py against references: naive full-recompute decoding with model.py, HF generate,
model.py's log-softmax, the softmax distribution itself, and the sampler's PyTorch path for its
Triton path (kernels run by the interpreter on CPU tensors; the kernels alone: test_paged_attention.py).
The CLI (python sample.py) against HF generate on the chat prompt HF's own tokenizer renders."""
import io
import os
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import model as M
import sample
import data
from conftest import REAL_MODELS, TOKENIZERS, hf_model, token_logprobs, write_checkpoint, needs_math_verify


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


def test_a_long_call_reports_its_progress(qwen, monkeypatch):
    """on_progress sees the call's sequences finish one by one up to all of them, and the tokens
    grow (every PROGRESS_SECONDS: here every step)."""
    monkeypatch.setattr(sample, "PROGRESS_SECONDS", 0.0)
    prompts = random_prompts([3, 17, 5])
    sampler = sample.Sampler(qwen, kv_cache_tokens=512)
    seen = []
    sampler.on_progress = lambda st: seen.append((st.finished, st.sequences, st.decode_tokens))
    lengths = [4, 9, 14]
    sampler.generate(prompts, n=2, max_new_tokens=lengths, temperature=0)
    finished = [f for f, _, _ in seen]
    assert finished == sorted(finished) and finished[-1] == 6 and {t for _, t, _ in seen} == {6}
    assert 0 < seen[0][2] < seen[-1][2] <= 2 * sum(lengths)


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


@pytest.mark.parametrize("use_triton", [False, True])
def test_lora_and_post_attn_steering_decode_like_naive_greedy(qwen, use_triton):
    """Other adapters enter the sampler's forward (prefill and decode, PyTorch and Triton paths)
    exactly as model.py's own: greedy equals full-recompute greedy."""
    prompts = random_prompts([15, 18], seed=4)  # decoding crosses the first block boundary
    torch.manual_seed(1)
    for kind, options in (("lora", dict(lora_rank=2, layers="1")), ("steering", dict(steer_at="post-attn"))):
        qwen.set_adapter(kind, **options)
        with torch.no_grad():
            for p in qwen.trainable_parameters():
                p.copy_(torch.randn_like(p) * (3.0 if kind == "lora" else 0.5))
        try:
            results = sample.Sampler(qwen, kv_cache_tokens=256, use_triton=use_triton).generate(
                prompts, n=1, max_new_tokens=6, temperature=0)
            with torch.no_grad():
                want = [naive_greedy(qwen, p, 6) for p in prompts]
            assert [r[0].tokens for r in results] == want, kind
        finally:
            qwen.set_adapter("steering")
    base = sample.Sampler(qwen, kv_cache_tokens=256).generate(prompts, n=1, max_new_tokens=6, temperature=0)
    assert [r[0].tokens for r in base] != want  # the adapters did change the greedy path


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
        alone = sampler.generate([prompt], n=2, max_new_tokens=budget, temperature=1.0, seed=3, prompt_ids=[i])[0]
        assert [c.tokens for c in together[i]] == [c.tokens for c in alone]
        assert all(len(c.tokens) <= budget for c in together[i])
    assert together[1][0].tokens == [] and together[1][0].finish_reason == "length"
    with pytest.raises(ValueError, match="budgets for 3 prompts"):
        sampler.generate(prompts, n=1, max_new_tokens=[4, 4])


# -----------------------------------------------------------------------------
# The command line


# interpreted Triton: a shorter run
@pytest.mark.parametrize("use_triton,new_tokens,pool_blocks", [(False, 20, 5), (True, 6, 3)])
def test_vectors_side_by_side_equal_one_at_a_time(qwen, use_triton, new_tokens, pool_blocks):
    """Each prompt under each of 4 rows (the base and 3 vectors at different strengths) in ONE call,
    the copies sharing prompt ids, gives what 4 calls with that vector as model.steering give: the
    same tokens, the same log-probs. The pool is too small for the batch, so sequences are pre-empted
    and re-prefilled under their own rows; a prompt's KV is shared only by its rollouts."""
    prompts = random_prompts([15, 18, 7], seed=5)
    g = torch.Generator().manual_seed(2)
    vectors = torch.randn(3, *qwen.steering.shape, generator=g) * torch.tensor([0.3, 0.6, -1.2])[:, None, None]
    kw = dict(n=2, max_new_tokens=new_tokens, temperature=1.0, seed=7)
    try:
        alone = []
        for v in [torch.zeros_like(qwen.steering), *vectors]:
            with torch.no_grad():
                qwen.steering.copy_(v)
            alone.append(sample.Sampler(qwen, kv_cache_tokens=1024, use_triton=use_triton).generate(prompts, **kw))
        qwen.set_adapter("steering")
        qwen.adapter.set_table(vectors)
        sampler = sample.Sampler(qwen, kv_cache_tokens=16 * pool_blocks, use_triton=use_triton)
        together = sampler.generate(prompts * 4, prompt_ids=[0, 1, 2] * 4,
                                    vectors=[r for r in range(4) for _ in prompts], **kw)
        assert sampler.stats.preemptions > 0
        assert_pool_whole(sampler)
    finally:
        qwen.set_adapter("steering")
    for row in range(4):
        for p in range(3):
            got, want = together[3 * row + p], alone[row][p]
            assert [c.tokens for c in got] == [c.tokens for c in want], (row, p)
            for a, b in zip(got, want):
                torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)
    assert len({tuple(alone[row][0][0].tokens) for row in range(4)}) > 1  # the vectors change the text


def test_a_seed_per_prompt_draws_what_each_seed_draws_alone(flat):
    """train.py's runs side by side each sample with their own seed, in one call."""
    sampler = sample.Sampler(flat, kv_cache_tokens=512)
    prompts = random_prompts([6, 9], seed=8)
    kw = dict(n=2, max_new_tokens=8, temperature=1.0)
    together = sampler.generate(prompts * 2, seed=[3, 3, 2 ** 40 + 5, 2 ** 40 + 5], prompt_ids=[0, 1, 0, 1], **kw)
    for i, seed in enumerate((3, 2 ** 40 + 5)):
        alone = sampler.generate(prompts, seed=seed, **kw)
        assert [[c.tokens for c in g] for g in together[2 * i:2 * i + 2]] == [[c.tokens for c in g] for g in alone]
    assert together[0][0].tokens != together[2][0].tokens
    with pytest.raises(ValueError, match="seed has 1 seeds for 2 prompts"):
        sampler.generate(prompts, seed=[1], **kw)


def test_vectors_refused_where_they_cannot_work(qwen):
    sampler = sample.Sampler(qwen, kv_cache_tokens=256)
    prompts = random_prompts([5, 6])
    with pytest.raises(ValueError, match="holds no table of vectors"):
        sampler.generate(prompts, vectors=[0, 1])
    try:
        qwen.adapter.set_table(torch.zeros(2, *qwen.steering.shape))
        with pytest.raises(ValueError, match=r"rows 0..3 outside the table's 0..2"):
            sampler.generate(prompts, vectors=[0, 3])
        with pytest.raises(ValueError, match="vectors has 1 rows for 2 prompts"):
            sampler.generate(prompts, vectors=[1])
        qwen.set_adapter("lora")
        with pytest.raises(ValueError, match="'lora' adapter holds no table"):
            sampler.generate(prompts, vectors=[0, 1])
    finally:
        qwen.set_adapter("steering")


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory):
    """A tiny random model with the real Qwen2.5 tokenizer (so the real vocabulary: 151,936 rows).
    Untied and 32 wide: its greedy text varies from token to token (tied tiny models repeat one)."""
    tok_dir = TOKENIZERS / "qwen2.5"
    if not (tok_dir / "tokenizer.json").is_file():
        pytest.skip(f"{tok_dir} is absent (the shared tokenizers)")
    folder = write_checkpoint(tmp_path_factory.mktemp("tiny_chat"), "qwen2-untied", vocab_size=151936,
                              hidden_size=32, intermediate_size=64)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / name, folder / name)
    return folder


def hf_chat_greedy(folder, questions, max_new_tokens, dtype=torch.float32):
    """HF transformers end to end: its tokenizer renders the chat template with the paper's system
    prompt, its generate decodes greedily, stopping at the chat end tokens and never emitting the
    embedding's padding rows past the tokenizer's vocabulary. Returns (tokens, text) per question."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    stop = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    out = []
    for q in questions:
        messages = [{"role": "system", "content": data.SYSTEM_PROMPT}, {"role": "user", "content": q}]
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
        x = torch.tensor([ids])
        with torch.no_grad():
            gen = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=max_new_tokens,
                              eos_token_id=stop, pad_token_id=stop[0],
                              suppress_tokens=list(range(len(tok), hf.config.vocab_size)))[0, len(ids):].tolist()
        out.append((gen, tok.decode(gen, skip_special_tokens=True)))
    return out


def test_cli_greedy_equals_hf_generate_on_the_chat_prompt(tiny_chat, capsys):
    questions = ["What is 2+2?", "Name three colours."]
    records = sample.main(["--model", str(tiny_chat), "--dtype", "float32", "--max-new-tokens", "12",
                           "--kv-cache-tokens", "4096", *questions])
    printed = capsys.readouterr().out
    want = hf_chat_greedy(tiny_chat, questions, 12)
    assert [r["tokens"] for r in records] == [tokens for tokens, _ in want]
    assert want[0][0] != want[1][0]  # the two prompts really lead to different text
    for i, (q, (_, text)) in enumerate(zip(questions, want)):
        assert f"=== [{i + 1}/2] {q}\n--- base" in printed and f"---\n{text}\n" in printed


@needs_math_verify
def test_cli_side_by_side_raw_and_file_questions(tiny_chat, tmp_path, capsys):
    """--steering none,FILE: base then steered per question, the steered one equal to naive greedy
    decoding with the vector loaded; --raw encodes the text as is; questions come from JSONL."""
    model = M.Transformer.from_pretrained(tiny_chat, dtype=torch.float32)
    torch.manual_seed(0)
    with torch.no_grad():
        model.steering.normal_(0, 1.0)
    model.save_steering(tmp_path / "steering.safetensors")
    questions = ["The capital of France is", "1, 2, 3,"]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(dict(problem=q, answer="x")) + "\n" for q in questions))
    records = sample.main(["--model", str(tiny_chat), "--dtype", "float32", "--max-new-tokens", "8",
                           "--kv-cache-tokens", "4096", "--raw", "--file", str(tmp_path / "q.jsonl"),
                           "--steering", f"none,{tmp_path},none", "--steering-scale", "0.5", "--batch", "1"])
    tok = data.Tokenizer.from_dir(tiny_chat)
    steered = f"steered {tmp_path} (alpha 0.5)"
    assert [(r["question"], r["setup"]) for r in records] == [(0, "base"), (0, steered), (1, "base"), (1, steered)]
    for r in records:
        prompt = tok.encode(questions[r["question"]])
        model.steering_scale = 0.5 if r["setup"] != "base" else 0.0
        assert r["tokens"] == naive_greedy(model, prompt, 8), r
    assert records[0]["tokens"] != records[1]["tokens"]  # the vector changes the text
    printed = capsys.readouterr().out
    assert printed.index("--- base, truncated at 8 tokens, wrong: boxed None, answer 'x' ---") < printed.index(
        f"--- {steered}, truncated") < printed.index("=== [2/2]")
    assert "accuracy base: 0/2 = 0.0%" in printed


class FakeTokenizer:
    """Prompts are the question's characters; a completion decodes to the text its token ids spell."""
    stop_token_ids = [0]

    def encode_prompt(self, q):
        return [ord(c) for c in q]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(map(chr, ids))


class EchoSampler:
    """Every completion is the question itself, so its \\boxed{} is known."""
    def generate(self, prompts, n, **kw):
        return [[sample.Completion(list(p), [0.0] * len(p), "stop") for _ in range(n)] for p in prompts]


@needs_math_verify
def test_cli_grades_with_the_reward_and_prints_accuracy():
    args = sample.parse_cli(["--model", "m", "--n", "2", "x"])
    questions = ["so \\boxed{4}", "so \\boxed{\\frac{1}{2}}", "no box"]
    answers = ["4", "0.5", "3"]
    lines = []
    setups = [("base", torch.zeros(1))]
    model = SimpleNamespace(adapter=SimpleNamespace(set_table=lambda v: None))  # the echo needs no vectors
    records = sample.generate_all(model, EchoSampler(), FakeTokenizer(), args,
                                  questions, answers, setups, emit=lines.append)
    assert [r["reward"] for r in records] == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    assert lines[1] == "--- base, sample 1/2, correct, answer '4' ---\nso \\boxed{4}"
    assert lines[-1] == "--- base, sample 2/2, wrong: boxed None, answer '3' ---\nno box"
    assert sample.accuracy_lines(records, setups) == ["accuracy base: 4/6 = 66.7%"]


def test_cli_reads_questions_as_lines_or_jsonl():
    assert sample.read_questions("a b\n\n c \n", "f") == [("a b", None), ("c", None)]
    jsonl = '{"problem": "p1", "answer": 12}\n{"problem": "p2"}\n'
    assert sample.read_questions(jsonl, "f") == [("p1", "12"), ("p2", None)]
    with pytest.raises(ValueError, match="f line 2: a JSONL question needs a string 'problem'"):
        sample.read_questions('{"problem": "p1"}\n{"question": "p2"}\n', "f")
    with pytest.raises(ValueError, match="f line 1: not JSON"):
        sample.read_questions('{"problem": \n', "f")


def test_cli_questions_from_stdin(monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("q1\nq2\n"))
    args = sample.parse_cli(["--model", "m", "--answer", "1", "--answer", "2"])
    assert sample.gather_questions(args) == (["q1", "q2"], ["1", "2"])


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("argv, stdin, message", [
    (["--model", "m"], Terminal(), "no question given"),
    (["--model", "m"], io.StringIO(""), "no question given"),
    (["--model", "m", "--file", "/nonexistent/q.txt"], None, "--file /nonexistent/q.txt: no such file"),
    (["--model", "m", "--answer", "1", "q1", "q2"], None, "--answer given 1 times for 2 questions"),
    (["--model", "m", "--n", "0", "q"], None, "--n must be >= 1, got 0"),
    (["--model", "m", "--top-p", "0", "q"], None, "0 < --top-p <= 1"),
    (["--model", "m", "--temperature", "x", "q"], None, "invalid float value: 'x'"),
    (["--model", "m", "--dtype", "fp8", "q"], None, "invalid choice: 'fp8'"),
    (["--model", "/nonexistent/model", "q"], None, "/nonexistent/model: not a checkpoint folder"),
    (["q"], None, "the following arguments are required: --model"),
])
def test_cli_user_errors_are_one_line(argv, stdin, message, monkeypatch):
    monkeypatch.setattr("sys.stdin", stdin or Terminal())
    with pytest.raises(SystemExit) as exit_:
        sample.main(argv)
    text = str(exit_.value.code)
    assert message in text and "\n" not in text and text.startswith("sample.py: ")


def test_cli_missing_steering_is_one_line(tiny_chat, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        sample.main(["--model", str(tiny_chat), "--steering", f"none,{tmp_path}/nope.safetensors", "q"])
    assert str(exit_.value.code) == f"sample.py: --steering: {tmp_path}/nope.safetensors is not a file " \
                                    "(nor a hub repo 'org/name[:file]')"


REAL_QWEN = REAL_MODELS / "qwen2.5-coder-0.5b-instruct"


@pytest.mark.slow
@pytest.mark.skipif(not (REAL_QWEN / "model.safetensors").is_file(), reason=f"{REAL_QWEN} is absent")
def test_cli_greedy_equals_hf_generate_real_qwen(capsys):
    questions = ["What is 482 + 917?", "Is 91 a prime number?"]
    records = sample.main(["--model", str(REAL_QWEN), "--dtype", "float32", "--max-new-tokens", "64",
                           "--kv-cache-tokens", "4096", *questions])
    want = hf_chat_greedy(REAL_QWEN, questions, 64)
    assert [r["tokens"] for r in records] == [tokens for tokens, _ in want]
    printed = capsys.readouterr().out
    assert all(f"---\n{text}\n" in printed for _, text in want)


EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*/steering.safetensors"))


@pytest.mark.parametrize("vector", EXAMPLES, ids=lambda p: p.parent.name)
def test_an_example_is_the_run_its_files_say(vector):
    """examples/*: the vector, its run's config and its metrics agree: the file's metadata is the
    config's (model, dataset, final step), and the last metrics line's per-layer norms are the file's."""
    import train_config
    vectors, meta = M.read_steering(vector)
    cfg = train_config.load_config(vector.parent / "config.json", resume="")
    rows = [json.loads(line) for line in (vector.parent / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, cfg.max_steps + 1))
    assert (meta["base_model"], meta["dataset"], int(meta["step"])) == (cfg.model, cfg.dataset, cfg.max_steps)
    assert vectors.shape == (int(meta["num_layers"]), int(meta["hidden_size"])) and vectors.isfinite().all()
    assert vectors.norm(dim=-1).tolist() == pytest.approx(rows[-1]["steering_norm"], rel=1e-5)


def test_examples_exist():
    assert EXAMPLES, "examples/ holds no trained vector"


@pytest.mark.slow
@pytest.mark.skipif(not (REAL_QWEN / "model.safetensors").is_file(), reason=f"{REAL_QWEN} is absent")
@needs_math_verify
def test_the_arithmetic_example_answers_what_the_base_gets_wrong(capsys):
    """examples/README.md's answer: greedy, the base model boxes a wrong number, the vector -351."""
    vector = [p for p in EXAMPLES if p.parent.name.startswith("arithmetic")][0]
    records = sample.main(["--model", str(REAL_QWEN), "--steering", f"none,{vector}", "--max-new-tokens", "96",
                           "--answer=-351", "What is 401 - 752?"])
    assert [r["reward"] for r in records] == [0.0, 1.0]
    assert "\\boxed{-351}" in records[1]["text"]


def test_an_empty_question_is_one_line(tiny_with_tokenizer, tmp_path):
    proc = subprocess.run([sys.executable, str(Path(sample.__file__)), "--model", str(tiny_with_tokenizer), ""],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].endswith("question 1 of 1 is empty: "
                                                                                  "nothing to answer"), proc.stderr


@pytest.mark.parametrize("flags,says", [
    (["--temperature", "nan"], "need a finite --temperature >= 0"), (["--top-p", "0"], "0 < --top-p <= 1"),
    (["--steering-scale", "inf"], "--steering-scale inf: must be a finite number"),
    (["--max-new-tokens", "-1"], "--max-new-tokens must be >= 1, got -1")])
def test_a_number_that_cannot_work_is_one_line_before_the_model_loads(tmp_path, flags, says):
    """The model path does not exist: the flag's error comes first, in one line, exit 2."""
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "sample.py"), "--model", str(tmp_path / "no-model"), *flags, "hi"],
                          cwd=root, capture_output=True, text=True, timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and says in lines[0], proc.stderr[-2000:]
