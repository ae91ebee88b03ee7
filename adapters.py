"""What trains, and where it enters the forward: the adapters of model.py's Transformer.

Every block calls its adapter at three fixed points (post_attn, down_proj, post_block: see
model.py's docstring); `prepare` runs once per forward (scales and casts), so a point costs one
method call. The tensors an adapter reads at those points are read in place, so a CUDA graph
captured around the forward sees optimizer updates (see Transformer.adapter_key). A new adapter
is one class here, overriding the points it uses, plus its name in ADAPTERS and its options in
check_options.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

ADAPTERS = ("steering", "lora", "full")
STEER_AT = ("post-block", "post-attn")


def parse_layers(spec: str, num_layers: int, flag: str = "--layers") -> tuple[int, ...]:
    """'27', '0-13', '20,24,27', '0-3,8' or '' (every layer) -> sorted layer indices."""
    if not spec.strip():
        return tuple(range(num_layers))
    layers = set()
    for part in spec.split(","):
        lo, dash, hi = part.strip().partition("-")
        if not lo.isdigit() or (dash and not hi.isdigit()):
            raise ValueError(f"{flag} {spec}: '{part}' is not a layer index or a range a-b")
        a, b = int(lo), int(hi if dash else lo)
        if a > b:
            raise ValueError(f"{flag} {spec}: the range '{part}' is empty")
        if b >= num_layers:
            raise ValueError(f"{flag} {spec}: out of range 0..{num_layers - 1}")
        layers.update(range(a, b + 1))
    return tuple(sorted(layers))


def check_options(kind, num_layers, layers, steer_at, lora_rank, lora_alpha) -> dict:
    """Transformer.set_adapter's arguments checked, as the adapter's options() will be."""
    if kind not in ADAPTERS:
        raise ValueError(f"--adapter {kind}: unknown (one of {', '.join(ADAPTERS)})")
    if layers is not None and not isinstance(layers, str):
        if not len(layers):
            raise ValueError("--layers: no layer given")
        layers = ",".join(str(i) for i in layers)
    layers = parse_layers(layers or "", num_layers)
    if kind == "steering":
        if steer_at not in STEER_AT:
            raise ValueError(f"--steer-at {steer_at}: unknown (one of {', '.join(STEER_AT)})")
        return dict(layers=layers, steer_at=steer_at)
    if kind == "lora":
        if isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 1:
            raise ValueError(f"--lora-rank {lora_rank}: must be an integer >= 1")
        lora_alpha = float(lora_rank if lora_alpha is None else lora_alpha)
        if not lora_alpha > 0:
            raise ValueError(f"--lora-alpha {lora_alpha}: must be > 0")
        return dict(layers=layers, rank=lora_rank, alpha=lora_alpha)
    if len(layers) != num_layers:
        raise ValueError("--layers: full fine-tuning trains every layer (leave --layers empty)")
    return {}


class Adapter(nn.Module):
    kind = ""
    base_fingerprint = None  # set by adapters that change the base weights (full)

    def prepare(self, dtype, scale):  # once per forward -> `state`, handed to every point
        return None

    def post_attn(self, layer, h, state):  # h (B, T, d): after the attention residual
        return h

    def down_proj(self, layer, x, out, state):  # x (B, T, ffn) into down_proj, out (B, T, d) its output
        return out

    def post_block(self, layer, h, state):  # h (B, T, d): after the MLP residual
        return h

    def options(self) -> dict:  # what rebuilds it (and its file's metadata): layers, steer_at, rank, alpha
        return {}

    def trainable(self) -> list:  # the tensors the optimizer updates
        return list(self.parameters())

    def num_trainable(self) -> int:  # numbers that actually train
        return sum(p.numel() for p in self.trainable())

    def key(self) -> tuple:  # what a captured graph bakes in: options, and the addresses it reads
        return (self.kind, tuple(self.options().items()), tuple(p.data_ptr() for p in self.parameters()))

    def after_step(self):  # after optimizer.step(): bring the forward's tensors up to date
        pass

    def close(self):  # undo what the adapter did to the base model, before it is replaced
        pass

    def metrics(self) -> dict:  # its own numbers for each metrics.jsonl line
        return {}


class Steering(Adapter):
    """h + alpha * steering[l] after the block (or after the attention residual), for the listed
    layers. Rows of other layers are never read: their gradient is exactly zero, so AdamW (zero
    moments, decoupled weight decay of zero) keeps them exactly zero."""
    kind = "steering"

    def __init__(self, num_layers, d, layers, steer_at, device=None, dtype=torch.float32):
        super().__init__()
        self.steering = nn.Parameter(torch.zeros(num_layers, d, device=device, dtype=dtype))
        self.layers, self.steer_at = layers, steer_at
        listed = set(layers)
        self.at_attn = tuple(i in listed and steer_at == "post-attn" for i in range(num_layers))
        self.at_block = tuple(i in listed and steer_at == "post-block" for i in range(num_layers))

    def prepare(self, dtype, scale):
        return (scale * self.steering).to(dtype)  # (L, d), added in the compute dtype

    def post_attn(self, layer, h, state):
        return h + state[layer] if self.at_attn[layer] else h

    def post_block(self, layer, h, state):
        return h + state[layer] if self.at_block[layer] else h

    def options(self):
        return dict(layers=self.layers, steer_at=self.steer_at)

    def num_trainable(self):
        return len(self.layers) * self.steering.shape[1]

    def metrics(self):
        return dict(steering_norm=self.steering.detach().norm(dim=1).tolist())  # (L,): one norm per layer


class LoRA(Adapter):
    """down_proj(x) + (alpha / r) B A x on the listed layers, as PEFT's LoRA (no dropout, PEFT's
    init: A kaiming-uniform(a=sqrt 5) = U(+-1/sqrt(ffn)), B zeros). A and B are stacked over the
    listed layers: two tensors whatever L. In a 16-bit model they are cast to the compute dtype
    for the two matmuls (as torch.autocast does), so the delta runs at the model's rate and autograd
    saves 16-bit activations; the gradient arrives in the fp32 parameters through the cast."""
    kind = "lora"

    def __init__(self, num_layers, d, ffn, layers, rank, alpha, device=None, dtype=torch.float32):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(len(layers), rank, ffn, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(len(layers), d, rank, device=device, dtype=dtype))
        for a in self.lora_A.data:  # per layer: fan_in = ffn (the stacked tensor's would be wrong)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.layers, self.rank, self.alpha, self.scale = layers, rank, alpha, alpha / rank
        self.slot = tuple(layers.index(i) if i in layers else None for i in range(num_layers))

    def prepare(self, dtype, scale):
        return self.lora_A.to(dtype), self.lora_B.to(dtype)

    def down_proj(self, layer, x, out, state):
        j = self.slot[layer]
        if j is None:
            return out
        A, B = state
        return out + F.linear(F.linear(x, A[j]), B[j]) * self.scale  # (B, T, r) -> (B, T, d)

    def options(self):
        return dict(layers=self.layers, rank=self.rank, alpha=self.alpha)


class Full(Adapter):
    """Every base weight trains. The optimizer updates fp32 tensors: the weights themselves in an
    fp32 (or fp64) model; otherwise fp32 masters, made when training first asks for them (an
    evaluated fine-tune needs none), while the forward reads the 16-bit weights. Then a hook moves
    each 16-bit gradient into its master's fp32 .grad as soon as backward produces it (micro-batches
    accumulate in fp32, no 16-bit gradients are kept), and after_step copies the masters into the
    16-bit weights IN PLACE: the sampler and its CUDA graphs read the same storage, so the trainer ->
    sampler weight sync is 0 bytes."""
    kind = "full"

    def __init__(self, weights: list, base_fingerprint: str):
        super().__init__()
        self.weights = tuple(weights)  # the model's own parameters (a tuple: not registered twice)
        self.base_fingerprint = base_fingerprint
        self.masters, self.hooks = None, []
        for w in weights:
            w.requires_grad_(True)

    def trainable(self):
        master_dtype = torch.promote_types(self.weights[0].dtype, torch.float32)
        if self.weights[0].dtype == master_dtype:
            return list(self.weights)
        if self.masters is None:
            self.masters = nn.ParameterList(nn.Parameter(w.detach().to(master_dtype)) for w in self.weights)
            self.hooks = [w.register_post_accumulate_grad_hook(lambda w, m=m: Full._to_master(w, m))
                          for w, m in zip(self.weights, self.masters)]
        return list(self.masters)

    @staticmethod
    def _to_master(w, master):
        if master.grad is None:
            master.grad = w.grad.to(master.dtype)
        else:
            master.grad.add_(w.grad)
        w.grad = None

    def key(self):
        return (self.kind, tuple(w.data_ptr() for w in self.weights))

    @torch.no_grad()
    def after_step(self):
        for w, m in zip(self.weights, self.masters or ()):
            w.copy_(m)

    def close(self):
        for h in self.hooks:
            h.remove()
        for w in self.weights:
            w.requires_grad_(False)
            w.grad = None
