"""Train one steering vector per layer with RLOO while every base weight stays frozen.

    torchrun --nproc_per_node=8 train.py --model Qwen/Qwen2.5-Math-1.5B     # the paper's hyperparameters
    python train.py --quickstart                                            # CPU, no download, < 1 min

One step, on every rank:

    prompts of the step  --split by rank-->  this rank's prompts (a prompt's N rollouts stay together)
    sample N rollouts per prompt with sample.Sampler on the live model (steering included)
    task.reward of each rollout (math: math-verify on the boxed answer; toy: a token count), RLOO advantages
    loss = rloo.policy_loss over token-budgeted micro-batches, backward into model.steering only
    all_reduce(steering.grad, SUM)  -- the only tensor that crosses ranks: L x d floats
    clip, AdamW step (identical on every rank, so the vectors never drift apart)

Determinism: the data order is a seeded permutation per epoch, and each rollout's random numbers
are hashed from (seed, step, the prompt's index within the step, rollout, position) by the
sampler, so a prompt gets the same rollouts whatever the number of ranks, and a resumed run
repeats what the interrupted one would have done: bit for bit on CPU; on GPU up to float
rounding, which batch composition and kernels change.

A run directory holds config.json (the resolved config), metrics.jsonl (one line per step),
steering.safetensors (the latest vector, for eval.py) and checkpoint.pt (everything to resume).
Every file is written to a temporary name and renamed, so a crash never leaves a half-written one.
"""
import argparse
import functools
import gc
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from tqdm import tqdm

import cluster
import model as M
import rloo
from sample import Sampler

# -----------------------------------------------------------------------------
# Config: every field is a command-line flag (--field-name); defaults are the paper's
# Qwen2.5-Math-1.5B recipe.


def _opt(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # what to train on
    model: str = _opt("Qwen/Qwen2.5-Math-1.5B", "base model: a checkpoint folder, a hub id, or 'random-tiny' "
                      "(a tiny random model written into the run directory; for --task toy)")
    tokenizer: str = _opt("", "tokenizer folder (default: the model's folder)")
    task: str = _opt("math", "'math': dataset problems, reward from the boxed answer; 'toy': random prompts, "
                     "reward = fraction of completion tokens equal to --toy-target (no tokenizer, no data)")
    dataset: str = _opt("math", "training set for --task math: math (MATH train), gsm8k, deepscaler")
    data_dir: str = _opt("", "folder with the dataset JSONL files (default: $STEER_DATA_DIR, else ../shared/data "
                         "when it exists, else the hub)")
    # rollouts
    prompts_per_step: int = _opt(128, "prompts per optimizer step, over all ranks (must divide by the world size)")
    rollouts: int = _opt(16, "rollouts per prompt: n, the RLOO group size, >= 2 (not --n: torchrun would take "
                         "that for an abbreviation of its own --nnodes / --nproc-per-node)")
    temperature: float = _opt(1.0, "sampling temperature; the loss uses the same logits / temperature")
    top_p: float = _opt(1.0, "nucleus sampling mass; must stay 1: the loss is on-policy for the full distribution")
    max_len: int = _opt(4096, "maximum prompt + completion tokens")
    max_new_tokens: int = _opt(0, "completion budget; 0 = max_len - prompt length, per prompt (a fixed budget is "
                               "also cut so that prompt + completion <= max_len)")
    max_prompt_len: int = _opt(1024, "prompts longer than this (tokens) are skipped, and counted, at startup")
    # optimisation
    lr: float = _opt(1e-3, "AdamW learning rate (after warmup)")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    warmup: float = _opt(0.03, "fraction of the steps with linear warmup from 0; constant after")
    grad_clip: float = _opt(2.0, "clip the global gradient norm to this (0 = off)")
    loss_norm: str = _opt("token", "loss normalisation: token (÷ completion tokens of the step, all ranks), "
                          "sequence (mean of per-sequence means), constant (÷ sequences x completion budget, "
                          "Dr. GRPO; the budget is max_new_tokens, or max_len when that is 0)")
    reward: str = _opt("pm1", "math reward values: pm1 (+1 correct / -1 wrong) or 01 (1 / 0)")
    epochs: int = _opt(1, "passes over the training set")
    max_steps: int = _opt(0, "stop after this many steps (0 = the epochs decide)")
    seed: int = _opt(0, "seeds the data order, the rollouts and the random-tiny model")
    # systems
    device: str = _opt("auto", "auto (cuda:LOCAL_RANK when CUDA is present, else cpu), cpu or cuda")
    dtype: str = _opt("auto", "model weights dtype: auto (model.auto_dtype: bfloat16 on CUDA and on CPUs with native "
                      "bf16 matmuls, else float32), float32, bfloat16, float16; steering and its gradient are "
                      "always float32")
    micro_batch_tokens: int = _opt(16384, "padded tokens per backward micro-batch (rows x longest row)")
    activation_checkpointing: bool | None = _opt(None, "recompute each block in backward: keeps one block's "
                                                 "activations instead of all layers' (the steering gradient of "
                                                 "layer 0 needs the whole backward), for ~1/3 more backward time. "
                                                 "Default (neither flag): on for CUDA; on CPU only when a "
                                                 "micro-batch's activations would not fit in half the available "
                                                 "host memory")
    kv_cache_tokens: int = _opt(0, "sampler KV pool in tokens; 0 = the sampler's default on CUDA "
                                "(gpu_memory_fraction of free memory); on CPU one step's need, at most 2 GiB")
    gpu_memory_fraction: float = _opt(0.5, "share of free GPU memory the sampler's KV pool takes (kv_cache_tokens=0)")
    reward_workers: int = _opt(0, "math-verify worker processes per rank (0 = reward.py's default)")
    reward_timeout: float = _opt(5.0, "seconds per answer check before it counts as wrong")
    # run directory
    out_dir: str = _opt("", "run directory (default: runs/<task>-<time>); refused if it exists and is not empty")
    resume: str = _opt("", "continue the run in this directory from its last checkpoint (other flags not allowed)")
    checkpoint_every: int = _opt(50, "checkpoint every this many steps (and always at the end)")
    preset: str = _opt("", "start from a named set of defaults (flags given override them): quickstart (tiny "
                       "random model, toy task, CPU, ~20 s), cpu-demo (a real 0.5B instruct model on generated "
                       "arithmetic, CPU, ~15 min), cpu-gsm8k (the same model on GSM8K, CPU, ~90 min; see README)")
    # the toy task and the random-tiny model
    toy_target: int = _opt(5, "toy task: the token id whose frequency in completions is the reward")
    toy_prompts: int = _opt(2048, "toy task: number of random prompts")
    toy_prompt_len: int = _opt(8, "toy task: prompt lengths are drawn from [len/2, len]")
    tiny_vocab: int = _opt(64, "random-tiny model: vocabulary size")
    tiny_dim: int = _opt(64, "random-tiny model: hidden size")
    tiny_layers: int = _opt(2, "random-tiny model: layers")


PRESETS = {
    # The whole loop on 2 CPU cores in under a minute: the reward (the share of completion tokens
    # that are token 5) climbs from ~0.03 to ~0.8 by step 10 and ~0.98 by step 30. Adam moves each
    # coordinate by about lr per step, hence a learning rate far above the paper's 1e-3.
    "quickstart": dict(model="random-tiny", task="toy", device="cpu", prompts_per_step=16, rollouts=8,
                       max_new_tokens=16, max_len=32, max_prompt_len=16, lr=0.01, warmup=0.0, max_steps=30,
                       checkpoint_every=10, micro_batch_tokens=4096, dtype="float32"),
    # A real instruct model gets better at a real (if easy) task on 2 CPU cores in ~15 minutes:
    # generated arithmetic (data/arithmetic.py), 96-token answers, 16 prompts x 4 rollouts.
    # Qwen2.5-Coder-0.5B-Instruct: see README for the measured curves and held-out accuracy.
    "cpu-demo": dict(model="Qwen/Qwen2.5-0.5B-Instruct", task="math", dataset="arithmetic", device="cpu",
                     prompts_per_step=16, rollouts=4, max_new_tokens=96, max_len=256, max_prompt_len=128,
                     lr=5e-3, warmup=0.0, max_steps=8, checkpoint_every=1, micro_batch_tokens=4096),
    # GSM8K on 2 CPU cores: 8 prompts x 8 rollouts (a group of 8 leaves fewer all-wrong prompts without
    # signal than 4 at a ~20 % base accuracy). The completion budget must not be shorter than the base
    # model's own answers: measured with 256 tokens (base greedy answers average 292), RL rewarded
    # brevity and GSM8K greedy fell from 26.5 to 8.5 % (README). 512 is the eval budget; ~2x the step time.
    "cpu-gsm8k": dict(model="Qwen/Qwen2.5-0.5B-Instruct", task="math", dataset="gsm8k", device="cpu",
                      prompts_per_step=8, rollouts=8, max_new_tokens=512, max_len=1024, max_prompt_len=512,
                      lr=5e-3, warmup=0.0, max_steps=12, checkpoint_every=2, micro_batch_tokens=4096),
}


def parse_args(argv=None) -> TrainConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        text = f.metadata["help"]
        if "default" not in text:
            text += f" (default: {f.default!r})"
        kw = dict(dest=f.name, default=argparse.SUPPRESS, help=text)
        if f.type in (bool, bool | None):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        else:
            parser.add_argument(flag, type=type(f.default), **kw)
    parser.add_argument("--quickstart", dest="preset", action="store_const", const="quickstart",
                        default=argparse.SUPPRESS, help="same as --preset quickstart")
    given = vars(parser.parse_args(argv))  # only the flags actually passed (defaults are SUPPRESSed)
    if given.get("resume"):
        others = sorted(k for k in given if k != "resume")
        if others:
            parser.error(f"--resume continues a run with its saved config.json; remove {others}")
        return load_config(Path(given["resume"]) / "config.json", resume=given["resume"])
    preset = given.get("preset", "")
    if preset and preset not in PRESETS:
        parser.error(f"--preset {preset!r} is unknown (known: {sorted(PRESETS)})")
    return TrainConfig(**{**PRESETS.get(preset, {}), **given})


def load_config(path: Path, resume: str) -> TrainConfig:
    if not path.is_file():
        raise SystemExit(f"--resume {resume}: {path} not found (not a run directory)")
    raw = json.loads(path.read_text())
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise SystemExit(f"{path}: unknown config fields {unknown} (written by another version of train.py?)")
    return TrainConfig(**{**raw, "resume": resume})


def check_config(cfg: TrainConfig, world: int):
    problems = []
    if cfg.task not in TASKS:
        problems.append(f"--task {cfg.task!r}: use one of {sorted(TASKS)}")
    if cfg.rollouts < 2:
        problems.append(f"--rollouts {cfg.rollouts}: RLOO needs at least 2 rollouts per prompt")
    if cfg.prompts_per_step % world:
        problems.append(f"--prompts-per-step {cfg.prompts_per_step} does not divide by the world size {world}")
    if cfg.top_p != 1.0:
        problems.append(f"--top-p {cfg.top_p}: the loss scores the full distribution, so rollouts drawn from "
                        "a nucleus would make the update off-policy; train with --top-p 1")
    if cfg.temperature <= 0:
        problems.append(f"--temperature {cfg.temperature}: training samples, so it must be > 0")
    if cfg.loss_norm not in rloo.NORMALIZATIONS:
        problems.append(f"--loss-norm {cfg.loss_norm!r}: use one of {rloo.NORMALIZATIONS}")
    if cfg.reward not in ("pm1", "01"):
        problems.append(f"--reward {cfg.reward!r}: use pm1 or 01")
    if cfg.max_prompt_len >= cfg.max_len:
        problems.append(f"--max-prompt-len {cfg.max_prompt_len} leaves no room for a completion "
                        f"in --max-len {cfg.max_len}")
    if cfg.checkpoint_every < 1:
        problems.append(f"--checkpoint-every {cfg.checkpoint_every}: must be >= 1")
    if cfg.model == "random-tiny" and cfg.task != "toy":
        problems.append("--model random-tiny has no tokenizer: use it with --task toy")
    if problems:
        raise SystemExit("config error: " + "; ".join(problems))

# -----------------------------------------------------------------------------
# Memory: whether the backward recomputes blocks


def available_host_memory() -> int:
    """Bytes the kernel says a new allocation can take without swapping (MemAvailable)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def use_recompute(cfg: TrainConfig, model, device) -> bool:
    """--activation-checkpointing when given; else on for CUDA (memory is the scarce resource there)
    and, on CPU, only when one micro-batch's activations without recompute would take more than
    half the available host memory (the recompute costs ~1/3 of the backward's time)."""
    if cfg.activation_checkpointing is not None:
        return cfg.activation_checkpointing
    if device.type == "cuda":
        return True
    dtype = model.embed_tokens.weight.dtype
    need = M.activation_bytes_per_token(model.config, dtype, recompute=False) * cfg.micro_batch_tokens
    return 2 * need > available_host_memory()


# -----------------------------------------------------------------------------
# Tasks: prompts as token ids, and the reward of their completions. A task is built by one
# function in TASKS; adding a reward means adding one such function.


@dataclass
class Task:
    prompts: list[list[int]]
    answers: list[str] | None  # gold answers (math), hashed into the fingerprint; None when the reward needs none
    stop_token_ids: list[int]
    vocab_size: int | None  # the tokenizer's real vocabulary (the head's padding rows are never sampled)
    skipped_prompts: int  # dropped at startup: longer than max_prompt_len
    # (completions as token ids, the dataset index of each one's prompt) -> (rewards, correct as 1/0)
    reward: Callable[[list[list[int]], list[int]], tuple[list[float], list[float]]]
    close: Callable[[], None] = lambda: None  # frees what the reward holds (worker processes)

    def fingerprint(self) -> str:
        """Hash of the prompts (token ids) and answers: a resumed run must see the same data."""
        return hashlib.sha256(json.dumps([self.prompts, self.answers]).encode()).hexdigest()[:16]


def build_tiny_model(folder: Path, cfg: TrainConfig):
    """Write a tiny random Llama checkpoint (config.json + model.safetensors) with model.py's own
    classes, deterministic in cfg.seed. Embeddings are scaled down so the initial next-token
    distribution is broad (every token has some probability): the toy reward then starts low
    but non-zero, and a steering vector can raise it."""
    from safetensors.torch import save_file
    d = cfg.tiny_dim
    raw = dict(model_type="llama", vocab_size=cfg.tiny_vocab, hidden_size=d, intermediate_size=2 * d,
               num_hidden_layers=cfg.tiny_layers, num_attention_heads=4, num_key_value_heads=2,
               rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=True, torch_dtype="float32")
    torch.manual_seed(cfg.seed)
    net = M.Transformer(M.Config.from_dict(raw))
    with torch.no_grad():
        net.embed_tokens.weight.mul_(0.15)  # logits = norm(h) . e: std ~ 0.15 sqrt(d) instead of sqrt(d)
    tensors = {k: v.contiguous() for k, v in net.state_dict().items() if k != "steering"}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors.tmp"))
    os.replace(folder / "model.safetensors.tmp", folder / "model.safetensors")
    atomic_write_text(folder / "config.json", json.dumps(raw, indent=2))


def toy_task(cfg: TrainConfig, model_path, is_main: bool) -> Task:
    """Random prompts; reward = the share of completion tokens equal to --toy-target: smooth, so
    learning shows at once. No tokenizer, no data."""
    vocab_size = M.Config.from_json(M.resolve_checkpoint(model_path) / "config.json").vocab_size
    if not 0 <= cfg.toy_target < vocab_size:
        raise SystemExit(f"--toy-target {cfg.toy_target} is not a token id of this model (vocab {vocab_size})")
    g = torch.Generator().manual_seed(cfg.seed)
    lo, hi = max(1, cfg.toy_prompt_len // 2), cfg.toy_prompt_len
    lengths = torch.randint(lo, hi + 1, (cfg.toy_prompts,), generator=g).tolist()
    prompts = [torch.randint(0, vocab_size, (k,), generator=g).tolist() for k in lengths]

    def reward(completions, prompt_indices):
        rewards = [sum(t == cfg.toy_target for t in c) / max(1, len(c)) for c in completions]
        return rewards, [float(r >= 0.5) for r in rewards]
    return Task(prompts, None, [], vocab_size, 0, reward)


def math_task(cfg: TrainConfig, model_path, is_main: bool) -> Task:
    """Dataset problems in the model's chat template; reward = the last \\boxed{} checked against
    the gold answer by math-verify (reward.RewardPool): +1 / -1 (--reward pm1) or 1 / 0."""
    import data
    import reward
    # the workers fork now, from a small process: before the model and CUDA take memory
    pool = reward.RewardPool(workers=cfg.reward_workers or None, timeout=cfg.reward_timeout).start()
    tok = data.Tokenizer.from_dir(cfg.tokenizer or M.resolve_checkpoint(model_path))
    rows = data.load(cfg.dataset, split="train", data_dir=data.default_dir(cfg.data_dir))
    prompts, answers, skipped = [], [], 0
    for row in rows:
        tokens = tok.encode_prompt(row["problem"])
        if len(tokens) > cfg.max_prompt_len:
            skipped += 1
            continue
        prompts.append(tokens)
        answers.append(row["answer"])
    if not prompts:
        raise SystemExit(f"{cfg.dataset}: no prompt fits --max-prompt-len {cfg.max_prompt_len}")
    if is_main:
        print(f"{cfg.dataset}: {len(prompts)} prompts, {skipped} skipped (longer than {cfg.max_prompt_len} tokens)")
    wrong = -1.0 if cfg.reward == "pm1" else 0.0

    def score(completions, prompt_indices):
        texts = [tok.decode(c, skip_special_tokens=True) for c in completions]
        rewards = pool.score_batch(texts, [answers[i] for i in prompt_indices], correct=1.0, wrong=wrong)
        return rewards, [float(r == 1.0) for r in rewards]
    return Task(prompts, answers, tok.stop_token_ids, tok.vocab_size, skipped, score, pool.close)


TASKS = {"math": math_task, "toy": toy_task}

# -----------------------------------------------------------------------------
# Data order: one seeded permutation per epoch; step s reads positions [o, o + P) of epoch e.


def step_position(step: int, steps_per_epoch: int, prompts_per_step: int) -> tuple[int, int]:
    return step // steps_per_epoch, (step % steps_per_epoch) * prompts_per_step


@functools.lru_cache(maxsize=1)  # every step of an epoch reads the same permutation
def epoch_order(seed: int, epoch: int, size: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(size, generator=g).tolist()

# -----------------------------------------------------------------------------
# Rollouts and rewards


def sample(sampler, task: Task, cfg: TrainConfig, step: int, prompt_indices: list[int], rank_offset: int):
    """N rollouts of each of this rank's prompts, flat and prompt-major. The sampler hashes each
    random draw from (seed, prompt index, rollout, position): with the step's seed and this rank's
    offset into the step, a prompt gets the same rollouts whatever the number of ranks (exactly on
    CPU; on GPU up to float rounding, which batch composition changes). Each prompt has its own
    budget: max_len - its length, or max_new_tokens when that is smaller."""
    prompts = [task.prompts[i] for i in prompt_indices]
    budgets = [min(cfg.max_new_tokens or cfg.max_len, cfg.max_len - len(p)) for p in prompts]
    groups = sampler.generate(prompts, n=cfg.rollouts, max_new_tokens=budgets, temperature=cfg.temperature,
                              top_p=cfg.top_p, stop_token_ids=task.stop_token_ids,
                              seed=(cfg.seed << 32) + step, prompt_offset=rank_offset)
    return [c for group in groups for c in group]


# -----------------------------------------------------------------------------
# The backward: right-padded micro-batches of (prompt + completion), longest first, each at most
# micro_batch_tokens padded tokens; the loss counts completion positions only.


@dataclass
class Rollout:
    prompt: list[int]
    completion: list[int]
    advantage: float
    sampler_logprobs: list[float]


def micro_batches(rollouts: list[Rollout], budget: int) -> list[list[Rollout]]:
    """Sorted by length so rows of a batch pad little; a row longer than the budget goes alone."""
    order = sorted(rollouts, key=lambda r: len(r.prompt) + len(r.completion), reverse=True)
    batches, current = [], []
    for r in order:
        width = len(current[0].prompt) + len(current[0].completion) - 1 if current else 0  # longest row first
        if current and (len(current) + 1) * width > budget:
            batches.append(current)
            current = []
        current.append(r)
    return batches + [current] if current else batches


def backward(model, batch: list[Rollout], cfg: TrainConfig, vocab_size, totals: dict, device):
    """Loss of one micro-batch (already divided by the step's normaliser), backpropagated into
    steering. Returns (loss, sum of |train log-prob - sampler log-prob| over its tokens)."""
    width = max(len(r.prompt) + len(r.completion) for r in batch) - 1
    inputs = torch.zeros(len(batch), width, dtype=torch.long)  # (B, T) right-padded with id 0 (masked out)
    targets = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.bool)
    for b, r in enumerate(batch):
        seq = torch.tensor(r.prompt + r.completion)
        inputs[b, :len(seq) - 1], targets[b, :len(seq) - 1] = seq[:-1], seq[1:]
        mask[b, len(r.prompt) - 1:len(seq) - 1] = True  # position t predicts token t+1: the completion
    inputs, targets, mask = inputs.to(device), targets.to(device), mask.to(device)
    adv = torch.tensor([r.advantage for r in batch], device=device)
    hidden = model.hidden_states(inputs)  # (B, T, d)
    # the head runs on completion positions only: prompt and padding rows need no logits
    picked = M.chunked_logprobs(hidden[mask], model.head_weight, targets[mask], cfg.temperature, vocab_size)
    logprobs = torch.zeros(mask.shape, dtype=picked.dtype, device=device)
    logprobs[mask] = picked  # (B, T)
    loss = rloo.policy_loss(logprobs, mask, adv, cfg.loss_norm, **totals)
    if torch.isfinite(loss):
        loss.backward()
    sampler = torch.tensor([lp for r in batch for lp in r.sampler_logprobs], device=device)
    return loss.detach(), (picked.detach() - sampler).abs().sum()

def accumulate_gradient(model, rollouts: list[Rollout], cfg: TrainConfig, vocab_size, totals: dict, device):
    """Backward over all micro-batches into a zeroed steering.grad. Returns (loss, summed
    |log-prob gap|, number of micro-batches, whether some loss was non-finite)."""
    if model.steering.grad is None:
        model.steering.grad = torch.zeros_like(model.steering)
    model.steering.grad.zero_()
    loss, gap, bad_loss = 0.0, 0.0, False
    batches = micro_batches(rollouts, cfg.micro_batch_tokens)
    for batch in batches:
        mb_loss, mb_gap = backward(model, batch, cfg, vocab_size, totals, device)
        bad_loss |= not bool(torch.isfinite(mb_loss))
        loss += mb_loss.item()
        gap += mb_gap.item()
    return loss, gap, len(batches), bad_loss


def reduce_and_step(model, optimizer, cfg: TrainConfig, lr: float, bad_loss: bool) -> tuple[float, bool]:
    """Sum steering.grad over ranks (the one all-reduce of the step: L x d floats), then clip and
    take the AdamW step. A non-finite loss or gradient on any rank skips the update on every rank:
    a rank with a bad loss poisons its gradient with NaN, which the sum carries everywhere.
    Returns (global gradient norm before clipping, skipped)."""
    grad = model.steering.grad
    if bad_loss:
        grad.fill_(float("nan"))
    dist.all_reduce(grad)  # SUM: the loss is already divided by the whole step's normaliser
    grad_norm = grad.norm().item()
    if not math.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=False)
        return grad_norm, True
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([model.steering], cfg.grad_clip)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    return grad_norm, False


def ranks_divergence(model) -> float:
    """Largest |steering - rank 0's steering| over ranks: 0.0 when every rank holds the same
    vector, as identical gradients and optimizer states guarantee. Checked at checkpoints."""
    ref = model.steering.detach().clone()
    dist.broadcast(ref, src=0)
    diff = (model.steering.detach() - ref).abs().max().reshape(1)
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return diff.item()


# -----------------------------------------------------------------------------
# Checkpoints: everything needed to continue exactly, in one file renamed into place.


def atomic_write_text(path: Path, text: str):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(run_dir: Path, model, optimizer, cfg: TrainConfig, step: int, epoch: int, offset: int,
                    skipped_steps: int, data_fingerprint: str):
    """steering.safetensors first (the file eval.py reads), then checkpoint.pt: the checkpoint is
    the commit point, and resuming reads nothing else."""
    model.save_steering(run_dir / "steering.safetensors", step=step, task=cfg.task, dataset=cfg.dataset)
    state = dict(step=step, epoch=epoch, offset=offset, skipped_steps=skipped_steps, data=data_fingerprint,
                 steering=model.steering.detach().cpu().clone(), optimizer=optimizer.state_dict(),
                 config=asdict(cfg))
    tmp = run_dir / "checkpoint.pt.tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, run_dir / "checkpoint.pt")


def load_checkpoint(run_dir: Path) -> dict | None:
    path = run_dir / "checkpoint.pt"  # a leftover checkpoint.pt.tmp is an interrupted write: ignored
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SystemExit(f"{path}: unreadable checkpoint ({type(e).__name__}: {e})") from None


def prepare_run_dir(cfg: TrainConfig) -> tuple[Path, dict | None]:
    """Rank 0: the run directory (refusing to reuse a non-empty one unless resuming) and the
    checkpoint to resume from. metrics.jsonl is cut back to the checkpoint's step, so the lines a
    killed run wrote after its last checkpoint are replaced, not duplicated."""
    if cfg.resume:
        run_dir = Path(cfg.resume)
        state = load_checkpoint(run_dir)
        last = state["step"] if state else 0
        metrics = run_dir / "metrics.jsonl"
        if metrics.is_file():
            lines = [ln for ln in metrics.read_text().splitlines() if ln and json.loads(ln)["step"] <= last]
            atomic_write_text(metrics, "".join(ln + "\n" for ln in lines))
        return run_dir, state
    run_dir = Path(cfg.out_dir or f"runs/{cfg.task}-{time.strftime('%Y%m%d-%H%M%S')}")
    if run_dir.exists() and any(run_dir.iterdir()):
        raise SystemExit(f"run directory {run_dir} exists and is not empty: pass --resume {run_dir} to continue "
                         "it, or choose another --out-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.out_dir = str(run_dir)
    atomic_write_text(run_dir / "config.json", json.dumps(asdict(cfg), indent=2))
    return run_dir, None

# -----------------------------------------------------------------------------
# Setup: run directory, task, model, optimizer, sampler; then one RL step as one function.


@dataclass
class Run:
    """Everything a step needs, built once by setup()."""
    cfg: TrainConfig
    cluster: cluster.Cluster
    run_dir: Path
    task: Task
    model: M.Transformer
    optimizer: torch.optim.Optimizer
    sampler: Sampler
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    start: int  # the first step to run (0, or the checkpoint's step)
    skipped_steps: int  # updates skipped for a non-finite loss or gradient, so far


def setup(cfg: TrainConfig, c: cluster.Cluster) -> Run:
    decision = None  # the run directory and resume state are decided once, by rank 0, and shared
    if c.is_main:
        try:
            decision = prepare_run_dir(cfg)
        except SystemExit as e:
            decision = e
    decision = cluster.broadcast(decision, c)
    if isinstance(decision, SystemExit):
        raise decision
    run_dir, state = decision
    cfg.out_dir = str(run_dir)

    model_path = cfg.model
    if cfg.model == "random-tiny":
        model_path = run_dir / "model"
        if c.is_main and not (model_path / "model.safetensors").is_file():
            build_tiny_model(model_path, cfg)
        dist.barrier()  # (several nodes need the run directory on a shared filesystem here)
    task = TASKS[cfg.task](cfg, model_path, c.is_main)  # before the model: reward workers fork small
    dtype = M.auto_dtype(c.device) if cfg.dtype == "auto" else cfg.dtype
    model = M.Transformer.from_pretrained(model_path, dtype=dtype, device=c.device)
    model.checkpoint_blocks = use_recompute(cfg, model, c.device)
    if c.is_main:
        print(f"{model_path}: {dtype}, activation checkpointing {'on' if model.checkpoint_blocks else 'off'}")

    P = cfg.prompts_per_step
    steps_per_epoch = len(task.prompts) // P
    if steps_per_epoch == 0:
        raise SystemExit(f"{len(task.prompts)} prompts do not fill one step of --prompts-per-step {P}")
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    optimizer = torch.optim.AdamW([model.steering], lr=cfg.lr, weight_decay=cfg.weight_decay)
    start, skipped_steps = 0, 0
    if state is not None:
        start, skipped_steps = state["step"], state["skipped_steps"]
        if state["data"] != task.fingerprint():
            raise SystemExit(f"{run_dir}/checkpoint.pt: the training prompts differ from the ones the run began "
                             "with (dataset, data dir, tokenizer or template changed?)")
        if (state["epoch"], state["offset"]) != step_position(start, steps_per_epoch, P):
            raise SystemExit(f"{run_dir}/checkpoint.pt: data position {(state['epoch'], state['offset'])} does not "
                             f"match step {start} (the dataset changed since the run began?)")
        with torch.no_grad():
            model.steering.copy_(state["steering"])  # in place: the sampler's CUDA graphs hold this tensor
        optimizer.load_state_dict(state["optimizer"])
        if c.is_main:
            print(f"resuming {run_dir} at step {start}/{total_steps}")

    longest = min(cfg.max_len, max(len(p) for p in task.prompts) + (cfg.max_new_tokens or cfg.max_len))
    kv_tokens = cfg.kv_cache_tokens or None  # GPU: the sampler sizes its pool from free memory
    if kv_tokens is None and c.device.type == "cpu":  # one step's rollouts, capped at 2 GiB (pre-emption copes)
        per_token = M.kv_bytes_per_token(model.config, model.embed_tokens.weight.dtype)
        kv_tokens = min(P // c.world * cfg.rollouts * (longest + 16), 2 ** 31 // per_token)
    sampler = Sampler(model, kv_cache_tokens=kv_tokens, gpu_memory_fraction=cfg.gpu_memory_fraction,
                      vocab_size=task.vocab_size, max_seq_len=longest)
    return Run(cfg, c, run_dir, task, model, optimizer, sampler, steps_per_epoch, total_steps,
               math.ceil(cfg.warmup * total_steps), start, skipped_steps)


def rl_step(run: Run, step: int) -> dict:
    """One step on every rank: sample -> reward -> RLOO advantages -> backward over micro-batches
    -> all-reduce of the L x d gradient -> AdamW. Returns the step's metrics over all ranks."""
    cfg, c, task = run.cfg, run.cluster, run.task
    P, per_rank = cfg.prompts_per_step, cfg.prompts_per_step // c.world
    t0 = time.perf_counter()
    epoch, offset = step_position(step, run.steps_per_epoch, P)
    rank_offset = c.rank * per_rank  # this rank's first prompt, as an index within the step
    prompt_indices = epoch_order(cfg.seed, epoch, len(task.prompts))[offset + rank_offset:][:per_rank]
    completions = sample(run.sampler, task, cfg, step, prompt_indices, rank_offset)
    sync(c.device)
    t1 = time.perf_counter()
    owners = [i for i in prompt_indices for _ in range(cfg.rollouts)]  # each rollout's prompt
    rewards, correct = task.reward([comp.tokens for comp in completions], owners)
    adv = rloo.advantages(torch.tensor(rewards).view(per_rank, cfg.rollouts))  # a prompt's rollouts share a rank
    t2 = time.perf_counter()

    lengths = [len(comp.tokens) for comp in completions]
    count = torch.tensor([float(sum(lengths))], dtype=torch.float64, device=c.device)
    dist.all_reduce(count)  # the loss divides by the whole step's completion tokens
    totals = dict(total_sequences=P * cfg.rollouts, max_completion_len=cfg.max_new_tokens or cfg.max_len,
                  total_tokens=max(count.item(), 1.0))
    rollouts = [Rollout(task.prompts[i], comp.tokens, a, comp.logprobs)
                for i, comp, a in zip(owners, completions, adv.view(-1).tolist())]
    loss, gap, batches, bad_loss = accumulate_gradient(run.model, rollouts, cfg, task.vocab_size, totals, c.device)
    lr = cfg.lr * min(1.0, (step + 1) / run.warmup_steps) if run.warmup_steps else cfg.lr
    grad_norm, skipped = reduce_and_step(run.model, run.optimizer, cfg, lr, bad_loss)
    run.skipped_steps += skipped
    sync(c.device)
    t3 = time.perf_counter()

    sums, top = cluster.reduce_metrics(
        dict(reward=sum(rewards), correct=sum(correct), rollouts=len(rewards), tokens=sum(lengths),
             truncated=sum(comp.finish_reason == "length" for comp in completions), adv_abs=adv.abs().sum().item(),
             adv_sq=adv.pow(2).sum().item(), zero_adv_prompts=(adv == 0).all(1).sum().item(), loss=loss, gap=gap),
        dict(completion_len=max(lengths), sample_s=t1 - t0, reward_s=t2 - t1, train_s=t3 - t2), c.device)
    n = sums["rollouts"]
    return dict(step=step + 1, epoch=epoch, lr=lr, reward_mean=sums["reward"] / n, accuracy=sums["correct"] / n,
                adv_abs_mean=sums["adv_abs"] / n, adv_std=math.sqrt(max(sums["adv_sq"] / n, 0.0)),
                zero_adv_prompts=sums["zero_adv_prompts"] / P, completion_len_mean=sums["tokens"] / n,
                completion_len_max=int(top["completion_len"]), truncated_frac=sums["truncated"] / n,
                loss=sums["loss"], logprob_gap=sums["gap"] / max(sums["tokens"], 1.0), sample_s=top["sample_s"],
                reward_s=top["reward_s"], train_s=top["train_s"], step_s=time.perf_counter() - t0,
                tokens_per_s=sums["tokens"] / max(top["sample_s"], 1e-9), grad_norm=grad_norm,
                steering_norm=run.model.steering.detach().norm(dim=1).tolist(),
                bytes_allreduced=run.model.steering.numel() * run.model.steering.element_size(),
                micro_batches=batches, skipped=skipped, skipped_steps=run.skipped_steps,
                skipped_prompts=task.skipped_prompts)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def log_line(m: dict) -> str:
    return (f"step {m['step']} reward {m['reward_mean']:+.3f} acc {m['accuracy']:.3f} "
            f"len {m['completion_len_mean']:.0f} trunc {m['truncated_frac']:.2f} | {m['step_s']:.1f}s "
            f"(sample {m['sample_s']:.1f} reward {m['reward_s']:.1f} train {m['train_s']:.1f}) "
            f"{m['tokens_per_s']:.0f} tok/s" + (" SKIPPED" if m["skipped"] else ""))

# -----------------------------------------------------------------------------
# The loop


def main(argv=None):
    cfg = parse_args(argv)
    c = cluster.init(cfg.device)
    check_config(cfg, c.world)
    run = setup(cfg, c)
    metrics_file = open(run.run_dir / "metrics.jsonl", "a") if c.is_main else None
    # a bar on a terminal; on a log file (not a tty) one plain line per step
    bar = tqdm(total=run.total_steps, initial=run.start, unit="step", file=sys.stdout,
               disable=not (c.is_main and sys.stdout.isatty()))
    for step in range(run.start, run.total_steps):
        m = rl_step(run, step)
        checkpoint_now = (step + 1) % cfg.checkpoint_every == 0 or step + 1 == run.total_steps
        m["rank_divergence"] = ranks_divergence(run.model) if checkpoint_now else None
        if m["rank_divergence"]:  # the same value on every rank (all-reduced): all stop together
            raise RuntimeError(f"step {step + 1}: the ranks' steering vectors differ by up to {m['rank_divergence']}")
        if c.is_main:
            metrics_file.write(json.dumps(m) + "\n")
            metrics_file.flush()
            if bar.disable:
                print(f"[{step + 1}/{run.total_steps}] " + log_line(m), flush=True)
            else:
                bar.set_postfix_str(log_line(m).split(" ", 2)[2], refresh=False)
                bar.update(1)
        if checkpoint_now:
            if c.is_main:
                save_checkpoint(run.run_dir, run.model, run.optimizer, cfg, step + 1,
                                *step_position(step + 1, run.steps_per_epoch, cfg.prompts_per_step),
                                run.skipped_steps, run.task.fingerprint())
            dist.barrier()  # nobody runs ahead of a checkpoint that may still be written
    bar.close()
    if c.is_main:
        metrics_file.close()
        print(f"done: {run.run_dir}/steering.safetensors")
    run.task.close()
    cluster.close()
    # Reference cycles can keep gloo's process group, and the work objects its threads still hold,
    # alive into interpreter shutdown, where a thread releasing a tensor needs the GIL and aborts
    # the process ("terminate called without an active exception", ~1 run in 7). Collect them now.
    gc.collect()


if __name__ == "__main__":
    main()
