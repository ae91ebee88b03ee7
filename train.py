"""Train one steering vector per layer with RLOO while every base weight stays frozen (or, for the
paper's baselines, LoRA on down_proj or every weight: --adapter).

    torchrun --nproc_per_node=8 train.py --model Qwen/Qwen2.5-Math-1.5B     # the paper's hyperparameters
    python train.py --quickstart                                            # CPU, no download, < 1 min

One step, on every rank:

    prompts of the step  --split by rank-->  this rank's prompts (a prompt's N rollouts stay together)
    sample N rollouts per prompt with sample.Sampler on the live model (its adapter included)
    task.reward of each rollout (math: math-verify on the boxed answer; toy: a token count), RLOO advantages
    loss = rloo.policy_loss over micro-batches of the rollouts with signal, each prompt forwarded once
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

Several vectors at once (--lrs 1e-3,3e-3 / --seeds 0,1): every member of the run does all of the
above with its own prompts and seed, its own row of the steering table in the same sampler call
and backward, its own slice of the one all-reduced buffer, clip and AdamW param group, and writes
its own folder: what a run of it alone would compute and write.

Around the method: train_config.py (flags, presets, checks), rl_task.py (prompts, rewards, the one
evaluation), run_lifecycle.py (run directory, checkpoints, resume, signals, metrics): re-running
the same command continues a run.
"""
import functools
import gc
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import adapters
import cluster
import memory
import model as M
import rloo
from rl_task import TASKS, Task, completion_budget, eval_task
from run_lifecycle import (RolloutLog, RunLog, StopSignals, Tracker, check_resume, open_run, restore, run_model,
                           save_checkpoint, step_metrics, write_text)
from rollout_groups import Group, as_groups, has_signal, micro_batches, padded_tokens, refill, with_signal
from sample import Sampler
from train_config import STREAM_PROMPTS, Member, TrainConfig, check_config, member_config, members, parse_args

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


def sample(sampler, task: Task, cfg: TrainConfig, step: int, work: list[tuple[Member, list[int]]], rank_offset: int):
    """N rollouts of each of this rank's prompts of each member, flat and prompt-major per member,
    all in one sampler call (each member's prompts under its row of the steering table). The sampler
    hashes each random draw from (seed, prompt index, rollout, position): with the member's step
    seed and this rank's offset into the step, a prompt gets the same rollouts whatever the number
    of ranks or members (exactly on CPU; on GPU up to float rounding, which batch composition
    changes). Each prompt has its own budget: max_len - its length, or max_new_tokens when smaller."""
    prompts, seeds, ids, vectors = [], [], [], []
    for member, indices in work:
        prompts += [task.prompts[i] for i in indices]
        seeds += [(member.seed << 32) + step] * len(indices)
        ids += range(rank_offset, rank_offset + len(indices))
        vectors += [member.vector] * len(indices)
    budgets = [completion_budget(len(p), cfg.max_new_tokens, cfg.max_len) for p in prompts]
    groups = sampler.generate(prompts, n=cfg.rollouts, max_new_tokens=budgets, temperature=cfg.temperature,
                              top_p=cfg.top_p, stop_token_ids=task.stop_token_ids, seed=seeds, prompt_ids=ids,
                              vectors=None if vectors[0] is None else vectors)
    out, start = [], 0
    for _, indices in work:
        out.append([c for group in groups[start:start + len(indices)] for c in group])
        start += len(indices)
    return out


def rewards_of(task: Task, cfg: TrainConfig, completions, owners: list[int]) -> tuple[list[float], list[float]]:
    """The task's rewards and correctness (1 / 0) of the completions (owners: each one's prompt index),
    the rewards shaped by --overlong-buffer's length penalty (the correctness is not)."""
    rewards, correct = task.reward([comp.tokens for comp in completions], owners)
    if cfg.overlong_buffer:
        budgets = [completion_budget(len(task.prompts[i]), cfg.max_new_tokens, cfg.max_len) for i in owners]
        rewards = [r + rloo.overlong_penalty(len(comp.tokens), b, cfg.overlong_buffer)
                   for r, comp, b in zip(rewards, completions, budgets, strict=True)]
    return rewards, correct


def fresh_groups(run, step: int, round_: int, missing: int) -> list[Group]:
    """--dynamic-sampling's draws (rollout_groups.refill): `missing` prompts at random from the
    training set, seeded by (seed, step, rank, round) and sampled under prompt offsets past the
    step's own, so a resumed run draws the same; rewarded, with their advantages."""
    cfg, c, task = run.cfg, run.cluster, run.task
    gen = torch.Generator().manual_seed(((cfg.seed * 1_000_003 + step) * 65_537 + c.rank) * 257 + round_)
    indices = torch.randint(len(task.prompts), (missing,), generator=gen).tolist()
    offset = cfg.prompts_per_step * (round_ + 1) + c.rank * (cfg.prompts_per_step // c.world)
    completions = sample(run.sampler, task, cfg, step, [(run.members[0], indices)], offset)[0]
    rewards, _ = rewards_of(task, cfg, completions, [i for i in indices for _ in range(cfg.rollouts)])
    return as_groups([task.prompts[i] for i in indices], completions,
                     rloo.advantages(torch.tensor(rewards).view(missing, cfg.rollouts)), cfg.overlong_filter)

# -----------------------------------------------------------------------------
# The backward, with two savings that leave the gradient exactly as one forward per rollout gives:
# - a rollout whose advantage is 0 adds A * grad log pi = 0: it is not forwarded at all (the loss's
#   normaliser was counted over every rollout before, as the paper's token mean does);
# - a prompt is forwarded once for its rollouts: the completions attend to its keys and values at
#   every layer, and autograd sums their gradients through the shared prompt.


def backward(model, batch: list[Group], cfg: TrainConfig, vocab_size, totals: dict, device, vector=None):
    """Loss of one micro-batch (already divided by the step's normaliser), backpropagated into the
    adapter (`vector`: the member's row of the steering table, None: the one adapter). Two forwards:
    the G prompts (right-padded), recording each layer's keys and values; then the R completion
    rows, each attending to its prompt's keys and values and causally to its own. Returns (loss,
    sum of |train log-prob - sampler log-prob| over its tokens)."""
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
    ids = None if vector is None else torch.full((len(batch), 1), vector, device=device)  # (G, 1)
    prompt_hidden = model.hidden_states(prompts, attend=record, vector_ids=ids)  # (G, P, d)
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
        rest = model.hidden_states(completions[:, :-1], positions, attend=after_prompt,
                                   vector_ids=None if ids is None else ids[owner])  # (R, C-1, d)
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
    tokens), the tokens it forwarded (and their padded count: what the matmuls ran over), the
    micro-batches it took, whether some loss was non-finite, and the budget it ended with after
    halving on OOM."""
    loss: float
    gap: float
    gap_tokens: int
    forwarded_tokens: int
    padded_tokens: int
    micro_batches: int
    bad_loss: bool
    budget: int
    oom_retries: int


def accumulate_gradient(model, parts: list[tuple[list[Group], dict, int | None]], cfg: TrainConfig, vocab_size,
                        device, budget: int) -> list[BackwardRecord]:
    """Backward over micro-batches of at most `budget` padded tokens into the adapter's zeroed
    gradient buffer, one record per part: a member's (groups, normaliser totals, row of the table).
    The groups hold only rollouts with signal (with_signal); none at all is a zero gradient.
    Out of GPU memory in a micro-batch: free what it held, halve the budget and redo the whole
    step's backward (the gradient is the same sum, only grouped differently); below one prompt and
    one completion, give up with the numbers."""
    longest = max((len(g.prompt) + g.width() for groups, _, _ in parts for g in groups), default=0)
    retries = 0
    while True:
        model.reset_grads()
        records = []
        try:
            for groups, totals, vector in parts:
                loss, gap, bad_loss = 0.0, 0.0, False
                batches = micro_batches(groups, budget)
                for batch in batches:
                    mb_loss, mb_gap = backward(model, batch, cfg, vocab_size, totals, device, vector)
                    bad_loss |= not bool(torch.isfinite(mb_loss))
                    loss += mb_loss.item()
                    gap += mb_gap.item()
                records.append(BackwardRecord(loss, gap, sum(len(r.completion) for g in groups for r in g.rollouts),
                                              sum(g.tokens() for b in batches for g in b),
                                              sum(map(padded_tokens, batches)), len(batches), bad_loss, budget,
                                              retries))
            return records
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


def reduce_and_step(model, optimizer, cfg: TrainConfig, lrs: list[float], bad_loss: bool,
                    layer_scale: torch.Tensor | None = None) -> tuple[list[float], bool]:
    """Sum the adapter's gradients over ranks (the one all-reduce of the step: every trainable
    gradient lives in one flat fp32 buffer, L x d floats for steering, K x L x d for K members),
    then clip each member's gradient (its param group's slice of the buffer) and take the AdamW
    step at each member's lr, and let the model refresh the weights its forward reads (full
    fine-tuning in 16 bits: the fp32 masters copied in place). A non-finite loss or gradient on any
    rank skips the update on every rank: a rank with a bad loss poisons its gradient with NaN, which
    the sum carries everywhere. layer_scale (L,): --layer-lr stream's factor on each layer's step
    (each trainable tensor is one (L, d) steering table). Returns (each member's gradient norm
    before clipping, skipped)."""
    grad = model.grad_buffer
    if bad_loss:
        grad.fill_(float("nan"))
    dist.all_reduce(grad)  # SUM: the loss is already divided by the whole step's normaliser
    slices, start = [], 0
    for group in optimizer.param_groups:  # in trainable order, as the buffer is laid out
        size = sum(p.numel() for p in group["params"])
        slices.append(grad[start:start + size])
        start += size
    norms = [g.norm().item() for g in slices]
    if not all(map(math.isfinite, norms)):
        grad.zero_()
        return norms, True
    for g, norm, group, lr in zip(slices, norms, optimizer.param_groups, lrs, strict=True):
        if cfg.grad_clip > 0:
            g.mul_(min(1.0, cfg.grad_clip / (norm + 1e-6)))  # clip_grad_norm_'s rule, on the member's slice
        group["lr"] = lr
    before = [] if layer_scale is None else [(p, p.detach().clone()) for g in optimizer.param_groups
                                             for p in g["params"]]
    optimizer.step()
    with torch.no_grad():  # AdamW's step (update and decay) is proportional to lr: this is a per-layer lr
        for p, p0 in before:
            p.copy_(torch.lerp(p0, p, layer_scale[:, None]))  # p0 + (p - p0) * scale, row by row
    model.trainable_to_weights()
    return norms, False


def stream_scale(model, prompts: list[list[int]], layers) -> torch.Tensor:
    """--layer-lr stream: (L,) the base model's residual-stream norm after each block, averaged over
    the tokens of `prompts` (the first token of each left out: its attention-sink activations are
    tens of times the others'), divided by its mean over the trained `layers`. With one lr for all,
    a vector moves a few percent of the stream where the stream is small (early layers) and a
    fraction of a percent where it is large (Qwen2.5-0.5B: norm 6 after block 0, 103 after block 23)."""
    sums, tokens = torch.zeros(model.config.num_layers, dtype=torch.float64), 0

    def record(layer):
        def hook(_module, _inputs, h):  # h (1, T, d): the stream after block `layer`
            sums[layer] += h[0, 1:].float().norm(dim=-1).sum().item()
        return hook

    hooks = [block.register_forward_hook(record(i)) for i, block in enumerate(model.layers)]
    device = model.embed_tokens.weight.device
    ids = torch.zeros(1, 1, dtype=torch.long, device=device) if isinstance(model.adapter, adapters.Population) \
        else None  # a population's row 0: no vector
    saved, model.steering_scale = model.steering_scale, 0.0  # the base model's stream, whatever the vectors hold
    try:
        with torch.no_grad():
            for prompt in prompts:
                model.hidden_states(torch.tensor([prompt], device=device), vector_ids=ids)
                tokens += len(prompt) - 1
    finally:
        model.steering_scale = saved
        for hook in hooks:
            hook.remove()
    if tokens == 0:
        raise ValueError("--layer-lr stream: the probe prompts have no token after their first")
    norms = (sums / tokens).float()
    return norms / norms[list(layers)].mean()


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
    micro_batch_tokens: int  # the backward's budget: --micro-batch-tokens, halved by each OOM
    members: list[Member]  # what trains: one plain member, or a population's (--lrs / --seeds)
    eval_task: Task | None = None  # the --eval-every benchmark
    layer_scale: torch.Tensor | None = None  # --layer-lr stream: each layer's factor on its step (L,)


def setup(cfg: TrainConfig, c: cluster.Cluster) -> Run:
    run_dir, state = open_run(cfg, c)  # the run directory, and the checkpoint to continue from
    model_path = run_model(cfg, run_dir, c)
    task = TASKS[cfg.task](cfg, model_path, c.is_main)  # before the model: reward workers fork small
    evals = eval_task(cfg, model_path, c.is_main) if cfg.eval_every else None
    # everything that can be checked without the model is checked before it loads
    P = cfg.prompts_per_step
    steps_per_epoch = len(task.prompts) // P
    if steps_per_epoch == 0:
        raise SystemExit(f"{len(task.prompts)} prompts do not fill one step of --prompts-per-step {P}")
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    start = state["step"] if state else 0
    if state:
        check_resume(state, run_dir, task.fingerprint(), step_position(start, steps_per_epoch, P))
    all_prompts = task.prompts + (evals.prompts if evals else [])
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
    crew = members(cfg)
    if crew[0].vector is None:
        model.set_adapter(cfg.adapter, layers=cfg.layers, steer_at=cfg.steer_at, lora_rank=cfg.lora_rank,
                          lora_alpha=cfg.lora_alpha or None)
    else:  # a population: one steering vector per member, each its own param group (its lr, its AdamW state)
        model.set_population([m.name for m in crew], layers=cfg.layers, steer_at=cfg.steer_at)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if c.device.type == "cpu" else 1  # ranks sharing the RAM
    try:
        plan = memory.plan(config, dtype, c.device, available=available, adapter=model.adapter,
                           trainable=sum(p.numel() for p in model.trainable_parameters()),
                           sequences=P // c.world * cfg.rollouts * len(crew), longest=longest,
                           micro_batch_tokens=cfg.micro_batch_tokens or None, recompute=cfg.activation_checkpointing,
                           kv_cache_tokens=cfg.kv_cache_tokens or None, gpu_memory_fraction=cfg.gpu_memory_fraction,
                           share=local)
    except memory.MemoryPlanError as e:
        raise SystemExit(str(e)) from None
    model.checkpoint_blocks = plan.recompute
    if c.is_main:
        what = f"adapter {cfg.adapter}" if len(crew) == 1 and crew[0].vector is None else \
            f"{len(crew)} steering vectors side by side: {', '.join(m.name for m in crew)}"
        print(f"{model_path}: {dtype}, {what} ({model.num_trainable():,} trainable numbers)")
        print(plan.summary())
        write_text(run_dir / "memory_plan.json", plan.to_json())
    model.reset_grads()  # the flat gradient buffer exists from here on (metrics and collectives read it)
    params = model.trainable_parameters()
    groups = ([dict(params=params, lr=cfg.lr)] if crew[0].vector is None else
              [dict(params=[p], lr=m.lr) for p, m in zip(params, crew, strict=True)])
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    for m in crew:  # each member's folder holds what a run of it alone would: its config first
        member_dir = run_dir / m.name
        if c.is_main and (state is None or not (member_dir / "config.json").is_file()):
            member_dir.mkdir(exist_ok=True)
            write_text(member_dir / "config.json", json.dumps(asdict(member_config(cfg, m)), indent=2))
    if state is not None:
        restore(state, model, optimizer)
        if c.is_main and start < total_steps:
            print(f"resuming {run_dir} at step {start}/{total_steps}")
    elif c.is_main and any((run_dir / m.name / "metrics.jsonl").is_file() for m in crew):
        print(f"restarting {run_dir} from step 0 (it holds no checkpoint yet)")

    layer_scale = None
    if cfg.layer_lr == "stream":  # the same prompts, model and arithmetic on every rank: the same factors
        layer_scale = stream_scale(model, task.prompts[:STREAM_PROMPTS], model.adapter.layers).to(c.device)
        if c.is_main:
            print(f"--layer-lr stream: each layer's step x {', '.join(f'{x:.2f}' for x in layer_scale.tolist())}")
    sampler = Sampler(model, kv_cache_tokens=plan.kv_cache_tokens, vocab_size=task.vocab_size, max_seq_len=longest)
    return Run(cfg, c, run_dir, task, model, optimizer, sampler, steps_per_epoch, total_steps,
               math.ceil(cfg.warmup * total_steps), start, plan.micro_batch_tokens, crew, evals, layer_scale)


def rl_step(run: Run, step: int) -> tuple[list[dict], list[list[dict]] | None]:
    """One step on every rank: sample -> reward -> RLOO advantages -> backward over micro-batches
    -> all-reduce of the L x d gradient -> AdamW. With several members (--lrs / --seeds) each does
    all of it with its own prompts, in the same sampler call, backward, all-reduce and optimizer
    step. Returns each member's metrics for the step, over all ranks, and with --log-rollouts each
    member's rollouts on this rank (rollout_rows)."""
    cfg, c, task, N = run.cfg, run.cluster, run.task, run.cfg.rollouts
    P, per_rank = cfg.prompts_per_step, cfg.prompts_per_step // c.world
    t0 = time.perf_counter()
    epoch, offset = step_position(step, run.steps_per_epoch, P)
    rank_offset = c.rank * per_rank  # this rank's first prompt, as an index within the step
    work = [(m, epoch_order(m.seed, epoch, len(task.prompts))[offset + rank_offset:][:per_rank]) for m in run.members]
    completions = sample(run.sampler, task, cfg, step, work, rank_offset)  # per member
    cluster.synchronize(c.device)
    t1 = time.perf_counter()
    owners = [i for _, indices in work for i in indices for _ in range(N)]  # each rollout's prompt
    all_rewards, all_correct = rewards_of(task, cfg, [comp for cs in completions for comp in cs], owners)
    size = per_rank * N
    rewards = [all_rewards[k * size:(k + 1) * size] for k in range(len(work))]
    correct = [all_correct[k * size:(k + 1) * size] for k in range(len(work))]
    advs = [rloo.advantages(torch.tensor(r).view(per_rank, N)) for r in rewards]  # a prompt's rollouts share a rank
    t2 = time.perf_counter()
    groups = [as_groups([task.prompts[i] for i in indices], cs, adv, cfg.overlong_filter)
              for (_, indices), cs, adv in zip(work, completions, advs)]
    scheduled, draws = list(groups), 0  # (what --log-rollouts records: refill may replace groups[0])
    if cfg.dynamic_sampling:  # (one member: check_config)
        groups[0], draws = refill(groups[0], cfg.dynamic_sampling, functools.partial(fresh_groups, run, step))
    t_refill = time.perf_counter()

    count = torch.tensor([float(sum(len(r.completion) for g in gs for r in g.rollouts  # (filtered: not counted)
                                    if not (cfg.overlong_filter and r.truncated))) for gs in groups],
                         dtype=torch.float64, device=c.device)
    dist.all_reduce(count)  # each member's loss divides by its whole step's completion tokens
    parts = [(with_signal(gs), dict(total_sequences=P * N, max_completion_len=cfg.max_new_tokens or cfg.max_len,
                                    total_tokens=max(n, 1.0)), m.vector)
             for gs, n, m in zip(groups, count.tolist(), run.members)]
    grads = accumulate_gradient(run.model, parts, cfg, task.vocab_size, c.device, run.micro_batch_tokens)
    run.micro_batch_tokens = grads[0].budget  # a budget halved on OOM stays halved for the rest of the run
    warm = min(1.0, (step + 1) / run.warmup_steps) if run.warmup_steps else 1.0
    lrs = [m.lr * warm for m in run.members]
    grad_norms, skipped = reduce_and_step(run.model, run.optimizer, cfg, lrs, any(g.bad_loss for g in grads),
                                           run.layer_scale)
    if skipped:  # the same on every rank (the gradient is all-reduced): all stop together, nothing updated
        kept = max(run.start, step // cfg.checkpoint_every * cfg.checkpoint_every)
        raise SystemExit(f"step {step + 1}: the loss or the gradient is not finite (gradient norm "
                         f"{', '.join(map(str, grad_norms))}): the run stops before updating. The last checkpoint, "
                         f"step {kept} in {run.run_dir}, is kept and the same command continues from it; a NaN that "
                         "comes back there needs a lower --lr, --dtype float32 or a look at the data")
    cluster.synchronize(c.device)
    t3 = time.perf_counter()

    pool = task.stats()  # this rank's reward workers, since the run began (summed over ranks below)
    out = []
    for k, m in enumerate(run.members):
        cs, adv, grad, lengths = completions[k], advs[k], grads[k], [len(comp.tokens) for comp in completions[k]]
        sums, top = cluster.reduce_metrics(
            dict(reward=sum(rewards[k]), correct=sum(correct[k]), rollouts=len(rewards[k]), tokens=sum(lengths),
                 reward_timeouts=pool.get("timeouts", 0), reward_crashes=pool.get("crashes", 0),
                 reward_workers_replaced=pool.get("replaced", 0), reward_workers_recycled=pool.get("recycled", 0),
                 truncated=sum(comp.finish_reason == "length" for comp in cs), adv_abs=adv.abs().sum().item(),
                 adv_sq=adv.pow(2).sum().item(), zero_adv_prompts=(adv == 0).all(1).sum().item(), loss=grad.loss,
                 gap=grad.gap, gap_tokens=grad.gap_tokens, oom_retries=grad.oom_retries,
                 forwarded=grad.forwarded_tokens, padded=grad.padded_tokens,
                 naive=sum(len(g.prompt) + len(r.completion) - 1 for g in groups[k] for r in g.rollouts),
                 dynamic_draws=draws, signal_prompts=sum(map(has_signal, groups[k]))),
            dict(completion_len=max(lengths), sample_s=t1 - t0, reward_s=t2 - t1, refill_s=t_refill - t2,
                 train_s=t3 - t_refill), c.device)
        out.append(step_metrics(sums, top, step=step + 1, epoch=epoch, lr=lrs[k], prompts=P,
                                step_s=time.perf_counter() - t0, grad_norm=grad_norms[k], model=run.model,
                                dynamic=bool(cfg.dynamic_sampling), micro_batches=grad.micro_batches,
                                micro_batch_tokens=run.micro_batch_tokens, skipped_prompts=task.skipped_prompts,
                                member=None if m.vector is None else k))
    rows = [rollout_rows(task, step, indices, cs, r, gs)
            for (_, indices), cs, r, gs in zip(work, completions, rewards, scheduled)] if cfg.log_rollouts else None
    return out, rows


def rollout_rows(task: Task, step: int, indices: list[int], completions, rewards: list[float],
                 groups: list[Group]) -> list[dict]:
    """--log-rollouts: one record per rollout (prompt-major, as sampled), with the advantage its
    tokens were trained with (its Group's: 0 for one the overlong filter dropped)."""
    trained = [r for g in groups for r in g.rollouts]
    N = len(groups[0].rollouts)
    return [dict(step=step + 1, prompt=indices[k // N], id=task.rows[indices[k // N]].get("id") if task.rows else None,
                 rollout=k % N, reward=rewards[k], advantage=r.advantage, tokens=len(comp.tokens),
                 finish_reason=comp.finish_reason, completion=task.decode(comp.tokens) if task.decode else comp.tokens)
            for k, (comp, r) in enumerate(zip(completions, trained, strict=True))]


def evaluate(run: Run) -> list[dict]:
    """--eval-every: the benchmark's problems on the live model with the training sampler (no
    reload, no copy: the vector being trained is the one evaluated), scored by the Task's own
    evaluate, as eval.py scores it, and summed over ranks; every member side by side. One dict
    per member."""
    cfg, c, task = run.cfg, run.cluster, run.eval_task
    t0 = time.perf_counter()
    vectors, seeds = [m.vector for m in run.members], [m.seed for m in run.members]
    population = vectors[0] is not None
    done = task.evaluate(run.sampler, samples=cfg.eval_samples, temperature=cfg.eval_temperature,
                         seed=seeds if population else seeds[0], max_new_tokens=cfg.max_new_tokens, max_len=cfg.max_len,
                         rank=c.rank, world=c.world, vectors=vectors if population else None)
    out = []
    for m in run.members:
        mine = [s for s in done if s.vector == m.vector]
        sums, _ = cluster.reduce_metrics(
            dict(correct=sum(s.correct for s in mine), samples=len(mine), tokens=sum(len(s.tokens) for s in mine),
                 truncated=sum(s.finish_reason == "length" for s in mine)), {}, c.device)
        n = max(sums["samples"], 1.0)
        out.append(dict(eval_bench=cfg.eval_bench, eval_problems=len(task.prompts),
                        eval_accuracy=sums["correct"] / n, eval_len_mean=sums["tokens"] / n,
                        eval_truncated_frac=sums["truncated"] / n, eval_s=time.perf_counter() - t0))
    return out


# -----------------------------------------------------------------------------
# The loop


def save(run: Run, step: int, snapshot=None):
    """Rank 0: the checkpoint after `step` completed steps, from the live state or a StopSignals
    snapshot of it (a CPU copy)."""
    save_checkpoint(run.run_dir, run.model, run.optimizer, run.cfg, step,
                    *step_position(step, run.steps_per_epoch, run.cfg.prompts_per_step), run.task.fingerprint(),
                    snapshot=snapshot)


def train(run: Run):
    """The steps from the run's start to its end, with evaluation, checkpoints and stopping. Each
    member has its own metrics.jsonl (and W&B run), in its folder."""
    cfg, c = run.cfg, run.cluster
    stops = StopSignals(run, functools.partial(save, run))
    population = run.members[0].vector is not None
    tracker = Tracker(cfg, run.run_dir) if population and cfg.wandb_project and c.is_main else None
    logs = [RunLog(member_config(cfg, m), run.run_dir / m.name, c.is_main, run.start, run.total_steps, m.name,
                   tracker) for m in run.members]
    rollout_logs = [RolloutLog(run.run_dir / m.name, c.rank, c.world) for m in run.members] if cfg.log_rollouts else []
    if cfg.eval_every and run.start == 0:  # the base model's score: where the curve starts
        for log, e in zip(logs, evaluate(run)):
            log.record(dict(step=0, **e))
    for step in range(run.start, run.total_steps):
        stops.take_snapshot(step)
        metrics, rollouts = rl_step(run, step)
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0:
            for m, e in zip(metrics, evaluate(run)):
                m.update(e)
        checkpoint_now = (step + 1) % cfg.checkpoint_every == 0 or step + 1 == run.total_steps
        divergence = cluster.max_divergence(run.model.trainable_parameters()) if checkpoint_now else None
        if divergence:  # the same value on every rank (all-reduced): all stop together
            raise RuntimeError(f"step {step + 1}: the ranks' adapters differ by up to {divergence}")
        for log, m in zip(logs, metrics):
            m["rank_divergence"] = divergence
            log.record(m)
            log.show(m)
        for log, rows in zip(rollout_logs, rollouts or []):
            log.write(rows)
        if checkpoint_now:
            stops.checkpoint(step + 1)
        stops.stop_after(step + 1)
    for log in logs + rollout_logs:
        log.close()
    if tracker:
        tracker.close()
    if c.is_main:
        for m in run.members:
            print(f"done: {run.run_dir / m.name / run.model.adapter.latest_file()}")


def main(argv=None):
    cfg = parse_args(argv, __doc__)
    c = cluster.init(cfg.device, cfg.collective_timeout)
    if c.device.type == "cpu":
        memory.return_freed_host_memory()  # what the memory plan assumes (see there)
    check_config(cfg, c.world)
    run = setup(cfg, c)
    if run.start < run.total_steps:
        train(run)
    elif c.is_main:
        print(f"{run.run_dir} is finished (step {run.start}/{run.total_steps}): nothing to do")
    for task in (run.task, run.eval_task):
        if task:
            task.close()
    cluster.close()
    # Reference cycles can keep gloo's process group, and the work objects its threads still hold,
    # alive into interpreter shutdown, where a thread releasing a tensor needs the GIL and aborts
    # the process ("terminate called without an active exception", ~1 run in 7). Collect them now.
    gc.collect()


if __name__ == "__main__":
    cluster.run_cli(main)
