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
