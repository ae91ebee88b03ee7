"""model.py against the reference: HF transformers models built from the same tiny random
configs (conftest.hf_model), loaded from the folders they save. Also the loader's refusals,
steering files, and the chunked log-prob path used by training."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import FAMILIES, REAL_MODELS, hf_model, token_logprobs, write_checkpoint
from safetensors.torch import load_file, save_file

import model as M

ROOT = Path(__file__).resolve().parents[1]

T_LONG = 100  # past llama31's original_max_position_embeddings (32), so the llama3 rescaling matters


def tokens(B=2, T=T_LONG, vocab=96, seed=1):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def saved(tmp_path, family, dtype=torch.float32, **save_kw):
    """(HF model, folder) for a tiny random model of `family`, saved in `dtype`."""
    hf = hf_model(family).to(dtype)
    hf.save_pretrained(tmp_path, **save_kw)
    return hf, tmp_path


def hf_logits(hf, toks):
    with torch.no_grad():
        return hf(toks).logits.float()


def ours(folder, toks, **kw):
    with torch.no_grad():
        return M.Transformer.from_pretrained(folder, **kw)(toks).float()


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()

# -----------------------------------------------------------------------------
# Parity with HF transformers


@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_parity(tmp_path, family):
    hf, folder = saved(tmp_path, family)
    toks = tokens()
    ref, got = hf_logits(hf, toks), ours(folder, toks, dtype=torch.float32)
    assert got.shape == (2, T_LONG, 96)
    assert rel_err(got, ref) <= 1e-5


@pytest.mark.parametrize("family", ["qwen2-tied", "llama31"])
def test_bf16_parity(tmp_path, family):
    from transformers import AutoModelForCausalLM
    _, folder = saved(tmp_path, family)
    # the reference loaded from the folder, not hf.to(bf16): .to() would also round HF's
    # inv_freq buffer to bf16, which no real bf16 checkpoint does
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    toks = tokens(T=40)
    ref, got = hf_logits(hf, toks), ours(folder, toks, dtype=torch.bfloat16)
    # one bf16 ulp at the logit scale is 2^-8 relative
    assert rel_err(got, ref) <= 2 ** -7


def test_reference_models_are_sharp():
    """conftest scales q/k so attention is peaked: near-uniform attention would let rope and
    GQA mistakes through the parity tests above."""
    hf = hf_model("llama31")
    hf.set_attn_implementation("eager")  # sdpa returns no attention weights
    with torch.no_grad():
        out = hf(tokens(), output_attentions=True)
    uniform = torch.log(torch.arange(1, T_LONG + 1).float()).mean()  # row t attends over t+1 keys
    for A in out.attentions:  # (B, H, T, T)
        entropy = -(A * A.clamp_min(1e-30).log()).sum(-1).mean()
        assert entropy < 0.5 * uniform
    assert 1.0 < out.logits.std() < 10.0


def rope_interleaved(x, cos, sin):
    """GPT-J convention (rotates pairs (0,1), (2,3), ...): a plausible bug, not HF's layout."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    c, s = cos[..., 0::2], sin[..., 0::2]
    return torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)


def test_parity_catches_wrong_rope(tmp_path, monkeypatch):
    hf, folder = saved(tmp_path, "llama31")
    toks = tokens()
    ref = hf_logits(hf, toks)
    model = M.Transformer.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        assert rel_err(model(toks), ref) <= 1e-5
        monkeypatch.setattr(M, "apply_rope", rope_interleaved)
        assert rel_err(model(toks), ref) > 0.03
        monkeypatch.undo()
        cfg = model.config
        model.inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim)
        assert rel_err(model(toks), ref) > 0.03  # llama3 scaling dropped
        model.inv_freq = M.rope_inv_freq(cfg) * 1.02
        assert rel_err(model(toks), ref) > 0.01

# -----------------------------------------------------------------------------
# Config: both dialects, refusals


def rewrite_config(folder, edit):
    path = folder / "config.json"
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))


@pytest.mark.parametrize("family,type_key", [("qwen2-untied", None), ("llama31", "rope_type"), ("llama31", "type")])
def test_hub_config_dialect(tmp_path, family, type_key):
    """Hub checkpoints keep rope_theta / rope_scaling at the top level (transformers < 5)."""
    _, folder = saved(tmp_path, family)
    toks = tokens()
    new = ours(folder, toks)

    def to_old(raw):
        rope = raw.pop("rope_parameters")
        raw["rope_theta"] = rope.pop("rope_theta")
        kind = rope.pop("rope_type")
        raw["rope_scaling"] = None if kind == "default" else {type_key: kind, **rope}

    rewrite_config(folder, to_old)
    assert "rope_parameters" not in json.loads((folder / "config.json").read_text())
    assert torch.equal(ours(folder, toks), new)


BASE_CONFIG = dict(model_type="qwen2", vocab_size=96, hidden_size=64, intermediate_size=128,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.parametrize("edit,field", [
    (dict(model_type="mistral"), "model_type"),
    (dict(model_type="qwen2_moe", num_experts=8), "model_type"),
    (dict(num_experts=8), "num_experts"),
    (dict(use_sliding_window=True, sliding_window=4096), "use_sliding_window"),
    (dict(layer_types=["sliding_attention", "full_attention"]), "layer_types"),
    (dict(rope_scaling=dict(rope_type="yarn", factor=4.0)), "yarn"),
    (dict(rope_scaling=dict(type="linear", factor=2.0)), "linear"),
    (dict(rope_parameters=dict(rope_type="dynamic", factor=2.0, rope_theta=1e4)), "dynamic"),
    (dict(hidden_size=None), "hidden_size"),
    (dict(num_hidden_layers=None), "num_hidden_layers"),
    (dict(model_type=None), "model_type"),
])
def test_config_refusals(tmp_path, edit, field):
    raw = {**BASE_CONFIG, **edit}
    raw = {k: v for k, v in raw.items() if v is not None}  # None = field left out
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=field):
        M.Config.from_json(path)


def test_base_config_is_accepted(tmp_path):
    """The refusals above start from a config that does load."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps(BASE_CONFIG))
    cfg = M.Config.from_json(path)
    assert (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.qkv_bias) == (2, 2, 16, True)
    assert cfg.rope_scaling is None and cfg.rope_theta == 10000.0

# -----------------------------------------------------------------------------
# Steering


def add_hooks(hf, vec):
    """Forward hooks adding vec[i] to the output of HF decoder layer i (a tensor in transformers 5,
    a tuple whose first element is the hidden state in 4.x)."""
    def hook(i):
        def add(module, args, out):
            if isinstance(out, tuple):
                return (out[0] + vec[i],) + out[1:]
            return out + vec[i]
        return add
    return [layer.register_forward_hook(hook(i)) for i, layer in enumerate(hf.model.layers)]


@pytest.mark.parametrize("family", ["qwen2-tied", "llama31"])
def test_steering_parity(tmp_path, family):
    hf, folder = saved(tmp_path, family)
    model = M.Transformer.from_pretrained(folder)
    L, d = model.steering.shape
    assert (L, d) == (hf.config.num_hidden_layers, hf.config.hidden_size)
    vec = torch.randn(L, d, generator=torch.Generator().manual_seed(2))
    toks = tokens(T=40)
    plain = hf_logits(hf, toks)
    with torch.no_grad():
        model.steering.copy_(vec)
    for alpha in (1.0, 0.5):
        handles = add_hooks(hf, alpha * vec)
        ref = hf_logits(hf, toks)
        for h in handles:
            h.remove()
        model.steering_scale = alpha
        with torch.no_grad():
            got = model(toks)
        assert rel_err(got, ref) <= 1e-5
        assert rel_err(ref, plain) > 0.05  # the vector does change the output


def test_only_steering_gets_gradient(tiny_qwen):
    model = M.Transformer.from_pretrained(tiny_qwen)
    assert model.steering.requires_grad and model.steering.dtype == torch.float32
    assert not model.steering.any()  # zeros at init
    frozen = [p for n, p in model.named_parameters() if not n.startswith("adapter.")]
    assert frozen and not any(p.requires_grad for p in frozen)
    logits = model(tokens(T=20))
    F.cross_entropy(logits.flatten(0, 1), tokens(T=20, seed=3).flatten()).backward()
    assert all(p.grad is None for p in frozen)
    assert (model.steering.grad.abs().sum(-1) > 0).all()  # every layer's vector gets a gradient


def test_steering_round_trip(tiny_qwen, tmp_path):
    model = M.Transformer.from_pretrained(tiny_qwen)
    vec = torch.randn(model.steering.shape)
    with torch.no_grad():
        model.steering.copy_(vec)
    path = tmp_path / "steer.safetensors"
    model.save_steering(path, step=120, reward=0.5)
    other = M.Transformer.from_pretrained(tiny_qwen)
    meta = other.load_steering(path)
    assert torch.equal(other.steering.detach(), vec)
    assert meta["step"] == "120" and meta["reward"] == "0.5"
    assert meta["base_model"] == str(tiny_qwen)
    assert meta["num_layers"] == "2" and meta["hidden_size"] == "64"
    assert list(load_file(path)) == ["steering"]
    # the base is recognised whatever dtype it was loaded in
    assert M.Transformer.from_pretrained(tiny_qwen, dtype=torch.bfloat16).load_steering(path)["step"] == "120"


def test_steering_file_refusals(tiny_qwen, tmp_path):
    model = M.Transformer.from_pretrained(tiny_qwen)
    bad = tmp_path / "bad.safetensors"
    save_file({"steering": torch.zeros(3, 64)}, str(bad))
    with pytest.raises(ValueError, match=r"shape \(3, 64\), expected \(2, 64\)"):
        model.load_steering(bad)
    save_file({"vector": torch.zeros(2, 64)}, str(bad))
    with pytest.raises(ValueError, match="'steering'"):
        model.load_steering(bad)
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="corrupt"):
        model.load_steering(bad)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_vectors_are_refused_where_they_load(tiny_qwen, tmp_path, bad):
    """NaN or Inf in a steering or LoRA file: refused with the file, the tensor and the rows named
    (a broken vector would otherwise steer every answer into garbage that still gets graded)."""
    model = M.Transformer.from_pretrained(tiny_qwen)
    with torch.no_grad():
        model.steering[1, 3] = bad
    model.save_steering(tmp_path / "s.safetensors")
    model.set_adapter("lora", lora_rank=2)
    with torch.no_grad():
        model.adapter.lora_B[0, 0, 0] = bad
    model.save_adapter(tmp_path / "l.safetensors")
    fresh = M.Transformer.from_pretrained(tiny_qwen)
    for path in (tmp_path / "s.safetensors", tmp_path / "l.safetensors"):
        with pytest.raises(ValueError, match="holds 1 NaN or infinite numbers") as e:
            fresh.load_adapter(path)
        assert str(path) in str(e.value)
    with pytest.raises(ValueError, match=r"tensor 'steering' holds 1 NaN or infinite numbers \(rows \[1\]"):
        M.read_steering(tmp_path / "s.safetensors")
    assert fresh.adapter.kind == "steering" and torch.equal(fresh.steering, torch.zeros_like(fresh.steering))


@pytest.mark.parametrize("cli", ["sample.py", "eval.py", "lens.py"])
def test_a_broken_vector_is_one_line_in_every_cli(tmp_path, tiny_with_tokenizer, cli):
    """A steering file holding NaN: sample.py, eval.py and lens.py each stop with one line naming the
    file and the problem, exit 2 (before: an empty answer, 0.0 % as a real score, a table of nan)."""
    from conftest import DATA_DIR
    model = M.Transformer.from_pretrained(tiny_with_tokenizer)
    with torch.no_grad():
        model.steering[0, 0] = float("nan")
    bad = tmp_path / "nan.safetensors"
    model.save_steering(bad)
    args = {"sample.py": ["--model", str(tiny_with_tokenizer), "--steering", str(bad), "What is 1 + 1?"],
            "eval.py": ["--model", str(tiny_with_tokenizer), "--steering", str(bad), "--bench", "arithmetic",
                        "--limit", "1", "--data-dir", str(DATA_DIR), "--out", str(tmp_path / "eval")],
            "lens.py": ["lens", "--steering", str(bad)]}[cli]
    proc = subprocess.run([sys.executable, str(ROOT / cli), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert str(bad) in lines[0] and "holds 1 NaN or infinite numbers" in lines[0], lines[0]


def test_steering_for_another_base(tiny_qwen, tmp_path):
    other_base = write_checkpoint(tmp_path / "other", "qwen2-tied", seed=1)  # same shapes, other weights
    theirs = M.Transformer.from_pretrained(other_base)
    with torch.no_grad():
        theirs.steering.normal_()
    path = tmp_path / "theirs.safetensors"
    theirs.save_steering(path)
    model = M.Transformer.from_pretrained(tiny_qwen)
    with pytest.raises(ValueError, match="made for base model"):
        model.load_steering(path)
    assert not model.steering.any()  # a refused file leaves the vector alone
    model.load_steering(path, check_base=False)
    assert torch.equal(model.steering, theirs.steering)

# -----------------------------------------------------------------------------
# Loading: shards, dtypes, refusals


def test_sharded_checkpoint(tmp_path):
    hf, folder = saved(tmp_path, "llama31", max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("*.safetensors"))) > 2
    toks = tokens()
    assert rel_err(ours(folder, toks), hf_logits(hf, toks)) <= 1e-5


def test_dtypes(tmp_path, monkeypatch):
    _, bf16 = saved(tmp_path / "bf16", "qwen2-untied", dtype=torch.bfloat16)
    model = M.Transformer.from_pretrained(bf16)  # dtype=None: the config's
    assert {p.dtype for n, p in model.named_parameters() if not n.startswith("adapter.")} == {torch.bfloat16}
    assert model.steering.dtype == torch.float32 and model.inv_freq.dtype == torch.float32

    _, fp32 = saved(tmp_path / "fp32", "qwen2-untied")
    assert M.Transformer.from_pretrained(fp32).embed_tokens.weight.dtype == torch.float32
    built_on = []
    init = M.Transformer.__init__

    def spy(self, cfg):
        init(self, cfg)
        built_on.append(self.embed_tokens.weight.device.type)

    monkeypatch.setattr(M.Transformer, "__init__", spy)
    model = M.Transformer.from_pretrained(fp32, dtype="bfloat16")
    assert built_on == ["meta"]  # constructed without allocating, then filled tensor by tensor
    params = dict(model.named_parameters())
    assert {p.dtype for n, p in params.items() if not n.startswith("adapter.")} == {torch.bfloat16}
    assert params["adapter.steering"].dtype == torch.float32
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    with torch.no_grad():
        assert model(tokens(T=8)).dtype == torch.bfloat16

    for dtype in (torch.int8, torch.float64, "float64", "fp8"):
        with pytest.raises(ValueError, match="dtype"):
            M.Transformer.from_pretrained(fp32, dtype=dtype)


def edit_tensors(folder, edit):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("edit,error", [
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), r"lacks 1 tensor\(s\): \['layers.1.mlp.up_proj.weight'\]"),
    (lambda t: t.update({"model.layers.0.self_attn.extra.weight": torch.zeros(3)}),
     "unexpected tensor 'model.layers.0.self_attn.extra.weight'"),
    (lambda t: t.update({"model.norm.weight": torch.ones(65)}), r"'model.norm.weight' has shape \(65,\), expected \(64,\)"),
    (lambda t: t.update({"model.norm.weight": torch.ones(64, dtype=torch.float64)}), "'model.norm.weight' has dtype F64"),
    (lambda t: t.update({"model.norm.weight": torch.ones(64, dtype=torch.int8)}), "'model.norm.weight' has dtype I8"),
])
def test_bad_tensors(tmp_path, edit, error):
    folder = write_checkpoint(tmp_path, "qwen2-untied")
    edit_tensors(folder, edit)
    with pytest.raises(ValueError, match=error):
        M.Transformer.from_pretrained(folder)


def test_tied_checkpoint_with_duplicate_head_loads(tmp_path):
    """Some tied checkpoints still store lm_head.weight; it is the embedding, so it is skipped."""
    hf, folder = saved(tmp_path, "qwen2-tied")
    edit_tensors(folder, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    toks = tokens(T=20)
    assert rel_err(ours(folder, toks), hf_logits(hf, toks)) <= 1e-5


def test_truncated_and_corrupt_files(tmp_path):
    folder = write_checkpoint(tmp_path, "qwen2-tied")
    path = folder / "model.safetensors"
    good = path.read_bytes()
    path.write_bytes(good[:-1000])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        M.Transformer.from_pretrained(folder)
    path.write_bytes((2 ** 40).to_bytes(8, "little") + good[8:])  # header length past the end
    with pytest.raises(ValueError, match="truncated or corrupt"):
        M.Transformer.from_pretrained(folder)
    n = int.from_bytes(good[:8], "little")
    path.write_bytes(good[:8] + b"[" * n + good[8 + n:])  # header not JSON
    with pytest.raises(ValueError, match="truncated or corrupt"):
        M.Transformer.from_pretrained(folder)


def test_missing_files(tmp_path):
    folder = write_checkpoint(tmp_path / "ckpt", "qwen2-tied")
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        M.Transformer.from_pretrained(folder)

    pickled = write_checkpoint(tmp_path / "pickled", "qwen2-tied")
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"pickle.*arbitrary code"):
        M.Transformer.from_pretrained(pickled)

    (pickled / "pytorch_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        M.Transformer.from_pretrained(pickled)

    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        M.Transformer.from_pretrained(tmp_path / "no" / "such" / "folder")


def test_hub_id_offline(monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read once, when huggingface_hub was imported
    with pytest.raises(FileNotFoundError, match="steer-tests/no-such-model.*HF_HUB_OFFLINE=1"):
        M.Transformer.from_pretrained("steer-tests/no-such-model")

# -----------------------------------------------------------------------------
# Log-probs for training


def naive_logprobs(model, toks, targets, temperature=1.0, vocab_size=None):
    logits = model(toks).float()[..., :vocab_size] / temperature
    return logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)


@pytest.mark.parametrize("chunk_size", [8, 7, 1000])  # divides N = 2 * 20, does not, exceeds it
@pytest.mark.parametrize("temperature,vocab_size", [(1.0, None), (0.7, None), (1.3, 80)])
def test_chunked_logprobs(tiny_llama, chunk_size, temperature, vocab_size):
    model = M.Transformer.from_pretrained(tiny_llama)
    with torch.no_grad():
        model.steering.normal_(std=0.3)
    toks, targets = tokens(T=20), tokens(T=20, seed=4, vocab=vocab_size or 96)

    ref = naive_logprobs(model, toks, targets, temperature, vocab_size)
    ref.sum().backward()
    ref_grad, model.steering.grad = model.steering.grad, None

    got = token_logprobs(model, toks, targets, temperature, vocab_size, chunk_size)
    assert got.dtype == torch.float32 and got.shape == (2, 20)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    got.sum().backward()
    torch.testing.assert_close(model.steering.grad, ref_grad, rtol=1e-5, atol=1e-5)
    assert ref_grad.abs().sum() > 0

    hidden = model.hidden_states(toks).detach()  # no grad anywhere: the plain (unchecked) path
    with torch.no_grad():
        plain = M.chunked_logprobs(hidden, model.head_weight, targets, temperature, vocab_size, chunk_size)
    torch.testing.assert_close(plain, ref.detach(), rtol=0, atol=1e-5)


def test_chunked_logprobs_with_a_trainable_head(tiny_llama):
    """A head that trains (full fine-tuning) takes autograd's path: its gradient, and the
    hidden states', equal the naive log-softmax's."""
    model = M.Transformer.from_pretrained(tiny_llama)
    hidden = model.hidden_states(tokens(T=20)).detach().requires_grad_(True)
    weight = model.head_weight.detach().clone().requires_grad_(True)
    targets = tokens(T=20, seed=4, vocab=80)
    grads = []
    for fn in (lambda: M.chunked_logprobs(hidden, weight, targets, 0.7, 80, chunk_size=7),
               lambda: F.linear(hidden, weight[:80]).div(0.7).log_softmax(-1).gather(-1, targets[..., None])[..., 0]):
        hidden.grad = weight.grad = None
        out = fn()
        (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
        grads.append((out.detach(), hidden.grad.clone(), weight.grad.clone()))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert grads[0][2][:80].abs().sum() > 0 and grads[0][2][80:].abs().sum() == 0


def test_checkpoint_blocks(tiny_llama):
    model = M.Transformer.from_pretrained(tiny_llama)
    with torch.no_grad():
        model.steering.normal_(std=0.3)
    toks, targets = tokens(T=20), tokens(T=20, seed=4)
    results = []
    for flag in (False, True):
        model.checkpoint_blocks = flag
        model.steering.grad = None
        loss = -token_logprobs(model, toks, targets, chunk_size=16).mean()
        loss.backward()
        results.append((loss.detach(), model.steering.grad.clone()))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=1e-6)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-5, atol=1e-7)


def test_right_padding(tiny_llama):
    model = M.Transformer.from_pretrained(tiny_llama)
    with torch.no_grad():
        model.steering.normal_(std=0.3)
        seqs = [tokens(1, n, seed=n)[0] for n in (5, 13, 9)]
        batch = torch.zeros(len(seqs), 13, dtype=torch.long)  # pad id 0, on the right
        for i, s in enumerate(seqs):
            batch[i, :len(s)] = s
        padded = model(batch)
        for i, s in enumerate(seqs):
            torch.testing.assert_close(padded[i, :len(s)], model(s[None])[0], rtol=0, atol=1e-5)

# -----------------------------------------------------------------------------
# Real checkpoints (../shared/tools/real_models.sh puts them in STEER_REAL_MODELS)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"])
def test_real_checkpoint_parity(name):
    folder = REAL_MODELS / name
    if not (folder / "config.json").is_file():
        pytest.skip(f"{folder} absent (set STEER_REAL_MODELS or run ../shared/tools/real_models.sh)")
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM
    toks = torch.tensor([Tokenizer.from_file(str(folder / "tokenizer.json")).encode(
        "Solve for x: 3x + 7 = 22. Put the final answer in \\boxed{}.").ids])
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ref = hf_logits(hf, toks)
    del hf
    got = ours(folder, toks, dtype=torch.float32)
    print(f"{name}: max |dlogit| {(got - ref).abs().max():.3g}, relative {rel_err(got, ref):.3g}")
    assert rel_err(got, ref) <= 1e-4
    assert torch.equal(got[0, -1].argmax(), ref[0, -1].argmax())


@pytest.mark.parametrize("cli", ["sample.py", "eval.py", "lens.py"])
def test_a_vector_for_other_weights_is_one_line_naming_the_flag_that_loads_it(tmp_path, tiny_with_tokenizer, cli):
    """Made for another base (same shapes): refused in one line that says which --model it was made
    for and that --any-base loads it anyway; with --any-base each CLI runs."""
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open
    from conftest import DATA_DIR
    model = M.Transformer.from_pretrained(tiny_with_tokenizer)
    made = tmp_path / "made.safetensors"
    model.save_steering(made)
    with safe_open(str(made), "pt") as f:
        meta = dict(f.metadata(), base_fingerprint="0123456789abcdef", base_model="someone/else")
    theirs = tmp_path / "theirs.safetensors"
    save_file(load_file(str(made)), str(theirs), metadata=meta)
    args = {"sample.py": ["--model", str(tiny_with_tokenizer), "--steering", str(theirs), "--max-new-tokens", "4",
                          "What is 1 + 1?"],
            "eval.py": ["--model", str(tiny_with_tokenizer), "--steering", str(theirs), "--bench", "arithmetic",
                        "--limit", "1", "--max-new-tokens", "4", "--data-dir", str(DATA_DIR), "--out",
                        str(tmp_path / "eval")],
            "lens.py": ["lens", "--steering", str(theirs), "--model", str(tiny_with_tokenizer)]}[cli]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / cli), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=env)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert "made for base model 'someone/else'" in lines[0] and "--model someone/else" in lines[0], lines[0]
    assert "pass --any-base" in lines[0] and str(theirs) in lines[0], lines[0]
    anyway = subprocess.run([sys.executable, str(ROOT / cli), *args, "--any-base"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, env=env)
    assert anyway.returncode == 0, anyway.stderr[-3000:]
