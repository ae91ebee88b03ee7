"""rollout_groups.py: with_signal keeps exactly the rollouts with a gradient, and micro_batches
keeps every one of them once, within the budget. (That the grouped backward gives the naive
gradient is tested in test_train.py, where the backward lives.)"""
from test_train import random_groups

import rollout_groups as RG


def test_with_signal_drops_zero_advantages_and_empty_completions():
    groups = random_groups()
    groups[3].rollouts[0].completion = []
    kept = RG.with_signal(groups)
    assert [len(g.rollouts) for g in kept] == [4, 3, 3]  # group 2 is flat, one zero in group 1, one empty in 3
    assert all(r.advantage != 0 and r.completion for g in kept for r in g.rollouts)
    assert [RG.has_signal(g) for g in groups] == [True, True, False, True]


def test_micro_batches_keep_every_rollout_once_within_the_budget():
    groups = RG.with_signal(random_groups(prompts=(5, 9, 3, 7, 20, 1), rollouts=6))
    for budget in (1000, 60, 25, 1):
        batches = RG.micro_batches(groups, budget)
        seen = sorted(id(r) for b in batches for g in b for r in g.rollouts)
        assert seen == sorted(id(r) for g in groups for r in g.rollouts)
        for b in batches:
            assert RG.padded_tokens(b) <= budget or (len(b) == 1 and len(b[0].rollouts) == 1)


def test_micro_batches_are_the_least_padding_of_all_cuts_of_the_sorted_rows():
    """Against brute force: every way of cutting the rows, sorted by length, into micro-batches
    within the budget; the cost is padded tokens + MICRO_BATCH_COST each. Lengths spread like a
    GSM8K step's (a few long rows among short ones), where one micro-batch would pad ~everything."""
    import itertools
    lengths = [[30, 400, 35, 28], [33, 31], [200, 29, 410]]
    groups = [RG.Group([1] * p, [RG.Rollout([2] * n, 1.0, [0.0] * n) for n in ns])
              for p, ns in zip((20, 60, 40), lengths)]
    rows = sorted(((gi, r) for gi, g in enumerate(groups) for r in g.rollouts), key=lambda x: len(x[1].completion))

    def as_batch(part):
        owners = sorted({gi for gi, _ in part})
        return [RG.Group(groups[gi].prompt, [r for g2, r in part if g2 == gi]) for gi in owners]

    for budget in (5000, 1500, 900):
        costs = []
        for cuts in itertools.product((0, 1), repeat=len(rows) - 1):
            bounds = [0] + [i + 1 for i, c in enumerate(cuts) if c] + [len(rows)]
            batches = [as_batch(rows[a:b]) for a, b in zip(bounds, bounds[1:])]
            if all(RG.padded_tokens(b) <= budget for b in batches):
                costs.append(sum(RG.padded_tokens(b) + RG.MICRO_BATCH_COST for b in batches))
        ours = RG.micro_batches(groups, budget)
        assert all(RG.padded_tokens(b) <= budget for b in ours)
        assert sum(RG.padded_tokens(b) + RG.MICRO_BATCH_COST for b in ours) == min(costs)
        assert sorted(id(r) for b in ours for g in b for r in g.rollouts) == sorted(id(r) for _, r in rows)
    one = sum(len(g.rollouts) for g in groups) * 409 + 3 * 60  # everything in one micro-batch
    assert sum(RG.padded_tokens(b) for b in RG.micro_batches(groups, 5000)) < one / 2


def test_overlong_filter_takes_the_gradient_from_truncated_rollouts_only():
    """DAPO's overlong filtering: a rollout cut by its budget gets advantage 0 (with_signal drops it);
    the others keep the advantages RLOO gave them, truncated rewards included in their baselines."""
    import torch
    from types import SimpleNamespace
    comps = [SimpleNamespace(tokens=[1] * n, logprobs=[0.0] * n, finish_reason=why)
             for n, why in ((3, "stop"), (8, "length"), (2, "stop"), (8, "length"))]
    adv = torch.tensor([[1.0, -1.0, 0.5, -0.5]])
    plain, = RG.as_groups([[7]], comps, adv)
    filtered, = RG.as_groups([[7]], comps, adv, overlong_filter=True)
    assert [r.advantage for r in plain.rollouts] == [1.0, -1.0, 0.5, -0.5]
    assert [r.advantage for r in filtered.rollouts] == [1.0, 0.0, 0.5, 0.0]
    assert [r.truncated for r in filtered.rollouts] == [False, True, False, True]
    assert [len(r.completion) for g in RG.with_signal([filtered]) for r in g.rollouts] == [3, 2]
