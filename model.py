"""A hand-written Llama / Qwen2 decoder with a pluggable adapter: what trains, and where.

    h = embed(tokens)
    for l in range(L):
        h = h + attn(rmsnorm(h))            # GQA attention with RoPE
        h = adapter.post_attn(l, h)         # post-attn steering
        x = silu(gate(m)) * up(m)           # SwiGLU, m = rmsnorm(h)
        h = h + adapter.down_proj(l, x, down(x))   # LoRA: down(x) + (alpha / r) B A x
        h = adapter.post_block(l, h)        # steering (the default): h + alpha * steering[l]
    logits = lm_head(rmsnorm(h))

The default adapter is one steering vector per layer (L x d, fp32, zeros at init: Sinii et al.);
the others are LoRA on every MLP down_proj and full fine-tuning (fp32 master weights). A new
adapter is one class in adapters.py. Module and tensor names follow the Hugging Face layout (minus the
leading "model."), so a checkpoint folder (config.json + safetensors) loads tensor by tensor with
no renaming table.

Batches of different-length sequences use RIGHT padding: attention is causal, so a real
token never sees the pads that follow it, and no attention mask is needed; the caller masks
the pads out of the loss. Attention itself is pluggable (`attend=`): the sampler passes its
paged-KV attention and reuses everything else here, so the adapted forward exists once.
"""
import errno
import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from adapters import ADAPTERS, Adapter, Population, Steering, adapter_class

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
    max_position_embeddings: int | None = None  # the context the model was trained for, when config.json says
    name: str = ""  # where the weights came from (hub id or folder); saved with adapter files
    raw: dict = field(default_factory=dict, repr=False, compare=False)  # config.json as read (full fine-tunes save it)

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
            max_position_embeddings=raw.get("max_position_embeddings"),
            raw=dict(raw),
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

    def forward(self, x, layer, adapter, state):
        x = F.silu(self.gate_proj(x)) * self.up_proj(x)  # (B, T, ffn)
        return adapter.down_proj(layer, x, self.down_proj(x), state)


class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, attend, layer, adapter, state):
        x = adapter.post_attn(layer, x + self.self_attn(self.input_layernorm(x), cos, sin, attend, layer), state)
        x = x + self.mlp(self.post_attention_layernorm(x), layer, adapter, state)
        return adapter.post_block(layer, x, state)


class Transformer(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.adapter = Steering(cfg.num_layers, cfg.hidden_size, tuple(range(cfg.num_layers)), "post-block")
        self.steering_scale = 1.0  # alpha at inference: h + alpha * steering[l]
        self.checkpoint_blocks = False  # recompute blocks in backward (activation checkpointing)
        self.grad_buffer = None  # the trainable gradients, flat: made by reset_grads
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def __getattr__(self, name):
        # `model.steering` (a public contract: ../shared/DESIGN.md) is the steering adapter's (L, d)
        # parameter. It is resolved here rather than by a property because nn.Module's __getattr__
        # would replace a property's AttributeError by a generic one.
        if name == "steering":
            adapter = super().__getattr__("adapter")
            if not isinstance(adapter, Steering):
                raise AttributeError(f"model.steering: the adapter is {type(adapter).__name__} ('{adapter.kind}'), "
                                     "not one steering vector (see model.adapter, model.trainable_parameters())")
            return adapter.steering
        return super().__getattr__(name)

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

    def hidden_states(self, tokens, positions=None, attend=causal_attention, vector_ids=None):
        """tokens (B, T) -> final-normed hidden states (B, T, d), the adapter applied in every block.
        vector_ids (B, 1) or (B, T): each sequence's (or token's) row of the adapter's table of vectors
        (adapters.Steering.set_table, or a Population's members; 0 = none), instead of one vector."""
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape)
        cos, sin = self.rope(positions)
        h = self.embed_tokens(tokens)
        adapter = self.adapter
        state = adapter.prepare(h.dtype, self.steering_scale, vector_ids)
        for i, block in enumerate(self.layers):
            if self.checkpoint_blocks and torch.is_grad_enabled():
                h = checkpoint(block, h, cos, sin, attend, i, adapter, state, use_reentrant=False)
            else:
                h = block(h, cos, sin, attend, i, adapter, state)
        return self.norm(h)

    def forward(self, tokens, positions=None, attend=causal_attention, vector_ids=None):
        """tokens (B, T) -> logits (B, T, V) in the model dtype."""
        return F.linear(self.hidden_states(tokens, positions, attend, vector_ids), self.head_weight)

    # ---- the adapter: choosing it, training it (train.py), keying graphs on it (sample.py) ----

    def base_weights(self) -> dict:
        """The checkpoint's parameters by (HF name minus 'model.'): everything but the adapter's own."""
        return {n: p for n, p in self.named_parameters() if not n.startswith("adapter.")}

    def set_adapter(self, kind, layers=None, steer_at="post-block", lora_rank=4, lora_alpha=None) -> Adapter:
        """Replace the adapter by a fresh one: steering zeros, LoRA with PEFT's init, or the current
        weights (full). `layers`: None / '' (all), a spec for parse_layers, or indices; `lora_alpha`
        None means alpha = rank (scale 1). Options that do not apply to `kind` are ignored.
        Parameters are fp32 (fp64 in a float64 model) on the model's device."""
        cls = adapter_class(kind)
        options = cls.check_options(self.config.num_layers, layers, steer_at=steer_at, lora_rank=lora_rank,
                                    lora_alpha=lora_alpha)
        return self._replace_adapter(cls, options)

    def set_population(self, names, layers=None, steer_at="post-block") -> Adapter:
        """K steering vectors trained side by side (adapters.Population), zeros, one per name."""
        options = Population.check_options(self.config.num_layers, layers, steer_at=steer_at, names=names)
        return self._replace_adapter(Population, options)

    def _replace_adapter(self, cls, options) -> Adapter:
        self.adapter.close()  # first: an adapter of the base weights (full) takes them over from here
        self.adapter = self._new_adapter(cls, options)
        self.grad_buffer = None  # the next reset_grads makes the new adapter's
        return self.adapter

    def _new_adapter(self, cls, options) -> Adapter:
        base = self.embed_tokens.weight
        return cls.create(self, options, device=base.device, dtype=torch.promote_types(base.dtype, torch.float32))

    def trainable_parameters(self) -> list:
        """The fp32 tensors the optimizer updates (nanoGPT's configure_optimizers, on the model)."""
        return self.adapter.trainable()

    def num_trainable(self) -> int:
        """Numbers that actually train (a 3-layer steering subset: 3 d)."""
        return self.adapter.num_trainable()

    def reset_grads(self) -> torch.Tensor:
        """Zero the trainable gradients and return the ONE flat fp32 buffer they live in: each
        trainable tensor's .grad is a view of it, so backward accumulates straight into it and the
        trainer all-reduces this single tensor. Call before each step's backward (it re-binds the
        views, so an optimizer.zero_grad(set_to_none=True) in between does no harm)."""
        params = self.trainable_parameters()
        n, p0 = sum(p.numel() for p in params), params[0]
        buf = self.grad_buffer
        if buf is None or buf.numel() != n or buf.dtype != p0.dtype or buf.device != p0.device:
            buf = self.grad_buffer = torch.zeros(n, dtype=p0.dtype, device=p0.device)
        buf.zero_()
        offset = 0
        for p in params:
            p.grad = buf[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        return buf

    def trainable_to_weights(self):
        """After optimizer.step(): the forward's weights from the updated tensors, in place (full
        fine-tuning in 16 bits: masters -> weights; a no-op for every other adapter)."""
        self.adapter.after_step()

    def trainable_bytes(self) -> dict:
        """What training holds beyond activations, in bytes: the weights the forward reads (base +
        adapter), the fp32 masters (full fine-tuning in 16 bits), the gradients (the flat buffer,
        also what is all-reduced) and AdamW's two moments; `numel` counts the trainable tensors."""
        params = self.trainable_parameters()
        numel, size = sum(p.numel() for p in params), params[0].element_size()
        masters = numel * size if getattr(self.adapter, "masters", None) is not None else 0
        weights = sum(p.numel() * p.element_size() for p in self.parameters()) - masters
        return dict(numel=numel, weights=weights, masters=masters, grads=numel * size, optimizer=2 * numel * size)

    def adapter_key(self) -> tuple:
        """A hashable key of everything a captured CUDA graph bakes in: the adapter's kind and
        options, the Python floats (steering_scale; LoRA's alpha / r) and the addresses of the
        tensors the forward reads. In-place (optimizer) updates keep it; replacing a tensor or the
        adapter changes it."""
        return (self.steering_scale, *self.adapter.key())

    # ---- adapter files: safetensors + metadata; full fine-tuning: a Hugging Face folder ----

    def fingerprint(self) -> str:
        """A short hash of the base weights (final norm and the first embedding rows), so an adapter
        file knows its base model whatever path or dtype it was loaded with (rounded to bf16 to be
        dtype-independent). The norm alone is not enough: freshly initialised norms are all ones."""
        h = hashlib.sha256()
        for w in (self.norm.weight, self.embed_tokens.weight[:16]):
            h.update(w.detach().to(torch.bfloat16).float().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    def save_adapter(self, path, tensors: dict | None = None, **metadata):
        """Steering / LoRA: a safetensors file of the adapter's tensors (fp32; or `tensors`, a copy of
        them by name, e.g. a CPU snapshot); full fine-tuning: a checkpoint folder (config.json +
        model.safetensors, HF names) that transformers and from_pretrained load, + ADAPTER_JSON.
        Metadata: kind, options, base model, `metadata`."""
        cfg, adapter = self.config, self.adapter
        meta = {"format": "steer", "kind": adapter.kind, "base_model": cfg.name,
                "base_fingerprint": adapter.base_fingerprint or self.fingerprint(),
                "num_layers": str(cfg.num_layers), "hidden_size": str(cfg.hidden_size)}
        meta.update({k: ",".join(map(str, v)) if k == "layers" else str(v) for k, v in adapter.options().items()})
        meta.update({k: str(v) for k, v in metadata.items()})
        if adapter.trains_base:
            return save_checkpoint_folder(self, Path(path), meta)
        from safetensors.torch import save_file
        if tensors is None:
            if isinstance(adapter, Population):
                raise ValueError("save_adapter: a population's vectors are files of their own, one per member "
                                 "(adapters.Population.checkpoint_files)")
            tensors = dict(adapter.named_parameters())
        tensors = {name: t.detach().float().cpu().contiguous() for name, t in tensors.items()}
        atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=meta))

    def load_adapter(self, path, check_base=True) -> dict:
        """Set the adapter a file (or full fine-tuning folder) describes, with its options, and load
        its tensors; returns its metadata. When the current adapter already has that kind and those
        options, its tensors are overwritten in place (the optimizer and the sampler's graphs keep
        them). A refused file leaves the model as it was."""
        path = Path(path)
        meta = adapter_metadata(path)
        where, kind = f"adapter {'folder' if path.is_dir() else 'file'} {path}", meta["kind"]
        cls = ADAPTERS.get(kind)
        if cls is None or cls.trains_base != path.is_dir():
            folders = ", ".join(name for name, c in ADAPTERS.items() if c.trains_base)
            raise ValueError(f"{where}: adapter kind '{kind}' is unknown or does not match the path (one of "
                             f"{', '.join(ADAPTERS)}; {folders}: a folder, the others a file)")
        if check_base:
            self.check_made_for(path, meta)
        try:
            options = cls.read_options(meta, self.config.num_layers)
        except (KeyError, ValueError) as e:
            raise ValueError(f"{where}: bad metadata ({e})") from None
        if cls.trains_base:  # a checkpoint folder: the base weights themselves, overwritten in place
            load_weights(self, path, self.embed_tokens.weight.dtype, self.embed_tokens.weight.device)
            if type(self.adapter) is not cls or self.adapter.options() != options:
                self._replace_adapter(cls, options)
            self.adapter.base_loaded(meta.get("base_fingerprint") or self.adapter.base_fingerprint
                                     or self.fingerprint())
            return meta
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{where}: unreadable or corrupt ({e})") from None
        same = type(self.adapter) is cls and self.adapter.options() == options
        target = self.adapter if same else self._new_adapter(cls, options)
        want = dict(target.named_parameters())
        if sorted(tensors) != sorted(want):
            raise ValueError(f"{where}: expected tensor(s) {sorted(want)} for a {kind} adapter, "
                             f"found {sorted(tensors)}")
        for name, t in tensors.items():
            if t.shape != want[name].shape:
                raise ValueError(f"{where}: tensor '{name}' has shape {tuple(t.shape)}, expected "
                                 f"{tuple(want[name].shape)} for {self.config.name or 'this model'}")
            refuse_non_finite(t, f"{where}: tensor '{name}'")
        with torch.no_grad():
            for name, t in tensors.items():
                want[name].copy_(t)
        if not same:
            self.adapter.close()
            self.adapter, self.grad_buffer = target, None
        return meta

    def save_steering(self, path, **metadata):
        """save_adapter for the steering adapter (a public contract: ../shared/DESIGN.md)."""
        if not isinstance(self.adapter, Steering):
            raise ValueError(f"save_steering: the adapter is {type(self.adapter).__name__} ('{self.adapter.kind}'), "
                             "not one steering vector (use save_adapter; a population's files: checkpoint_files)")
        self.save_adapter(path, **metadata)

    def check_made_for(self, path, meta=None):
        """Refuse an adapter file whose metadata names other base weights (its base_fingerprint)."""
        path = Path(path)
        meta = meta or adapter_metadata(path)
        theirs, ours = meta.get("base_fingerprint"), self.adapter.base_fingerprint or self.fingerprint()
        if theirs and theirs != ours:
            raise ValueError(f"adapter {'folder' if path.is_dir() else 'file'} {path} was made for base model "
                             f"'{meta.get('base_model')}', whose weights differ from '{self.config.name}' (fingerprint "
                             f"{theirs} != {ours}): use it with --model {meta.get('base_model')}, or pass --any-base "
                             "(check_base=False in Python) to load it on these weights anyway")

    def load_steering(self, path, check_base=True) -> dict:
        """load_adapter for a steering file, any other file refused by read_steering (a public
        contract: ../shared/DESIGN.md)."""
        read_steering(path)
        return self.load_adapter(path, check_base)

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
        model.inv_freq = rope_inv_freq(cfg).to(device)
        model.set_adapter("steering")
        return model.eval()

# -----------------------------------------------------------------------------
# Loading straight from safetensors; saving a full fine-tune as a checkpoint folder


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


def load_for_cli(model_id, tokenizer=None, dtype="auto", device="cpu") -> tuple:
    """(Transformer, data.Tokenizer) for a command line (eval.py, sample.py, lens.py): the tokenizer
    from its folder (`tokenizer`, else the model's), read first so that its errors come before the
    weights load; the model by from_pretrained in `dtype` ('auto': auto_dtype of `device`). A
    tokenizer with more tokens than the model has embedding rows is refused (a wrong --tokenizer);
    fewer is usual (the padded rows of Qwen2.5's head: samplers take the tokenizer's vocab_size)."""
    import data  # the tokenizer's home; data/ imports nothing of ours, so the imports stay one-way
    tok = data.Tokenizer.from_dir(tokenizer or resolve_checkpoint(model_id))
    dtype = auto_dtype(device) if dtype == "auto" else dtype
    model = Transformer.from_pretrained(model_id, dtype=dtype, device=device)
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} tokens but {model_id} only "
                         f"{model.config.vocab_size} embedding rows: wrong --tokenizer?")
    return model, tok


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
    """Check every tensor header (names, shapes, dtypes, nothing missing) first, then read tensors
    one at a time, cast on the way to the target device, and install them: as new parameters in a
    model built on the meta device, else copied in place (a full fine-tune loaded as an adapter:
    the sampler's graphs keep reading the same storage). Host memory peaks near one tensor."""
    from safetensors import SafetensorError, safe_open
    expected = model.base_weights()
    plan = {}  # file -> [(key, name)]
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
                    plan.setdefault(file, []).append((key, name))
        except SafetensorError as e:
            raise ValueError(f"{file}: truncated or corrupt safetensors file ({e})") from None
    missing = sorted(set(expected) - {name for keys in plan.values() for _, name in keys})
    if missing:
        raise ValueError(f"{folder}: checkpoint lacks {len(missing)} tensor(s): {missing[:20]}")
    for file, keys in plan.items():
        try:
            with safe_open(str(file), framework="pt") as f, torch.no_grad():
                for key, name in keys:
                    tensor, param = f.get_tensor(key), expected[name]
                    if param.is_meta:
                        module_name, _, leaf = name.rpartition(".")
                        tensor = tensor.to(device=device, dtype=dtype)
                        setattr(model.get_submodule(module_name), leaf, nn.Parameter(tensor, requires_grad=False))
                    else:
                        param.copy_(tensor)
        except SafetensorError as e:
            raise ValueError(f"{file}: truncated or corrupt safetensors file ({e})") from None


ADAPTER_JSON = "steer_adapter.json"  # in a full fine-tuning folder: kind, base model, caller metadata
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"]


def adapter_metadata(path) -> dict:
    """An adapter's metadata without a model (str -> str): a safetensors file's header, or a full
    fine-tuning folder's ADAPTER_JSON. Steering files from before adapters had no 'kind'."""
    path = Path(path)
    if path.is_dir():
        file = path / ADAPTER_JSON
        if not file.is_file():
            raise ValueError(f"adapter folder {path}: no {ADAPTER_JSON} (not a folder written by save_adapter)")
        try:
            meta = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"adapter folder {path}: {ADAPTER_JSON} is not valid JSON ({e})") from None
    else:
        if not path.exists():
            raise FileNotFoundError(f"adapter file {path}: not found")
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except (SafetensorError, OSError) as e:
            raise ValueError(f"adapter file {path}: unreadable or corrupt ({e})") from None
    return {"kind": Steering.kind, **meta}  # steering files from before adapters name no kind


def read_steering(path) -> tuple[torch.Tensor, dict]:
    """The (L, d) vectors (fp32) and the metadata (as stored) of a steering file: the one reader of
    steering files (load_steering, lens.py, hub.py). Refused by name: a path that is not a file, an
    unreadable file, another adapter kind's file, tensors other than the one 'steering' (L, d)."""
    from safetensors import SafetensorError, safe_open
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"steering file {path} is not a file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta, names = f.metadata() or {}, list(f.keys())
            kind = meta.get("kind", Steering.kind)  # files from before adapters name no kind
            if kind != Steering.kind:
                raise ValueError(f"{path} is a '{kind}' adapter file, not a steering file")
            if names != ["steering"]:
                shown = names[:4] + (["..."] if len(names) > 4 else [])
                raise ValueError(f"{path} holds tensors {shown}, not the one tensor 'steering' of a steering file "
                                 "(expected one tensor 'steering', (L, d))")
            vectors = f.get_tensor("steering")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"steering file {path}: unreadable or corrupt, not a readable safetensors file "
                         f"({e})") from None
    if vectors.ndim != 2:
        raise ValueError(f"{path}: tensor 'steering' has shape {tuple(vectors.shape)}, expected (L, d)")
    refuse_non_finite(vectors, f"{path}: tensor 'steering'")
    return vectors.float(), meta


def check_adapter_file(path):
    """Before any model loads: a steering or LoRA file's tensors are all finite numbers (a full
    fine-tuning folder is checked as its weights load)."""
    path = Path(path)
    if path.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"adapter file {path}: unreadable or corrupt ({e})") from None
        for name, t in tensors.items():
            refuse_non_finite(t, f"adapter file {path}: tensor '{name}'")


def refuse_non_finite(t: torch.Tensor, what: str):
    """A vector with NaN or Inf would steer every answer into garbage that still gets graded: refuse it."""
    bad = ~torch.isfinite(t)
    if bad.any():
        rows = sorted({int(i) for i in bad.nonzero()[:, 0].tolist()})
        raise ValueError(f"{what} holds {int(bad.sum())} NaN or infinite numbers (rows {rows[:8]}"
                         f"{', ...' if len(rows) > 8 else ''}): the file is broken; use an earlier checkpoint")


def atomic_write(path: Path, write):
    """write(temporary path) then rename it to `path`: a crash never leaves a half-written file,
    and readers see the old file or the new one. Every file this project writes goes through here.
    A failed write (a full disk, no permission) is an OSError naming the file, whatever the writer:
    safetensors reports those as its own SafetensorError, with the OS's message inside."""
    from safetensors import SafetensorError
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
    except SafetensorError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(errno.EIO, str(e), str(tmp)) from None
    os.replace(tmp, path)


def save_checkpoint_folder(model: Transformer, folder: Path, meta: dict):
    """A full fine-tune as a Hugging Face checkpoint: config.json (the base's, dtype updated),
    model.safetensors in the model dtype with HF names, the base's tokenizer files when it is a
    local folder, and ADAPTER_JSON last (a folder without it is incomplete)."""
    from safetensors.torch import save_file
    cfg = model.config
    if not cfg.raw:
        raise ValueError("save_adapter: this model's Config was not read from a config.json; nothing to save as one")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ADAPTER_JSON).unlink(missing_ok=True)  # rewriting a folder: incomplete until the new one lands
    tensors = {(n if n == "lm_head.weight" else "model." + n): w.detach().cpu().contiguous()
               for n, w in model.base_weights().items()}
    config = {k: v for k, v in cfg.raw.items() if k != "torch_dtype"}
    config["dtype"] = str(model.embed_tokens.weight.dtype).removeprefix("torch.")

    def write(name, fn):
        atomic_write(folder / name, fn)

    write("model.safetensors", lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    write("config.json", lambda p: p.write_text(json.dumps(config, indent=2)))
    source = Path(cfg.name)
    for name in TOKENIZER_FILES if source.is_dir() and source.resolve() != folder.resolve() else []:
        if (source / name).is_file():
            write(name, lambda p: shutil.copyfile(source / name, p))
    write(ADAPTER_JSON, lambda p: p.write_text(json.dumps(meta, indent=2)))

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

