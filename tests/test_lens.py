"""lens.py: the logit lens against naive loops and planted directions; every analysis on constructed
models whose answer is known (zero vectors, zeroed blocks, a vector only the norm's scale can see,
an attention change that is a pure shift of the scores), against HF's attention weights and
unbatched references; and the CLI end to end on a tiny model with a byte-level tokenizer."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lens
from conftest import TOKENIZERS, hf_model, token_logprobs, write_checkpoint, needs_math_verify
import model as M


def naive_cosines(vecs, weight):
    """(L, d), (V, d) -> (L, V), one token at a time."""
    return torch.tensor([[F.cosine_similarity(v, w, dim=0).item() for w in weight] for v in vecs])


@pytest.fixture
def planted():
    torch.manual_seed(0)
    weight = torch.randn(50, 16)
    steering = torch.randn(4, 16)
    steering[1] = 3.0 * weight[7]  # points exactly at token 7
    steering[2] = -0.5 * weight[11]  # points exactly away from token 11
    return steering, weight

# -----------------------------------------------------------------------------
# The logit lens


def test_planted_token_ranks_first_and_last(planted):
    steering, weight = planted
    out = lens.logit_lens(steering, weight, k=5)
    assert out.top_ids.shape == out.bottom_ids.shape == (4, 5)
    assert out.top_ids[1, 0] == 7 and out.top_cosine[1, 0] == pytest.approx(1.0, abs=1e-5)
    assert out.bottom_ids[2, 0] == 11 and out.bottom_cosine[2, 0] == pytest.approx(-1.0, abs=1e-5)
    assert (out.top_cosine[:, :-1] >= out.top_cosine[:, 1:]).all()  # best first
    assert (out.bottom_cosine[:, :-1] <= out.bottom_cosine[:, 1:]).all()  # most negative first
    assert torch.allclose(out.norms, steering.norm(dim=-1))
    assert out.top_dot[1, 0] == pytest.approx(3.0 * weight[7].dot(weight[7]).item(), rel=1e-5)


def test_matches_naive_loop(planted):
    steering, weight = planted
    out = lens.logit_lens(steering, weight, k=6, chunk_rows=7)  # chunks that do not divide V
    ref = naive_cosines(steering, weight)
    top = ref.topk(6, dim=-1)
    bottom = ref.topk(6, dim=-1, largest=False)
    assert torch.equal(out.top_ids, top.indices) and torch.equal(out.bottom_ids, bottom.indices)
    assert torch.allclose(out.top_cosine, top.values, atol=1e-5)
    assert torch.allclose(out.bottom_cosine, bottom.values, atol=1e-5)
    dots = steering @ weight.T  # (L, V): the logit change of each vector on its own
    assert torch.allclose(out.top_dot, dots.gather(1, out.top_ids), atol=1e-5)
    by_dot = lens.logit_lens(steering, weight, k=6, rank_by="dot", chunk_rows=7)
    assert torch.equal(by_dot.top_ids, dots.topk(6, dim=-1).indices)
    assert torch.equal(by_dot.bottom_ids, dots.topk(6, dim=-1, largest=False).indices)
    assert torch.allclose(by_dot.top_cosine, ref.gather(1, by_dot.top_ids), atol=1e-5)


def test_rank_by_dot_sees_row_norms():
    """A long unembedding row that is only roughly aligned wins on dot product, not on cosine."""
    weight = torch.eye(4, 8)
    weight[1] = 10 * (torch.eye(8)[0] + torch.eye(8)[1])  # cosine .71 with e_0, dot 10
    vec = torch.eye(8)[:1]
    assert lens.logit_lens(vec, weight, k=1).top_ids[0, 0] == 0
    assert lens.logit_lens(vec, weight, k=1, rank_by="dot").top_ids[0, 0] == 1


def test_after_norm_uses_the_norm_weights(planted):
    steering, weight = planted
    norm = M.RMSNorm(16, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(16) * 2 + 0.1)
    # a vector that becomes token 5's row only once the norm has scaled its channels
    steering[0] = weight[5] / norm.weight.detach() * 0.01
    out = lens.logit_lens(steering, weight, k=3, norm=norm)
    assert out.top_ids[0, 0] == 5 and out.top_cosine[0, 0] == pytest.approx(1.0, abs=1e-4)
    ref = naive_cosines(norm(steering).detach(), weight)
    assert torch.allclose(out.top_cosine, ref.topk(3, dim=-1).values, atol=1e-5)
    before = lens.logit_lens(steering, weight, k=3)
    assert before.top_cosine[0, 0] < 0.999  # without the norm it is not token 5's direction


def test_vocab_size_drops_padding_rows(planted):
    steering, weight = planted
    steering[3] = weight[49]
    assert lens.logit_lens(steering, weight, k=2).top_ids[3, 0] == 49
    cut = lens.logit_lens(steering, weight, k=2, vocab_size=49)
    assert (cut.top_ids < 49).all() and (cut.bottom_ids < 49).all()


def test_zero_vector_is_reported_not_ranked():
    out = lens.logit_lens(torch.zeros(2, 8), torch.randn(10, 8), k=3)
    assert torch.equal(out.top_cosine, torch.zeros(2, 3)) and torch.equal(out.top_dot, torch.zeros(2, 3))
    rows = lens.lens_rows(out, lambda i: f"t{i}")
    assert "zero vector" in lens.format_table(rows)


def test_cosine_matrix_matches_naive(planted):
    steering, _ = planted
    steering[0] = 0
    got = lens.cosine_matrix(steering)
    for i in range(4):
        for j in range(4):
            want = 0.0 if i == 0 or j == 0 else F.cosine_similarity(steering[i], steering[j], dim=0).item()
            assert got[i, j].item() == pytest.approx(want, abs=1e-6)


def test_token_display_escapes_whitespace():
    assert lens.show_token(" Because") == "␣Because"
    assert lens.show_token("\n\n") == "\\n\\n"
    assert lens.show_token("\t\x01") == "\\t\\x01"
    assert lens.show_token("") == "∅"
    assert lens.show_token("abcdefghijklmnopqrstuvwxyz", width=10) == "abcdefghi…"
    assert lens.show_score(0.4123) == ".41" and lens.show_score(-0.1234) == "-.12"
    assert lens.width("电动 a") == 6 and lens.pad("电动", 6) == "电动  "  # wide characters take two columns


def test_tables_align():
    rows = [dict(layer=0, norm=1.5, top=[dict(token="a", cosine=0.5, dot=2.0), dict(token="bb", cosine=0.4, dot=1.0)],
                 bottom=[dict(token="cccc", cosine=-0.5, dot=-2.0), dict(token="d", cosine=-0.6, dot=-1.0)]),
            dict(layer=12, norm=10.25,
                 top=[dict(token=" x\n", cosine=0.9, dot=12.5), dict(token="y", cosine=0.1, dot=0.5)],
                 bottom=[dict(token="z", cosine=-0.1, dot=-0.1), dict(token="w", cosine=-0.2, dot=-0.3)])]
    lines = lens.format_table(rows).splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("L0   |v|= 1.50  + a .50 (2.0)") and "␣x\\n .90 (12.5)" in lines[2]
    assert len({line.index(" | ") for line in lines}) == 1  # the second column starts at one place
    table = lens.aligned(["name", "x"], [["电动", "1.5"], ["ab", "-10.25"]]).splitlines()
    assert len({lens.width(line) for line in table}) == 1  # right-aligned last column ends at one place

# -----------------------------------------------------------------------------
# Constructed models and sequences


class Decoder:
    """The one tokenizer method the analyses call, for models without a tokenizer."""
    def decode(self, ids, skip_special_tokens=False):
        return "".join(f"<{i}>" for i in ids)


def study_of(model, vectors):
    with torch.no_grad():
        model.steering.zero_()
    return lens.Study(model, Decoder(), vectors, model.config.vocab_size)


def random_sequences(vocab, count=5, seed=0):
    """Prompts and completions of varied lengths (so batches pad), two sequences per problem."""
    g = torch.Generator().manual_seed(seed)
    prompts, completions = [], []
    for i in range(count):
        prompt = torch.randint(0, vocab, (3 + (i // 2) * 2,), generator=g).tolist()
        prompts.append(prompt)
        completions.append(torch.randint(0, vocab, (4 + 3 * (i % 3),), generator=g).tolist())
    return lens.Sequences(prompts, completions, ["length"] * count, [i // 2 for i in range(count)],
                          [[0.0] * len(c) for c in completions])


def reference_logprob(model, seqs, vocab_size):
    """Mean completion-token log-prob, one unpadded sequence at a time (conftest's scoring path)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for p, c in zip(seqs.prompts, seqs.completions):
            toks = torch.tensor([p + c])
            lp = token_logprobs(model, toks[:, :-1], toks[:, 1:], vocab_size=vocab_size)[0, len(p) - 1:]
            total += lp.double().sum().item()
            count += len(c)
    return total / count


@pytest.fixture(scope="module")
def qwen(tiny_qwen):
    return M.Transformer.from_pretrained(tiny_qwen)


def random_vectors(model, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(model.config.num_layers, model.config.hidden_size, generator=g)


def test_steered_restores_the_model(qwen):
    vecs = random_vectors(qwen)
    before = qwen.steering.detach().clone()
    with lens.steered(qwen, vecs, 0.5):
        assert torch.equal(qwen.steering, vecs) and qwen.steering_scale == 0.5
    assert torch.equal(qwen.steering, before) and qwen.steering_scale == 1.0


def test_ablating_every_layer_is_the_base_model_and_one_vector_alone_is_itself(qwen):
    vecs = random_vectors(qwen)
    seqs = random_sequences(qwen.config.vocab_size)
    study = study_of(qwen, vecs)
    V = qwen.config.vocab_size
    base = reference_logprob(qwen, seqs, V)  # steering is zero now
    none = lens.mean_logprob_under(study, seqs, lens.without(vecs, [0, 1]), batch_size=2)
    assert none == pytest.approx(base, abs=1e-6)
    with lens.steered(qwen, lens.only(vecs, [0])):
        alone0 = reference_logprob(qwen, seqs, V)
    with lens.steered(qwen, vecs):
        full = reference_logprob(qwen, seqs, V)

    out = lens.ablate(study, seqs, [0, 1], batch_size=3)
    assert out["base"]["logprob"] == pytest.approx(base, abs=1e-6)
    assert out["steered"]["logprob"] == pytest.approx(full, abs=1e-6)
    l0, l1 = out["layers"]
    assert l0["alone"]["logprob"] == pytest.approx(alone0, abs=1e-6)
    assert l1["without"]["logprob"] == pytest.approx(alone0, abs=1e-6)  # all but s_1 = s_0 alone (2 layers)
    assert l0["delta_alone"] == pytest.approx(alone0 - full, abs=1e-6)
    assert abs(full - base) > 1e-2  # the vectors do something, so the equalities above can fail

    vecs[1] = 0  # an untrained layer: removing it is the full steering, keeping it alone is the base
    study = study_of(qwen, vecs)
    out = lens.ablate(study, seqs, [0, 1], batch_size=3)
    assert out["layers"][1]["delta_without"] == 0 and out["layers"][1]["alone"] == out["base"]
    assert out["layers"][0]["without"]["logprob"] == pytest.approx(base, abs=1e-6)


def test_scale_zero_is_base_and_one_is_steered(qwen):
    vecs = random_vectors(qwen)
    seqs = random_sequences(qwen.config.vocab_size, seed=3)
    study = study_of(qwen, vecs)
    V = qwen.config.vocab_size
    base = reference_logprob(qwen, seqs, V)
    with lens.steered(qwen, vecs):
        full = reference_logprob(qwen, seqs, V)
    with lens.steered(qwen, 2 * vecs):
        double = reference_logprob(qwen, seqs, V)
    rows = lens.scale_sweep(study, seqs, [0.0, 1.0, 2.0], batch_size=2)
    assert [r["alpha"] for r in rows] == [0.0, 1.0, 2.0]
    assert rows[0]["logprob"] == pytest.approx(base, abs=1e-6)
    assert rows[1]["logprob"] == pytest.approx(full, abs=1e-6)
    assert rows[2]["logprob"] == pytest.approx(double, abs=1e-5)
    assert len({round(r["logprob"], 4) for r in rows}) == 3


def test_the_sweep_samples_every_alpha_side_by_side_as_it_would_one_at_a_time(qwen):
    """lens.py scale --accuracy: the alphas run in one sampler pass (rows of the steering table, at
    their strengths) and each gets exactly the completions the steered model at that alpha samples
    alone, and the accuracy the Task grades them with."""
    from types import SimpleNamespace

    from rl_task import Task
    from sample import Sampler
    vecs = random_vectors(qwen, scale=1.0)
    V = qwen.config.vocab_size
    prompts = [torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (3, 6, 4)]

    def reward(completions, owners):  # correct: an even first token
        correct = [float(bool(c) and c[0] % 2 == 0) for c in completions]
        return correct, correct
    study = study_of(qwen, vecs)
    study.task = Task("toy", prompts, None, [], V, 0, reward)
    args = SimpleNamespace(samples=2, temperature=1.0, seed=4, max_new_tokens=6)
    alphas = [0.0, 0.5, 2.5]
    sampled = study.generate_side_by_side([(vecs, a) for a in alphas], args)
    for alpha, got in zip(alphas, sampled):
        with lens.steered(qwen, vecs, alpha):
            want = study.task.sample(Sampler(qwen, kv_cache_tokens=512), samples=2, temperature=1.0, seed=4,
                                     max_new_tokens=6, max_len=None)
        assert got.completions == [s.tokens for s in want] and got.problems == [s.index for s in want], alpha
    assert len({tuple(map(tuple, s.completions)) for s in sampled}) == 3  # the alphas differ
    rows = lens.scale_sweep(study, random_sequences(V), alphas, batch_size=2, accuracy_args=args)
    assert [r["accuracy"] for r in rows] == [study.accuracy(s)["accuracy"] for s in sampled]


def test_positions_zero_vector_has_zero_kl(qwen):
    vecs = random_vectors(qwen)
    vecs[1] = 0
    seqs = random_sequences(qwen.config.vocab_size)
    study = study_of(qwen, vecs)
    ref, treat = lens.contrast(vecs, 1, "keep")  # s_1 is zero: treatment and reference are one steering
    out = lens.positions(study, seqs, ref, treat, batch_size=2)
    assert out["kl"] == [0.0] * len(out["kl"]) and out["kl_first"] == 0.0
    assert all(t["logprob_rise"] == 0 for t in out["rise_first"])


def test_positions_match_an_unbatched_kl_and_find_a_planted_token(qwen):
    vecs = random_vectors(qwen, scale=1.0)
    planted = 17
    vecs[-1] = 4.0 * qwen.head_weight[planted] / qwen.head_weight[planted].norm()  # a last-layer token bias
    seqs = random_sequences(qwen.config.vocab_size, seed=1)
    study = study_of(qwen, vecs)
    V = qwen.config.vocab_size
    ref, treat = lens.contrast(vecs, None, "keep")
    out = lens.positions(study, seqs, ref, treat, batch_size=3, top_k=5)

    sums, counts = {}, {}
    with torch.no_grad():
        for p, c in zip(seqs.prompts, seqs.completions):
            toks = torch.tensor([p + c])
            lps = []
            for v in (treat, ref):
                with lens.steered(qwen, v):
                    lps.append(qwen(toks)[0, len(p) - 1:-1, :V].float().log_softmax(-1))
            kl = F.kl_div(lps[1], lps[0], log_target=True, reduction="none").sum(-1)  # KL(treat || ref)
            for t, x in enumerate(kl.tolist()):
                sums[t] = sums.get(t, 0) + x
                counts[t] = counts.get(t, 0) + 1
    assert out["counts"] == [counts[t] for t in range(len(counts))]
    assert out["kl"] == pytest.approx([sums[t] / counts[t] for t in range(len(counts))], rel=1e-4, abs=1e-7)
    assert out["gain_first"][0]["id"] == planted and out["rise_first"][0]["logprob_rise"] > 0


# --- path patching


def zeroed_channel_model(folder, channel=0, value=1.0):
    """A model whose residual stream holds `value` in `channel` at every position and layer: the
    embedding column is constant and no block writes to it. A vector -2 * value on that channel flips
    its sign, leaving every RMS (hence every other normed channel) unchanged, bit for bit."""
    model = M.Transformer.from_pretrained(folder)
    with torch.no_grad():
        model.embed_tokens.weight[:, channel] = value
        for block in model.layers:
            block.self_attn.o_proj.weight[channel] = 0
            block.mlp.down_proj.weight[channel] = 0
    return model


def test_paths_rebuild_the_steered_residual_and_heads_sum_to_attention(tiny_llama):
    model = M.Transformer.from_pretrained(tiny_llama)  # GQA 7 heads / 1 KV head, llama3 rope
    vecs = random_vectors(model, scale=2.0)
    seqs = random_sequences(model.config.vocab_size)
    ref, treat = lens.contrast(vecs, 0, "keep")
    batch = lens.batches(seqs, 8, "cpu")[0]
    h_ref, h_treat, terms = lens.path_terms(model, batch, 0, ref, treat)
    parts = [v for k, v in terms.items() if lens.is_partition(k)]
    assert len(parts) == 3  # direct, attn L1, mlp L1
    assert torch.allclose(h_ref + sum(parts), h_treat, atol=1e-4)
    heads = sum(terms[("head", 1, h)] for h in range(model.config.num_heads))
    assert torch.allclose(heads, terms[("attn", 1)], atol=1e-4)
    with lens.steered(model, treat), torch.no_grad():  # h_treat is the forward's own final residual
        full = model(batch.tokens)[batch.rows, batch.cols]
        assert torch.allclose(F.linear(model.norm(h_treat), model.head_weight), full, atol=1e-4)

    out = lens.paths(study_of(model, vecs), seqs, 0, ref, treat, batch_size=2)
    by = {r["path"]: r for r in out["paths"]}
    assert out["rebuild_max_abs_logit_error"] < 1e-3
    assert by["all terms together"]["kl"] == pytest.approx(by["total"]["kl"], rel=1e-4)
    assert by["total"]["kl"] > 1e-3 and by["total"]["kl_share"] == 1.0
    assert {"direct", "attn L1", "mlp L1", "attn L1 h6"} <= set(by)
    # the total is the per-position KL of the positions analysis, averaged over all positions
    pos = lens.positions(study_of(model, vecs), seqs, ref, treat, batch_size=2)
    mean_kl = sum(k * c for k, c in zip(pos["kl"], pos["counts"])) / sum(pos["counts"])
    assert by["total"]["kl"] == pytest.approx(mean_kl, rel=1e-4)


def test_post_attn_steering_also_reaches_its_own_mlp(tiny_qwen):
    model = M.Transformer.from_pretrained(tiny_qwen)
    model.set_adapter("steering", steer_at="post-attn")  # h + s_l after layer l's attention residual
    vecs = random_vectors(model)
    batch = lens.batches(random_sequences(model.config.vocab_size), 8, "cpu")[0]
    h_ref, h_treat, terms = lens.path_terms(model, batch, 0, *lens.contrast(vecs, 0, "zero"))
    assert ("mlp", 0) in terms and ("attn", 0) not in terms
    assert torch.allclose(h_ref + sum(v for k, v in terms.items() if lens.is_partition(k)), h_treat, atol=1e-4)


def test_paths_with_later_blocks_zeroed_go_all_direct(tiny_qwen):
    model = M.Transformer.from_pretrained(tiny_qwen)
    with torch.no_grad():
        model.layers[1].self_attn.o_proj.weight.zero_()
        model.layers[1].mlp.down_proj.weight.zero_()
    vecs = random_vectors(model)
    seqs = random_sequences(model.config.vocab_size)
    out = lens.paths(study_of(model, vecs), seqs, 0, *lens.contrast(vecs, 0, "keep"), batch_size=3)
    by = {r["path"]: r for r in out["paths"]}
    assert by["total"]["kl"] > 1e-3
    assert by["direct"]["kl_share"] == pytest.approx(1.0, abs=1e-5)
    assert by["direct"]["logit_share"] == pytest.approx(1.0, abs=1e-5)
    for name in ("attn L1", "mlp L1", "attn L1 h0"):
        assert by[name]["kl"] == 0 and by[name]["logit_share"] == 0
    assert out["partition_sums"]["kl_share"] == pytest.approx(1.0, abs=1e-5)


def test_last_layer_vector_has_only_the_direct_path(qwen):
    vecs = random_vectors(qwen)
    seqs = random_sequences(qwen.config.vocab_size)
    out = lens.paths(study_of(qwen, vecs), seqs, 1, *lens.contrast(vecs, 1, "zero"), batch_size=2)
    assert [r["path"] for r in out["paths"]] == ["total", "direct", "all terms together"]
    total, direct = out["paths"][0], out["paths"][1]
    assert direct["kl"] == pytest.approx(total["kl"], rel=1e-6) and direct["logit_share"] == pytest.approx(1.0)


def test_a_vector_the_head_cannot_see_has_no_direct_effect(tmp_path):
    """Flip a constant channel the unembedding ignores: the direct path changes nothing (the RMS is
    unchanged and the head reads zero from the channel), while layer 1 sees the flip. The same
    channel pushed without preserving the RMS does have a direct effect: through the norm's scale."""
    model = zeroed_channel_model(write_checkpoint(tmp_path / "m", "qwen2-untied"))
    with torch.no_grad():
        model.lm_head.weight[:, 0] = 0  # the vector is orthogonal to every unembedding row
    seqs = random_sequences(model.config.vocab_size)
    vecs = torch.zeros(2, model.config.hidden_size)
    vecs[0, 0] = -2.0
    out = lens.paths(study_of(model, vecs), seqs, 0, *lens.contrast(vecs, 0, "zero"), batch_size=3)
    by = {r["path"]: r for r in out["paths"]}
    assert by["total"]["kl"] > 1e-3
    assert by["direct"]["kl"] == 0 and by["direct"]["logit_share"] == 0
    assert by["attn L1"]["kl"] > 0 and by["mlp L1"]["kl"] > 0

    vecs[0, 0] = 1.0  # still orthogonal to the head, but it changes the RMS
    out = lens.paths(study_of(model, vecs), seqs, 0, *lens.contrast(vecs, 0, "zero"), batch_size=3)
    assert {r["path"]: r for r in out["paths"]}["direct"]["kl"] > 1e-6


# --- attention


def test_attend_closure_equals_causal_attention():
    torch.manual_seed(0)
    B, T, H, KVH, D = 2, 9, 6, 2, 8
    q, k, v = torch.randn(B, T, H, D) * 3, torch.randn(B, T, KVH, D) * 3, torch.randn(B, T, KVH, D)
    store = {}
    rows, cols = torch.tensor([0, 1, 1]), torch.tensor([8, 0, 5])
    out = lens.recording_attend(store, rows, cols)(0, q, k, v)
    assert torch.allclose(out, M.causal_attention(0, q, k, v), atol=1e-5)
    p = store[0]  # (N, H, T)
    assert p.shape == (3, H, T) and torch.allclose(p.sum(-1), torch.ones(3, H))
    assert (p[1, :, 1:] == 0).all() and (p[2, :, 6:] == 0).all()  # causal: nothing after the query


@pytest.mark.parametrize("family", ["qwen2-tied", "llama31"])  # GQA 4 heads / 2 KV heads; 7 / 1 and llama3 rope
def test_attention_probs_match_hf_eager(tmp_path, family):
    hf = hf_model(family)
    hf.save_pretrained(tmp_path)
    hf.set_attn_implementation("eager")  # sdpa returns no attention weights
    ours = M.Transformer.from_pretrained(tmp_path)
    toks = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf(toks, output_attentions=True).attentions  # per layer (B, H, T, T)
        store = {}
        rows = torch.arange(2).repeat_interleave(40)
        cols = torch.arange(40).repeat(2)
        logits = ours(toks, attend=lens.recording_attend(store, rows, cols))
        assert torch.allclose(logits, ours(toks), atol=1e-4)  # the closure changes nothing in the forward
    for layer, w in enumerate(want):
        got = store[layer].view(2, 40, -1, 40).permute(0, 2, 1, 3)
        assert torch.allclose(got, w.float(), atol=1e-5), layer


def test_jensen_shannon_against_known_values():
    p = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
    q = torch.tensor([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.5, 0.3, 0.2]])
    got = lens.jensen_shannon(p, q)
    m = 0.5 * (p[2] + q[2])
    naive = sum(0.5 * a * torch.log2(a / c) + 0.5 * b * torch.log2(b / c) for a, b, c in zip(p[2], q[2], m))
    assert got[0] == 0 and got[1] == pytest.approx(1.0) and got[2] == pytest.approx(naive.item(), rel=1e-6)


def test_attention_jsd_is_zero_for_a_pure_score_shift(tmp_path):
    """Layer 1's queries see the steering only in slow rotary dimensions, where every key is the same
    constant (its bias): the vector adds one constant to each query's scores, which softmax ignores,
    while it does change the values. Control: the same channel pushed differently changes the RMS,
    which rescales the queries: the attention moves."""
    folder = write_checkpoint(tmp_path / "m", "qwen2-untied", rope_theta=1e30)
    model = zeroed_channel_model(folder)
    cfg = model.config
    assert cfg.rope_theta == 1e30  # inv_freq <= 1e-15 for the last half of each rotary half: no rotation
    D, half = cfg.head_dim, cfg.head_dim // 2
    slow = torch.zeros(D, dtype=torch.bool)
    slow[half // 2:half] = slow[half + half // 2:] = True
    slow_q, slow_k = slow.repeat(cfg.num_heads), slow.repeat(cfg.num_kv_heads)
    attn = model.layers[1].self_attn
    with torch.no_grad():
        attn.k_proj.weight[slow_k] = 0  # keys: a constant (the bias) in the slow dims ...
        attn.k_proj.weight[:, 0] = 0  # ... and blind to channel 0
        attn.q_proj.weight[~slow_q, 0] = 0  # queries read channel 0 only into the slow dims
    seqs = random_sequences(cfg.vocab_size)
    vecs = torch.zeros(2, cfg.hidden_size)
    vecs[0, 0] = -2.0
    study = study_of(model, vecs)
    ref, treat = lens.contrast(vecs, 0, "zero")
    out = lens.attention(study, seqs, ref, treat, batch_size=3)
    assert out["layer_max"][0] == 0  # layer 0 runs before the vector is added
    assert out["layer_max"][1] < 1e-9
    assert lens.positions(study, seqs, ref, treat, batch_size=3)["kl_later"] > 1e-3  # yet the output moved

    vecs[0, 0] = 3.0
    out = lens.attention(study, seqs, *lens.contrast(vecs, 0, "zero"), batch_size=3)
    assert out["layer_max"][0] == 0 and out["layer_mean"][1] > 1e-4


def test_attention_before_the_vector_is_untouched(tiny_llama):
    model = M.Transformer.from_pretrained(tiny_llama)
    vecs = random_vectors(model)
    out = lens.attention(study_of(model, vecs), random_sequences(96), *lens.contrast(vecs, 0, "keep"), batch_size=4)
    assert out["jsd"][0] == [0.0] * model.config.num_heads and min(out["jsd"][1]) > 0
    assert out["positions"] == sum(map(len, random_sequences(96).completions))

# -----------------------------------------------------------------------------
# The CLI, end to end on a tiny model with a byte-level tokenizer (256 byte tokens + 2 specials)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    folder = write_checkpoint(tmp_path_factory.mktemp("chat"), "qwen2-tied", vocab_size=258)
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))},
                               merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok.save(str(folder / "tokenizer.json"))
    template = ("{% for m in messages %}{% if m['role'] == 'user' %}<|im_start|>{{ m['content'] }}<|im_end|>"
                "{% endif %}{% endfor %}<|im_start|>")
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(eos_token="<|im_end|>", chat_template=template)))
    model = M.Transformer.from_pretrained(folder)
    with torch.no_grad():
        model.steering.copy_(random_vectors(model))
    model.save_steering(folder.parent / "s.safetensors", step=3)  # not in the folder: it would load as weights
    return folder


def run_cli(capsys, *argv):
    lens.main(list(argv))
    return capsys.readouterr()


PROMPT_ARGS = ["--bench", "arithmetic", "--limit", "2", "--max-new-tokens", "5", "--batch-size", "2"]


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        lens.main(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and all(c in out for c in lens.COMMANDS)
    for command in lens.COMMANDS:
        with pytest.raises(SystemExit) as exit_:
            lens.main([command, "--help"])
        assert exit_.value.code == 0 and "--steering" in capsys.readouterr().out


def test_cli_lens_bare_form_writes_json(tmp_path, capsys):
    tok_dir = TOKENIZERS / "qwen2.5"
    if not (tok_dir / "tokenizer.json").is_file():
        pytest.skip(f"{tok_dir} is absent (the shared tokenizers)")
    # the real vocabulary (every CLI refuses a tokenizer with more tokens than the model has rows)
    folder = write_checkpoint(tmp_path / "tiny", "qwen2-untied", vocab_size=151936, hidden_size=16,
                              intermediate_size=32)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / name, folder / name)
    model = M.Transformer.from_pretrained(folder)
    with torch.no_grad():
        model.steering.copy_(torch.randn_like(model.steering))
        model.steering[1] = model.head_weight[42]
    model.save_steering(tmp_path / "s.safetensors", step=7)

    out = tmp_path / "lens.json"
    printed = run_cli(capsys, "--steering", str(tmp_path / "s.safetensors"), "--top-k", "3", "--out", str(out)).out
    result = json.loads(out.read_text())
    assert result["model"] == str(folder)  # taken from the file's metadata
    assert result["metadata"]["step"] == "7"
    layers = result["layers"]
    assert [r["layer"] for r in layers] == [0, 1] and all(len(r["top"]) == len(r["bottom"]) == 3 for r in layers)
    assert layers[1]["top"][0]["id"] == 42 and layers[1]["top"][0]["cosine"] == pytest.approx(1.0, abs=1e-4)
    assert layers[1]["top"][0]["dot"] == pytest.approx(model.head_weight[42].norm().item() ** 2, rel=1e-4)
    assert layers[1]["top"][0]["token"] == "K"  # byte-level BPE: id 42 is "K" in Qwen's vocabulary
    assert layers[0]["norm"] == pytest.approx(model.steering[0].norm().item(), rel=1e-4)
    cos = F.cosine_similarity(model.steering[0], model.steering[1], dim=0).item()
    assert result["cosine_matrix"][0][1] == pytest.approx(cos, abs=1e-5)
    assert "L1" in printed and "K 1.00" in printed and "cross-layer cosine" in printed
    assert (tmp_path / "lens_norms_cosine.png").is_file()  # figures beside a .json --out


@needs_math_verify
def test_cli_every_analysis_writes_json_and_figures(chat_model, tmp_path, capsys):
    steering = str(chat_model.parent / "s.safetensors")
    out = tmp_path / "out"
    runs = {"ablate": ["--accuracy"], "positions": ["--layer", "-1"], "paths": ["--layer", "0"],
            "attention": ["--layer", "-2", "--control"], "scale": ["--alphas", "0,1"]}
    names = {"ablate": "ablate", "positions": "positions_L1", "paths": "paths_L0", "attention": "attention_L0",
             "scale": "scale"}
    for command, extra in runs.items():
        printed = run_cli(capsys, command, "--steering", steering, "--out", str(out), *PROMPT_ARGS, *extra).out
        assert "2 completions of 2 arithmetic problems" in printed
        result = json.loads((out / f"{names[command]}.json").read_text())
        assert result["command"] == command and result["options"]["limit"] == 2
        assert list(out.glob(f"{names[command]}_*.png")), command
    ablated = json.loads((out / "ablate.json").read_text())
    assert [r["layer"] for r in ablated["layers"]] == [0, 1] and "accuracy" in ablated["base"]
    scale = json.loads((out / "scale.json").read_text())["alphas"]
    assert scale[1]["logprob"] == pytest.approx(ablated["steered"]["logprob"], abs=1e-6)  # same sequences
    assert scale[0]["logprob"] == pytest.approx(ablated["base"]["logprob"], abs=1e-6)
    attn = json.loads((out / "attention_L0.json").read_text())
    assert attn["jsd"][0] == [0.0] * 4 and len(attn["control_jsd"]) == 2


def test_cli_without_matplotlib_still_writes_json(chat_model, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    err = run_cli(capsys, "lens", "--steering", str(chat_model.parent / "s.safetensors"), "--out", str(tmp_path),
                  "--top-k", "2").err
    assert (tmp_path / "lens.json").is_file() and not list(tmp_path.glob("*.png"))
    assert sum("matplotlib is not installed" in line for line in err.splitlines()) == 1


def one_line_error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit_:
        lens.main(list(argv))
    message = str(exit_.value.code)
    assert exit_.value.code != 0 and "\n" not in message and "Traceback" not in capsys.readouterr().err
    return message


def test_cli_refuses_what_is_not_a_steering_file(chat_model, tmp_path, capsys):
    from safetensors.torch import save_file
    lora = tmp_path / "lora.safetensors"
    save_file({"steering": torch.zeros(2, 64)}, str(lora), metadata={"kind": "lora"})
    assert "'lora' adapter file, not a steering file" in one_line_error(capsys, "--steering", str(lora))
    many = tmp_path / "many.safetensors"
    save_file({"layers.0.lora_A": torch.zeros(2, 2), "layers.0.lora_B": torch.zeros(2, 2)}, str(many))
    assert "not the one tensor 'steering'" in one_line_error(capsys, "paths", "--steering", str(many))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    assert "unreadable or corrupt" in one_line_error(capsys, "--steering", str(junk))
    assert "is not a file" in one_line_error(capsys, "--steering", str(tmp_path / "missing.safetensors"))
    steering = str(chat_model.parent / "s.safetensors")
    assert "--layer 5" in one_line_error(capsys, "paths", "--steering", steering, "--layer", "5", *PROMPT_ARGS)
    assert "--limit must be >= 1" in one_line_error(capsys, "ablate", "--steering", steering, "--limit", "0")
    assert "--alphas" in one_line_error(capsys, "scale", "--steering", steering, "--alphas", "a,b")


def test_the_quickstart_vector_reads_as_its_target_token_without_a_tokenizer(tmp_path):
    """A --task toy run's model has no tokenizer: `lens.py lens` names tokens by id, and the vector
    trained to emit token 5 points at <5> in its last layer; an analysis that needs benchmark
    prompts says which flag, in one line (exit 2)."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run_dir = tmp_path / "qs"
    train = subprocess.run([sys.executable, str(root / "train.py"), "--quickstart", "--max-steps", "12", "--out-dir",
                            str(run_dir)], cwd=root, capture_output=True, text=True, timeout=300, env=env)
    assert train.returncode == 0, train.stderr[-2000:]
    vector = str(run_dir / "steering.safetensors")
    read = subprocess.run([sys.executable, str(root / "lens.py"), "--steering", vector, "--top-k", "3"], cwd=root,
                          capture_output=True, text=True, timeout=120, env=env)
    assert read.returncode == 0, read.stderr
    last = [line for line in read.stdout.splitlines() if line.startswith("L1 ")][0]
    assert last.split("+")[1].split()[0] == "<5>", read.stdout
    other = subprocess.run([sys.executable, str(root / "lens.py"), "ablate", "--steering", vector], cwd=root,
                           capture_output=True, text=True, timeout=120, env=env)
    lines = other.stderr.strip().splitlines()
    assert other.returncode == 2 and len(lines) == 1 and "pass --tokenizer DIR" in lines[0], other.stderr


@pytest.mark.parametrize("flags,says", [
    (["--temperature", "nan"], "--temperature nan: must be a finite number >= 0"),
    (["--alphas", "1,nan"], "--alphas '1,nan': one or more finite scales"),
    (["--limit", "0"], "--limit must be >= 1, got 0")])
def test_a_number_that_cannot_work_is_one_line_before_the_model_loads(tmp_path, flags, says):
    """The model path does not exist: the flag's error comes first, in one line, exit 2."""
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "lens.py"), "scale", "--steering", str(tmp_path / "v.safetensors"), "--model", str(tmp_path / "no-model"), *flags],
                          cwd=root, capture_output=True, text=True, timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and says in lines[0], proc.stderr[-2000:]
