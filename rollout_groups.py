"""A step's rollouts as the backward lays them out: a Group is a prompt and its rollouts, forwarded
together (the prompt once, its completions attending to it); only rollouts whose gradient is not
exactly zero are kept (with_signal); and groups are packed into micro-batches of a token budget.
"""
from dataclasses import dataclass


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


def as_groups(prompts: list[list[int]], completions, adv) -> list[Group]:
    """Flat prompt-major completions (N per prompt) and their (P, N) advantages -> one Group per prompt."""
    N = adv.shape[1]
    return [Group(prompt, [Rollout(comp.tokens, a, comp.logprobs)
                           for comp, a in zip(completions[k * N:(k + 1) * N], adv[k].tolist())])
            for k, prompt in enumerate(prompts)]


def has_signal(group: Group) -> bool:
    return any(r.advantage != 0 for r in group.rollouts)


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


def refill(groups: list[Group], rounds: int, draw) -> tuple[list[Group], int]:
    """Dynamic sampling (DAPO): groups whose rollouts all got the same reward carry no signal;
    replace them by fresh prompts' groups, in up to `rounds` rounds of draw(round, missing) for
    as many prompts as are still missing. Groups still without signal after the last round fill
    the step up to its size. Returns (the groups, the fresh prompts drawn)."""
    size = len(groups)
    kept, flat, draws = [g for g in groups if has_signal(g)], [g for g in groups if not has_signal(g)], 0
    for round_ in range(rounds):
        missing = size - len(kept)
        if missing == 0:
            break
        kept += [g for g in draw(round_, missing) if has_signal(g)]
        draws += missing
    return kept + flat[:size - len(kept)], draws
