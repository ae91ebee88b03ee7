"""RLOO: leave-one-out advantages over the N rollouts of a prompt, and the policy-gradient loss.

For a prompt with rollouts y_1..y_N and rewards r_1..r_N, rollout i is judged against the
mean reward of the *other* N-1 rollouts:

    A_i = r_i - mean_{j != i} r_j  =  N / (N-1) * (r_i - mean_j r_j)

and the loss is the plain REINFORCE estimator with that baseline,

    loss = -(1 / Z) * sum_i A_i * sum_t log pi(y_it | prefix),

fully on-policy (the rollouts come from the current parameters): no clipping, no KL term. The
one off-policy correction is optional: the sampler's log-probs can differ from the trainer's
for the same parameters (bf16, CUDA graphs, other kernels), and truncated importance sampling
(Yao et al., 2025) weights each token by w_it = min(pi_train(y_it) / pi_sampler(y_it), C), held
constant in the gradient. Z is the normalisation, one of:

    token     Z = total completion tokens of the step, over every rank (the paper's choice)
    sequence  each sequence's sum is first divided by its own length; Z = number of sequences
    constant  Z = number of sequences * completion budget (Dr. GRPO: a length-independent constant)

The rewards may be shaped by length first (DAPO's soft overlong punishment, overlong_penalty): a
completion in the last B tokens of its budget loses reward linearly, down to -1 at the budget.

A step is processed in micro-batches, possibly on many ranks, so Z always describes the
*whole* step and is passed in: the micro-batch losses (and gradients) then simply add up.
"""
import torch

NORMALIZATIONS = ("token", "sequence", "constant")


def advantages(rewards: torch.Tensor) -> torch.Tensor:
    """rewards (P, N) -> leave-one-out advantages (P, N), no std scaling.

    N must be >= 2: with a single rollout there is no "other" rollout to form a baseline,
    and silently returning zeros would train nothing, so it is an error."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must have shape (prompts, rollouts), got {tuple(rewards.shape)}")
    n = rewards.shape[1]
    if n < 2:
        raise ValueError(f"RLOO needs at least 2 rollouts per prompt (got N={n}): the baseline of a rollout "
                         "is the mean reward of the other rollouts of its prompt")
    rewards = rewards.double()  # exact for +-1 / 0-1 rewards, and no fp32 drift for long groups
    adv = rewards - (rewards.sum(1, keepdim=True) - rewards) / (n - 1)
    # a group whose rewards are all equal carries no signal: make that exactly 0, not 1e-17
    flat = (rewards == rewards[:, :1]).all(1, keepdim=True)
    return torch.where(flat, torch.zeros_like(adv), adv).float()


def overlong_penalty(length: int, budget: int, buffer: int) -> float:
    """DAPO's soft overlong punishment, added to a completion's reward: 0 up to budget - buffer
    tokens, then falling linearly to -1 at the budget (where the sampler cuts it)."""
    return -min(max(length - (budget - buffer), 0) / buffer, 1.0)


def truncated_is_weights(logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, cap: float) -> torch.Tensor:
    """Per-token weights min(pi_train / pi_sampler, cap), no gradient: logprobs and sampler_logprobs
    are log-probs of the same tokens, any shape."""
    return (logprobs.detach() - sampler_logprobs).exp().clamp(max=cap)


def policy_loss(logprobs: torch.Tensor, mask: torch.Tensor, adv: torch.Tensor, norm: str = "token",
                total_tokens: float | None = None, total_sequences: float | None = None,
                max_completion_len: float | None = None, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The RLOO loss of one micro-batch, already divided by the whole step's normaliser.

    logprobs (B, T) fp32: log pi(token) of each target position (logits / temperature),
    mask (B, T): 1 on completion tokens, 0 on prompt and padding, adv (B,).
    total_tokens: completion tokens in the whole step, all ranks (norm="token").
    total_sequences: rollouts in the whole step, all ranks (norm="sequence", "constant").
    max_completion_len: the completion budget (norm="constant").
    weights (B, T), optional: per-token importance weights (truncated_is_weights), no gradient."""
    if norm not in NORMALIZATIONS:
        raise ValueError(f"loss normalisation '{norm}' is unknown (use one of {NORMALIZATIONS})")
    mask = mask.to(logprobs.dtype)
    token_weight = mask if weights is None else mask * weights.detach().to(logprobs.dtype)
    seq_logprob = (logprobs * token_weight).sum(1)  # (B,) log pi(y_i) (importance-weighted), prompt and pads excluded
    adv = adv.to(logprobs.dtype)
    if norm == "token":
        _need(total_tokens, "total_tokens", norm)
        return -(adv * seq_logprob).sum() / total_tokens
    if norm == "sequence":
        _need(total_sequences, "total_sequences", norm)
        lengths = mask.sum(1).clamp(min=1)  # an empty completion contributes 0, not 0/0
        return -(adv * seq_logprob / lengths).sum() / total_sequences
    _need(total_sequences, "total_sequences", norm)
    _need(max_completion_len, "max_completion_len", norm)
    return -(adv * seq_logprob).sum() / (total_sequences * max_completion_len)


def _need(value, name, norm):
    if value is None or value <= 0:
        raise ValueError(f"policy_loss(norm='{norm}') needs a positive {name} for the whole step, got {value}")
