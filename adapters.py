"""What trains, and where it enters the forward: the adapters of model.py's Transformer.

Every block calls its adapter at three fixed points (post_attn, down_proj, post_block: see
model.py's docstring); `prepare` runs once per forward (scales and casts), so a point costs one
method call. Steering can also give each sequence of a batch its own vector: a table of vectors
(Steering.set_table, or the trained members of a Population) and one row index per sequence,
handed to `prepare` (0 = no steering). The tensors an adapter reads at those points are read in
place, so a CUDA graph captured around the forward sees optimizer updates (see
Transformer.adapter_key).

An adapter kind is one class here, and it answers everything the rest of the code asks of a kind:
its options and their checks (check_options, read_options from a file's metadata), how it is built
on a model (create), its files (trains_base: a checkpoint folder or a safetensors file of its own
tensors; latest_file, file_names and file_step for a run's checkpoints), its memory (saved_blocks,
block_saved_bytes, head_bytes_per_row, state_bytes_per_trainable: memory.py's plan) and its metrics.
A new kind is one class overriding what differs from Adapter's defaults, plus its name in ADAPTERS.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

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


def _layer_indices(num_layers: int | None, layers) -> tuple[int, ...] | None:
    """set_adapter's `layers` (None / '' for every layer, a spec for parse_layers, or indices) as
    sorted indices; None when num_layers is None (a flag checked before the model is known)."""
    if layers is not None and not isinstance(layers, str):
        if not len(layers):
            raise ValueError("--layers: no layer given")
        layers = ",".join(str(i) for i in layers)
    return None if num_layers is None else parse_layers(layers or "", num_layers)


def adapter_class(adapter) -> type["Adapter"]:
    """The class of an adapter kind, given by its name (--adapter, a file's 'kind'), its class or
    an instance."""
    if isinstance(adapter, Adapter):
        return type(adapter)
    if isinstance(adapter, type) and issubclass(adapter, Adapter):
        return adapter
    if adapter not in ADAPTERS:
        raise ValueError(f"--adapter {adapter}: unknown (one of {', '.join(ADAPTERS)})")
    return ADAPTERS[adapter]


class Adapter(nn.Module):
    kind = ""  # its name: --adapter, the 'kind' in its files' metadata, its checkpoint files' names
    base_fingerprint = None  # set by adapters that change the base weights (full)
    # its trainable tensors are the base weights themselves: its file is the model's checkpoint folder,
    # loading one overwrites the base in place, and the base must be read back to drop it
    trains_base = False
    keeps_history = True  # a run keeps {kind}-step{N} files beside the latest (see file_names)

    # ---- its options ----

    @classmethod
    def check_options(cls, num_layers, layers=None, **flags) -> dict:
        """set_adapter's arguments checked, as options() will return them; `flags` (steer_at,
        lora_rank, lora_alpha) that are not this kind's are ignored. num_layers None: before the
        model loads, layer indices cannot be checked yet (train_config.check_config)."""
        _layer_indices(num_layers, layers)
        return {}

    @classmethod
    def read_options(cls, meta: dict, num_layers: int) -> dict:
        """The checked options a file's metadata (str -> str, written by save_adapter) describes."""
        return cls.check_options(num_layers, cls._meta_layers(meta, num_layers))

    @staticmethod
    def _meta_layers(meta: dict, num_layers: int) -> tuple[int, ...]:
        return parse_layers(meta.get("layers", ""), num_layers, "'layers'")

    @classmethod
    def create(cls, model, options: dict, device=None, dtype=torch.float32) -> "Adapter":
        """A fresh adapter for `model` (model.py's Transformer) with checked `options`; its own
        tensors on `device`, in `dtype` (fp32, or fp64 in a float64 model)."""
        return cls()

    # ---- where it enters the forward ----

    def prepare(self, dtype, scale, vector_ids=None):  # once per forward -> `state`, handed to every point
        """vector_ids: None, or each sequence's (B, 1) or token's (B, T) row of a table of vectors,
        which only steering has: every other kind runs one adapter per batch."""
        if vector_ids is not None:
            raise ValueError(f"one vector per sequence needs the steering adapter; '{self.kind}' runs one "
                             "adapter per batch: give this batch no vector_ids")
        return None

    def table_rows(self) -> int:  # the rows vector_ids may name (0 = none); 0: no table, one adapter per batch
        return 0

    def post_attn(self, layer, h, state):  # h (B, T, d): after the attention residual
        return h

    def down_proj(self, layer, x, out, state):  # x (B, T, ffn) into down_proj, out (B, T, d) its output
        return out

    def post_block(self, layer, h, state):  # h (B, T, d): after the MLP residual
        return h

    # ---- what it is, and what trains ----

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

    def base_loaded(self, base_fingerprint: str):  # trains_base: the weights were just read from its folder
        pass

    def close(self):  # undo what the adapter did to the base model, before it is replaced
        pass

    def metrics(self) -> dict:  # its own numbers for each metrics.jsonl line
        return {}

    # ---- its files in a run directory (run_lifecycle.save_checkpoint, eval.py --checkpoints) ----

    @classmethod
    def latest_file(cls) -> str:
        """The latest checkpoint's name in a run directory (what eval.py and sample.py read)."""
        return f"{cls.kind}.safetensors"

    @classmethod
    def step_file(cls, step) -> str:
        return f"{cls.kind}-step{step}.safetensors"

    @classmethod
    def file_names(cls, step: int) -> list[str]:
        """What a checkpoint at `step` writes, in order: the history file (if kept), then the latest."""
        return ([cls.step_file(step)] if cls.keeps_history else []) + [cls.latest_file()]

    def checkpoint_files(self, step: int, tensors: dict) -> list[tuple[str, dict]]:
        """(path in the run directory, tensors by name) of each file a checkpoint at `step` writes, given
        the adapter's tensors by name (named_parameters): file_names(step), each with all of them."""
        return [(name, tensors) for name in self.file_names(step)]

    @classmethod
    def file_step(cls, name: str) -> int | None:
        """The step of a history file's name, None for any other name."""
        head, _, tail = cls.step_file("\0").partition("\0")
        digits = name[len(head):len(name) - len(tail)] if name.startswith(head) and name.endswith(tail) else ""
        return int(digits) if cls.keeps_history and digits.isdigit() else None

    # ---- its memory, per model Config and compute dtype (memory.py's plan) ----

    @classmethod
    def saved_blocks(cls, cfg) -> int:
        """Blocks whose activations autograd saves for this adapter's gradient."""
        return cfg.num_layers

    @classmethod
    def block_saved_bytes(cls, cfg, dtype: torch.dtype) -> int:
        """Bytes per token a block saves for this adapter beyond what a frozen block saves."""
        return 0

    @classmethod
    def head_bytes_per_row(cls, cfg, dtype: torch.dtype, past_one_chunk: bool) -> int:
        """The head's transient per row of a chunk, with the head frozen: (V,) fp32 logits with a
        16-bit copy beside them (the model dtype's matmul output, then p cast back for E_p[W]); past
        one chunk the previous chunk's logits are still referenced while the next is computed."""
        size = dtype.itemsize
        return cfg.vocab_size * (4 + (size if size < 4 else 0) + (4 if past_one_chunk else 0))

    @classmethod
    def state_bytes_per_trainable(cls, dtype: torch.dtype) -> int:
        """Training state per trainable number: its own fp32 tensor, its gradient, AdamW's 2 moments."""
        return 4 * torch.promote_types(dtype, torch.float32).itemsize


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
        # (R, L, d): the vectors of a batch whose sequences each carry their own (set_table); row 0 is
        # zeros, no steering. Not a parameter: nothing trains it, and no file holds it.
        self.table = None

    @classmethod
    def check_options(cls, num_layers, layers=None, steer_at="post-block", **flags):
        layers = _layer_indices(num_layers, layers)
        if steer_at not in STEER_AT:
            raise ValueError(f"--steer-at {steer_at}: unknown (one of {', '.join(STEER_AT)})")
        return dict(layers=layers, steer_at=steer_at)

    @classmethod
    def read_options(cls, meta, num_layers):
        steer_at = meta.get("steer_at", "post-block")  # files from before post-attn name none
        return cls.check_options(num_layers, cls._meta_layers(meta, num_layers), steer_at=steer_at)

    @classmethod
    def create(cls, model, options, device=None, dtype=torch.float32):
        cfg = model.config
        return cls(cfg.num_layers, cfg.hidden_size, **options, device=device, dtype=dtype)

    @torch.no_grad()
    def set_table(self, vectors: torch.Tensor):
        """vectors (K, L, d), each at its own strength, become rows 1..K of the table; row 0 stays
        zeros (no steering). The table is added at every layer at this adapter's steer_at, so a
        vector of a layer subset comes with zero rows elsewhere (in_force: h + 0 is h exactly). Its
        storage is kept while it has room, so a CUDA graph captured on it reads the new contents
        without recapture."""
        K, L, d = vectors.shape
        if (L, d) != tuple(self.steering.shape):
            raise ValueError(f"a table of vectors of shape {(L, d)}, but the model's steering is "
                             f"{tuple(self.steering.shape)}")
        if self.table is None or len(self.table) < K + 1:
            self.table = torch.zeros(K + 1, L, d, dtype=self.steering.dtype, device=self.steering.device)
        self.table[1:K + 1] = vectors
        self.table[K + 1:] = 0

    def table_rows(self):
        return 0 if self.table is None else len(self.table)

    def prepare(self, dtype, scale, vector_ids=None):
        if vector_ids is None:
            return (scale * self.steering).to(dtype), None  # (L, d), added in the compute dtype
        if self.table is None:
            raise ValueError("vector_ids given, but the steering adapter holds no table of vectors (set_table)")
        return (scale * self.table).to(dtype), vector_ids  # (R, L, d), and each row's index

    def _add(self, layer, h, state, here: bool):
        vectors, ids = state
        if ids is None:
            return h + vectors[layer] if here else h
        return h + vectors[ids, layer]  # (B, T or 1, d): each sequence's (or token's) own row

    def post_attn(self, layer, h, state):
        return self._add(layer, h, state, self.at_attn[layer]) if self.steer_at == "post-attn" else h

    def post_block(self, layer, h, state):
        return self._add(layer, h, state, self.at_block[layer]) if self.steer_at == "post-block" else h

    def options(self):
        return dict(layers=self.layers, steer_at=self.steer_at)

    def in_force(self) -> torch.Tensor:
        """(L, d): a copy of the vectors as the forward adds them, the rows of layers not listed zero
        (a row of a table of vectors is added at every layer)."""
        out = torch.zeros_like(self.steering.detach())
        out[list(self.layers)] = self.steering.detach()[list(self.layers)]
        return out

    def key(self):
        return (*super().key(), None if self.table is None else self.table.data_ptr())

    def num_trainable(self):
        return len(self.layers) * self.steering.shape[1]

    def metrics(self):
        return dict(steering_norm=self.steering.detach().norm(dim=1).tolist())  # (L,): one norm per layer

    @classmethod
    def saved_blocks(cls, cfg):  # block 0 sees no trainable input: it saves nothing
        return cfg.num_layers - 1


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

    @classmethod
    def check_options(cls, num_layers, layers=None, lora_rank=4, lora_alpha=None, **flags):
        layers = _layer_indices(num_layers, layers)
        if isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 1:
            raise ValueError(f"--lora-rank {lora_rank}: must be an integer >= 1")
        lora_alpha = float(lora_rank if lora_alpha is None else lora_alpha)
        if not lora_alpha > 0:
            raise ValueError(f"--lora-alpha {lora_alpha}: must be > 0")
        return dict(layers=layers, rank=lora_rank, alpha=lora_alpha)

    @classmethod
    def read_options(cls, meta, num_layers):
        rank, alpha = int(meta["rank"]), float(meta["alpha"])
        return cls.check_options(num_layers, cls._meta_layers(meta, num_layers), lora_rank=rank, lora_alpha=alpha)

    @classmethod
    def create(cls, model, options, device=None, dtype=torch.float32):
        cfg = model.config
        return cls(cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, **options, device=device, dtype=dtype)

    def prepare(self, dtype, scale, vector_ids=None):
        super().prepare(dtype, scale, vector_ids)  # refuses vector_ids
        return self.lora_A.to(dtype), self.lora_B.to(dtype)

    def down_proj(self, layer, x, out, state):
        j = self.slot[layer]
        if j is None:
            return out
        A, B = state
        return out + F.linear(F.linear(x, A[j]), B[j]) * self.scale  # (B, T, r) -> (B, T, d)

    def options(self):
        return dict(layers=self.layers, rank=self.rank, alpha=self.alpha)

    @classmethod
    def block_saved_bytes(cls, cfg, dtype):  # down_proj's input, for A's gradient
        return cfg.intermediate_size * dtype.itemsize


class Full(Adapter):
    """Every base weight trains. The optimizer updates fp32 tensors: the weights themselves in an
    fp32 (or fp64) model; otherwise fp32 masters, made when training first asks for them (an
    evaluated fine-tune needs none), while the forward reads the 16-bit weights. Then a hook moves
    each 16-bit gradient into its master's fp32 .grad as soon as backward produces it (micro-batches
    accumulate in fp32, no 16-bit gradients are kept), and after_step copies the masters into the
    16-bit weights IN PLACE: the sampler and its CUDA graphs read the same storage, so the trainer ->
    sampler weight sync is 0 bytes."""
    kind = "full"
    trains_base = True
    keeps_history = False  # each would be a whole model: only the latest folder

    def __init__(self, weights: list, base_fingerprint: str):
        super().__init__()
        self.weights = tuple(weights)  # the model's own parameters (a tuple: not registered twice)
        self.base_fingerprint = base_fingerprint
        self.masters, self.hooks = None, []
        for w in weights:
            w.requires_grad_(True)

    @classmethod
    def check_options(cls, num_layers, layers=None, **flags):
        listed = _layer_indices(num_layers, layers)
        if (bool(layers) if listed is None else len(listed) != num_layers):
            raise ValueError("--layers: full fine-tuning trains every layer (leave --layers empty)")
        return {}

    @classmethod
    def create(cls, model, options, device=None, dtype=torch.float32):
        """The model's own weights; the base they came from keeps its fingerprint across fine-tunes."""
        return cls(list(model.base_weights().values()), model.adapter.base_fingerprint or model.fingerprint())

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

    @torch.no_grad()
    def base_loaded(self, base_fingerprint):
        self.base_fingerprint = base_fingerprint
        for w, m in zip(self.weights, self.masters or ()):  # the masters (when training made them) follow
            m.copy_(w)

    def close(self):
        for h in self.hooks:
            h.remove()
        for w in self.weights:
            w.requires_grad_(False)
            w.grad = None

    @classmethod
    def latest_file(cls):  # a checkpoint folder
        return cls.kind

    @classmethod
    def block_saved_bytes(cls, cfg, dtype):  # every linear's input and each norm's normalised x
        return (4 * cfg.hidden_size + cfg.intermediate_size) * dtype.itemsize

    @classmethod
    def head_bytes_per_row(cls, cfg, dtype, past_one_chunk):
        """A trained head recomputes each chunk in backward with its gradient: ~3 fp32 copies."""
        return cfg.vocab_size * 12

    @classmethod
    def state_bytes_per_trainable(cls, dtype):  # the weight is the base's; fp32 masters for 16-bit weights
        f32 = torch.promote_types(dtype, torch.float32).itemsize
        return (f32 if dtype.itemsize < f32 else 0) + 3 * f32  # (+ master) + grad + 2 moments


class Population(Adapter):
    """K steering vectors trained side by side on one base (train.py --lrs / --seeds): one (L, d)
    parameter per member, so each has its own AdamW state and learning rate (a param group of its
    own) while their gradients share the one flat buffer (one all-reduce of K x L x d). Every
    sequence of a batch names its member's row (vector_ids = member + 1; 0: no steering), added at
    every layer of steer_at, the rows of unlisted layers multiplied by 0 (so their gradient is 0 and
    they stay 0, as Steering's). Each member's files are plain steering files in a folder of its own."""
    kind = Steering.kind  # what its files are

    def __init__(self, num_layers, d, layers, steer_at, names, device=None, dtype=torch.float32):
        super().__init__()
        self.members = nn.ParameterList(nn.Parameter(torch.zeros(num_layers, d, device=device, dtype=dtype))
                                        for _ in names)
        self.layers, self.steer_at, self.names = layers, steer_at, tuple(names)
        listed = torch.zeros(num_layers, 1, device=device, dtype=dtype)
        listed[list(layers)] = 1
        self.register_buffer("listed", listed, persistent=False)

    @classmethod
    def check_options(cls, num_layers, layers=None, steer_at="post-block", names=(), **flags):
        if len(names) < 1 or len(set(names)) != len(names):
            raise ValueError(f"a population needs members with distinct names (got {list(names)})")
        return dict(Steering.check_options(num_layers, layers, steer_at), names=tuple(names))

    @classmethod
    def create(cls, model, options, device=None, dtype=torch.float32):
        cfg = model.config
        return cls(cfg.num_layers, cfg.hidden_size, **options, device=device, dtype=dtype)

    def table_rows(self):
        return len(self.members) + 1

    def prepare(self, dtype, scale, vector_ids=None):
        if vector_ids is None:
            raise ValueError("a population's forward needs each sequence's member: vector_ids = member + 1")
        table = torch.stack([torch.zeros_like(self.members[0]), *self.members]) * self.listed  # (K + 1, L, d)
        return (scale * table).to(dtype), vector_ids

    def post_attn(self, layer, h, state):
        vectors, ids = state
        return h + vectors[ids, layer] if self.steer_at == "post-attn" else h

    def post_block(self, layer, h, state):
        vectors, ids = state
        return h + vectors[ids, layer] if self.steer_at == "post-block" else h

    def options(self):  # what its files' metadata says: each is one steering vector
        return dict(layers=self.layers, steer_at=self.steer_at)

    def num_trainable(self):
        return len(self.members) * len(self.layers) * self.members[0].shape[1]

    def member_metrics(self, k: int) -> dict:
        return dict(steering_norm=self.members[k].detach().norm(dim=1).tolist())

    def checkpoint_files(self, step, tensors):
        """Per member, its folder's steering-step{N}.safetensors and steering.safetensors, each holding
        its one vector as 'steering': what a plain run of that member would write."""
        return [(f"{name}/{file}", {"steering": tensors[f"members.{k}"]})
                for k, name in enumerate(self.names) for file in self.file_names(step)]

    @classmethod
    def saved_blocks(cls, cfg):  # block 0 sees no trainable input
        return cfg.num_layers - 1


ADAPTERS = {cls.kind: cls for cls in (Steering, LoRA, Full)}  # --adapter NAME; a new kind: its class here
