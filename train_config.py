"""train.py's configuration: every field of TrainConfig is a command-line flag (--field-name),
the defaults are the paper's Qwen2.5-Math-1.5B recipe, and PRESETS holds the paper's setups
(and the CPU demonstrations) by name. check_config refuses what cannot work before any model
or data loads.
"""
import argparse
import json
import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import adapters
import rl_task
import rloo

STREAM_PROMPTS = 8  # --layer-lr stream measures the base model's residual stream on this many training prompts


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
    layer_lr: str = _opt("uniform", "steering: uniform (every layer's vector takes the same AdamW step, the paper's) "
                         "or stream (layer l's step, decay included, times the base model's residual-stream norm "
                         "after block l over its mean across the trained layers, measured at startup on the first "
                         f"{STREAM_PROMPTS} training prompts, so that each vector moves by about the same fraction "
                         "of the stream it is added to; that stream grows ~18x over Qwen2.5-0.5B's 24 layers)")
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
    overlong_filter: bool = _opt(False, "DAPO's overlong filtering: a rollout cut by the completion budget gets no "
                                 "gradient (advantage 0) and its tokens leave the token-mean normaliser, so length "
                                 "is not punished as wrongness. Off = the paper's (truncated = wrong)")
    overlong_buffer: int = _opt(0, "DAPO's soft overlong punishment: a completion in the last B tokens of its "
                                "budget loses reward linearly with its length, down to -1 at the budget, so length "
                                "is pushed back before it truncates; the logged accuracy is not shaped. 0 = off "
                                "(the paper's)")
    tis_cap: float = _opt(0.0, "truncated importance sampling: weight each token's log-prob in the loss by "
                          "min(pi_train / pi_sampler, C), correcting the sampler/trainer gap (logprob_gap; bf16, "
                          "CUDA graphs). 0 = off (the paper's); Yao et al. use C = 2")
    epochs: int = _opt(1, "passes over the training set")
    max_steps: int = _opt(0, "stop after this many steps (0 = the epochs decide)")
    seed: int = _opt(0, "seeds the data order, the rollouts and the random-tiny model")
    lrs: str = _opt("", "train one steering vector per learning rate, side by side in one run, e.g. 1e-3,3e-3,1e-2: "
                    "each gets its own prompts, rollouts, clipped gradient, AdamW state, metrics and checkpoints "
                    "(RUN/lr<lr>-seed<seed>/), as its own run would; one sampler pass and one all-reduce serve all")
    seeds: str = _opt("", "train one steering vector per seed, side by side (as --lrs; both: one member per pair). "
                      "A member's seed orders its data and draws its rollouts; the toy task's prompts and the "
                      "random-tiny model come from --seed")
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
    out_dir: str = _opt("", "run directory (default: runs/<preset or task>-<hash of the config>, so the same "
                        "command finds it again). If it holds a run of the same config, "
                        "that run continues from its last checkpoint (so re-running a command, a torchrun restart "
                        "or a requeue resumes); a different config is refused")
    resume: str = _opt("", "continue the run in this directory from its last checkpoint (no other flag but "
                           "--log-rollouts)")
    checkpoint_every: int = _opt(50, "checkpoint every this many steps (and always at the end); each checkpoint "
                                 "also keeps its vector as steering-step{N}.safetensors")
    log_rollouts: bool = _opt(False, "append every rollout (prompt row, reward, advantage, length, text) to "
                              "rollouts.jsonl beside metrics.jsonl, one line each (rollouts-rank{R}.jsonl per rank "
                              "with several; the scheduled prompts', not --dynamic-sampling's extra draws); may be "
                              "switched on or off when a run continues")
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
    # Still no gain at 512 (12 steps at lr 3e-3: avg@4 at T = 1 18.6 -> 15.5, answers 308 -> 253 tokens):
    # a recipe, not yet a result (README, "GSM8K: no gain yet").
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
        PRESETS[f"deepscaler-{_name}" + ("" if _adapter == TrainConfig.adapter else f"-{_adapter}")] = dict(
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


def parse_args(argv=None, doc: str = __doc__) -> TrainConfig:
    """The flags given (after a --preset's defaults), or a run's saved config for --resume; `doc` is
    the --help text (train.py's own docstring)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0], epilog=doc.split("\n\n", 1)[1],
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
        others = sorted(k for k in given if k not in ("resume", "log_rollouts"))
        if others:
            parser.error(f"--resume continues a run with its saved config.json; remove {others}")
        cfg = load_config(Path(given["resume"]) / "config.json", resume=given["resume"])
        return replace(cfg, log_rollouts=given.get("log_rollouts", cfg.log_rollouts))
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


def numeric_problems(cfg: TrainConfig) -> list[tuple[str, object, str]]:
    """(field, value, the rule it breaks) for every number outside what can work: NaN and infinity
    included (a NaN compares false with everything, so each rule is written to fail on it)."""
    rules = [  # field, holds when, the rule
        ("lr", 0 < cfg.lr <= 1, "must be a number in (0, 1]: AdamW moves each trained number by about lr a step"),
        ("grad_clip", math.isfinite(cfg.grad_clip) and cfg.grad_clip >= 0, "must be a finite number >= 0 (0 = off)"),
        ("warmup", 0 <= cfg.warmup < 1, "is a fraction of the steps, in [0, 1)"),
        ("weight_decay", math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0, "must be a finite number >= 0"),
        ("temperature", math.isfinite(cfg.temperature), "must be a finite number"),
        ("prompts_per_step", cfg.prompts_per_step >= 1, "must be >= 1"),
        ("epochs", cfg.epochs >= 1, "must be >= 1 (--max-steps caps a run shorter)"),
        ("max_steps", cfg.max_steps >= 0, "must be >= 0 (0 = the epochs decide)"),
        ("max_new_tokens", cfg.max_new_tokens >= 0, "must be >= 0 (0 = what --max-len leaves)"),
        ("max_len", cfg.max_len >= 2, "must be >= 2 (a prompt token and a completion token)"),
        ("micro_batch_tokens", cfg.micro_batch_tokens == 0 or cfg.micro_batch_tokens >= cfg.max_len,
         f"must be 0 (the memory plan's) or hold one whole sequence (>= --max-len {cfg.max_len})"),
        ("kv_cache_tokens", cfg.kv_cache_tokens >= 0, "must be >= 0 (0 = the memory plan's)"),
        ("gpu_memory_fraction", 0 < cfg.gpu_memory_fraction <= 1, "is a share, in (0, 1]"),
        ("reward_timeout", math.isfinite(cfg.reward_timeout) and cfg.reward_timeout > 0, "must be a finite number > 0"),
        ("tiny_layers", cfg.tiny_layers >= 1, "must be >= 1"),
        ("tiny_dim", cfg.tiny_dim >= 8 and cfg.tiny_dim % 8 == 0, "must be a multiple of 8 (4 heads of an even size)"),
        ("tiny_vocab", cfg.tiny_vocab >= 2, "must be >= 2"),
        ("toy_prompts", cfg.toy_prompts >= 1, "must be >= 1"),
        ("toy_prompt_len", cfg.toy_prompt_len >= 1, "must be >= 1"),
    ]
    return [(name, getattr(cfg, name), rule) for name, ok, rule in rules if not ok]


@dataclass(frozen=True)
class Member:
    """One vector a run trains. A plain run trains one: the model's own adapter (vector None), in the
    run directory itself. With --lrs / --seeds each member is a row of the steering table (vector =
    its index + 1) with a folder of its own, and gets what a run of its lr and seed would."""
    name: str  # its folder in the run directory; "" for a plain run
    lr: float
    seed: int
    vector: int | None


def members(cfg: TrainConfig) -> list[Member]:
    """The run's members: (--lrs, --seeds) paired, one list repeating the other's single value."""
    if not (cfg.lrs or cfg.seeds):
        return [Member("", cfg.lr, cfg.seed, None)]
    try:
        lrs = [float(x) for x in cfg.lrs.split(",")] if cfg.lrs else [cfg.lr]
    except ValueError:
        raise ValueError(f"--lrs {cfg.lrs!r}: comma-separated learning rates") from None
    try:
        seeds = [int(x) for x in cfg.seeds.split(",")] if cfg.seeds else [cfg.seed]
    except ValueError:
        raise ValueError(f"--seeds {cfg.seeds!r}: comma-separated integer seeds") from None
    if len(lrs) > 1 and len(seeds) > 1 and len(lrs) != len(seeds):
        raise ValueError(f"--lrs gives {len(lrs)} learning rates and --seeds {len(seeds)} seeds: give as many of "
                         "each (one member per pair), or one of either")
    k = max(len(lrs), len(seeds))
    lrs, seeds = lrs * (k // len(lrs)), seeds * (k // len(seeds))
    bad = [lr for lr in lrs if not 0 < lr <= 1]
    if bad and cfg.lrs:  # (a bad --lr is --lr's error)
        raise ValueError(f"--lrs {cfg.lrs}: {bad[0]} must be a number in (0, 1]")
    out = [Member(f"lr{lr:g}-seed{seed}", lr, seed, i + 1) for i, (lr, seed) in enumerate(zip(lrs, seeds))]
    names = [m.name for m in out]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"--lrs {cfg.lrs!r} --seeds {cfg.seeds!r}: two members named {twice[0]} (the same lr and "
                         "seed, to 6 digits): each member needs its own folder")
    return out


def member_config(cfg: TrainConfig, member: Member) -> TrainConfig:
    """The config of a run that would train `member` alone (its folder's config.json): a plain
    run's own config. (With --task toy or --model random-tiny, whose prompts and model come from
    --seed, that holds for the members whose seed is --seed.)"""
    if member.vector is None:
        return cfg
    return replace(cfg, lr=member.lr, seed=member.seed, lrs="", seeds="", resume="",
                   out_dir=str(Path(cfg.out_dir) / member.name))


def check_config(cfg: TrainConfig, world: int):
    problems = [f"--{name.replace('_', '-')} {value}: {rule}" for name, value, rule in numeric_problems(cfg)]
    try:
        if len(members(cfg)) > 1 or members(cfg)[0].vector is not None:
            if cfg.adapter != adapters.Steering.kind:
                problems.append(f"--lrs / --seeds train steering vectors side by side; --adapter {cfg.adapter} "
                                "trains one adapter per run")
            if cfg.dynamic_sampling:
                problems.append("--dynamic-sampling with --lrs / --seeds: not supported yet (each member would "
                                "draw its own refills); run the members as separate runs")
    except ValueError as e:
        problems.append(str(e))
    if cfg.task not in rl_task.TASKS:
        problems.append(f"--task {cfg.task!r}: use one of {sorted(rl_task.TASKS)}")
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
    if cfg.layer_lr not in ("uniform", "stream"):
        problems.append(f"--layer-lr {cfg.layer_lr!r}: use uniform or stream")
    elif cfg.layer_lr == "stream" and cfg.adapter != adapters.Steering.kind:
        problems.append(f"--layer-lr stream scales steering vectors' steps; --adapter {cfg.adapter} has none")
    if cfg.reward not in ("pm1", "01"):
        problems.append(f"--reward {cfg.reward!r}: use pm1 or 01")
    if cfg.dynamic_sampling < 0:
        problems.append(f"--dynamic-sampling {cfg.dynamic_sampling}: extra rounds per step, >= 0")
    budget = rl_task.completion_budget(0, cfg.max_new_tokens, cfg.max_len)  # the most any completion may take
    if not 0 <= cfg.overlong_buffer < budget:
        problems.append(f"--overlong-buffer {cfg.overlong_buffer}: tokens at the end of the completion budget "
                        f"({budget}), in [0, {budget})")
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
    chosen = adapters.ADAPTERS.get(cfg.adapter)
    if chosen is None:
        problems.append(f"--adapter {cfg.adapter!r}: use one of {', '.join(adapters.ADAPTERS)}")
    # each flag is checked by the adapter class it belongs to, whichever adapter trains, and --layers
    # by the one that trains (num_layers None: the model, and its layer count, are not loaded yet)
    for adapter in adapters.ADAPTERS.values():
        try:
            adapter.check_options(None, cfg.layers if adapter is chosen else None, steer_at=cfg.steer_at,
                                  lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha or None)
        except ValueError as e:
            problems.append(str(e))
    if cfg.collective_timeout <= 0:
        problems.append(f"--collective-timeout {cfg.collective_timeout}: must be > 0 seconds")
    if cfg.wandb_project:
        try:
            import wandb  # noqa: F401  (checked before anything loads)
        except ImportError:
            problems.append("--wandb-project needs the wandb package: pip install wandb")
    if problems:
        raise SystemExit("config error: " + "; ".join(problems))
