"""lens.py: the logit lens against a naive per-token loop, planted directions, and the CLI."""
import json
import shutil

import pytest
import torch
import torch.nn.functional as F

import lens
from conftest import TOKENIZERS, write_checkpoint
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


def test_planted_token_ranks_first_and_last(planted):
    steering, weight = planted
    out = lens.logit_lens(steering, weight, k=5)
    assert out.top_ids.shape == out.bottom_ids.shape == (4, 5)
    assert out.top_ids[1, 0] == 7 and out.top_scores[1, 0] == pytest.approx(1.0, abs=1e-5)
    assert out.bottom_ids[2, 0] == 11 and out.bottom_scores[2, 0] == pytest.approx(-1.0, abs=1e-5)
    assert (out.top_scores[:, :-1] >= out.top_scores[:, 1:]).all()  # best first
    assert (out.bottom_scores[:, :-1] <= out.bottom_scores[:, 1:]).all()  # most negative first
    assert torch.allclose(out.norms, steering.norm(dim=-1))


def test_matches_naive_loop(planted):
    steering, weight = planted
    out = lens.logit_lens(steering, weight, k=6, chunk_rows=7)  # chunks that do not divide V
    ref = naive_cosines(steering, weight)
    top = ref.topk(6, dim=-1)
    bottom = ref.topk(6, dim=-1, largest=False)
    assert torch.equal(out.top_ids, top.indices) and torch.equal(out.bottom_ids, bottom.indices)
    assert torch.allclose(out.top_scores, top.values, atol=1e-5)
    assert torch.allclose(out.bottom_scores, bottom.values, atol=1e-5)


def test_after_norm_uses_the_norm_weights(planted):
    steering, weight = planted
    norm = M.RMSNorm(16, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(16) * 2 + 0.1)
    # a vector that becomes token 5's row only once the norm has scaled its channels
    steering[0] = weight[5] / norm.weight.detach() * 0.01
    out = lens.logit_lens(steering, weight, k=3, norm=norm)
    assert out.top_ids[0, 0] == 5 and out.top_scores[0, 0] == pytest.approx(1.0, abs=1e-4)
    ref = naive_cosines(norm(steering).detach(), weight)
    assert torch.allclose(out.top_scores, ref.topk(3, dim=-1).values, atol=1e-5)
    before = lens.logit_lens(steering, weight, k=3)
    assert before.top_scores[0, 0] < 0.999  # without the norm it is not token 5's direction


def test_vocab_size_drops_padding_rows(planted):
    steering, weight = planted
    steering[3] = weight[49]
    assert lens.logit_lens(steering, weight, k=2).top_ids[3, 0] == 49
    cut = lens.logit_lens(steering, weight, k=2, vocab_size=49)
    assert (cut.top_ids < 49).all() and (cut.bottom_ids < 49).all()


def test_zero_vector_is_reported_not_ranked():
    out = lens.logit_lens(torch.zeros(2, 8), torch.randn(10, 8), k=3)
    assert torch.equal(out.top_scores, torch.zeros(2, 3))
    rows = lens.lens_rows(out, lambda i: f"t{i}")
    assert "zero vector" in lens.format_table(rows)


def test_token_display_escapes_whitespace():
    assert lens.show_token(" Because") == "␣Because"
    assert lens.show_token("\n\n") == "\\n\\n"
    assert lens.show_token("\t\x01") == "\\t\\x01"
    assert lens.show_token("") == "∅"
    assert lens.show_token("abcdefghijklmnopqrstuvwxyz", width=10) == "abcdefghi…"
    assert lens.show_score(0.4123) == ".41" and lens.show_score(-0.1234) == "-.12"
    assert lens.width("电动 a") == 6 and lens.pad("电动", 6) == "电动  "  # wide characters take two columns


def test_table_columns_align():
    rows = [dict(layer=0, norm=1.5, top=[dict(token="a", score=0.5), dict(token="bb", score=0.4)],
                 bottom=[dict(token="cccc", score=-0.5), dict(token="d", score=-0.6)]),
            dict(layer=12, norm=10.25, top=[dict(token=" x\n", score=0.9), dict(token="y", score=0.1)],
                 bottom=[dict(token="z", score=-0.1), dict(token="w", score=-0.2)])]
    lines = lens.format_table(rows).splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("L0   |v|= 1.50  + a .50") and "␣x\\n .90" in lines[2]
    assert len({line.index(" | ") for line in lines}) == 1  # the second column starts at one place


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        lens.main(["--help"])
    assert exit_.value.code == 0 and "--after-norm" in capsys.readouterr().out


def test_cli_writes_json(tmp_path, capsys):
    tok_dir = TOKENIZERS / "qwen2.5"
    if not (tok_dir / "tokenizer.json").is_file():
        pytest.skip(f"{tok_dir} is absent (the shared tokenizers)")
    folder = write_checkpoint(tmp_path / "tiny", "qwen2-untied")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / name, folder / name)
    model = M.Transformer.from_pretrained(folder)
    with torch.no_grad():
        model.steering.copy_(torch.randn_like(model.steering))
        model.steering[1] = model.head_weight[42]
    model.save_steering(tmp_path / "s.safetensors", step=7)

    out = tmp_path / "lens.json"
    lens.main(["--steering", str(tmp_path / "s.safetensors"), "--top-k", "3", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["model"] == str(folder)  # taken from the file's metadata
    assert result["metadata"]["step"] == "7"
    layers = result["layers"]
    assert [r["layer"] for r in layers] == [0, 1] and all(len(r["top"]) == len(r["bottom"]) == 3 for r in layers)
    assert layers[1]["top"][0]["id"] == 42 and layers[1]["top"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert layers[1]["top"][0]["token"] == "K"  # byte-level BPE: id 42 is "K" in Qwen's vocabulary
    assert layers[0]["norm"] == pytest.approx(model.steering[0].norm().item(), rel=1e-4)
    printed = capsys.readouterr().out
    assert "L1" in printed and "K 1.00" in printed
