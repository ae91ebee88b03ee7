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
    truncated: bool = False  # stopped by its budget, not by a stop token


@dataclass
class Group:
    """A prompt and those of its rollouts that go through one shared forward."""
    prompt: list[int]
    rollouts: list[Rollout]

    def width(self) -> int:  # the completion rows' padded width in the forward (the last token is a target only)
        return max(len(r.completion) for r in self.rollouts) - 1

    def tokens(self) -> int:  # tokens forwarded: the prompt once, each completion but its last token
        return len(self.prompt) + sum(len(r.completion) - 1 for r in self.rollouts)


def as_groups(prompts: list[list[int]], completions, adv, overlong_filter: bool = False) -> list[Group]:
    """Flat prompt-major completions (N per prompt) and their (P, N) advantages -> one Group per prompt.
    overlong_filter (DAPO): a truncated rollout is unfinished, not wrong; its advantage becomes 0, so
    it adds no gradient (its reward still enters its group-mates' leave-one-out baselines)."""
    N = adv.shape[1]
    return [Group(prompt, [Rollout(comp.tokens, 0.0 if overlong_filter and cut else a, comp.logprobs, cut)
                           for comp, a in zip(completions[k * N:(k + 1) * N], adv[k].tolist())
                           for cut in [comp.finish_reason == "length"]])
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


# A micro-batch's fixed cost, in forwarded tokens: what makes two short ones dearer than one of
# the same padded size (the Python around each forward, less efficient small matmuls).
MICRO_BATCH_COST = 256


def micro_batches(groups: list[Group], budget: int) -> list[list[Group]]:
    """The rollouts cut into micro-batches of at most `budget` padded tokens, with the least padding.

    Completions are padded to the longest of their micro-batch, and sampled lengths vary a lot (a
    GSM8K step: 40 to 512 tokens), so rows are sorted by length and the sorted list is cut where
    padding costs more than forwarding a prompt again (a rollout's prompt goes with it, once per
    micro-batch: still exact). The cuts are the cheapest by dynamic programming over the sorted
    rows, a micro-batch costing its padded tokens plus MICRO_BATCH_COST. A row bigger than the
    budget goes alone. Longest micro-batch first: an out-of-memory shows at once."""
    rows = sorted(((gi, k) for gi, g in enumerate(groups) for k in range(len(g.rollouts))),
                  key=lambda row: len(groups[row[0]].rollouts[row[1]].completion))  # (group, rollout), shortest first
    width = [len(groups[gi].rollouts[k].completion) - 1 for gi, k in rows]
    best, cut = [0] + [None] * len(rows), [0] * (len(rows) + 1)  # best[j]: cheapest cost of rows[:j]
    for j in range(1, len(rows) + 1):
        owners, longest_prompt = set(), 0
        for i in range(j - 1, -1, -1):  # the micro-batch rows[i:j]; its widest row is the last
            gi = rows[i][0]
            owners.add(gi)
            longest_prompt = max(longest_prompt, len(groups[gi].prompt))
            size = len(owners) * longest_prompt + (j - i) * max(width[j - 1], 0)
            if size > budget and i < j - 1:
                break  # larger for every smaller i
            cost = best[i] + size + MICRO_BATCH_COST
            if best[j] is None or cost < best[j]:
                best[j], cut[j] = cost, i
    batches, j = [], len(rows)
    while j > 0:
        pieces = {}  # owner -> its rollouts in this micro-batch, in their group's order
        for gi, k in sorted(rows[cut[j]:j]):
            pieces.setdefault(gi, []).append(groups[gi].rollouts[k])
        batches.append([Group(groups[gi].prompt, rs) for gi, rs in sorted(pieces.items())])
        j = cut[j]
    return batches


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
