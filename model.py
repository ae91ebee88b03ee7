"""A hand-written Llama / Qwen2 decoder with one trainable steering vector per layer.

    h = embed(tokens)
    for l in range(L):
        h = h + attn(rmsnorm(h))            # GQA attention with RoPE
        h = h + mlp(rmsnorm(h))             # SwiGLU
        h = h + alpha * steering[l]         # the only trainable numbers: L x d, fp32, zeros at init
    logits = lm_head(rmsnorm(h))

Module and tensor names follow the Hugging Face layout (minus the leading "model."), so a
checkpoint folder (config.json + safetensors) loads tensor by tensor with no renaming table.

Batches of different-length sequences use RIGHT padding: attention is causal, so a real
token never sees the pads that follow it, and no attention mask is needed; the caller masks
the pads out of the loss. Attention itself is pluggable (`attend=`): the sampler passes its
paged-KV attention and reuses everything else here, so the steered forward exists once.
"""
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# -----------------------------------------------------------------------------
# Config: read both dialects of config.json (hub checkpoints keep rope_theta / rope_scaling at
# the top level; transformers >= 5 writes them inside rope_parameters).


@dataclass
class Config:
    model_type: str  # "llama" or "qwen2"
    vocab_size: int
    hidden_size: int  # d
    intermediate_size: int
    num_layers: int  # L
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None  # llama3 scaling: factor, low/high_freq_factor, original_max_position_embeddings
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2 has biases on q/k/v (not on o)
    torch_dtype: str | None = None
    name: str = ""  # where the weights came from (hub id or folder); saved with steering files

    @classmethod
    def from_json(cls, path) -> "Config":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config.json not found: {path}")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> "Config":
        def need(key):
            if key not in raw:
                raise ValueError(f"{source}: required field '{key}' is missing")
            return raw[key]

        model_type = need("model_type")
        if model_type not in ("llama", "qwen2"):
            raise ValueError(f"{source}: model_type '{model_type}' is not supported (only 'llama' and 'qwen2')")
        for key in ("num_experts", "num_local_experts", "n_routed_experts"):
            if raw.get(key):
                raise ValueError(f"{source}: '{key}' is set: mixture-of-experts models are not supported")
        if raw.get("use_sliding_window") or "sliding_attention" in (raw.get("layer_types") or []):
            raise ValueError(f"{source}: 'use_sliding_window' / 'layer_types': sliding-window attention is not supported")
        if raw.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: hidden_act '{raw['hidden_act']}' is not supported (only 'silu')")
        if raw.get("mlp_bias"):
            raise ValueError(f"{source}: 'mlp_bias' is set: MLP biases are not supported")
        if model_type == "llama" and raw.get("attention_bias"):
            raise ValueError(f"{source}: 'attention_bias' is set: Llama attention biases are not supported")

        rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
        theta = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type == "default":
            scaling = None
        elif rope_type == "llama3":
            keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            missing = [k for k in keys if k not in rope]
            if missing:
                raise ValueError(f"{source}: llama3 rope scaling lacks {missing}")
            scaling = {k: float(rope[k]) for k in keys}
        else:
            raise ValueError(f"{source}: rope type '{rope_type}' (rope_scaling / rope_parameters) is not supported "
                             "(only default and llama3)")

        hidden, heads = need("hidden_size"), need("num_attention_heads")
        return cls(
            model_type=model_type,
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_layers=need("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or hidden // heads,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=scaling,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2",
            torch_dtype=raw.get("dtype") or raw.get("torch_dtype"),
        )


def rope_inv_freq(cfg: Config) -> torch.Tensor:
    """Rotary frequencies (head_dim/2,), with Llama-3.1's long-context rescaling when configured."""
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.int64).float() / cfg.head_dim))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    # llama3: long wavelengths (beyond the original context / low_freq_factor) are slowed down by
    # `factor`, short ones kept, and the band in between interpolated smoothly.
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / s["low_freq_factor"], inv_freq / s["factor"], inv_freq)
    smooth = (old_len / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
    smoothed = (1 - smooth) * scaled / s["factor"] + smooth * scaled
    medium = (wavelen >= old_len / s["high_freq_factor"]) & (wavelen <= old_len / s["low_freq_factor"])
    return torch.where(medium, smoothed, scaled)


def apply_rope(x, cos, sin):
    """x (B, T, H, D); cos, sin (B, T, 1, D). Rotates the two halves of each head (HF convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def causal_attention(layer: int, q, k, v):
    """Default attention: q (B, T, H, D), k/v (B, T, KVH, D) -> (B, T, H, D), causal, GQA."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=True, enable_gqa=True)
    return out.transpose(1, 2)

# -----------------------------------------------------------------------------
# The network


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32 (or fp64 for a float64 model: gradient checks), scale in the model
        # dtype (as the reference does: it matters in bf16)
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, attend, layer):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return self.o_proj(attend(layer, q, k, v).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, attend, layer):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attend, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.steering = nn.Parameter(torch.zeros(cfg.num_layers, cfg.hidden_size, dtype=torch.float32))
        self.steering_scale = 1.0  # alpha at inference: h + alpha * steering[l]
        self.checkpoint_blocks = False  # recompute blocks in backward (activation checkpointing)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    @property
    def head_weight(self) -> torch.Tensor:
        """The unembedding matrix (V, d): lm_head, or the token embedding when tied."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def rope(self, positions):
        """positions (B, T) -> cos, sin (B, T, 1, D), computed in fp32 then cast like the reference."""
        freqs = positions[..., None].float() * self.inv_freq  # (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
        dtype = self.embed_tokens.weight.dtype
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def hidden_states(self, tokens, positions=None, attend=causal_attention):
        """tokens (B, T) -> final-normed hidden states (B, T, d), steering added after every block."""
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape)
        cos, sin = self.rope(positions)
        h = self.embed_tokens(tokens)
        steer = (self.steering_scale * self.steering).to(h.dtype)  # added in the compute dtype
        for i, block in enumerate(self.layers):
            if self.checkpoint_blocks and torch.is_grad_enabled():
                h = checkpoint(block, h, cos, sin, attend, i, use_reentrant=False)
            else:
                h = block(h, cos, sin, attend, i)
            h = h + steer[i]
        return self.norm(h)

    def forward(self, tokens, positions=None, attend=causal_attention):
        """tokens (B, T) -> logits (B, T, V) in the model dtype."""
        return F.linear(self.hidden_states(tokens, positions, attend), self.head_weight)

    # ---- steering files: safetensors with one tensor "steering" (L, d) + metadata ----

    def fingerprint(self) -> str:
        """A short hash of the base weights (final norm and the first embedding rows), so a steering
        file knows its base model whatever path or dtype it was loaded with (rounded to bf16 to be
        dtype-independent). The norm alone is not enough: freshly initialised norms are all ones."""
        h = hashlib.sha256()
        for w in (self.norm.weight, self.embed_tokens.weight[:16]):
            h.update(w.detach().to(torch.bfloat16).float().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    def save_steering(self, path, **metadata):
        from safetensors.torch import save_file
        cfg = self.config
        meta = {"format": "steer", "base_model": cfg.name, "base_fingerprint": self.fingerprint(),
                "num_layers": str(cfg.num_layers), "hidden_size": str(cfg.hidden_size)}
        meta.update({k: str(v) for k, v in metadata.items()})
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        save_file({"steering": self.steering.detach().float().cpu().contiguous()}, str(tmp), metadata=meta)
        os.replace(tmp, path)  # atomic: a crash never leaves a half-written steering file

    def load_steering(self, path, check_base=True) -> dict:
        """Load a steering file into `self.steering`; returns its metadata."""
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                meta, names = f.metadata() or {}, list(f.keys())
                if names != ["steering"]:
                    raise ValueError(f"steering file {path}: expected one tensor 'steering', found {names}")
                vec = f.get_tensor("steering")
        except (SafetensorError, OSError) as e:
            raise ValueError(f"steering file {path}: unreadable or corrupt ({e})") from None
        want = (self.config.num_layers, self.config.hidden_size)
        if tuple(vec.shape) != want:
            raise ValueError(f"steering file {path}: tensor 'steering' has shape {tuple(vec.shape)}, "
                             f"expected {want} (L, d) for {self.config.name or 'this model'}")
        theirs = meta.get("base_fingerprint")
        if check_base and theirs and theirs != self.fingerprint():
            raise ValueError(f"steering file {path} was made for base model '{meta.get('base_model')}', whose "
                             f"weights differ from '{self.config.name}' (fingerprint {theirs} != "
                             f"{self.fingerprint()}); pass check_base=False to load it anyway")
        with torch.no_grad():
            self.steering.copy_(vec)
        return meta

    @classmethod
    def from_pretrained(cls, path_or_hub_id, dtype=None, device=None) -> "Transformer":
        folder = resolve_checkpoint(path_or_hub_id)
        cfg = Config.from_json(folder / "config.json")
        cfg.name = str(path_or_hub_id)
        dtype = resolve_dtype(dtype, cfg.torch_dtype)
        device = torch.device(device or "cpu")
        with torch.device("meta"):  # no memory until each tensor arrives
            model = cls(cfg)
        load_weights(model, folder, dtype, device)
        model.steering = nn.Parameter(torch.zeros(cfg.num_layers, cfg.hidden_size, device=device))
        model.inv_freq = rope_inv_freq(cfg).to(device)
        return model.eval()

# -----------------------------------------------------------------------------
# Loading straight from safetensors


CHECKPOINT_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
                    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_checkpoint(path_or_hub_id) -> Path:
    """A local folder, or a hub id fetched with snapshot_download (honours HF_HUB_OFFLINE)."""
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(path_or_hub_id).count("/") != 1:
        raise FileNotFoundError(f"{path_or_hub_id}: not a checkpoint folder (and not a hub id 'org/name')")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(str(path_or_hub_id), allow_patterns=CHECKPOINT_FILES))
    except Exception as e:  # network, auth, offline mode: all mean "not here"
        raise FileNotFoundError(f"{path_or_hub_id}: no local folder of that name, and the hub download failed "
                                f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}): {e}") from None


def auto_dtype(device) -> str:
    """The compute dtype `--dtype auto` means on `device`: bfloat16 on CUDA, and on a CPU whose
    cores multiply bf16 natively (AVX512-BF16 or AMX: ~2.5x the fp32 matmul rate on 2 Zen 4 cores,
    398 vs 157 GFLOP/s); float32 on other CPUs, where bf16 matmuls are emulated and slower."""
    if torch.device(device).type == "cuda":
        return "bfloat16"
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return "bfloat16" if native else "float32"


def resolve_dtype(dtype, config_dtype) -> torch.dtype:
    if dtype is None:
        dtype = config_dtype or "float32"
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype '{dtype}' is not supported (use one of {sorted(DTYPES)})")
        dtype = DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise ValueError(f"dtype {dtype} is not supported (use float32, float16 or bfloat16)")
    return dtype


def checkpoint_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({e!r})") from None
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shards that are missing: {missing}")
        return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    if list(folder.glob("*.bin")) or list(folder.glob("*.pt")) or list(folder.glob("*.pth")):
        raise ValueError(f"{folder}: only pickle checkpoints (.bin/.pt) found. They are refused because "
                         "unpickling can run arbitrary code; convert them to safetensors first.")
    raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def load_weights(model: Transformer, folder: Path, dtype, device):
    """Read tensors one at a time, cast on the way to the target device, and install them.
    Host memory peaks near one tensor, never a full fp32 copy of the model."""
    from safetensors import SafetensorError, safe_open
    expected = {name: p for name, p in model.named_parameters() if name != "steering"}
    loaded = set()
    for file in checkpoint_files(folder):
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    name = key.removeprefix("model.")
                    if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and model.lm_head is None):
                        continue  # derived buffers, or the duplicate head of a tied model
                    if name not in expected:
                        raise ValueError(f"{file.name}: unexpected tensor '{key}' for a {model.config.model_type} "
                                         f"model with this config")
                    tslice = f.get_slice(key)
                    if tslice.get_dtype() not in ("F32", "F16", "BF16"):
                        raise ValueError(f"{file.name}: tensor '{key}' has dtype {tslice.get_dtype()}; "
                                         "only F32, F16 and BF16 are supported")
                    want, got = tuple(expected[name].shape), tuple(tslice.get_shape())
                    if want != got:
                        raise ValueError(f"{file.name}: tensor '{key}' has shape {got}, expected {want}")
                    tensor = f.get_tensor(key).to(device=device, dtype=dtype)
                    module_name, _, leaf = name.rpartition(".")
                    setattr(model.get_submodule(module_name), leaf, nn.Parameter(tensor, requires_grad=False))
                    loaded.add(name)
        except SafetensorError as e:
            raise ValueError(f"{file}: truncated or corrupt safetensors file ({e})") from None
    missing = sorted(set(expected) - loaded)
    if missing:
        raise ValueError(f"{folder}: checkpoint lacks {len(missing)} tensor(s): {missing[:20]}")

# -----------------------------------------------------------------------------
# Log-probs of given tokens, chunked over rows so [N, V] fp32 logits never exist at once


def chunked_logprobs(hidden, weight, targets, temperature=1.0, vocab_size=None, chunk_size=1024):
    """hidden (..., d), weight (V, d), targets (...) -> log softmax(hidden @ weight.T / T)[targets], fp32.

    `vocab_size` cuts the padded head rows the tokenizer never produces (the sampler samples
    from the same cut distribution). Rows go through the head `chunk_size` at a time, so [N, V]
    fp32 logits never exist at once. With a frozen head (every adapter but full fine-tuning) the
    backward needs no second pass over the vocabulary: see _HeadLogprobs."""
    shape = targets.shape
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    weight = weight[:vocab_size] if vocab_size else weight
    if weight.requires_grad:  # the head trains: autograd, each chunk recomputed in backward
        out = [checkpoint(_logprobs, hidden[i:i + chunk_size], weight, targets[i:i + chunk_size], temperature,
                          use_reentrant=False) for i in range(0, hidden.shape[0], chunk_size)]
        return torch.cat(out).view(shape)
    need_grad = torch.is_grad_enabled() and hidden.requires_grad
    return _HeadLogprobs.apply(hidden, weight, targets, temperature, chunk_size, need_grad).view(shape)


def _logprobs(hidden, weight, targets, temperature):
    logits = F.linear(hidden, weight)  # (n, V), then at least fp32
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    return logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)


class _HeadLogprobs(torch.autograd.Function):
    """log p(target) = z_target / T - logsumexp(z / T), z = W h, with W frozen. Its gradient is
    d/dh = (W[target] - E_p[W]) / T, where E_p[W] = p @ W is the expected unembedding row under
    the tempered softmax p. E_p[W] does not depend on the upstream gradient, so the forward
    computes it (one (n, V) @ (V, d) matmul per chunk, while p is at hand) and saves it; the
    backward is then O(N d). Autograd with recompute would need two more vocabulary-sized matmuls
    and ~10 more passes over the (n, V) fp32 logits: the head dominated a CPU backward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_size, need_grad):
        N = hidden.shape[0]
        out = torch.empty(N, dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
        expected = torch.empty_like(hidden) if need_grad else None  # (N, d): E_p[W] per row
        for i in range(0, N, chunk_size):
            z = F.linear(hidden[i:i + chunk_size], weight)  # (n, V) in the model dtype
            z = z.to(out.dtype)  # a fresh (n, V) tensor either way: the in-place ops below may reuse it
            if temperature != 1.0:
                z.div_(temperature)
            picked = z.gather(-1, targets[i:i + chunk_size, None])[:, 0]
            top = z.amax(-1, keepdim=True)
            z.sub_(top).exp_()  # unnormalised probabilities, in place
            total = z.sum(-1, keepdim=True)
            out[i:i + chunk_size] = picked - (top + total.log())[:, 0]
            if need_grad:
                z.div_(total)  # p
                expected[i:i + chunk_size] = (z.to(weight.dtype) @ weight).to(hidden.dtype)
        if need_grad:
            ctx.save_for_backward(weight, targets, expected)
            ctx.temperature = temperature
        return out

    @staticmethod
    def backward(ctx, grad_out):  # grad_out (N,)
        weight, targets, expected = ctx.saved_tensors
        diff = weight[targets].to(grad_out.dtype) - expected.to(grad_out.dtype)  # (N, d)
        grad_hidden = grad_out[:, None] * diff / ctx.temperature
        return grad_hidden.to(expected.dtype), None, None, None, None, None


def kv_bytes_per_token(cfg: Config, dtype: torch.dtype) -> int:
    """KV-cache bytes one token takes: a key and a value per layer and KV head."""
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * dtype.itemsize


def activation_bytes_per_token(cfg: Config, dtype: torch.dtype, recompute: bool) -> int:
    """Bytes autograd keeps per token for a backward into the adapter (base weights frozen).

    A frozen linear saves no input (its input gradient needs only the weight), so what stays per
    block is: SDPA's q, k, v and output (2 H D + 2 KVH D), the MLP's gate, silu(gate) and up
    (3 ffn), in the model dtype, and each RMSNorm's fp32 input (2 x 4 d bytes). With recompute
    only each block's input (d) stays, and one block's activations exist while it is redone."""
    per_block = (2 * cfg.num_heads * cfg.head_dim + 2 * cfg.num_kv_heads * cfg.head_dim
                 + 3 * cfg.intermediate_size) * dtype.itemsize + 2 * 4 * cfg.hidden_size
    if recompute:
        return cfg.num_layers * cfg.hidden_size * dtype.itemsize + per_block
    return cfg.num_layers * per_block
