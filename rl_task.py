"""A task: prompts as token ids, the reward of their completions, and `evaluate`, the one way a
steered model is scored on them. Training (rewards), eval during training, eval.py and lens.py
all use the same Task, so one vector gets one accuracy everywhere.

A task is built by one function in TASKS from train.py's config; adding a reward means adding
one such function. eval.py builds benchmark tasks with math_task directly.
"""
import hashlib
import json
import zlib
from dataclasses import dataclass
from typing import Callable

import torch

import model as M

EVAL_GRADE_TIMEOUT = 10.0  # s to grade one evaluation sample (eval.py, and --eval-every in training)


def completion_budget(prompt_len: int, max_new_tokens: int, max_len: int | None) -> int:
    """Tokens a completion may take: max_new_tokens (0: all that max_len leaves), cut so that
    prompt + completion <= max_len (None or 0: no cap)."""
    budget = max_new_tokens or max_len
    if max_len:
        budget = min(budget, max_len - prompt_len)
    return max(0, budget)


@dataclass
class Sample:
    """One completion of `sample` / `evaluate`."""
    index: int  # the problem's index in the task
    sample: int  # which of its samples
    tokens: list[int]
    finish_reason: str
    logprobs: list[float]  # the sampler's, of each token
    correct: float | None = None  # 1.0 or 0.0 once graded
    vector: int | None = None  # the steering table's row it ran under (sample's `vectors`); None: the model's adapter


@dataclass
class Task:
    name: str  # the dataset (or "toy"): part of every evaluation's sampler seed
    prompts: list[list[int]]
    answers: list[str] | None  # gold answers (math), hashed into the fingerprint; None when the reward needs none
    stop_token_ids: list[int]
    vocab_size: int | None  # the tokenizer's real vocabulary (the head's padding rows are never sampled)
    skipped_prompts: int  # dropped at startup: longer than max_prompt_len
    # (completions as token ids, the task index of each one's prompt) -> (rewards, correct as 1/0)
    reward: Callable[[list[list[int]], list[int]], tuple[list[float], list[float]]]
    close: Callable[[], None] = lambda: None  # frees what the reward holds (worker processes)
    stats: Callable[[], dict] = dict  # running counters of the reward (math: the RewardPool's)
    rows: list[dict] | None = None  # the dataset rows behind the prompts (problem, answer, id)
    decode: Callable[[list[int]], str] | None = None  # token ids -> text (math)

    def fingerprint(self) -> str:
        """Hash of the prompts (token ids) and answers: a resumed run must see the same data."""
        return hashlib.sha256(json.dumps([self.prompts, self.answers]).encode()).hexdigest()[:16]

    def share(self, rank: int, world: int) -> list[int]:
        """The problems rank `rank` of `world` evaluates: a contiguous share."""
        size = -(-len(self.prompts) // world)
        return list(range(len(self.prompts)))[rank * size:][:size]

    def sample(self, sampler, *, samples: int, temperature: float, seed: int | list[int], max_new_tokens: int,
               max_len: int | None, top_p: float = 1.0, rank: int = 0, world: int = 1,
               batch_prompts: int | None = None, progress: Callable[[list], None] | None = None,
               vectors: list[int] | None = None) -> list[Sample]:
        """`samples` completions of each of this rank's problems. Ranks take contiguous shares and
        every random draw is hashed from (seed and the task's name, the problem's index, the sample,
        the position): a problem gets the same completions whatever the world size and
        --batch-prompts, in training, eval.py and lens.py alike. `progress` sees each call's groups.
        `vectors`: rows of the model's steering table (adapters.Steering.set_table); every problem
        then runs under each of them in the same generate calls, and draws under each what it would
        draw with that vector alone (batch_prompts counts problems, not problem x vector); `seed`:
        one for all, or one per vector (train.py's members, each evaluated as its own run would be)."""
        mine = self.share(rank, world)
        step = batch_prompts or max(len(mine), 1)
        rows = [None] if vectors is None else list(vectors)
        seeds = seed if isinstance(seed, list) else [seed] * len(rows)
        call_seeds = [s * 2 ** 32 + zlib.crc32(self.name.encode()) for s in seeds]
        done = []
        for start in range(0, len(mine), step):
            chunk = mine[start:start + step]
            prompts = [self.prompts[i] for i in chunk] * len(rows)
            groups = sampler.generate(prompts, n=samples, temperature=temperature, top_p=top_p,
                                      max_new_tokens=[completion_budget(len(p), max_new_tokens, max_len)
                                                      for p in prompts],
                                      stop_token_ids=self.stop_token_ids, prompt_ids=chunk * len(rows),
                                      seed=[s for s in call_seeds for _ in chunk],
                                      vectors=None if vectors is None else [r for r in rows for _ in chunk])
            done += [Sample(i, j, c.tokens, c.finish_reason, c.logprobs, vector=rows[g // len(chunk)])
                     for g, (i, group) in enumerate(zip(chunk * len(rows), groups)) for j, c in enumerate(group)]
            if progress is not None:
                progress(groups)
        return done

    def grade(self, samples: list[Sample]) -> list[Sample]:
        """Each sample's correctness (1 / 0) by the task's reward, in one batch."""
        if samples:
            _, correct = self.reward([s.tokens for s in samples], [s.index for s in samples])
            for s, ok in zip(samples, correct):
                s.correct = float(ok)
        return samples

    def evaluate(self, sampler, **how) -> list[Sample]:
        """sample(sampler, **how), graded: the one evaluation of a vector on this task."""
        return self.grade(self.sample(sampler, **how))


def toy_task(cfg, model_path, is_main: bool) -> Task:
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
    return Task("toy", prompts, None, [], vocab_size, 0, reward)


def math_task(model_path, dataset: str, split: str = "train", *, tokenizer: str = "", data_dir: str = "",
              limit: int | None = None, max_prompt_len: int = 0, wrong: float = -1.0, pool=None,
              workers: int | None = None, timeout: float = EVAL_GRADE_TIMEOUT, verbose: bool = False,
              lazy_pool: bool = False) -> Task:
    """Dataset problems in the model's chat template (prompts longer than max_prompt_len skipped,
    0: none); reward = the last \\boxed{} checked against the gold answer by math-verify
    (reward.RewardPool): 1 correct, `wrong` otherwise. Pass `pool` to share one RewardPool between
    tasks (its owner closes it); else the task starts its own, which close() ends: now, from a
    small process (before the model and CUDA take memory), or at the first grading with
    `lazy_pool` (lens.py: most analyses never grade, and need no math-verify)."""
    import data
    own = pool is None
    pools = [pool] if pool is not None else []

    def grader():
        if not pools:
            import reward
            pools.append(reward.RewardPool(workers=workers, timeout=timeout).start())
        return pools[0]
    if not lazy_pool:
        grader()
    tok = data.Tokenizer.from_dir(tokenizer or M.resolve_checkpoint(model_path))
    rows = data.load(dataset, split=split, data_dir=data.default_dir(data_dir))
    rows = rows[:limit] if limit is not None else rows
    kept, prompts, skipped = [], [], 0
    for row in rows:
        tokens = tok.encode_prompt(row["problem"])
        if max_prompt_len and len(tokens) > max_prompt_len:
            skipped += 1
            continue
        kept.append(row)
        prompts.append(tokens)
    if not prompts:
        why = f"none of its {len(rows)} prompts fits --max-prompt-len {max_prompt_len}" if rows else "no problems"
        raise SystemExit(f"{dataset} ({split}): {why}")
    if verbose:
        print(f"{dataset} ({split}): {len(prompts)} prompts, {skipped} skipped (longer than "
              f"{max_prompt_len} tokens)")
    answers = [row["answer"] for row in kept]

    def decode(tokens):
        return tok.decode(tokens, skip_special_tokens=True)

    def score(completions, prompt_indices):
        rewards = grader().score_batch([decode(c) for c in completions], [answers[i] for i in prompt_indices],
                                   correct=1.0, wrong=wrong)
        return rewards, [float(r == 1.0) for r in rewards]
    def close():
        if own and pools:
            pools.pop().close()
    return Task(dataset, prompts, answers, tok.stop_token_ids, tok.vocab_size, skipped, score, close,
                lambda: dict(pools[0].stats) if pools else {}, kept, decode)


def math_train_task(cfg, model_path, is_main: bool) -> Task:
    """--task math: the training set of --dataset, rewards +1 / -1 (--reward pm1) or 1 / 0."""
    return math_task(model_path, cfg.dataset, "train", tokenizer=cfg.tokenizer, data_dir=cfg.data_dir,
                     max_prompt_len=cfg.max_prompt_len, wrong=-1.0 if cfg.reward == "pm1" else 0.0,
                     workers=cfg.reward_workers or None, timeout=cfg.reward_timeout, verbose=is_main)


def eval_task(cfg, model_path, is_main: bool) -> Task:
    """--eval-every: the first --eval-limit problems of --eval-bench's test split, graded as eval.py
    grades (EVAL_GRADE_TIMEOUT), nothing skipped."""
    return math_task(model_path, cfg.eval_bench, "test", tokenizer=cfg.tokenizer, data_dir=cfg.data_dir,
                     limit=cfg.eval_limit or None, wrong=0.0, workers=cfg.reward_workers or None)


TASKS = {"math": math_train_task, "toy": toy_task}
