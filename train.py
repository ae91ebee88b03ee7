"""Train one steering vector per layer with RLOO while every base weight stays frozen (or, for the
paper's baselines, LoRA on down_proj or every weight: --adapter).

    torchrun --nproc_per_node=8 train.py --model Qwen/Qwen2.5-Math-1.5B     # the paper's hyperparameters
    python train.py --quickstart                                            # CPU, no download, < 1 min

One step, on every rank:

    prompts of the step  --split by rank-->  this rank's prompts (a prompt's N rollouts stay together)
    sample N rollouts per prompt with sample.Sampler on the live model (its adapter included)
    task.reward of each rollout (math: math-verify on the boxed answer; toy: a token count), RLOO advantages
    loss = rloo.policy_loss over token-budgeted micro-batches, backward into the adapter only
    all_reduce(the adapter's flat gradient buffer, SUM)  -- the only tensor that crosses ranks: L x d floats
    clip, AdamW step (identical on every rank, so the vectors never drift apart)

What trains is the model's concern (its adapter, one of adapters.py): train.py asks it for the
trainable tensors, their one flat gradient buffer, and to refresh the weights the forward reads
after the step. The sampler runs on the same module, so the trainer -> sampler weight sync is 0 bytes for
every adapter, full fine-tuning included.

Determinism: the data order is a seeded permutation per epoch, and each rollout's random numbers
are hashed from (seed, step, the prompt's index within the step, rollout, position) by the
sampler, so a prompt gets the same rollouts whatever the number of ranks, and a resumed run
repeats what the interrupted one would have done: bit for bit on CPU; on GPU up to float
rounding, which batch composition and kernels change.

A run directory holds config.json (the resolved config), metrics.jsonl (one line per step),
{adapter}.safetensors (the latest vector or LoRA, for eval.py; `full`: a Hugging Face folder
full/), {adapter}-step{N}.safetensors for every checkpoint (the history), and checkpoint.pt
(everything to resume). Every file is written to a temporary name and renamed, so a crash never
leaves a half-written one. Re-running the same command on the directory continues the run.
"""
import argparse
import copy
import functools
import gc
import hashlib
import json
import math
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import adapters
import cluster
import memory
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
    # what trains (adapters.py; every base weight stays frozen except with --adapter full)
    adapter: str = _opt("steering", "steering (one vector per layer, the paper's method), lora (rank --lora-rank on "
                        "every MLP down_proj of --layers) or full (every base weight). The paper's learning rates "
                        "(its Table 6 / official configs): steering 1e-3 (Qwen2.5 up to 7B), 5e-4 (14B), 3e-4 "
                        "(Llama-3.1-8B), 8e-5 (Llama-3.1-8B-Instruct); LoRA 1e-4; full 1e-6 (2e-6 for "
                        "Qwen2.5-Math-1.5B); the deepscaler-* presets set them")
    layers: str = _opt("", "layers whose vector / LoRA trains, e.g. 27, 0-13 or 20,24,27 (default: all)")
    steer_at: str = _opt("post-block", "where a steering vector is added: post-block (after the whole block, the "
                         "paper's) or post-attn (after the attention residual, before the MLP)")
    lora_rank: int = _opt(4, "LoRA rank r (the paper: 4, and 1 in its Table 1 LoRA rows)")
    lora_alpha: float = _opt(0.0, "LoRA alpha; the update is scaled by alpha / r (0 = r, the paper's)")
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
    dynamic_sampling: int = _opt(0, "DAPO's dynamic sampling: up to this many extra sampling rounds per step, each "
                                 "drawing fresh prompts for those whose rollouts all got the same reward (no "
                                 "signal), until the step has --prompts-per-step prompts with signal; the rest stay "
                                 "as drawn. 0 = off (the paper's). Logged: dynamic_draws, signal_prompts")
    tis_cap: float = _opt(0.0, "truncated importance sampling: weight each token's log-prob in the loss by "
                          "min(pi_train / pi_sampler, C), correcting the sampler/trainer gap (logprob_gap; bf16, "
                          "CUDA graphs). 0 = off (the paper's); Yao et al. use C = 2")
    epochs: int = _opt(1, "passes over the training set")
    max_steps: int = _opt(0, "stop after this many steps (0 = the epochs decide)")
    seed: int = _opt(0, "seeds the data order, the rollouts and the random-tiny model")
    # systems
    device: str = _opt("auto", "auto (cuda:LOCAL_RANK when CUDA is present, else cpu), cpu or cuda")
    dtype: str = _opt("auto", "model weights dtype: auto (model.auto_dtype: bfloat16 on CUDA and on CPUs with native "
                      "bf16 matmuls, else float32), float32, bfloat16, float16; steering and its gradient are "
                      "always float32")
    micro_batch_tokens: int = _opt(0, "padded tokens per backward micro-batch (rows x longest row); 0 = the "
                                   "memory plan's: the largest that fits beside weights, optimizer state and KV pool")
    activation_checkpointing: bool | None = _opt(None, "recompute each block in backward: keeps one block's "
                                                 "activations instead of all layers' (the steering gradient of "
                                                 "layer 0 needs the whole backward), for ~1/3 more backward time. "
                                                 "Default (neither flag): the memory plan decides (CPU: only when "
                                                 "one sequence would not fit without; CUDA: unless the whole step "
                                                 "fits without)")
    kv_cache_tokens: int = _opt(0, "sampler KV pool in tokens; 0 = the memory plan's: one step's rollouts, at most "
                                "--gpu-memory-fraction of the memory that weights and optimizer state leave")
    gpu_memory_fraction: float = _opt(0.5, "share of the memory left beside weights and optimizer state that the KV "
                                      "pool may take (CPU or GPU; --kv-cache-tokens 0)")
    reward_workers: int = _opt(0, "math-verify worker processes per rank (0 = reward.py's default)")
    reward_timeout: float = _opt(5.0, "seconds per answer check before it counts as wrong")
    collective_timeout: float = _opt(1800.0, "seconds a collective waits for the other ranks: a dead rank makes "
                                     "the others exit with an error after this long instead of hanging")
    # evaluation during training (on the live model, with the training sampler)
    eval_every: int = _opt(0, "evaluate every this many steps, and before the first (0 = never); logged into "
                           "metrics.jsonl as eval_* fields")
    eval_bench: str = _opt("math500", "benchmark (test split) for --eval-every")
    eval_limit: int = _opt(100, "first N problems of --eval-bench (0 = all)")
    eval_samples: int = _opt(1, "samples per problem for --eval-every (eval_accuracy is their mean)")
    eval_temperature: float = _opt(0.0, "sampling temperature for --eval-every (0 = greedy)")
    # run directory
    out_dir: str = _opt("", "run directory (default: runs/<task>-<time>). If it holds a run of the same config, "
                        "that run continues from its last checkpoint (so re-running a command, a torchrun restart "
                        "or a requeue resumes); a different config is refused")
    resume: str = _opt("", "continue the run in this directory from its last checkpoint (other flags not allowed)")
    checkpoint_every: int = _opt(50, "checkpoint every this many steps (and always at the end); each checkpoint "
                                 "also keeps its vector as steering-step{N}.safetensors")
    wandb_project: str = _opt("", "log the config and every step's metrics to this Weights & Biases project "
                              "(needs `pip install wandb`; imported only when set)")
    preset: str = _opt("", "start from a named set of defaults (flags given override them): quickstart (tiny "
                       "random model, toy task, CPU, ~20 s), cpu-demo (a real 0.5B instruct model on generated "
                       "arithmetic, CPU, ~15 min), cpu-gsm8k (the same model on GSM8K, CPU; see README), and the "
                       "paper's setups: deepscaler-<model>[-lora|-full] (Table 1) and gsm8k-<model> / math-<model> "
                       "(the GSM8K / MATH table), <model> one of qwen2.5-math-1.5b, qwen2.5-math-7b, qwen2.5-1.5b, "
                       "qwen2.5-7b, qwen2.5-14b, llama3.1-8b, llama3.1-8b-instruct (README maps each to its row)")
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
                       checkpoint_every=10, dtype="float32"),
    # A real instruct model gets better at a real (if easy) task on 2 CPU cores in ~15 minutes:
    # generated arithmetic (data/arithmetic.py), 96-token answers, 16 prompts x 4 rollouts.
    # Qwen2.5-Coder-0.5B-Instruct: see README for the measured curves and held-out accuracy.
    "cpu-demo": dict(model="Qwen/Qwen2.5-0.5B-Instruct", task="math", dataset="arithmetic", device="cpu",
                     prompts_per_step=16, rollouts=4, max_new_tokens=96, max_len=256, max_prompt_len=128,
                     lr=5e-3, warmup=0.0, max_steps=8, checkpoint_every=1),
    # GSM8K on 2 CPU cores: 8 prompts x 8 rollouts (a group of 8 leaves fewer all-wrong prompts without
    # signal than 4 at a ~20 % base accuracy). The completion budget must not be shorter than the base
    # model's own answers: measured with 256 tokens (base greedy answers average 292), RL rewarded
    # brevity and GSM8K greedy fell from 26.5 to 8.5 % (README). 512 is the eval budget; ~2x the step time.
    "cpu-gsm8k": dict(model="Qwen/Qwen2.5-0.5B-Instruct", task="math", dataset="gsm8k", device="cpu",
                      prompts_per_step=8, rollouts=8, max_new_tokens=512, max_len=1024, max_prompt_len=512,
                      lr=5e-3, warmup=0.0, max_steps=12, checkpoint_every=2),
}

# The paper's setups, from its official configs (configs/train/rl/<model>/deepscaler/*.yml of
# corl-team/steering-reasoning). Shared by all: RLOO without KL, +-1 reward on the last box, 128
# prompts per step (16 per GPU x 8), T = 1, AdamW, constant lr after 3 % warmup, grad norm clipped
# at 2, the loss divided by the step's generated tokens (our --loss-norm token), 1 epoch of
# DeepScaleR (40,315 problems: 314 steps), max_len = prompt + completion. Per model: hub id, max_len,
# then per adapter (lr, rollouts per prompt, LoRA rank). LoRA is on down_proj with alpha = rank
# (rank 1 where the paper's table used its lora-1 runs); the official LoRA for the non-Math Qwen2.5
# models starts from PiSSA, which we do not implement (ours is PEFT's default init).
PAPER_SETUPS = {
    "qwen2.5-math-1.5b": ("Qwen/Qwen2.5-Math-1.5B", 4096, dict(steering=(1e-3, 16, 0), lora=(1e-4, 16, 4),
                                                                full=(2e-6, 16, 0))),
    "qwen2.5-math-7b": ("Qwen/Qwen2.5-Math-7B", 4096, dict(steering=(1e-3, 16, 0), lora=(1e-4, 16, 1),
                                                            full=(1e-6, 16, 0))),
    "qwen2.5-1.5b": ("Qwen/Qwen2.5-1.5B", 8192, dict(steering=(1e-3, 64, 0), lora=(1e-4, 16, 4),
                                                      full=(1e-6, 64, 0))),
    "qwen2.5-7b": ("Qwen/Qwen2.5-7B", 8192, dict(steering=(1e-3, 16, 0), lora=(1e-4, 16, 4), full=(1e-6, 16, 0))),
    "qwen2.5-14b": ("Qwen/Qwen2.5-14B", 8192, dict(steering=(5e-4, 16, 0), lora=(5e-4, 16, 4),
                                                    full=(1e-6, 16, 0))),
    "llama3.1-8b": ("meta-llama/Llama-3.1-8B", 8192, dict(steering=(3e-4, 64, 0), lora=(1e-4, 32, 4),
                                                           full=(1e-6, 64, 0))),
    "llama3.1-8b-instruct": ("meta-llama/Llama-3.1-8B-Instruct", 8192, dict(steering=(8e-5, 16, 0),
                                                                             lora=(8e-5, 16, 1),
                                                                             full=(1e-6, 16, 0))),
}
for _name, (_hub, _max_len, _adapters) in PAPER_SETUPS.items():
    for _adapter, (_lr, _rollouts, _rank) in _adapters.items():
        PRESETS[f"deepscaler-{_name}" + ("" if _adapter == "steering" else f"-{_adapter}")] = dict(
            model=_hub, dataset="deepscaler", adapter=_adapter, lr=_lr, rollouts=_rollouts, max_len=_max_len,
            prompts_per_step=128, epochs=1, checkpoint_every=53, **({"lora_rank": _rank} if _rank else {}))
# The GSM8K / MATH table (the paper's v1): the official v1-era configs (configs/train/rl/<model>/{gsm8k,math})
# train 3 epochs (Llama-3.1-8B: 2) at 1024 tokens in total; the Llama-3.1-8B-Instruct one steers layer
# 16 alone. Those configs also add a KL term (0.01) and use a mean baseline, which we do not (RLOO, no
# KL: the paper's final recipe). Only the steering setups with a published config are here.
for _name, _dataset, _lr, _rollouts, _epochs, _layers in (
        ("qwen2.5-math-1.5b", "gsm8k", 2e-3, 16, 3, ""), ("qwen2.5-math-1.5b", "math", 1e-3, 16, 3, ""),
        ("qwen2.5-1.5b", "gsm8k", 5e-4, 64, 3, ""), ("llama3.1-8b", "gsm8k", 5e-4, 64, 2, ""),
        ("llama3.1-8b-instruct", "gsm8k", 3e-4, 16, 3, "16")):
    PRESETS[f"{_dataset}-{_name}"] = dict(model=PAPER_SETUPS[_name][0], dataset=_dataset, lr=_lr, rollouts=_rollouts,
                                         epochs=_epochs, max_len=1024, max_prompt_len=512, prompts_per_step=128,
                                         layers=_layers)


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
    if cfg.dynamic_sampling < 0:
        problems.append(f"--dynamic-sampling {cfg.dynamic_sampling}: extra rounds per step, >= 0")
    if not (cfg.tis_cap == 0 or 1 <= cfg.tis_cap < math.inf):
        problems.append(f"--tis-cap {cfg.tis_cap}: 0 (off) or a finite cap >= 1")
    if cfg.max_prompt_len >= cfg.max_len:
        problems.append(f"--max-prompt-len {cfg.max_prompt_len} leaves no room for a completion "
                        f"in --max-len {cfg.max_len}")
    if cfg.checkpoint_every < 1:
        problems.append(f"--checkpoint-every {cfg.checkpoint_every}: must be >= 1")
    if cfg.model == "random-tiny" and cfg.task != "toy":
        problems.append("--model random-tiny has no tokenizer: use it with --task toy")
    import data  # dataset names are checked here, before any model or data is loaded
    if cfg.task == "math" and cfg.dataset not in data.NAMES:
        problems.append(f"--dataset {cfg.dataset!r}: use one of {', '.join(data.NAMES)}")
    if cfg.eval_every < 0 or cfg.eval_limit < 0 or cfg.eval_samples < 1 or cfg.eval_temperature < 0:
        problems.append("--eval-every and --eval-limit must be >= 0, --eval-samples >= 1, --eval-temperature >= 0")
    if cfg.eval_every and (cfg.task != "math" or cfg.eval_bench not in data.NAMES):
        problems.append(f"--eval-every needs --task math and an --eval-bench among {', '.join(data.NAMES)} "
                        f"(got --task {cfg.task}, --eval-bench {cfg.eval_bench!r})")
    if cfg.adapter not in adapters.ADAPTERS:
        problems.append(f"--adapter {cfg.adapter!r}: use one of {', '.join(adapters.ADAPTERS)}")
    if cfg.steer_at not in adapters.STEER_AT:
        problems.append(f"--steer-at {cfg.steer_at!r}: use one of {', '.join(adapters.STEER_AT)}")
    if cfg.lora_rank < 1 or cfg.lora_alpha < 0:
        problems.append(f"--lora-rank {cfg.lora_rank} / --lora-alpha {cfg.lora_alpha}: rank >= 1, alpha >= 0")
    if cfg.adapter == "full" and cfg.layers:
        problems.append("--layers: full fine-tuning trains every layer (leave --layers empty)")
    if cfg.collective_timeout <= 0:
        problems.append(f"--collective-timeout {cfg.collective_timeout}: must be > 0 seconds")
    if problems:
        raise SystemExit("config error: " + "; ".join(problems))

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
    stats: Callable[[], dict] = dict  # running counters of the reward (math: the RewardPool's)

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
    tensors = {k: v.detach().contiguous() for k, v in net.base_weights().items()}
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


def math_task(cfg: TrainConfig, model_path, is_main: bool, dataset: str = "", split: str = "train",
              limit: int = 0) -> Task:
    """Dataset problems in the model's chat template; reward = the last \\boxed{} checked against
    the gold answer by math-verify (reward.RewardPool): +1 / -1 (--reward pm1) or 1 / 0. The
    training set by default; --eval-every builds a second one from a benchmark's test split."""
    import data
    import reward
    # the workers fork now, from a small process: before the model and CUDA take memory
    pool = reward.RewardPool(workers=cfg.reward_workers or None, timeout=cfg.reward_timeout).start()
    tok = data.Tokenizer.from_dir(cfg.tokenizer or M.resolve_checkpoint(model_path))
    dataset = dataset or cfg.dataset
    rows = data.load(dataset, split=split, data_dir=data.default_dir(cfg.data_dir))
    rows = rows[:limit] if limit else rows
    prompts, answers, skipped = [], [], 0
    for row in rows:
        tokens = tok.encode_prompt(row["problem"])
        if len(tokens) > cfg.max_prompt_len:
            skipped += 1
            continue
        prompts.append(tokens)
        answers.append(row["answer"])
    if not prompts:
        raise SystemExit(f"{dataset} ({split}): no prompt fits --max-prompt-len {cfg.max_prompt_len}")
    if is_main:
        print(f"{dataset} ({split}): {len(prompts)} prompts, {skipped} skipped (longer than "
              f"{cfg.max_prompt_len} tokens)")
    wrong = -1.0 if cfg.reward == "pm1" else 0.0

    def score(completions, prompt_indices):
        texts = [tok.decode(c, skip_special_tokens=True) for c in completions]
        rewards = pool.score_batch(texts, [answers[i] for i in prompt_indices], correct=1.0, wrong=wrong)
        return rewards, [float(r == 1.0) for r in rewards]
    return Task(prompts, answers, tok.stop_token_ids, tok.vocab_size, skipped, score, pool.close,
                lambda: dict(pool.stats))


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


@dataclass
class Rollout:
    completion: list[int]
    advantage: float
    sampler_logprobs: list[float]  # one per completion token


@dataclass
class Group:
    """A prompt and those of its rollouts that go through one shared forward."""
    prompt: list[int]
    rollouts: list[Rollout]

    def width(self) -> int:  # the completion rows' padded width in the forward (the last token is a target only)
        return max(len(r.completion) for r in self.rollouts) - 1

    def tokens(self) -> int:  # tokens forwarded: the prompt once, each completion but its last token
        return len(self.prompt) + sum(len(r.completion) - 1 for r in self.rollouts)


def as_groups(task: Task, cfg: TrainConfig, prompt_indices: list[int], completions, adv) -> list[Group]:
    """Flat prompt-major completions and their (P, N) advantages -> one Group per prompt."""
    N = cfg.rollouts
    return [Group(task.prompts[i], [Rollout(comp.tokens, a, comp.logprobs)
                                    for comp, a in zip(completions[k * N:(k + 1) * N], adv[k].tolist())])
            for k, i in enumerate(prompt_indices)]


def has_signal(group: Group) -> bool:
    return any(r.advantage != 0 for r in group.rollouts)


def refill(run, step: int, groups: list[Group]) -> tuple[list[Group], int]:
    """Dynamic sampling (DAPO): the step's prompts whose rollouts all got the same reward carry no
    signal; replace them by fresh prompts, in up to --dynamic-sampling rounds of as many draws as
    are still missing. Fresh prompts are drawn at random from the training set, seeded by (seed,
    step, rank, round), and sampled under prompt offsets past the step's own, so a resumed run draws
    the same. Groups still without signal after the last round fill the step up to its size.
    Returns (this rank's groups, the extra prompts drawn)."""
    cfg, c, task = run.cfg, run.cluster, run.task
    per_rank = len(groups)
    kept, flat, draws = [g for g in groups if has_signal(g)], [g for g in groups if not has_signal(g)], 0
    for round_ in range(cfg.dynamic_sampling):
        missing = per_rank - len(kept)
        if missing == 0:
            break
        gen = torch.Generator().manual_seed(((cfg.seed * 1_000_003 + step) * 65_537 + c.rank) * 257 + round_)
        indices = torch.randint(len(task.prompts), (missing,), generator=gen).tolist()
        completions = sample(run.sampler, task, cfg, step, indices,
                             cfg.prompts_per_step * (round_ + 1) + c.rank * per_rank)
        owners = [i for i in indices for _ in range(cfg.rollouts)]
        rewards, _ = task.reward([comp.tokens for comp in completions], owners)
        adv = rloo.advantages(torch.tensor(rewards).view(missing, cfg.rollouts))
        kept += [g for g in as_groups(task, cfg, indices, completions, adv) if has_signal(g)]
        draws += missing
    return kept + flat[:per_rank - len(kept)], draws

# -----------------------------------------------------------------------------
# The backward, with two savings that leave the gradient exactly as one forward per rollout gives:
# - a rollout whose advantage is 0 adds A * grad log pi = 0: it is not forwarded at all (the loss's
#   normaliser was counted over every rollout before, as the paper's token mean does);
# - a prompt is forwarded once for its rollouts: the completions attend to its keys and values at
#   every layer, and autograd sums their gradients through the shared prompt.


def with_signal(groups: list[Group]) -> list[Group]:
    """Only the rollouts whose gradient is not exactly zero: advantage != 0 and a completion at all."""
    kept = [Group(g.prompt, [r for r in g.rollouts if r.advantage != 0 and r.completion]) for g in groups]
    return [g for g in kept if g.rollouts]


def padded_tokens(batch: list[Group]) -> int:
    """A micro-batch's forward size: its prompts right-padded to the longest, then its completion rows."""
    return (len(batch) * max(len(g.prompt) for g in batch) +
            sum(len(g.rollouts) for g in batch) * max(g.width() for g in batch))


def micro_batches(groups: list[Group], budget: int) -> list[list[Group]]:
    """Groups packed longest first into micro-batches of at most `budget` padded tokens. A group
    bigger than the budget is cut into pieces of fewer rollouts, each forwarding the prompt again
    (still exact), down to one rollout per piece, which goes alone when even that is too big."""
    pieces = []
    for g in groups:
        per_piece = max(1, (budget - len(g.prompt)) // max(g.width(), 1))
        pieces += [Group(g.prompt, g.rollouts[i:i + per_piece]) for i in range(0, len(g.rollouts), per_piece)]
    pieces.sort(key=lambda g: len(g.prompt) + g.width(), reverse=True)
    batches, current = [], []
    for g in pieces:
        if current and padded_tokens(current + [g]) > budget:
            batches.append(current)
            current = []
        current.append(g)
    return batches + [current] if current else batches


def backward(model, batch: list[Group], cfg: TrainConfig, vocab_size, totals: dict, device):
    """Loss of one micro-batch (already divided by the step's normaliser), backpropagated into the
    adapter. Two forwards: the G prompts (right-padded), recording each layer's keys and values;
    then the R completion rows, each attending to its prompt's keys and values and causally to its
    own. Returns (loss, sum of |train log-prob - sampler log-prob| over its tokens)."""
    owner = torch.tensor([gi for gi, g in enumerate(batch) for _ in g.rollouts], device=device)  # (R,)
    rows = [r for g in batch for r in g.rollouts]
    prompt_len = torch.tensor([len(g.prompt) for g in batch], device=device)  # (G,)
    P, C = int(prompt_len.max()), max(len(r.completion) for r in rows)
    prompts = torch.zeros(len(batch), P, dtype=torch.long)  # (G, P), right-padded with id 0
    completions = torch.zeros(len(rows), C, dtype=torch.long)  # (R, C): the targets
    sampler = torch.zeros(len(rows), C)
    for gi, g in enumerate(batch):
        prompts[gi, :len(g.prompt)] = torch.tensor(g.prompt)
    for ri, r in enumerate(rows):
        completions[ri, :len(r.completion)] = torch.tensor(r.completion)
        sampler[ri, :len(r.completion)] = torch.tensor(r.sampler_logprobs)
    prompts, completions, sampler = prompts.to(device), completions.to(device), sampler.to(device)
    mask = torch.arange(C, device=device) < torch.tensor([len(r.completion) for r in rows], device=device)[:, None]

    kv = {}  # layer -> the prompts' (k, v), (G, P, KVH, D), rope applied

    def record(layer, q, k, v):
        kv[layer] = (k, v)
        return M.causal_attention(layer, q, k, v)
    prompt_hidden = model.hidden_states(prompts, attend=record)  # (G, P, d)
    hidden = prompt_hidden[owner, prompt_len[owner] - 1][:, None]  # (R, 1, d): predicts each first token
    if C > 1:
        own = torch.ones(C - 1, C - 1, dtype=torch.bool, device=device).tril()  # (C-1, C-1) causal
        sees_prompt = (torch.arange(P, device=device) < prompt_len[owner][:, None])[:, None, :]  # (R, 1, P)
        allowed = torch.cat((sees_prompt.expand(-1, C - 1, -1), own.expand(len(rows), -1, -1)), 2)[:, None]

        def after_prompt(layer, q, k, v):  # q (R, T, H, D), k/v (R, T, KVH, D) -> (R, T, H, D)
            pk, pv = kv[layer]
            k, v = torch.cat((pk[owner], k), 1), torch.cat((pv[owner], v), 1)  # (R, P + T, KVH, D)
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 attn_mask=allowed, enable_gqa=True)
            return out.transpose(1, 2)
        positions = prompt_len[owner][:, None] + torch.arange(C - 1, device=device)  # (R, C-1)
        rest = model.hidden_states(completions[:, :-1], positions, attend=after_prompt)  # (R, C-1, d)
        hidden = torch.cat((hidden, rest), 1)  # (R, C, d): position t predicts completion token t
    # the head runs on completion tokens only: padding rows need no logits
    picked = M.chunked_logprobs(hidden[mask], model.head_weight, completions[mask], cfg.temperature, vocab_size)
    logprobs = torch.zeros(mask.shape, dtype=picked.dtype, device=device)
    logprobs[mask] = picked  # (R, C)
    adv = torch.tensor([r.advantage for r in rows], device=device)
    weights = rloo.truncated_is_weights(logprobs, sampler, cfg.tis_cap) if cfg.tis_cap else None
    loss = rloo.policy_loss(logprobs, mask, adv, cfg.loss_norm, **totals, weights=weights)
    if torch.isfinite(loss):
        loss.backward()
    return loss.detach(), (picked.detach() - sampler[mask]).abs().sum()

@dataclass
class BackwardRecord:
    """What accumulate_gradient did: the summed loss and |log-prob gap| (over `tokens` completion
    tokens), the tokens it forwarded, the micro-batches it took, whether some loss was non-finite,
    and the budget it ended with after halving on OOM."""
    loss: float
    gap: float
    gap_tokens: int
    forwarded_tokens: int
    micro_batches: int
    bad_loss: bool
    budget: int
    oom_retries: int


def accumulate_gradient(model, groups: list[Group], cfg: TrainConfig, vocab_size, totals: dict, device,
                        budget: int) -> BackwardRecord:
    """Backward over micro-batches of at most `budget` padded tokens into the adapter's zeroed
    gradient buffer. `groups` hold only rollouts with signal (with_signal); none at all is a zero
    gradient.
    Out of GPU memory in a micro-batch: free what it held, halve the budget and redo the whole
    step's backward (the gradient is the same sum, only grouped differently); below one prompt and
    one completion, give up with the numbers."""
    longest = max((len(g.prompt) + g.width() for g in groups), default=0)
    retries = 0
    while True:
        model.reset_grads()
        loss, gap, bad_loss = 0.0, 0.0, False
        batches = micro_batches(groups, budget)
        try:
            for batch in batches:
                mb_loss, mb_gap = backward(model, batch, cfg, vocab_size, totals, device)
                bad_loss |= not bool(torch.isfinite(mb_loss))
                loss += mb_loss.item()
                gap += mb_gap.item()
            return BackwardRecord(loss, gap, sum(len(r.completion) for g in groups for r in g.rollouts),
                                  sum(g.tokens() for b in batches for g in b), len(batches), bad_loss, budget, retries)
        except torch.OutOfMemoryError:
            pass  # outside the handler, so the traceback's frames (and the tensors they hold) are gone
        if budget <= longest:
            raise cluster.RankError(f"out of memory in the backward of a single {longest}-token sequence "
                             f"(--micro-batch-tokens now {budget}): lower --max-len, or turn on "
                             "--activation-checkpointing")
        budget, retries = max(budget // 2, longest), retries + 1
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"out of memory in a backward micro-batch: retrying the step's backward with "
              f"--micro-batch-tokens {budget}", file=sys.stderr, flush=True)


def reduce_and_step(model, optimizer, cfg: TrainConfig, lr: float, bad_loss: bool) -> tuple[float, bool]:
    """Sum the adapter's gradients over ranks (the one all-reduce of the step: every trainable
    gradient lives in one flat fp32 buffer, L x d floats for steering), then clip and take the
    AdamW step, and let the model refresh the weights its forward reads (full fine-tuning in 16
    bits: the fp32 masters copied in place). A non-finite loss or gradient on any rank skips the
    update on every rank: a rank with a bad loss poisons its gradient with NaN, which the sum
    carries everywhere. Returns (global gradient norm before clipping, skipped)."""
    grad = model.grad_buffer
    if bad_loss:
        grad.fill_(float("nan"))
    dist.all_reduce(grad)  # SUM: the loss is already divided by the whole step's normaliser
    grad_norm = grad.norm().item()
    if not math.isfinite(grad_norm):
        grad.zero_()
        return grad_norm, True
    if cfg.grad_clip > 0:
        grad.mul_(min(1.0, cfg.grad_clip / (grad_norm + 1e-6)))  # clip_grad_norm_'s rule, on the one buffer
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    model.trainable_to_weights()
    return grad_norm, False


def ranks_divergence(model) -> float:
    """Largest |trainable - rank 0's| over ranks and tensors: 0.0 when every rank holds the same
    adapter, as identical gradients and optimizer states guarantee. Checked at checkpoints."""
    diff = torch.zeros(1, dtype=torch.float64, device=model.grad_buffer.device)
    for p in model.trainable_parameters():
        ref = p.detach().clone()
        dist.broadcast(ref, src=0)
        diff = torch.maximum(diff, (p.detach() - ref).abs().max().double().reshape(1))
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return diff.item()


# -----------------------------------------------------------------------------
# Checkpoints: everything needed to continue exactly, in one file renamed into place.


def atomic_write_text(path: Path, text: str):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(run_dir: Path, model, optimizer, cfg: TrainConfig, step: int, epoch: int, offset: int,
                    skipped_steps: int, data_fingerprint: str, snapshot=None):
    """The adapter file: {kind}-step{N}.safetensors (the history: a few KB each for steering) and
    {kind}.safetensors (the latest, the file eval.py reads; full fine-tuning: the folder full/, no
    history: each would be a whole model), then checkpoint.pt: the checkpoint is the commit point,
    and resuming reads nothing else. A full or unwritable disk stops the run with the path named;
    every file is renamed into place only once complete, so the previous checkpoint stays intact.
    With a `snapshot` (StopSignals) the trainable state comes from that CPU copy, not the live model:
    nothing here then touches the device."""
    kind = model.adapter.kind
    if snapshot is not None:
        names = [name for name, _ in model.adapter.named_parameters()]  # steering / LoRA: trainable() order
        tensors, trainable, optimizer_state = dict(zip(names, snapshot.trainable)), snapshot.trainable, snapshot.optimizer
    else:
        tensors, optimizer_state = None, optimizer.state_dict()
        trainable = [p.detach().cpu().clone() for p in model.trainable_parameters()]
    target = run_dir / "checkpoint.pt"
    try:
        names = ["full"] if kind == "full" else [f"{kind}-step{step}.safetensors", f"{kind}.safetensors"]
        for name in names:
            target = run_dir / name
            model.save_adapter(target, tensors, step=step, task=cfg.task, dataset=cfg.dataset)
        state = dict(step=step, epoch=epoch, offset=offset, skipped_steps=skipped_steps, data=data_fingerprint,
                     trainable=trainable, optimizer=optimizer_state, config=asdict(cfg))
        tmp = run_dir / "checkpoint.pt.tmp"
        target = tmp
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, run_dir / "checkpoint.pt")
    except OSError as e:
        for leftover in run_dir.glob("*.tmp"):
            leftover.unlink(missing_ok=True)
        raise SystemExit(f"checkpoint of step {step} could not be written to {getattr(e, 'filename', None) or target} "
                         f"({e.strerror or e}); the previous checkpoint in {run_dir} is intact: free space or fix "
                         "permissions, then re-run the same command to continue from it") from None


def load_checkpoint(run_dir: Path) -> dict | None:
    path = run_dir / "checkpoint.pt"  # a leftover checkpoint.pt.tmp is an interrupted write: ignored
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise SystemExit(f"{path}: unreadable checkpoint ({type(e).__name__}: {e})") from None


RUN_DIR_FIELDS = ("out_dir", "resume")  # where a run lives, not what it computes


def config_differences(saved: dict, cfg: TrainConfig) -> list[str]:
    """The fields (other than the run directory's) on which a saved config.json and `cfg` differ."""
    mine = asdict(cfg)
    return [f"--{k.replace('_', '-')} {saved.get(k)!r} (saved) != {mine[k]!r} (given)"
            for k in mine if k not in RUN_DIR_FIELDS and saved.get(k) != mine[k]]


def prepare_run_dir(cfg: TrainConfig) -> tuple[Path, dict | None]:
    """Rank 0: the run directory and the checkpoint to continue from, if any. A directory that
    holds a run of the same config continues it (a re-run of the same command, a torchrun restart,
    a scheduler requeue); one that holds anything else is refused. metrics.jsonl is cut back to
    the checkpoint's step, so the lines a killed run wrote after its last checkpoint are replaced,
    not duplicated."""
    run_dir = Path(cfg.resume or cfg.out_dir or default_run_dir(cfg))
    config_file = run_dir / "config.json"
    if not cfg.resume and config_file.is_file():
        try:
            saved = json.loads(config_file.read_text())
        except json.JSONDecodeError as e:
            raise SystemExit(f"{config_file}: not valid JSON ({e}); choose another --out-dir") from None
        differ = config_differences(saved, cfg)
        if differ and (run_dir / "checkpoint.pt").is_file():
            raise SystemExit(f"run directory {run_dir} holds a run with another config ({'; '.join(differ)}): "
                             "re-run it with its own flags (or --resume it), or choose another --out-dir")
        if differ:  # no checkpoint, nothing to protect: a run that failed at startup, started again fixed
            print(f"{run_dir}: no checkpoint yet; starting it again with the new config ({'; '.join(differ)})")
            config_file.unlink()
    elif not cfg.resume and run_dir.exists() and any(run_dir.iterdir()):
        raise SystemExit(f"run directory {run_dir} exists, is not empty and holds no config.json: "
                         "choose another --out-dir")
    cfg.out_dir = str(run_dir)
    if not config_file.is_file():  # a new run
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        atomic_write_text(config_file, json.dumps(asdict(cfg), indent=2))
        return run_dir, None
    state = load_checkpoint(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        kept = [ln for ln in metrics.read_text().splitlines() if state and metrics_step(ln) <= state["step"]]
        atomic_write_text(metrics, "".join(ln + "\n" for ln in kept))
    return run_dir, state


def metrics_step(line: str) -> float:
    """The step of a metrics.jsonl line; a torn last line (a crash mid-write) counts as past every checkpoint."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def default_run_dir(cfg: TrainConfig) -> str:
    """runs/<task>-<time>; under torchrun the elastic run id instead of the time, so that a torchrun
    restart (--max-restarts) finds the directory it began."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    return f"runs/{cfg.task}-{run_id if run_id != 'none' else time.strftime('%Y%m%d-%H%M%S')}"

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
    micro_batch_tokens: int  # the backward's budget: --micro-batch-tokens, halved by each OOM
    eval_task: Task | None = None  # the --eval-every benchmark


def setup(cfg: TrainConfig, c: cluster.Cluster) -> Run:
    decision = None  # the run directory and resume state are decided once, by rank 0, and shared
    if c.is_main:
        try:
            decision = prepare_run_dir(cfg)
        except SystemExit as e:
            decision = e
    # only the decision crosses ranks (the checkpoint of a full fine-tune is 12 bytes per weight):
    # every rank then reads checkpoint.pt itself, from the run directory's shared filesystem
    decision = cluster.broadcast(decision if not isinstance(decision, tuple) else
                                 (decision[0], decision[1] is not None), c)
    if isinstance(decision, SystemExit):
        raise decision
    run_dir, resuming = decision
    state = load_checkpoint(run_dir) if resuming else None
    cfg.out_dir = str(run_dir)

    model_path = cfg.model
    if cfg.model == "random-tiny":
        model_path = run_dir / "model"
        if c.is_main and not (model_path / "model.safetensors").is_file():
            build_tiny_model(model_path, cfg)
        dist.barrier()  # (several nodes need the run directory on a shared filesystem here)
    task = TASKS[cfg.task](cfg, model_path, c.is_main)  # before the model: reward workers fork small
    eval_task = (math_task(cfg, model_path, c.is_main, cfg.eval_bench, "test", cfg.eval_limit)
                 if cfg.eval_every else None)
    # everything that can be checked without the model is checked before it loads
    P = cfg.prompts_per_step
    steps_per_epoch = len(task.prompts) // P
    if steps_per_epoch == 0:
        raise SystemExit(f"{len(task.prompts)} prompts do not fill one step of --prompts-per-step {P}")
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    start, skipped_steps = 0, 0
    if state is not None:
        start, skipped_steps = state["step"], state["skipped_steps"]
        if state["data"] != task.fingerprint():
            raise SystemExit(f"{run_dir}/checkpoint.pt: the training prompts differ from the ones the run began "
                             "with (dataset, data dir, tokenizer or template changed?)")
        if (state["epoch"], state["offset"]) != step_position(start, steps_per_epoch, P):
            raise SystemExit(f"{run_dir}/checkpoint.pt: data position {(state['epoch'], state['offset'])} does not "
                             f"match step {start} (the dataset changed since the run began?)")
    all_prompts = task.prompts + (eval_task.prompts if eval_task else [])
    longest = min(cfg.max_len, max(map(len, all_prompts)) + (cfg.max_new_tokens or cfg.max_len))
    if cfg.kv_cache_tokens and cfg.kv_cache_tokens < longest:  # (the memory plan checks the rest)
        raise SystemExit(f"--kv-cache-tokens {cfg.kv_cache_tokens} cannot hold one sequence of {longest} tokens "
                         "(longest prompt + completion budget): raise it, or lower --max-len")

    config = M.Config.from_json(M.resolve_checkpoint(model_path) / "config.json")
    adapters.parse_layers(cfg.layers, config.num_layers)  # an out-of-range --layers is refused before the model loads

    dtype = M.auto_dtype(c.device) if cfg.dtype == "auto" else cfg.dtype
    available = memory.available_bytes(c.device)  # before the weights load: the plan counts them
    model = M.Transformer.from_pretrained(model_path, dtype=dtype, device=c.device)
    torch.manual_seed(cfg.seed)  # LoRA's random A: the same on every rank, and in every run of this seed
    model.set_adapter(cfg.adapter, layers=cfg.layers, steer_at=cfg.steer_at, lora_rank=cfg.lora_rank,
                      lora_alpha=cfg.lora_alpha or None)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if c.device.type == "cpu" else 1  # ranks sharing the RAM
    try:
        plan = memory.plan(config, dtype, c.device, available=available, adapter=cfg.adapter,
                           trainable=sum(p.numel() for p in model.trainable_parameters()),
                           sequences=P // c.world * cfg.rollouts, longest=longest,
                           micro_batch_tokens=cfg.micro_batch_tokens or None, recompute=cfg.activation_checkpointing,
                           kv_cache_tokens=cfg.kv_cache_tokens or None, gpu_memory_fraction=cfg.gpu_memory_fraction,
                           share=local)
    except memory.MemoryPlanError as e:
        raise SystemExit(str(e)) from None
    model.checkpoint_blocks = plan.recompute
    if c.is_main:
        print(f"{model_path}: {dtype}, adapter {cfg.adapter} ({model.num_trainable():,} trainable numbers)")
        print(plan.summary())
        atomic_write_text(run_dir / "memory_plan.json", plan.to_json())
    model.reset_grads()  # the flat gradient buffer exists from here on (metrics and collectives read it)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if state is not None:
        with torch.no_grad():  # in place: the sampler's CUDA graphs hold these tensors
            for p, saved in zip(model.trainable_parameters(), state["trainable"], strict=True):
                p.copy_(saved)
        model.trainable_to_weights()
        optimizer.load_state_dict(state["optimizer"])
        if c.is_main and start < total_steps:
            print(f"resuming {run_dir} at step {start}/{total_steps}")
    elif c.is_main and (run_dir / "metrics.jsonl").is_file():
        print(f"restarting {run_dir} from step 0 (it holds no checkpoint yet)")

    sampler = Sampler(model, kv_cache_tokens=plan.kv_cache_tokens, vocab_size=task.vocab_size, max_seq_len=longest)
    return Run(cfg, c, run_dir, task, model, optimizer, sampler, steps_per_epoch, total_steps,
               math.ceil(cfg.warmup * total_steps), start, skipped_steps, plan.micro_batch_tokens, eval_task)


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

    groups = as_groups(task, cfg, prompt_indices, completions, adv)
    draws = 0
    if cfg.dynamic_sampling:
        groups, draws = refill(run, step, groups)
    t_refill = time.perf_counter()

    lengths = [len(comp.tokens) for comp in completions]
    count = torch.tensor([float(sum(len(r.completion) for g in groups for r in g.rollouts))], dtype=torch.float64,
                         device=c.device)
    dist.all_reduce(count)  # the loss divides by the whole step's completion tokens
    totals = dict(total_sequences=P * cfg.rollouts, max_completion_len=cfg.max_new_tokens or cfg.max_len,
                  total_tokens=max(count.item(), 1.0))
    grad = accumulate_gradient(run.model, with_signal(groups), cfg, task.vocab_size, totals, c.device,
                               run.micro_batch_tokens)
    run.micro_batch_tokens = grad.budget  # a budget halved on OOM stays halved for the rest of the run
    lr = cfg.lr * min(1.0, (step + 1) / run.warmup_steps) if run.warmup_steps else cfg.lr
    grad_norm, skipped = reduce_and_step(run.model, run.optimizer, cfg, lr, grad.bad_loss)
    run.skipped_steps += skipped
    sync(c.device)
    t3 = time.perf_counter()

    pool = task.stats()  # this rank's reward workers, since the run began (summed over ranks below)
    sums, top = cluster.reduce_metrics(
        dict(reward=sum(rewards), correct=sum(correct), rollouts=len(rewards), tokens=sum(lengths),
             reward_timeouts=pool.get("timeouts", 0), reward_crashes=pool.get("crashes", 0),
             reward_workers_replaced=pool.get("replaced", 0), reward_workers_recycled=pool.get("recycled", 0),
             truncated=sum(comp.finish_reason == "length" for comp in completions), adv_abs=adv.abs().sum().item(),
             adv_sq=adv.pow(2).sum().item(), zero_adv_prompts=(adv == 0).all(1).sum().item(), loss=grad.loss,
             gap=grad.gap, gap_tokens=grad.gap_tokens, oom_retries=grad.oom_retries,
             forwarded=grad.forwarded_tokens, naive=sum(len(g.prompt) + len(r.completion) - 1
                                                       for g in groups for r in g.rollouts),
             dynamic_draws=draws, signal_prompts=sum(map(has_signal, groups))),
        dict(completion_len=max(lengths), sample_s=t1 - t0, reward_s=t2 - t1, refill_s=t_refill - t2,
             train_s=t3 - t_refill), c.device)
    n = sums["rollouts"]
    return dict(step=step + 1, epoch=epoch, lr=lr, reward_mean=sums["reward"] / n, accuracy=sums["correct"] / n,
                adv_abs_mean=sums["adv_abs"] / n, adv_std=math.sqrt(max(sums["adv_sq"] / n, 0.0)),
                zero_adv_prompts=sums["zero_adv_prompts"] / P, completion_len_mean=sums["tokens"] / n,
                completion_len_max=int(top["completion_len"]), truncated_frac=sums["truncated"] / n,
                loss=sums["loss"], logprob_gap=sums["gap"] / max(sums["gap_tokens"], 1.0), sample_s=top["sample_s"],
                reward_s=top["reward_s"], train_s=top["train_s"], step_s=time.perf_counter() - t0,
                tokens_per_s=sums["tokens"] / max(top["sample_s"], 1e-9), grad_norm=grad_norm,
                **adapter_metrics(run.model),
                backward_tokens=int(sums["forwarded"]), backward_tokens_naive=int(sums["naive"]),
                signal_prompts=sums["signal_prompts"] / P,
                **(dict(dynamic_draws=int(sums["dynamic_draws"]), refill_s=top["refill_s"]) if cfg.dynamic_sampling
                   else {}),
                micro_batches=grad.micro_batches, oom_retries=int(sums["oom_retries"]),
                micro_batch_tokens=run.micro_batch_tokens, skipped=skipped, skipped_steps=run.skipped_steps,
                **{k: int(sums[k]) for k in ("reward_timeouts", "reward_crashes", "reward_workers_replaced",
                                             "reward_workers_recycled")},
                skipped_prompts=task.skipped_prompts)


def evaluate(run: Run) -> dict:
    """--eval-every: the benchmark's problems on the live model with the training sampler (no
    reload, no copy: the vector being trained is the one evaluated). Ranks take contiguous shares
    of the problems (prompt_offset keeps the draws independent of the world size) and add up."""
    cfg, c, task = run.cfg, run.cluster, run.eval_task
    t0 = time.perf_counter()
    share = math.ceil(len(task.prompts) / c.world)
    indices = list(range(len(task.prompts)))[c.rank * share:][:share]
    prompts = [task.prompts[i] for i in indices]
    budgets = [min(cfg.max_new_tokens or cfg.max_len, cfg.max_len - len(p)) for p in prompts]
    groups = run.sampler.generate(prompts, n=cfg.eval_samples, max_new_tokens=budgets,
                                  temperature=cfg.eval_temperature, stop_token_ids=task.stop_token_ids,
                                  seed=cfg.seed, prompt_offset=c.rank * share) if prompts else []
    flat = [comp for group in groups for comp in group]
    owners = [i for i in indices for _ in range(cfg.eval_samples)]
    _, correct = task.reward([comp.tokens for comp in flat], owners) if flat else ([], [])
    sums, _ = cluster.reduce_metrics(
        dict(correct=sum(correct), samples=len(flat), tokens=sum(len(comp.tokens) for comp in flat),
             truncated=sum(comp.finish_reason == "length" for comp in flat)), {}, c.device)
    n = max(sums["samples"], 1.0)
    return dict(eval_bench=cfg.eval_bench, eval_problems=len(task.prompts), eval_accuracy=sums["correct"] / n,
                eval_len_mean=sums["tokens"] / n, eval_truncated_frac=sums["truncated"] / n,
                eval_s=time.perf_counter() - t0)


def adapter_metrics(model) -> dict:
    """What trains and what crossed ranks; per-layer vector norms for steering (length L)."""
    buf = model.grad_buffer
    out = dict(trainable_params=model.num_trainable(), bytes_allreduced=buf.numel() * buf.element_size())
    if model.adapter.kind == "steering":
        out["steering_norm"] = model.steering.detach().norm(dim=1).tolist()
    return out


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def log_line(m: dict) -> str:
    return (f"step {m['step']} reward {m['reward_mean']:+.3f} acc {m['accuracy']:.3f} "
            f"len {m['completion_len_mean']:.0f} trunc {m['truncated_frac']:.2f} | {m['step_s']:.1f}s "
            f"(sample {m['sample_s']:.1f} reward {m['reward_s']:.1f} train {m['train_s']:.1f}) "
            f"{m['tokens_per_s']:.0f} tok/s" + (" SKIPPED" if m["skipped"] else ""))

# -----------------------------------------------------------------------------
# Stopping: SIGTERM (schedulers before pre-emption, torchrun when a peer failed) and SIGINT
# (Ctrl-C) end the run in a checkpoint of its last completed step.


@dataclass
class Snapshot:
    """The trainable state as of a completed step, on the CPU (what a signal's checkpoint writes)."""
    step: int
    trainable: list  # CPU copies, in model.trainable_parameters() order
    optimizer: dict  # AdamW's state_dict with CPU tensors
    skipped_steps: int


def to_cpu(obj):
    """A copy of a (nested) state dict with every tensor on the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return copy.deepcopy(obj)


class StopSignals:
    """At the start of every step the trainable state (the vector and AdamW's moments: a few
    hundred KB for steering) is copied to the CPU. A signal then writes the checkpoint of the last
    completed step from that copy at once, without waiting for the step in flight (its sampling
    may take minutes), and exits 128 + signal: re-running the same command continues from there,
    exactly as if never stopped. Every rank gets the signal (torchrun forwards it; schedulers
    signal the whole job) and they all hold the same state, so rank 0 writes and all exit.

    The writing happens on a watcher thread woken through signal.set_wakeup_fd, not in a Python
    signal handler: those run only when the main thread returns to the interpreter, and the main
    thread may be blocked for minutes inside a collective (waiting for a peer that already exited)
    or a CUDA sync. The watcher touches no device memory (the copy is on the CPU), so a stuck
    stream cannot stall it. A checkpoint being written when the signal comes is finished first
    (one lock).

    Full fine-tuning is too big to copy every step (3x the model in fp32): there the signal is
    noted, the step in flight completes, and all ranks agree (one all-reduce per step) to
    checkpoint it and exit."""
    SNAPSHOT_LIMIT = 1 << 26  # trainable numbers up to which a per-step copy is cheap (steering, LoRA)

    def __init__(self, run: Run):
        self.run = run
        self.snapshot: Snapshot | None = None
        self.saved_step = run.start  # the step the checkpoint on disk holds
        self.lock = threading.Lock()  # held while a checkpoint is written
        self.requested = 0  # deferred mode: the signal that came
        self.deferred = run.model.num_trainable() > self.SNAPSHOT_LIMIT
        self.wake_read, wake_write = socket.socketpair()
        wake_write.setblocking(False)
        signal.set_wakeup_fd(wake_write.fileno(), warn_on_full_buffer=False)
        self.wake_write = wake_write  # (kept alive: its descriptor is the wakeup fd)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: None)  # the watcher acts; the interpreter must not die
        threading.Thread(target=self.watch, name="stop-signals", daemon=True).start()

    def take_snapshot(self, step: int):
        run = self.run
        if not self.deferred:
            self.snapshot = Snapshot(step, [to_cpu(p) for p in run.model.trainable_parameters()],
                                     to_cpu(run.optimizer.state_dict()), run.skipped_steps)

    def watch(self):
        while True:
            signum = self.wake_read.recv(1)[0]
            if signum in (signal.SIGTERM, signal.SIGINT):
                break
        if self.deferred:
            self.requested = signum  # stop_after, on the main thread, does the rest
        else:
            self.exit(signum)

    def stop_after(self, step: int):
        """Deferred mode, after each step: if any rank got a signal, checkpoint `step` and exit."""
        if not self.deferred:
            return
        flag = torch.tensor([float(self.requested)], device=self.run.model.grad_buffer.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            if self.saved_step != step:
                self.checkpoint(step)
            self.exit(int(flag.item()))

    def checkpoint(self, step: int):
        """The regular checkpoint after `step` completed steps (rank 0 writes, every rank waits)."""
        run = self.run
        with self.lock:
            if run.cluster.is_main:
                save_checkpoint(run.run_dir, run.model, run.optimizer, run.cfg, step,
                                *step_position(step, run.steps_per_epoch, run.cfg.prompts_per_step),
                                run.skipped_steps, run.task.fingerprint())
            self.saved_step = step
        dist.barrier()  # nobody runs ahead of a checkpoint that may still be written

    def exit(self, signum: int):
        run, name = self.run, signal.Signals(signum).name
        with self.lock:  # a checkpoint in progress is completed first
            snap = self.snapshot
            if run.cluster.is_main and snap is not None and snap.step > self.saved_step:
                save_checkpoint(run.run_dir, run.model, run.optimizer, run.cfg, snap.step,
                                *step_position(snap.step, run.steps_per_epoch, run.cfg.prompts_per_step),
                                snap.skipped_steps, run.task.fingerprint(), snapshot=snap)
                self.saved_step = snap.step
            if run.cluster.is_main:
                print(f"{name}: stopped; {run.run_dir}/checkpoint.pt holds step {self.saved_step}: re-run the "
                      "same command to continue", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(128 + signum)  # not SystemExit: peers and gloo threads may be mid-collective


class Tracker:
    """--wandb-project: the config once, then every step's numbers (rank 0 only)."""

    def __init__(self, cfg: TrainConfig, run_dir: Path):
        import wandb  # optional: only when asked for
        run_id = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]  # a resumed run logs on
        self.run = wandb.init(project=cfg.wandb_project, name=run_dir.name, id=run_id, resume="allow",
                              config=asdict(cfg), dir=str(run_dir))

    def log(self, m: dict):
        numbers = {k: v for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        numbers.update({f"steering_norm/{i}": v for i, v in enumerate(m.get("steering_norm", []))})
        self.run.log(numbers, step=m["step"])

    def close(self):
        self.run.finish()


# -----------------------------------------------------------------------------
# The loop


def main(argv=None):
    cfg = parse_args(argv)
    c = cluster.init(cfg.device, cfg.collective_timeout)
    if c.device.type == "cpu":
        memory.return_freed_host_memory()  # what the memory plan assumes (see there)
    check_config(cfg, c.world)
    if cfg.wandb_project and c.is_main:
        try:
            import wandb  # noqa: F401  (checked before anything loads)
        except ImportError:
            raise SystemExit("--wandb-project needs the wandb package: pip install wandb") from None
    run = setup(cfg, c)
    if run.start >= run.total_steps:
        if c.is_main:
            print(f"{run.run_dir} is finished (step {run.start}/{run.total_steps}): nothing to do")
        run.task.close()
        cluster.close()
        return
    stops = StopSignals(run)
    tracker = Tracker(cfg, run.run_dir) if cfg.wandb_project and c.is_main else None
    metrics_file = open(run.run_dir / "metrics.jsonl", "a") if c.is_main else None

    def record(m: dict):
        if c.is_main:
            metrics_file.write(json.dumps(m) + "\n")
            metrics_file.flush()
            if tracker:
                tracker.log(m)

    if cfg.eval_every and run.start == 0:  # the base model's score: where the curve starts
        record(dict(step=0, **evaluate(run)))
    # a bar on a terminal; on a log file (not a tty) one plain line per step
    bar = tqdm(total=run.total_steps, initial=run.start, unit="step", file=sys.stdout,
               disable=not (c.is_main and sys.stdout.isatty()))
    for step in range(run.start, run.total_steps):
        stops.take_snapshot(step)
        m = rl_step(run, step)
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0:
            m.update(evaluate(run))
        checkpoint_now = (step + 1) % cfg.checkpoint_every == 0 or step + 1 == run.total_steps
        m["rank_divergence"] = ranks_divergence(run.model) if checkpoint_now else None
        if m["rank_divergence"]:  # the same value on every rank (all-reduced): all stop together
            raise RuntimeError(f"step {step + 1}: the ranks' adapters differ by up to {m['rank_divergence']}")
        record(m)
        if c.is_main:
            if bar.disable:
                print(f"[{step + 1}/{run.total_steps}] " + log_line(m), flush=True)
            else:
                bar.set_postfix_str(log_line(m).split(" ", 2)[2], refresh=False)
                bar.update(1)
        if checkpoint_now:
            stops.checkpoint(step + 1)
        stops.stop_after(step + 1)
    bar.close()
    if c.is_main:
        metrics_file.close()
        if tracker:
            tracker.close()
        kind = run.model.adapter.kind
        print(f"done: {run.run_dir}/{'full' if kind == 'full' else kind + '.safetensors'}")
    run.task.close()
    if run.eval_task:
        run.eval_task.close()
    cluster.close()
    # Reference cycles can keep gloo's process group, and the work objects its threads still hold,
    # alive into interpreter shutdown, where a thread releasing a tensor needs the GIL and aborts
    # the process ("terminate called without an active exception", ~1 run in 7). Collect them now.
    gc.collect()


if __name__ == "__main__":
    cluster.run_cli(main)
