"""adapters.py and the seam in model.py: LoRA against HF transformers + peft, gradients of every adapter
against central finite differences (float64) and against HF autograd (full fine-tuning),
layer subsets and post-attn steering against hooked HF models, the 16-bit master-weight path,
adapter files and folders, graph keys, and the refusals."""
import json
import math

import pytest
import torch
from conftest import hf_model, write_checkpoint
from safetensors.torch import load_file, save_file

import adapters
import model as M

D, FFN = 64, 128  # conftest.hf_model's default sizes


def tokens(B=2, T=12, vocab=96, seed=1):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def randomize(model, seed=0, std=0.3):
    """Every trainable tensor to random values (LoRA's B included), so no check sits at zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(std * torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.fixture(scope="module")
def three_layers(tmp_path_factory):
    """(HF model, folder) of a 3-layer tiny Llama (untied head): room for layer subsets."""
    folder = tmp_path_factory.mktemp("three")
    hf = hf_model("llama31", layers=3)
    hf.save_pretrained(folder)
    return hf, folder


def load(folder, **kw):
    return M.Transformer.from_pretrained(folder, **kw)

# -----------------------------------------------------------------------------
# LoRA against peft


@pytest.mark.parametrize("family,rank,layers", [
    ("qwen2-tied", 1, None), ("qwen2-tied", 4, None), ("llama31", 1, None), ("llama31", 4, None),
    ("llama31", 4, [0, 2]), ("qwen2-tied", 1, [1]),
])
def test_lora_matches_peft(tmp_path, family, rank, layers):
    from peft import LoraConfig, get_peft_model
    hf = hf_model(family, layers=3)
    hf.save_pretrained(tmp_path)
    model = load(tmp_path, dtype=torch.float32)
    alpha = 2 * rank + 1  # scale alpha / r != 1
    model.set_adapter("lora", layers=layers, lora_rank=rank, lora_alpha=alpha)
    randomize(model, std=0.1)
    peft = get_peft_model(hf, LoraConfig(r=rank, lora_alpha=alpha, target_modules=["down_proj"], lora_dropout=0.0,
                                         layers_to_transform=layers)).eval()
    A, B = model.adapter.lora_A, model.adapter.lora_B
    listed = layers or [0, 1, 2]
    with torch.no_grad():
        for i, layer in enumerate(peft.base_model.model.model.layers):
            down = layer.mlp.down_proj
            assert hasattr(down, "lora_A") == (i in listed)  # peft adapted the same layers
            if i in listed:
                down.lora_A["default"].weight.copy_(A[listed.index(i)])
                down.lora_B["default"].weight.copy_(B[listed.index(i)])
        toks = tokens(T=24)
        ref, got = peft(toks).logits, model(toks)
        with peft.disable_adapter():
            base = peft(toks).logits
    err = (got - ref).abs().max().item()
    print(f"lora {family} r={rank} layers={layers}: max |dlogit| vs peft {err:.2e}")
    assert err <= 1e-5
    assert (ref - base).abs().max() > 0.05  # the adapter does change the output
    assert model.num_trainable() == len(listed) * rank * (FFN + hf.config.hidden_size)


def test_lora_init_is_peft_default(tiny_qwen):
    """A = kaiming_uniform(a=sqrt 5) per layer (fan_in = ffn: U(+-1/sqrt(ffn))), B = 0: the
    adapted model starts as the base."""
    model = load(tiny_qwen)
    toks = tokens()
    with torch.no_grad():
        base = model(toks)
    torch.manual_seed(5)
    model.set_adapter("lora", lora_rank=4)
    torch.manual_seed(5)
    want = torch.stack([torch.nn.init.kaiming_uniform_(torch.empty(4, FFN), a=math.sqrt(5)) for _ in range(2)])
    assert torch.equal(model.adapter.lora_A.detach(), want)
    assert 0.9 / FFN ** 0.5 < want.abs().max() <= 1 / FFN ** 0.5
    assert not model.adapter.lora_B.any() and model.adapter.lora_A.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(model(toks), base)


def test_lora_in_bf16(tiny_qwen):
    """fp32 A, B in a bf16 model: bf16 output, fp32 gradients, close to the fp32 model."""
    outs = []
    for dtype in (torch.float32, torch.bfloat16):
        model = load(tiny_qwen, dtype=dtype)
        torch.manual_seed(0)
        model.set_adapter("lora", lora_rank=2)
        randomize(model, std=0.1)
        logits = model(tokens())
        assert logits.dtype == dtype
        model.reset_grads()
        logits.float().logsumexp(-1).sum().backward()
        assert all(p.dtype == torch.float32 and p.grad.abs().sum() > 0 for p in model.trainable_parameters())
        outs.append(logits.detach().float())
    assert ((outs[1] - outs[0]).abs().max() / outs[0].abs().max()) < 2 ** -6

# -----------------------------------------------------------------------------
# Gradients: central finite differences in float64, and HF autograd for full fine-tuning


def weighted_logprobs(model, toks, targets, weights):
    """A scalar loss the way train.py builds one: log-probs of given tokens through the chunked head."""
    hidden = model.hidden_states(toks)
    return (M.chunked_logprobs(hidden, model.head_weight, targets, 0.7, chunk_size=7) * weights).sum()


@pytest.mark.parametrize("kind,options,recompute", [
    ("lora", dict(lora_rank=2, lora_alpha=3.0), False),
    ("lora", dict(lora_rank=3, layers="0,2"), True),
    ("steering", dict(layers="0,2"), False),
    ("steering", dict(steer_at="post-attn"), True),
    ("steering", dict(steer_at="post-attn", layers="1"), False),
    ("full", {}, False),
])
def test_gradient_matches_finite_differences(three_layers, kind, options, recompute):
    _, folder = three_layers
    model = load(folder, dtype=torch.float32).double()
    torch.manual_seed(0)
    model.set_adapter(kind, **options)
    model.checkpoint_blocks = recompute
    params = model.trainable_parameters()
    assert all(p.dtype == torch.float64 for p in params)
    randomize(model, std=0.3 if kind != "full" else 0.01)
    g = torch.Generator().manual_seed(3)
    toks, targets = tokens(T=10), tokens(T=10, seed=2)
    weights = torch.randn(toks.shape, generator=g, dtype=torch.float64)
    flat = model.reset_grads()
    weighted_logprobs(model, toks, targets, weights).backward()
    assert torch.equal(flat, torch.cat([p.grad.flatten() for p in params]))  # backward wrote into the one buffer

    # 24 coordinates drawn over all trainable tensors (with full: across every weight)
    sizes = torch.tensor([p.numel() for p in params])
    picks = torch.multinomial(sizes.double(), 24, replacement=True, generator=g).tolist()
    eps, worst, scale = 1e-5, 0.0, 0.0
    for t in picks:
        p = params[t]
        i = torch.randint(p.numel(), (1,), generator=g).item()
        x = p.data.view(-1)
        with torch.no_grad():
            x[i] += eps
            up = weighted_logprobs(model, toks, targets, weights)
            x[i] -= 2 * eps
            down = weighted_logprobs(model, toks, targets, weights)
            x[i] += eps
        numeric, analytic = (up - down).item() / (2 * eps), p.grad.view(-1)[i].item()
        worst, scale = max(worst, abs(numeric - analytic)), max(scale, abs(analytic))
    print(f"{kind} {options} recompute={recompute}: max |grad - finite difference| {worst:.2e} "
          f"(max |grad| {scale:.2e})")
    assert scale > 1e-3 and worst <= 1e-6 * max(1.0, scale)


def test_full_gradients_match_hf(three_layers):
    """Every weight's gradient equals HF autograd's on the same batch and loss (float64)."""
    _, folder = three_layers
    hf = hf_model("llama31", layers=3).double()  # the same weights, float64
    model = load(folder, dtype=torch.float32).double()
    model.set_adapter("full")
    assert model.num_trainable() == sum(p.numel() for p in hf.parameters())
    toks, targets = tokens(T=16), tokens(T=16, seed=2)
    weights = torch.randn(toks.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    model.reset_grads()
    weighted_logprobs(model, toks, targets, weights).backward()
    ((hf(toks).logits / 0.7).log_softmax(-1).gather(-1, targets[..., None])[..., 0] * weights).sum().backward()
    ours = model.base_weights()
    worst = 0.0
    for name, p in hf.named_parameters():
        got, want = ours[name.removeprefix("model.")].grad, p.grad
        assert want.abs().sum() > 0
        worst = max(worst, ((got - want).abs().max() / want.abs().max()).item())
    print(f"full fine-tuning: max relative |grad - HF grad| over {len(ours)} weights {worst:.2e}")
    assert worst <= 1e-6

# -----------------------------------------------------------------------------
# Steering: layer subsets, post-attn


def test_layer_subset_rows_stay_zero(three_layers):
    _, folder = three_layers
    model = load(folder)
    model.set_adapter("steering", layers="0,2")
    d = model.config.hidden_size
    assert model.num_trainable() == 2 * d and model.steering.shape == (3, d)
    assert model.trainable_bytes()["numel"] == 3 * d  # the tensor stays (L, d): one buffer, simple indexing
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=0.1, weight_decay=0.1)
    for step in range(3):
        model.reset_grads()
        model(tokens(seed=step)).float().logsumexp(-1).sum().backward()
        grad = model.steering.grad
        assert torch.equal(grad[1], torch.zeros(d)) and (grad[[0, 2]].abs().sum(-1) > 0).all()
        opt.step()
        model.trainable_to_weights()
    assert torch.equal(model.steering[1], torch.zeros(d)) and (model.steering[[0, 2]].abs().sum(-1) > 0).all()


def hook_adds(hf, vec, module, layers):
    """Forward hooks adding vec[i] to the output of `module` of HF decoder layer i (for i in layers):
    a tensor, or a tuple whose first element is the hidden state."""
    def hook(i):
        def add(mod, args, out):
            return (out[0] + vec[i],) + tuple(out[1:]) if isinstance(out, tuple) else out + vec[i]
        return add
    return [module(hf.model.layers[i]).register_forward_hook(hook(i)) for i in layers]


@pytest.mark.parametrize("steer_at,layers", [("post-attn", None), ("post-attn", "1"), ("post-block", "0,2")])
def test_steering_points_match_hooked_hf(three_layers, steer_at, layers):
    """post-attn: added to the attention output, so the MLP reads the steered stream; post-block:
    after the block. Checked against HF with hooks at those points, on the listed layers only."""
    hf, folder = three_layers
    model = load(folder)
    model.set_adapter("steering", layers=layers, steer_at=steer_at)
    vec = torch.randn(3, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model.steering.copy_(vec)
        model.steering_scale = 0.5
        toks = tokens(T=30)
        plain = hf(toks).logits
        listed = adapters.parse_layers(layers or "", 3)
        module = (lambda block: block.self_attn) if steer_at == "post-attn" else (lambda block: block)
        handles = hook_adds(hf, 0.5 * vec, module, listed)
        ref = hf(toks).logits
        for h in handles:
            h.remove()
        got = model(toks)
    assert ((got - ref).abs().max() / ref.abs().max()) <= 1e-5
    assert (ref - plain).abs().max() > 0.05


@pytest.mark.parametrize("steer_at,layers", [("post-block", None), ("post-attn", "0,2")])
def test_a_table_gives_each_sequence_its_own_vector(three_layers, steer_at, layers):
    """One forward over a batch whose sequences each name a row of the table (per sequence or per
    token) equals, sequence by sequence, a forward with that row as model.steering; row 0 is the
    base. The rows are the vectors in force (in_force: unlisted layers zero), at their strengths."""
    _, folder = three_layers
    model = load(folder)
    model.set_adapter("steering", layers=layers, steer_at=steer_at)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        vectors = []
        for strength in (1.0, 0.5, -2.0):
            model.steering.copy_(torch.randn(model.steering.shape, generator=g))
            vectors.append(strength * model.adapter.in_force())
        model.steering_scale = 0.7
        model.adapter.set_table(torch.stack(vectors))
        toks = tokens(B=5, T=20)
        ids = torch.tensor([[2], [0], [3], [1], [2]])
        got = model(toks, vector_ids=ids)
        per_token = model(toks, vector_ids=ids.expand(-1, 20))
        for b, row in enumerate(ids[:, 0].tolist()):
            model.steering.copy_(vectors[row - 1] if row else torch.zeros_like(model.steering))
            want = model(toks[b:b + 1])[0]
            assert torch.equal(got[b], want) and torch.equal(per_token[b], want), (b, row)
        assert not torch.equal(got[0], got[1])  # the rows do differ
        model.adapter.set_table(torch.stack(vectors[:1]))  # fewer vectors: the storage stays, the rest zeros
        assert len(model.adapter.table) == 4 and not model.adapter.table[2:].any()


def test_a_table_is_refused_where_it_cannot_work(three_layers):
    _, folder = three_layers
    model = load(folder)
    toks, ids = tokens(B=2), torch.tensor([[0], [1]])
    with pytest.raises(ValueError, match="holds no table of vectors"):
        model(toks, vector_ids=ids)
    with pytest.raises(ValueError, match=r"table of vectors of shape \(3, 7\)"):
        model.adapter.set_table(torch.zeros(2, 3, 7))
    for kind in ("lora", "full"):
        model.set_adapter(kind)
        with pytest.raises(ValueError, match=f"'{kind}' runs one adapter per batch"):
            model(toks, vector_ids=ids)


def test_default_steering_is_todays_forward(tiny_llama):
    """The default adapter computes exactly what model.py computed before adapters: h + (alpha *
    steering).to(dtype)[l] after every block, written out here as a loop over the blocks' parts."""
    model = load(tiny_llama)
    with torch.no_grad():
        model.steering.normal_()
        model.steering_scale = 0.7
        toks = tokens(T=20)
        pos = torch.arange(20).expand(toks.shape)
        cos, sin = model.rope(pos)
        h = model.embed_tokens(toks)
        steer = (0.7 * model.steering).to(h.dtype)
        for i, b in enumerate(model.layers):
            h = h + b.self_attn(b.input_layernorm(h), cos, sin, M.causal_attention, i)
            m = b.post_attention_layernorm(h)
            h = h + b.mlp.down_proj(torch.nn.functional.silu(b.mlp.gate_proj(m)) * b.mlp.up_proj(m))
            h = h + steer[i]
        assert torch.equal(model(toks), torch.nn.functional.linear(model.norm(h), model.head_weight))

# -----------------------------------------------------------------------------
# Full fine-tuning in 16 bits: fp32 masters, weights updated in place


def test_full_bf16_masters(tiny_qwen):
    model = load(tiny_qwen, dtype=torch.bfloat16)
    model.set_adapter("full")
    model.checkpoint_blocks = True  # the hooks also fire on recomputed blocks
    weights = list(model.base_weights().values())
    assert model.adapter.masters is None  # until training asks: an evaluated fine-tune needs none
    masters = model.trainable_parameters()
    assert all(m.dtype == torch.float32 for m in masters) and len(masters) == len(weights)
    assert all(torch.equal(m, w.float()) for m, w in zip(masters, weights))
    ptrs, key = [w.data_ptr() for w in weights], model.adapter_key()
    n = sum(w.numel() for w in weights)
    assert model.trainable_bytes() == dict(numel=n, weights=2 * n, masters=4 * n, grads=4 * n, optimizer=8 * n)
    opt = torch.optim.AdamW(masters, lr=1e-2)
    before = [m.detach().clone() for m in masters]
    flat = model.reset_grads()
    for seed in (0, 1):  # two micro-batches, accumulated in fp32
        model(tokens(seed=seed)).float().logsumexp(-1).sum().backward()
    assert all(w.grad is None for w in weights)  # moved into the masters as backward produced them
    assert torch.equal(flat, torch.cat([m.grad.flatten() for m in masters])) and flat.abs().sum() > 0
    opt.step()
    model.trainable_to_weights()
    assert all(not torch.equal(m, b) for m, b in zip(masters, before))
    assert all(torch.equal(w, m.to(torch.bfloat16)) for w, m in zip(weights, masters))
    assert [w.data_ptr() for w in model.base_weights().values()] == ptrs  # same storage: 0 bytes of sync
    assert model.adapter_key() == key
    model.set_adapter("steering")  # back: base frozen again, hooks gone
    assert not any(w.requires_grad for w in model.base_weights().values())


def test_full_fp32_trains_the_weights(tiny_qwen):
    model = load(tiny_qwen)
    model.set_adapter("full")
    assert all(a is b for a, b in zip(model.trainable_parameters(), model.base_weights().values(), strict=True))
    assert model.trainable_bytes()["masters"] == 0

# -----------------------------------------------------------------------------
# Files


def run_logits(model, toks=None):
    with torch.no_grad():
        return model(tokens() if toks is None else toks)


@pytest.mark.parametrize("kind,options", [
    ("steering", {}), ("steering", dict(layers="1", steer_at="post-attn")),
    ("lora", dict(lora_rank=3, lora_alpha=5.0)), ("lora", dict(lora_rank=1, layers=[0])),
])
def test_adapter_file_round_trip(tiny_qwen, tmp_path, kind, options):
    model = load(tiny_qwen)
    model.set_adapter(kind, **options)
    randomize(model)
    path = tmp_path / "adapter.safetensors"
    model.save_adapter(path, step=7)
    meta = M.adapter_metadata(path)
    assert meta["kind"] == kind and meta["step"] == "7" and meta["base_model"] == str(tiny_qwen)
    other = load(tiny_qwen)
    assert other.load_adapter(path)["step"] == "7"
    assert other.adapter.kind == kind and other.adapter.options() == model.adapter.options()
    for a, b in zip(other.trainable_parameters(), model.trainable_parameters()):
        assert torch.equal(a, b)
    assert torch.equal(run_logits(other), run_logits(model))
    # loading again with the same kind and options overwrites in place (the optimizer keeps its tensors)
    ptrs = [p.data_ptr() for p in other.trainable_parameters()]
    other.load_adapter(path)
    assert [p.data_ptr() for p in other.trainable_parameters()] == ptrs


def test_steering_files_keep_todays_format(tiny_qwen, tmp_path):
    """A file as save_steering wrote it before adapters (one tensor, these metadata keys) loads;
    a new steering file is still one tensor 'steering' with those keys (plus kind and options)."""
    model = load(tiny_qwen)
    vec = torch.randn(2, D)
    old = tmp_path / "old.safetensors"
    save_file({"steering": vec}, str(old), metadata={
        "format": "steer", "base_model": "somewhere", "base_fingerprint": model.fingerprint(),
        "num_layers": "2", "hidden_size": str(D), "step": "3"})
    model.set_adapter("lora")
    assert model.load_steering(old)["step"] == "3"
    assert model.adapter.kind == "steering" and model.adapter.options() == dict(layers=(0, 1), steer_at="post-block")
    assert torch.equal(model.steering.detach(), vec)
    new = tmp_path / "new.safetensors"
    model.save_steering(new)
    assert list(load_file(new)) == ["steering"]
    assert {"format", "base_model", "base_fingerprint", "num_layers", "hidden_size"} <= set(M.adapter_metadata(new))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_full_folder_round_trip(tiny_llama, tmp_path, dtype):
    from transformers import AutoModelForCausalLM
    model = load(tiny_llama, dtype=dtype)
    model.set_adapter("full")
    randomize(model, std=0.02)
    model.trainable_to_weights()
    folder = tmp_path / "full"
    model.save_adapter(folder, step=5)
    assert (folder / "config.json").is_file() and M.adapter_metadata(folder)["kind"] == "full"
    names = set(load_file(folder / "model.safetensors"))
    assert "lm_head.weight" in names and "model.layers.0.mlp.down_proj.weight" in names
    toks = tokens(T=20)
    want = run_logits(model, toks)

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    with torch.no_grad():
        ref = hf(toks).logits
    assert ((want.float() - ref.float()).abs().max() / ref.float().abs().max()) <= (1e-5 if dtype == torch.float32
                                                                                     else 2 ** -7)
    assert torch.equal(run_logits(load(folder, dtype=dtype), toks), want)  # a checkpoint of its own

    base = load(tiny_llama, dtype=dtype)  # into the base it came from, as an adapter
    if dtype == torch.bfloat16:  # as in a training run: masters exist, and must follow the loaded weights
        base.set_adapter("full")
        masters = base.trainable_parameters()
    assert base.load_adapter(folder)["step"] == "5" and base.adapter.kind == "full"
    assert torch.equal(run_logits(base, toks), want)
    if dtype == torch.bfloat16:
        assert all(a is b for a, b in zip(base.trainable_parameters(), masters, strict=True))
        assert all(torch.equal(m, w.float()) for m, w in zip(masters, base.adapter.weights))
    with pytest.raises(ValueError, match="made for base model"):  # the fine-tune is not the base
        load(folder, dtype=dtype).load_adapter(folder)


def test_file_refusals(tiny_qwen, tmp_path):
    model = load(tiny_qwen)
    model.set_adapter("lora", lora_rank=2)
    lora = tmp_path / "lora.safetensors"
    model.save_adapter(lora)
    model.set_adapter("steering")
    with pytest.raises(ValueError, match="'lora' adapter file, not a steering file"):
        model.load_steering(lora)

    other = load(write_checkpoint(tmp_path / "other", "qwen2-tied", seed=1))  # same shapes, other weights
    other.set_adapter("lora", lora_rank=2)
    theirs = tmp_path / "theirs.safetensors"
    other.save_adapter(theirs)
    with pytest.raises(ValueError, match=f"adapter file {theirs} was made for base model"):
        model.load_adapter(theirs)
    assert model.adapter.kind == "steering"  # a refused file leaves the model alone
    model.load_adapter(theirs, check_base=False)
    assert model.adapter.kind == "lora"

    def edited(tensors=None, **meta):
        t = load_file(lora)
        from safetensors import safe_open
        with safe_open(str(lora), "pt") as f:
            m = f.metadata()
        path = tmp_path / f"edited{len(list(tmp_path.iterdir()))}.safetensors"
        save_file(tensors or t, str(path), metadata={**m, **meta})
        return path

    cases = [
        (edited(kind="prefix"), "adapter kind 'prefix' is unknown"),
        (edited(rank="x"), "bad metadata"),
        (edited(layers="0,5"), r"bad metadata \('layers' 0,5: out of range 0..1\)"),
        (edited(tensors={"lora_A": torch.zeros(2, 3, FFN), "lora_B": torch.zeros(2, D, 2)}),
         r"'lora_A' has shape \(2, 3, 128\), expected \(2, 2, 128\)"),
        (edited(tensors={"lora_A": torch.zeros(2, 2, FFN)}), r"expected tensor\(s\) \['lora_A', 'lora_B'\]"),
    ]
    for path, error in cases:
        with pytest.raises(ValueError, match=error):
            model.load_adapter(path)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match=f"adapter file {corrupt}: unreadable or corrupt"):
        model.load_adapter(corrupt)
    with pytest.raises(FileNotFoundError, match="not found"):
        M.adapter_metadata(tmp_path / "missing.safetensors")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="no steer_adapter.json"):
        model.load_adapter(tmp_path / "folder")
    with pytest.raises(ValueError, match=r"save_steering: the adapter is LoRA \('lora'\), not one steering vector"):
        model.save_steering(tmp_path / "x.safetensors")


def test_full_folder_refusals(tiny_qwen, tmp_path):
    model = load(tiny_qwen)
    model.set_adapter("full")
    folder = tmp_path / "full"
    model.save_adapter(folder)
    model.set_adapter("steering")
    tensors = load_file(folder / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones(65)
    save_file(tensors, str(folder / "model.safetensors"))
    before = model.norm.weight.clone()
    with pytest.raises(ValueError, match=r"'model.norm.weight' has shape \(65,\)"):
        model.load_adapter(folder)
    assert torch.equal(model.norm.weight, before) and model.adapter.kind == "steering"
    meta = json.loads((folder / M.ADAPTER_JSON).read_text())
    (folder / M.ADAPTER_JSON).write_text(json.dumps({**meta, "kind": "lora"}))
    with pytest.raises(ValueError, match="does not match the path"):
        model.load_adapter(folder)

# -----------------------------------------------------------------------------
# The seam's API: options, errors, graph keys, model.steering


@pytest.mark.parametrize("spec,want", [("", (0, 1, 2, 3)), ("2", (2,)), ("0-2", (0, 1, 2)), ("3,1,1", (1, 3)),
                                       ("0-1,3", (0, 1, 3))])
def test_parse_layers(spec, want):
    assert adapters.parse_layers(spec, 4) == want


@pytest.mark.parametrize("spec,error", [("4", "--layers 4: out of range 0..3"), ("1-7", "out of range"),
                                        ("x", "'x' is not a layer index"), ("-1", "not a layer index"),
                                        ("3-1", "empty"), ("1,,2", "'' is not")])
def test_parse_layers_refusals(spec, error):
    with pytest.raises(ValueError, match=error):
        adapters.parse_layers(spec, 4)


@pytest.mark.parametrize("kind,options,error", [
    ("prefix", {}, "--adapter prefix: unknown"),
    ("lora", dict(lora_rank=0), "--lora-rank 0: must be"),
    ("lora", dict(lora_alpha=-1), "--lora-alpha"),
    ("steering", dict(steer_at="pre-attn"), "--steer-at pre-attn: unknown"),
    ("steering", dict(layers="40"), "--layers 40: out of range 0..1"),
    ("lora", dict(layers=[]), "--layers: no layer"),
    ("full", dict(layers="1"), "--layers: full fine-tuning trains every layer"),
])
def test_set_adapter_refusals(tiny_qwen, kind, options, error):
    model = load(tiny_qwen)
    with pytest.raises(ValueError, match=error):
        model.set_adapter(kind, **options)
    assert model.adapter.kind == "steering"


def test_adapter_key(tiny_qwen):
    model = load(tiny_qwen)
    keys = [model.adapter_key()]
    with torch.no_grad():
        model.steering.add_(1.0)  # in place: a captured graph reads the new values
    assert model.adapter_key() == keys[0]
    model.steering_scale = 0.5  # a Python float baked into captures
    keys.append(model.adapter_key())
    model.set_adapter("steering", steer_at="post-attn")
    keys.append(model.adapter_key())
    model.set_adapter("lora")
    keys.append(model.adapter_key())
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=0.1)
    model.reset_grads()
    model(tokens()).float().logsumexp(-1).sum().backward()
    opt.step()
    assert model.adapter_key() == keys[-1]
    model.adapter.lora_B = torch.nn.Parameter(model.adapter.lora_B.detach().clone())  # a replaced tensor
    keys.append(model.adapter_key())
    model.set_adapter("lora", lora_alpha=8.0)
    keys.append(model.adapter_key())
    model.set_adapter("full")
    keys.append(model.adapter_key())
    assert len(set(keys)) == len(keys)
    hash(keys[-1])


def test_steering_attribute(tiny_qwen, tmp_path):
    model = load(tiny_qwen)
    assert isinstance(model.steering, torch.nn.Parameter) and model.steering is model.adapter.steering
    model.set_adapter("lora")
    assert not hasattr(model, "steering")
    with pytest.raises(AttributeError, match=r"model.steering: the adapter is LoRA \('lora'\), not one steering"):
        model.steering  # noqa: B018
    model.set_population(["a", "b"])  # K vectors: no one model.steering, and no one file
    with pytest.raises(AttributeError, match=r"the adapter is Population \('steering'\), not one steering vector"):
        model.steering  # noqa: B018
    with pytest.raises(ValueError, match="a population's vectors are files of their own"):
        model.save_adapter(tmp_path / "x.safetensors")


def test_reset_grads_survives_set_to_none(tiny_qwen):
    """zero_grad(set_to_none=True) between steps drops the views; reset_grads binds them again."""
    model = load(tiny_qwen)
    model.set_adapter("lora", lora_rank=2)
    randomize(model)
    opt = torch.optim.AdamW(model.trainable_parameters())
    grads = []
    for _ in range(2):
        flat = model.reset_grads()
        model(tokens()).float().logsumexp(-1).sum().backward()
        grads.append(flat.clone())
        opt.zero_grad(set_to_none=True)
    assert torch.equal(grads[0], grads[1]) and grads[0].abs().sum() > 0
    assert model.reset_grads().data_ptr() == flat.data_ptr()


def test_config_max_position_embeddings(tiny_llama, tmp_path):
    assert M.Config.from_json(tiny_llama / "config.json").max_position_embeddings == 128
    raw = json.loads((tiny_llama / "config.json").read_text())
    raw.pop("max_position_embeddings")
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert M.Config.from_json(tmp_path / "config.json").max_position_embeddings is None


def test_sampler_sees_the_adapter(tiny_qwen):
    """The sampler runs model.hidden_states with its own attention: the log-probs it reports for
    a LoRA'd model's samples equal the full forward's, and differ from the base model's."""
    import sample
    model = load(tiny_qwen)
    with torch.no_grad():
        model.embed_tokens.weight.mul_(0.1)  # (tied head) broad next-token distributions: log-probs far from 0
    torch.manual_seed(0)
    model.set_adapter("lora", lora_rank=2)
    randomize(model, std=0.5)
    prompt = tokens(1, 6)[0].tolist()
    outs = sample.Sampler(model, kv_cache_tokens=256).generate([prompt], n=2, max_new_tokens=8, temperature=1.0,
                                                               seed=0)[0]

    def forward_logprobs():
        with torch.no_grad():
            return [model(torch.tensor([prompt + c.tokens]))[0, len(prompt) - 1:-1].float().log_softmax(-1)
                    .gather(-1, torch.tensor(c.tokens)[:, None])[:, 0] for c in outs]
    for c, want in zip(outs, forward_logprobs()):
        torch.testing.assert_close(torch.tensor(c.logprobs, dtype=torch.float32), want, rtol=0, atol=1e-4)
    model.set_adapter("steering")
    assert max((torch.tensor(c.logprobs) - b).abs().max() for c, b in zip(outs, forward_logprobs())) > 0.05
