"""rloo.py against hand-computed advantages and losses, and the loss gradient w.r.t. the steering
vector against central finite differences on a tiny float64 model."""
import math

import pytest
import torch
from conftest import token_logprobs

import model as M
import rloo


def test_advantages_hand_computed():
    rewards = torch.tensor([[1.0, -1.0, -1.0, 1.0],
                            [1.0, 1.0, 1.0, 1.0],
                            [0.0, 0.0, 1.0, 0.0]])
    # row 0: for r=1 the others average (-1-1+1)/3 = -1/3, so A = 4/3; for r=-1 they average 1/3
    # row 1: all equal -> 0;  row 2: the 1 is judged against 0 -> 1, each 0 against 1/3 -> -1/3
    want = torch.tensor([[4 / 3, -4 / 3, -4 / 3, 4 / 3],
                         [0.0, 0.0, 0.0, 0.0],
                         [-1 / 3, -1 / 3, 1.0, -1 / 3]])
    torch.testing.assert_close(rloo.advantages(rewards), want)


def test_advantages_equal_group_is_exactly_zero_and_matches_naive_loop():
    torch.manual_seed(0)
    rewards = torch.rand(5, 7)
    rewards[2] = 0.1  # 0.1 is not exact in binary: the shortcut formula would leave ~1e-17 residue
    got = rloo.advantages(rewards)
    assert torch.equal(got[2], torch.zeros(7))
    for p in range(5):
        for i in range(7):
            others = torch.cat([rewards[p, :i], rewards[p, i + 1:]])
            assert abs(got[p, i].item() - (rewards[p, i] - others.mean()).item()) < 1e-6


def test_advantages_needs_two_rollouts():
    with pytest.raises(ValueError, match="at least 2 rollouts"):
        rloo.advantages(torch.ones(3, 1))
    with pytest.raises(ValueError, match="shape"):
        rloo.advantages(torch.ones(3))


LOGPROBS = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -1.5, -2.5]])
MASK = torch.tensor([[0, 1, 1], [1, 1, 1]])  # row 0: first position is prompt
ADV = torch.tensor([2.0, -1.0])
# sequence log-probs: row 0: -5 (2 tokens), row 1: -4.5 (3 tokens)


@pytest.mark.parametrize("norm, kwargs, want", [
    ("token", dict(total_tokens=5), -(2 * -5 + -1 * -4.5) / 5),  # 1.1
    ("sequence", dict(total_sequences=2), -(2 * -5 / 2 + -1 * -4.5 / 3) / 2),  # 1.75
    ("constant", dict(total_sequences=2, max_completion_len=4), -(2 * -5 + -1 * -4.5) / (2 * 4)),  # 0.6875
])
def test_policy_loss_hand_computed(norm, kwargs, want):
    got = rloo.policy_loss(LOGPROBS, MASK, ADV, norm, **kwargs)
    assert abs(got.item() - want) < 1e-6


@pytest.mark.parametrize("norm", rloo.NORMALIZATIONS)
def test_micro_batch_losses_add_up_to_the_step_loss(norm):
    torch.manual_seed(1)
    lp = -torch.rand(6, 9, dtype=torch.float64)
    mask = (torch.rand(6, 9) > 0.3).long()
    adv = torch.randn(6, dtype=torch.float64)
    totals = dict(total_tokens=mask.sum().item(), total_sequences=6, max_completion_len=9)
    full = rloo.policy_loss(lp, mask, adv, norm, **totals)
    parts = sum(rloo.policy_loss(lp[s], mask[s], adv[s], norm, **totals) for s in (slice(0, 2), slice(2, 6)))
    torch.testing.assert_close(parts, full)


def test_overlong_penalty_hand_computed():
    """DAPO's soft overlong punishment, budget 512, buffer 128: nothing up to 384 tokens, then
    linear (-1/128 a token) down to -1 at the budget itself."""
    got = [rloo.overlong_penalty(n, 512, 128) for n in (0, 300, 384, 385, 448, 511, 512)]
    assert got == pytest.approx([0, 0, 0, -1 / 128, -0.5, -127 / 128, -1])


def test_truncated_importance_weights_hand_computed():
    """w = min(pi_train / pi_sampler, C) per token, constant in the gradient: a token the sampler
    found half as likely as the trainer counts 2x (capped at C = 1.5), one it found twice as
    likely counts 0.5, an equal one 1; with equal log-probs the loss is the plain one."""
    sampler = LOGPROBS.clone()
    sampler[1, 0] -= math.log(2.0)  # pi_train / pi_sampler = 2 -> capped at 1.5
    sampler[1, 1] += math.log(2.0)  # ratio 0.5
    lp = LOGPROBS.clone().requires_grad_(True)
    w = rloo.truncated_is_weights(lp, sampler, cap=1.5)
    assert not w.requires_grad
    torch.testing.assert_close(w, torch.tensor([[1.0, 1.0, 1.0], [1.5, 0.5, 1.0]]))
    loss = rloo.policy_loss(lp, MASK, ADV, "token", total_tokens=5, weights=w)
    want = -(2 * -5 + -1 * (1.5 * -0.5 + 0.5 * -1.5 + -2.5)) / 5
    assert abs(loss.item() - want) < 1e-6
    loss.backward()  # d loss / d logprob_t = -A w_t / Z: the weight is not differentiated
    torch.testing.assert_close(lp.grad, -torch.tensor([[0.0, 2.0, 2.0], [-1.5, -0.5, -1.0]]) / 5)
    plain = rloo.policy_loss(LOGPROBS, MASK, ADV, "sequence", total_sequences=2)
    same = rloo.policy_loss(LOGPROBS, MASK, ADV, "sequence", total_sequences=2,
                            weights=rloo.truncated_is_weights(LOGPROBS, LOGPROBS, cap=2.0))
    torch.testing.assert_close(same, plain)


def test_policy_loss_errors():
    with pytest.raises(ValueError, match="unknown"):
        rloo.policy_loss(LOGPROBS, MASK, ADV, "mean")
    with pytest.raises(ValueError, match="total_tokens"):
        rloo.policy_loss(LOGPROBS, MASK, ADV, "token")
    with pytest.raises(ValueError, match="max_completion_len"):
        rloo.policy_loss(LOGPROBS, MASK, ADV, "constant", total_sequences=2)


def test_steering_gradient_matches_finite_differences(tiny_qwen):
    model = M.Transformer.from_pretrained(tiny_qwen, dtype="float32").double()
    assert model.steering.dtype == torch.float64 and model.steering.requires_grad
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a non-zero point, so the check is not at a special place
        model.steering.copy_(0.3 * torch.randn(model.steering.shape, generator=g, dtype=torch.float64))
    seqs = torch.randint(0, model.config.vocab_size, (3, 9), generator=g)
    inputs, targets = seqs[:, :-1], seqs[:, 1:]
    mask = torch.zeros(3, 8, dtype=torch.long)
    mask[0, 3:] = 1  # prompts of different lengths; row 2 is right-padded after 6 tokens
    mask[1, 2:] = 1
    mask[2, 4:6] = 1
    adv = torch.tensor([1.5, -0.5, -1.0], dtype=torch.float64)
    totals = dict(total_tokens=mask.sum().item(), total_sequences=3, max_completion_len=8)

    def losses():  # one forward, the loss under each normalisation
        lp = token_logprobs(model, inputs, targets, temperature=0.7)
        return torch.stack([rloo.policy_loss(lp, mask, adv, norm, **totals) for norm in rloo.NORMALIZATIONS])

    analytic = []
    for k in range(len(rloo.NORMALIZATIONS)):
        model.steering.grad = None
        losses()[k].backward()
        analytic.append(model.steering.grad.clone())
    analytic = torch.stack(analytic)  # (norms, L, d)

    # central differences on 48 coordinates drawn from both layers (all 128 cost 3x the time)
    eps = 1e-4
    flat = model.steering.data.view(-1)
    coords = torch.randperm(flat.numel(), generator=g)[:48].tolist()
    numeric = torch.zeros(len(rloo.NORMALIZATIONS), len(coords), dtype=torch.float64)
    with torch.no_grad():
        for j, idx in enumerate(coords):
            old = flat[idx].item()
            flat[idx] = old + eps
            up = losses()
            flat[idx] = old - eps
            down = losses()
            flat[idx] = old
            numeric[:, j] = (up - down) / (2 * eps)
    analytic = analytic.view(len(rloo.NORMALIZATIONS), -1)[:, coords]
    for k, norm in enumerate(rloo.NORMALIZATIONS):
        assert analytic[k].abs().max() > 1e-3, norm  # a real gradient, not a vacuous match of zeros
        torch.testing.assert_close(analytic[k], numeric[k], rtol=1e-4, atol=1e-6, msg=lambda m: f"{norm}: {m}")
