"""Interpretation of steering vectors: what each layer's vector does, one command per question.

    python lens.py lens      --steering F [--top-k 10] [--after-norm] [--rank-by cosine|dot]
    python lens.py ablate    --steering F [--layers 0,5,27] [--accuracy]
    python lens.py positions --steering F [--layer -1] [--others keep|zero]
    python lens.py paths     --steering F [--layer -2] [--others keep|zero]
    python lens.py attention --steering F [--layer -2] [--others keep|zero] [--control]
    python lens.py scale     --steering F [--alphas 0,0.25,0.5,1,1.5,2] [--no-accuracy]

`python lens.py --steering F ...` (no subcommand) is the `lens` subcommand, as it always was.
Each prints an aligned table; `--out DIR` also writes DIR/<analysis>.json and PNG figures (an
--out ending in .json names the JSON file itself, figures beside it). Figures need matplotlib,
an optional extra: without it the JSON is still written. The base model defaults to the
`base_model` in the steering file's metadata; --device / --dtype choose where and how it runs
(float32 by default: the checks below are exact there; bfloat16 for large models on a GPU).

lens: every layer's vector s_l against every unembedding row W_v (the tokenizer's real tokens
only): cosine and dot product W_v . s_l (the logit change s_l would cause if it reached the head
alone; --after-norm passes it through the final RMSNorm first), the top / bottom tokens, the
norms |s_l| and the cross-layer cosine matrix cos(s_i, s_j).

The other analyses run on SEQUENCES: --limit problems of --bench (test split) in the model's chat
template, --samples completions each, sampled from the fully steered model (--temperature,
--seed, --max-new-tokens). A sequence's SCORED POSITIONS are the ones that predict its completion
tokens; t = 0 is the one predicting the first generated token (its context is the prompt alone).

ablate: per layer l, (a) every vector but s_l, (b) s_l alone: the change of the mean log-prob
(per token, teacher-forced) of the sequences' completions against the fully steered model;
with --accuracy also benchmark accuracy, each variant sampling its own completions.

positions: KL(steered || base) of the next-token distribution at each step t (mean over the
sequences that reach t), and the tokens whose log-prob (and probability) rise most at t = 0.

paths, attention and positions with --layer l compare two steerings that differ only in s_l:
treatment = the trained vectors, reference = the same without s_l (--others keep), or s_l alone
against the base model (--others zero).

paths: path patching of s_l. The final residual (the final norm's input) is exactly
    h_treat = h_ref + s_l + sum_{j>l} (attn_j^treat - attn_j^ref) + sum_{j>l} (mlp_j^treat - mlp_j^ref)
where each component's output change includes whatever reached it from s_l (through any earlier
component). Path c is the reference run with only its term added before the final norm:
"direct" = s_l -> final norm -> unembedding with everything else at reference values; "attn Lj"
= s_l -> ... -> layer j's attention -> logits, split further per head (o_proj is linear, so the
heads' terms sum to the layer's); "mlp Lj" likewise. Per path: KL(p_path || p_ref) and its share
of the total KL(p_treat || p_ref) (all positions and t = 0), and its logit share
<dz_path, dz_total> / |dz_total|^2 (dz: logit change, mean over the vocabulary removed). All terms
at once rebuild h_treat (the table shows how exactly); the shares need not sum to 1 because the
final norm and the softmax are not linear: the table says by how much they do not.

attention: per layer and head, the Jensen-Shannon divergence (bits, 0..1) between the treatment's
and the reference's attention distributions at the scored positions of the same sequences, from
an attend= closure that computes the probabilities (causal, GQA) and returns probs @ v. With
--control also for a random direction of the same norm as s_l (a yardstick for "small").

scale: mean log-prob of the sequences and (default; --no-accuracy to skip) accuracy as a
function of the steering scale alpha (h + alpha * s_l after every block).
"""
import argparse
import json
import math
import sys
import unicodedata
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import data
import model as M
from rl_task import Task, math_task
from sample import Sampler

# -----------------------------------------------------------------------------
# 1. The logit lens: each vector against each unembedding row


@dataclass
class Lens:
    norms: torch.Tensor  # (L,) |steering[l]|, before any normalisation
    rank_by: str  # "cosine" or "dot": what orders the tokens
    top_ids: torch.Tensor  # (L, k) the highest-scoring token ids, best first
    top_cosine: torch.Tensor  # (L, k)
    top_dot: torch.Tensor  # (L, k)
    bottom_ids: torch.Tensor  # (L, k) the lowest-scoring token ids, lowest first
    bottom_cosine: torch.Tensor  # (L, k)
    bottom_dot: torch.Tensor  # (L, k)


@torch.no_grad()
def logit_lens(steering: torch.Tensor, unembedding: torch.Tensor, k: int = 10, norm=None,
               vocab_size: int | None = None, rank_by: str = "cosine", chunk_rows: int = 16384) -> Lens:
    """steering (L, d), unembedding (V, d) -> per layer the top / bottom k tokens by cosine or dot
    product. `norm` (e.g. model.norm) is applied to the vectors first; `vocab_size` keeps only the
    first rows of the unembedding. Rows are read in chunks, so no fp32 copy of W is ever made."""
    if rank_by not in ("cosine", "dot"):
        raise ValueError(f"rank by 'cosine' or 'dot', not {rank_by!r}")
    vecs = steering.detach().float()
    if norm is not None:
        vecs = norm(vecs.to(unembedding.device)).float()
    vecs = vecs.to(unembedding.device)  # (L, d)
    vec_norms = vecs.norm(dim=-1)
    weight = unembedding[:vocab_size] if vocab_size else unembedding
    if not 1 <= k <= weight.shape[0]:
        raise ValueError(f"top-k must be between 1 and the vocabulary size {weight.shape[0]}, got {k}")
    dots, norms = [], []
    for i in range(0, weight.shape[0], chunk_rows):
        rows = weight[i:i + chunk_rows].float()
        dots.append(rows @ vecs.T)  # (V_chunk, L)
        norms.append(rows.norm(dim=-1))
    dot = torch.cat(dots)  # (V, L)
    denom = torch.cat(norms)[:, None] * vec_norms[None, :]
    cos = torch.where(denom > 0, dot / denom.clamp_min(1e-30), torch.zeros_like(dot))  # a zero vector scores 0
    score = cos if rank_by == "cosine" else dot
    top = score.topk(k, dim=0).indices  # (k, L)
    bottom = score.topk(k, dim=0, largest=False).indices
    return Lens(norms=steering.detach().float().norm(dim=-1).cpu(), rank_by=rank_by,
                top_ids=top.T.cpu(), top_cosine=cos.gather(0, top).T.cpu(), top_dot=dot.gather(0, top).T.cpu(),
                bottom_ids=bottom.T.cpu(), bottom_cosine=cos.gather(0, bottom).T.cpu(),
                bottom_dot=dot.gather(0, bottom).T.cpu())


def cosine_matrix(steering: torch.Tensor) -> torch.Tensor:
    """(L, d) -> (L, L) cos(s_i, s_j); 0 where either vector is zero."""
    unit = F.normalize(steering.detach().float(), dim=-1)
    return unit @ unit.T

# -----------------------------------------------------------------------------
# The model under interventions: steering swapped in and out, sequences, scored positions


@contextmanager
def steered(model: M.Transformer, vectors: torch.Tensor, scale: float = 1.0):
    """Run `model` with `vectors` (L, d) as its steering at scale alpha; the previous state comes back after."""
    saved, saved_scale = model.steering.detach().clone(), model.steering_scale
    with torch.no_grad():
        model.steering.copy_(vectors)
    model.steering_scale = scale
    try:
        yield model
    finally:
        with torch.no_grad():
            model.steering.copy_(saved)
        model.steering_scale = saved_scale


def only(vectors: torch.Tensor, layers) -> torch.Tensor:
    """The vectors of `layers`, every other row zero."""
    out = torch.zeros_like(vectors)
    out[layers] = vectors[layers]
    return out


def without(vectors: torch.Tensor, layers) -> torch.Tensor:
    out = vectors.clone()
    out[layers] = 0
    return out


def contrast(vectors: torch.Tensor, layer: int | None, others: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(reference, treatment) steerings: base vs fully steered when `layer` is None; else two steerings
    that differ only in s_layer, the other vectors as trained (others='keep') or zero ('zero')."""
    if layer is None:
        return torch.zeros_like(vectors), vectors
    if others == "keep":
        return without(vectors, [layer]), vectors
    if others == "zero":
        return torch.zeros_like(vectors), only(vectors, [layer])
    raise ValueError(f"--others must be 'keep' or 'zero', not {others!r}")


@dataclass
class Sequences:
    prompts: list[list[int]]  # one per sequence (a prompt with n samples appears n times)
    completions: list[list[int]]
    finish: list[str]  # "stop" or "length"
    problems: list[int]  # index of each sequence's problem
    logprobs: list[list[float]]  # the sampler's log-probs of the completion tokens


@dataclass
class Batch:
    """Sequences right-padded into one (B, T) batch, and their scored positions, flattened to N."""
    tokens: torch.Tensor  # (B, T)
    rows: torch.Tensor  # (N,) row of each scored position
    cols: torch.Tensor  # (N,) its column: the position whose next-token distribution is scored
    targets: torch.Tensor  # (N,) the completion token it predicts
    steps: torch.Tensor  # (N,) t: 0 for the first generated token


def batches(seqs: Sequences, size: int, device) -> list[Batch]:
    out = []
    for start in range(0, len(seqs.prompts), size):
        chunk = list(zip(seqs.prompts[start:start + size], seqs.completions[start:start + size]))
        T = max(len(p) + len(c) for p, c in chunk)
        tokens = torch.zeros(len(chunk), T, dtype=torch.long)
        rows, cols, targets, steps = [], [], [], []
        for b, (p, c) in enumerate(chunk):
            tokens[b, :len(p) + len(c)] = torch.tensor(p + c)
            rows += [b] * len(c)
            cols += range(len(p) - 1, len(p) - 1 + len(c))
            targets += c
            steps += range(len(c))
        out.append(Batch(*(torch.as_tensor(x, device=device) for x in (tokens, rows, cols, targets, steps))))
    return out


def scored_hidden(model: M.Transformer, batch: Batch, attend=M.causal_attention) -> torch.Tensor:
    """Final-normed hidden states at the scored positions, (N, d)."""
    return model.hidden_states(batch.tokens, attend=attend)[batch.rows, batch.cols]


def log_softmax(model: M.Transformer, hidden: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(N, d) final-normed -> (N, V) fp32 next-token log-probs over the tokenizer's real tokens."""
    return F.linear(hidden, model.head_weight[:vocab_size]).float().log_softmax(-1)


@torch.no_grad()
def mean_logprob(model: M.Transformer, seqs: Sequences, vocab_size: int, batch_size: int) -> float:
    """Mean log-prob per completion token of `seqs` under the model as it is (teacher-forced)."""
    total, count = 0.0, 0
    device = model.embed_tokens.weight.device
    for b in batches(seqs, batch_size, device):
        lp = M.chunked_logprobs(scored_hidden(model, b), model.head_weight, b.targets, vocab_size=vocab_size)
        total += lp.double().sum().item()
        count += lp.numel()
    return total / count


@dataclass
class Study:
    """A base model with a steering file, its tokenizer and the task (--bench problems) the
    analyses run on: the same rl_task.Task that training and eval.py sample and grade with."""
    model: M.Transformer
    tokenizer: data.Tokenizer
    vectors: torch.Tensor  # (L, d) fp32: the trained steering
    vocab_size: int
    task: Task | None = None
    _sampler: Sampler | None = None

    def generate(self, vectors: torch.Tensor, args, scale: float = 1.0) -> Sequences:
        """Completions of every problem under `vectors` at scale alpha (--samples, --temperature,
        --seed): the Task's own sampling, so the draws are eval.py's for the same seed."""
        return self.generate_side_by_side([(vectors, scale)], args)[0]

    def generate_side_by_side(self, variants: list[tuple[torch.Tensor, float]], args) -> list[Sequences]:
        """generate() for each (vectors (L, d), alpha) of `variants`, all in one sampler pass: each a
        row of the model's steering table (its vectors as the forward adds them, times alpha), every
        problem drawing under each row what it draws under that variant alone."""
        prompts, adapter = self.task.prompts, self.model.adapter
        # a KV cache for every sequence of up to 8 variants at once (more wait their turn), not the
        # sampler's default GiBs
        need = min(len(variants), 8) * args.samples * sum(len(p) + args.max_new_tokens + 16 for p in prompts)
        if self._sampler is None or self._sampler.blocks.num_blocks * self._sampler.block_size < need:
            self._sampler = None  # the old KV pool goes before the new one is made
            self._sampler = Sampler(self.model, kv_cache_tokens=need, vocab_size=self.vocab_size)
        adapter.set_table(torch.stack([alpha * only(v, list(adapter.layers)) for v, alpha in variants]))
        with steered(self.model, torch.zeros_like(self.vectors), 1.0):  # the table carries every alpha
            done = self.task.sample(self._sampler, samples=args.samples, temperature=args.temperature,
                                    seed=args.seed, max_new_tokens=args.max_new_tokens, max_len=None,
                                    vectors=list(range(1, len(variants) + 1)))
        out = []
        for row in range(1, len(variants) + 1):
            mine = [s for s in done if s.vector == row]
            out.append(Sequences([prompts[s.index] for s in mine], [s.tokens for s in mine],
                                 [s.finish_reason for s in mine], [s.index for s in mine], [s.logprobs for s in mine]))
        return out

    def accuracy(self, seqs: Sequences) -> dict:
        """Fraction of sequences whose last \\boxed{} equals their problem's answer (the Task's
        reward); lengths; the mean log-prob the sampling model gave its own tokens."""
        _, correct = self.task.reward(seqs.completions, seqs.problems)
        return dict(accuracy=sum(correct) / len(correct),
                    mean_length=sum(map(len, seqs.completions)) / len(seqs.completions),
                    truncated=seqs.finish.count("length") / len(seqs.finish),
                    own_logprob=sum(map(sum, seqs.logprobs)) / max(1, sum(map(len, seqs.logprobs))))

# -----------------------------------------------------------------------------
# 2. Ablation: every vector but s_l, and s_l alone


@torch.no_grad()
def ablate(study: Study, seqs: Sequences, layers: list[int], batch_size: int,
           accuracy_args=None, steered_accuracy: dict | None = None) -> dict:
    """Mean log-prob of `seqs` under the full steering, the base model, and per layer (a) / (b).
    With `accuracy_args` each variant also samples and is graded (the full steering's figures,
    computed already from `seqs`, come in as `steered_accuracy`)."""
    vectors = study.vectors

    def measure(vecs, known_accuracy=None):
        out = dict(logprob=mean_logprob_under(study, seqs, vecs, batch_size))
        if accuracy_args is not None:
            out.update(known_accuracy or study.accuracy(study.generate(vecs, accuracy_args)))
        return out

    full = measure(vectors, steered_accuracy)
    base = measure(torch.zeros_like(vectors))
    rows = []
    for l in layers:
        if not vectors[l].any():  # an untrained layer: (a) is the full steering, (b) the base model
            without_l, alone = full, base
        else:
            without_l, alone = measure(without(vectors, [l])), measure(only(vectors, [l]))
        rows.append(dict(layer=l, norm=vectors[l].norm().item(), without=without_l, alone=alone,
                         delta_without=without_l["logprob"] - full["logprob"],
                         delta_alone=alone["logprob"] - full["logprob"]))
    return dict(steered=full, base=base, layers=rows)


def mean_logprob_under(study: Study, seqs: Sequences, vectors: torch.Tensor, batch_size: int,
                       scale: float = 1.0) -> float:
    with steered(study.model, vectors, scale):
        return mean_logprob(study.model, seqs, study.vocab_size, batch_size)

# -----------------------------------------------------------------------------
# 3. Positions: where in the completion the steering changes the next-token distribution


@torch.no_grad()
def positions(study: Study, seqs: Sequences, ref: torch.Tensor, treat: torch.Tensor, batch_size: int,
              top_k: int = 10) -> dict:
    """KL(p_treat || p_ref) per step t (mean over the sequences reaching t), and at t = 0 the mean
    log-prob rise (and probability gain) per token, over sequences (= over problems: each has the
    same number of samples, and t = 0 sees only the prompt)."""
    model = study.model
    max_t = max(map(len, seqs.completions))
    kl_sum = torch.zeros(max_t, dtype=torch.float64)
    counts = torch.zeros(max_t, dtype=torch.long)
    rise = torch.zeros(study.vocab_size, dtype=torch.float64)  # sum over sequences of log p_treat - log p_ref
    gain = torch.zeros(study.vocab_size, dtype=torch.float64)  # sum of p_treat - p_ref
    p_ref_sum = torch.zeros(study.vocab_size, dtype=torch.float64)
    n_first = 0
    for b in batches(seqs, batch_size, model.embed_tokens.weight.device):
        with steered(model, treat):
            lp1 = log_softmax(model, scored_hidden(model, b), study.vocab_size)  # (N, V)
        with steered(model, ref):
            lp0 = log_softmax(model, scored_hidden(model, b), study.vocab_size)
        kl = kl_rows(lp1, lp0)  # (N,)
        steps = b.steps.cpu()
        kl_sum.index_add_(0, steps, kl.double().cpu())
        counts.index_add_(0, steps, torch.ones_like(steps))
        first = b.steps == 0
        diff = (lp1[first] - lp0[first]).double()
        rise += diff.sum(0).cpu()
        gain += (lp1[first].exp() - lp0[first].exp()).double().sum(0).cpu()
        p_ref_sum += lp0[first].exp().double().sum(0).cpu()
        n_first += int(first.sum())
    mean_kl = (kl_sum / counts.clamp_min(1)).tolist()
    rise, gain, p_ref = rise / n_first, gain / n_first, p_ref_sum / n_first

    def tokens(score):
        ids = score.topk(min(top_k, score.numel())).indices.tolist()
        return [dict(id=i, token=study.tokenizer.decode([i]), logprob_rise=rise[i].item(),
                     prob_gain=gain[i].item(), prob_ref=p_ref[i].item(), prob_treat=(p_ref[i] + gain[i]).item())
                for i in ids]

    later = counts[1:].sum().item()
    mean_later = kl_sum[1:].sum().item() / later if later else float("nan")  # per token, over t >= 1
    return dict(kl=mean_kl, counts=counts.tolist(), kl_first=mean_kl[0], kl_later=mean_later,
                rise_first=tokens(rise), gain_first=tokens(gain))


def kl_rows(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from log-probs (N, V) -> (N,); p = 0 entries contribute 0."""
    return torch.where(lp > -torch.inf, lp.exp() * (lp - lq), torch.zeros_like(lp)).sum(-1)

# -----------------------------------------------------------------------------
# 4. Path patching of one layer's vector


@torch.no_grad()
def path_terms(model: M.Transformer, batch: Batch, layer: int, ref: torch.Tensor, treat: torch.Tensor):
    """Runs the reference and the treatment steering (which differ only in row `layer`) and returns
    (h_ref, h_treat, terms): the final norm's input at the scored positions (N, d) fp32 for both, and
    per path its term of h_treat - h_ref (N, d) fp32: "direct", ("attn", j), ("mlp", j) for j > layer
    (and ("mlp", layer) for post-attn steering), ("head", j, h) per attention head (the heads of layer
    j sum to ("attn", j))."""
    if not torch.equal(without(ref, [layer]), without(treat, [layer])):
        raise ValueError(f"path patching needs two steerings that differ only in layer {layer}")
    L = model.config.num_layers
    later = range(layer + 1, L)
    # steering after the attention residual (steer_at post-attn) also reaches its own layer's MLP
    post_attn = getattr(getattr(model, "adapter", None), "steer_at", "post-block") == "post-attn"
    mlps = range(layer if post_attn else layer + 1, L)
    rows, cols = batch.rows, batch.cols

    def run(vectors):
        seen = {}
        hooks = [model.norm.register_forward_pre_hook(lambda m, args: seen.__setitem__("final", args[0]))]
        for j in later:
            hooks.append(model.layers[j].self_attn.register_forward_hook(
                lambda m, args, out, j=j: seen.__setitem__(("attn", j), out)))
        for j in mlps:
            hooks.append(model.layers[j].mlp.register_forward_hook(
                lambda m, args, out, j=j: seen.__setitem__(("mlp", j), out)))

        def attend(j, q, k, v):
            z = M.causal_attention(j, q, k, v)  # (B, T, H, D)
            if j > layer:
                seen[("z", j)] = z
            return z

        try:
            with steered(model, vectors):
                model.hidden_states(batch.tokens, attend=attend)
                dtype = model.embed_tokens.weight.dtype
                added = (model.steering_scale * model.steering[layer]).to(dtype).float()  # what the forward adds
        finally:
            for h in hooks:
                h.remove()
        return {key: t[rows, cols].float() for key, t in seen.items()}, added

    (r, s_ref), (t, s_treat) = run(ref), run(treat)
    terms = {"direct": (s_treat - s_ref).expand_as(r["final"])}
    H, D = model.config.num_heads, model.config.head_dim
    for j in range(layer, L):
        if j in later:
            terms[("attn", j)] = t[("attn", j)] - r[("attn", j)]
            dz = t[("z", j)] - r[("z", j)]  # (N, H, D): each head's output change
            w_o = model.layers[j].self_attn.o_proj.weight.float()  # (d, H * D); o_proj has no bias
            for h in range(H):
                terms[("head", j, h)] = dz[:, h] @ w_o[:, h * D:(h + 1) * D].T
        if j in mlps:
            terms[("mlp", j)] = t[("mlp", j)] - r[("mlp", j)]
    return r["final"], t["final"], terms


def path_name(key) -> str:
    return key if isinstance(key, str) else (f"attn L{key[1]} h{key[2]}" if key[0] == "head"
                                             else f"{key[0]} L{key[1]}")


def is_partition(key) -> bool:
    """The terms that together make up h_treat - h_ref (heads are a finer split of attention)."""
    return key == "direct" or key[0] in ("attn", "mlp")


@torch.no_grad()
def paths(study: Study, seqs: Sequences, layer: int, ref: torch.Tensor, treat: torch.Tensor, batch_size: int,
          top_k: int = 3, chunk: int = 256) -> dict:
    """Per path: mean KL(p_path || p_ref) over the scored positions and at t = 0, its share of the total
    KL(p_treat || p_ref), its logit share, and the tokens its logit change favours most; the same for
    all terms together (the rebuild check) and the sums of the shares over the partition."""
    model = study.model
    W = model.head_weight[:study.vocab_size]
    dtype = model.embed_tokens.weight.dtype

    def logits(h):  # final residual (n, d) fp32 -> (n, V) fp32, through the model's own norm and head
        z = F.linear(model.norm(h.to(dtype)), W).float()
        return z - z.mean(-1, keepdim=True)  # logits are defined up to a shift: centre them

    acc = {}  # name -> dict of sums

    def add(name, key, value):
        acc.setdefault(name, {}).setdefault(key, 0.0)
        acc[name][key] += value

    n_all = n_first = 0
    rebuild_err = 0.0
    tokens_sum = {}
    for b in batches(seqs, batch_size, W.device):
        h_ref, h_treat, terms = path_terms(model, b, layer, ref, treat)
        terms["all terms together"] = sum(v for k, v in terms.items() if is_partition(k))
        for i in range(0, h_ref.shape[0], chunk):
            sl = slice(i, i + chunk)
            first = b.steps[sl] == 0
            z0, z1 = logits(h_ref[sl]), logits(h_treat[sl])
            lp0, lp1 = z0.log_softmax(-1), z1.log_softmax(-1)
            dt = z1 - z0
            kl = kl_rows(lp1, lp0)
            add("total", "kl", kl.sum().item())
            add("total", "kl_first", kl[first].sum().item())
            add("total", "dot", (dt * dt).sum().item())
            n_all += kl.numel()
            n_first += int(first.sum())
            for key, term in terms.items():
                name = path_name(key)
                zc = logits(h_ref[sl] + term[sl])
                kl = kl_rows(zc.log_softmax(-1), lp0)
                add(name, "kl", kl.sum().item())
                add(name, "kl_first", kl[first].sum().item())
                dc = zc - z0
                add(name, "dot", (dc * dt).sum().item())
                if name == "all terms together":
                    rebuild_err = max(rebuild_err, (zc - z1).abs().max().item())
                elif is_partition(key):
                    tokens_sum[name] = tokens_sum.get(name, 0) + dc.double().sum(0).cpu()
    total = acc["total"]

    def row(name, sums):
        return dict(path=name, kl=sums["kl"] / n_all, kl_first=sums["kl_first"] / max(1, n_first),
                    kl_share=sums["kl"] / total["kl"] if total["kl"] > 0 else float("nan"),
                    kl_share_first=sums["kl_first"] / total["kl_first"] if total["kl_first"] > 0 else float("nan"),
                    logit_share=sums["dot"] / total["dot"] if total["dot"] > 0 else float("nan"))

    table = [row(name, sums) for name, sums in acc.items()]
    for r in table:
        if r["path"] in tokens_sum:
            mean = tokens_sum[r["path"]] / n_all
            ids = mean.topk(min(top_k, mean.numel())).indices.tolist()
            r["top_tokens"] = [dict(id=i, token=study.tokenizer.decode([i]), logit_change=mean[i].item())
                               for i in ids]
    parts = [r for r in table if r["path"] in tokens_sum]
    sums = {key: sum(r[key] for r in parts) for key in ("kl_share", "kl_share_first", "logit_share")}
    return dict(layer=layer, positions=n_all, first_positions=n_first, paths=table, partition_sums=sums,
                rebuild_max_abs_logit_error=rebuild_err)

# -----------------------------------------------------------------------------
# 5. Attention: how much the steering moves each head's attention distribution


def attention_probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q (B, T, H, D), k (B, T, KVH, D) -> causal attention probabilities (B, H, T, T), fp32. Query head h
    reads key head h // (H / KVH), as model.causal_attention's GQA does."""
    H, KVH, D = q.shape[2], k.shape[2], q.shape[3]
    k = k.repeat_interleave(H // KVH, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * D ** -0.5
    T = q.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    return scores.masked_fill(~causal, -torch.inf).softmax(-1)


def recording_attend(store: dict, rows: torch.Tensor, cols: torch.Tensor):
    """An attend= closure that attends like model.causal_attention, through explicit probabilities, and
    keeps each layer's probabilities at the scored positions in store[layer] (N, H, T)."""
    def attend(layer, q, k, v):
        p = attention_probs(q, k)  # (B, H, T, T)
        store[layer] = p.permute(0, 2, 1, 3)[rows, cols]
        v = v.repeat_interleave(q.shape[2] // v.shape[2], dim=2)
        return torch.einsum("bhqk,bkhd->bqhd", p.to(v.dtype), v)
    return attend


def jensen_shannon(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """JSD(p, q) in bits over the last dim (0 for identical, 1 for disjoint supports)."""
    m = 0.5 * (p + q)
    kl = lambda a: (torch.xlogy(a, a) - torch.xlogy(a, m)).sum(-1)  # noqa: E731 (0 log 0 = 0)
    return 0.5 * (kl(p) + kl(q)) / math.log(2)


@torch.no_grad()
def attention(study: Study, seqs: Sequences, ref: torch.Tensor, treat: torch.Tensor, batch_size: int) -> dict:
    """Mean over the scored positions of JSD(attention_treat, attention_ref), per layer and head."""
    model, cfg = study.model, study.model.config
    total = torch.zeros(cfg.num_layers, cfg.num_heads, dtype=torch.float64)
    n = 0
    for b in batches(seqs, batch_size, model.embed_tokens.weight.device):
        probs = []
        for vectors in (ref, treat):
            store = {}
            with steered(model, vectors):
                model.hidden_states(b.tokens, attend=recording_attend(store, b.rows, b.cols))
            probs.append(store)
        for layer in range(cfg.num_layers):
            total[layer] += jensen_shannon(probs[1][layer], probs[0][layer]).double().sum(0).cpu()  # (H,)
        n += b.rows.numel()
    jsd = total / n
    return dict(jsd=jsd.tolist(), layer_mean=jsd.mean(1).tolist(), layer_max=jsd.max(1).values.tolist(),
                positions=n)

# -----------------------------------------------------------------------------
# 6. Scale: accuracy and log-prob as a function of alpha


def scale_sweep(study: Study, seqs: Sequences, alphas: list[float], batch_size: int, accuracy_args=None,
                steered_accuracy: dict | None = None) -> list[dict]:
    """Per alpha: the mean log-prob of the steered completions `seqs`, and with `accuracy_args` the
    graded completions sampled at that alpha: every alpha side by side in one sampler pass."""
    rows = [dict(alpha=alpha, logprob=mean_logprob_under(study, seqs, study.vectors, batch_size, alpha))
            for alpha in alphas]
    if accuracy_args is not None:
        known = {1.0: steered_accuracy} if steered_accuracy is not None else {}
        todo = [alpha for alpha in dict.fromkeys(alphas) if alpha not in known]
        if todo:
            sampled = study.generate_side_by_side([(study.vectors, alpha) for alpha in todo], accuracy_args)
            known.update((alpha, study.accuracy(s)) for alpha, s in zip(todo, sampled))
        for r in rows:
            r.update(known[r["alpha"]])
    return rows

# -----------------------------------------------------------------------------
# Presentation: tokens with visible whitespace, aligned tables


def show_token(text: str, width: int = 14) -> str:
    """A token as it reads: spaces as ␣, newlines/tabs as \\n/\\t, other control chars as \\xNN."""
    out = []
    for ch in text:
        if ch == " ":
            out.append("␣")
        elif ch in "\n\t\r":
            out.append({"\n": "\\n", "\t": "\\t", "\r": "\\r"}[ch])
        elif not ch.isprintable():
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 256 else f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    shown = "".join(out) or "∅"
    return shown if len(shown) <= width else shown[:width - 1] + "…"


def width(text: str) -> int:
    """Columns `text` takes in a terminal: CJK and other wide characters take two."""
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def pad(text: str, columns: int) -> str:
    return text + " " * (columns - width(text))


def show_score(score: float) -> str:
    return f"{score:.2f}".replace("0.", ".", 1)  # 0.41 -> .41, -0.12 -> -.12


def num(x: float) -> str:
    """A figure in a table: 4 significant digits, scientific when small or large."""
    if x != x:
        return "nan"
    return f"{x:.4f}" if x == 0 or 1e-3 <= abs(x) < 1e4 else f"{x:.2e}"


def aligned(header: list[str], rows: list[list[str]]) -> str:
    """First column left-aligned, the others right-aligned, two spaces apart."""
    widths = [max(width(r[i]) for r in [header] + rows) for i in range(len(header))]

    def line(cells):
        return "  ".join(pad(c, w) if i == 0 else " " * (w - width(c)) + c
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def lens_rows(lens: Lens, decode) -> list[dict]:
    """The lens as JSON-ready rows, one per layer, tokens decoded."""
    rows = []
    for layer in range(lens.norms.shape[0]):
        def entries(ids, cos, dot):
            return [dict(id=int(i), token=decode(int(i)), cosine=round(float(c), 4), dot=round(float(s), 4))
                    for i, c, s in zip(ids[layer], cos[layer], dot[layer])]
        rows.append(dict(layer=layer, norm=round(float(lens.norms[layer]), 4),
                         top=entries(lens.top_ids, lens.top_cosine, lens.top_dot),
                         bottom=entries(lens.bottom_ids, lens.bottom_cosine, lens.bottom_dot)))
    return rows


def format_table(rows: list[dict]) -> str:
    """Two lines per layer (+ top tokens, − bottom tokens), each 'token cosine (dot)', ranks aligned."""
    def cells(side):
        return [[f"{show_token(e['token'])} {show_score(e['cosine'])} ({e['dot']:.1f})" for e in r[side]]
                for r in rows]

    top, bottom = cells("top"), cells("bottom")
    widths = [max(width(c[i]) for c in top + bottom) for i in range(len(top[0]))]
    norm_w = max(len(f"{r['norm']:.2f}") for r in rows)
    lines = []
    for r, t, b in zip(rows, top, bottom):
        head = f"L{r['layer']:<3d} |v|={r['norm']:>{norm_w}.2f} "
        if r["norm"] == 0:
            lines.append(head + " (zero vector: no direction)")
            continue
        lines.append(head + " + " + " | ".join(pad(c, w) for c, w in zip(t, widths)).rstrip())
        lines.append(" " * len(head) + " − " + " | ".join(pad(c, w) for c, w in zip(b, widths)).rstrip())
    return "\n".join(lines)


def format_matrix(matrix: list[list[float]]) -> str:
    header = [""] + [f"L{j}" for j in range(len(matrix))]
    return aligned(header, [[f"L{i}"] + [show_score(x) for x in row] for i, row in enumerate(matrix)])

# -----------------------------------------------------------------------------
# Outputs: JSON always, figures when matplotlib is there


def out_paths(out: str, name: str) -> tuple[Path, Path]:
    """(JSON file, figure stem): DIR/name.json and DIR/name_*.png, or an --out ending in .json itself."""
    path = Path(out)
    if path.suffix == ".json":
        return path, path.with_suffix("")
    return path / f"{name}.json", path / name


def write_outputs(args, name: str, result: dict, draw=None):
    """JSON of `result` (with the run's options) and, via draw(plt, result) -> {suffix: figure}, PNGs."""
    if not args.out:
        return
    json_path, stem = out_paths(args.out, name)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    options = {k: v for k, v in vars(args).items() if k != "func"}
    json_path.write_text(json.dumps(dict(options=options, **result), indent=2, ensure_ascii=False) + "\n")
    written = [str(json_path)]
    if draw is not None:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib is not installed: no figures (pip install matplotlib); the JSON is written",
                  file=sys.stderr)
        else:
            for suffix, fig in draw(plt, result).items():
                png = stem.with_name(f"{stem.name}_{suffix}.png")
                fig.savefig(png, dpi=120, bbox_inches="tight")
                plt.close(fig)
                written.append(str(png))
    print("wrote " + ", ".join(written), file=sys.stderr)


def draw_lens(plt, result):
    norms = [r["norm"] for r in result["layers"]]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    a.bar(range(len(norms)), norms)
    a.set(xlabel="layer", ylabel="|s_l|", title="steering vector norms")
    im = b.imshow(result["cosine_matrix"], cmap="RdBu_r", vmin=-1, vmax=1)
    b.set(xlabel="layer", ylabel="layer", title="cos(s_i, s_j)")
    fig.colorbar(im, ax=b)
    return {"norms_cosine": fig}


def draw_ablate(plt, result):
    rows = result["layers"]
    x = [r["layer"] for r in rows]
    has_acc = "accuracy" in result["steered"]
    fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(12 if has_acc else 7, 4.5), squeeze=False)
    a = axes[0][0]
    a.bar([i - 0.2 for i in x], [r["delta_without"] for r in rows], 0.4, label="all but s_l")
    a.bar([i + 0.2 for i in x], [r["delta_alone"] for r in rows], 0.4, label="s_l alone")
    a.axhline(result["base"]["logprob"] - result["steered"]["logprob"], color="k", ls="--", lw=1, label="base")
    a.set(xlabel="layer", ylabel="Δ mean log-prob vs steered", title="ablation: log-prob of steered completions")
    a.legend()
    if has_acc:
        b = axes[0][1]
        b.plot(x, [r["without"]["accuracy"] for r in rows], "o-", label="all but s_l")
        b.plot(x, [r["alone"]["accuracy"] for r in rows], "s-", label="s_l alone")
        b.axhline(result["steered"]["accuracy"], color="C2", ls="--", label="steered")
        b.axhline(result["base"]["accuracy"], color="k", ls="--", label="base")
        b.set(xlabel="layer", ylabel="accuracy", title="ablation: accuracy")
        b.legend()
    return {"logprob": fig}


def draw_positions(plt, result):
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    a.plot(range(len(result["kl"])), result["kl"], "o-", ms=3)
    a.set(xlabel="generated position t", ylabel="KL(steered || base), nats",
          yscale="log" if min(result["kl"]) > 0 else "linear",
          title="per-position effect" + (f" of s_{result['layer']}" if result["layer"] is not None else ""))
    toks = result["gain_first"][::-1]
    b.barh(range(len(toks)), [t["prob_gain"] for t in toks])
    b.set_yticks(range(len(toks)), [show_token(t["token"]) for t in toks])
    b.set(xlabel="mean gain in probability at t = 0", title="tokens boosted at the first generated position")
    return {"kl": fig}


def draw_paths(plt, result):
    parts = [r for r in result["paths"] if "top_tokens" in r]
    fig, a = plt.subplots(figsize=(8, 0.35 * len(parts) + 1.5))
    y = range(len(parts))
    a.barh([i - 0.2 for i in y], [r["kl_share"] for r in parts], 0.4, label="KL share")
    a.barh([i + 0.2 for i in y], [r["logit_share"] for r in parts], 0.4, label="logit share")
    a.set_yticks(list(y), [r["path"] for r in parts])
    a.invert_yaxis()
    a.set(xlabel="share of the total effect", title=f"paths of s_{result['layer']}")
    a.legend()
    return {"shares": fig}


def draw_attention(plt, result):
    out = {}
    for key in ("jsd", "control_jsd"):
        if key in result:
            fig, a = plt.subplots(figsize=(7, 6))
            im = a.imshow(result[key], aspect="auto", cmap="viridis")
            a.set(xlabel="head", ylabel="layer", title="JSD(steered, base) of attention (bits)"
                  + (" — random control" if key == "control_jsd" else ""))
            fig.colorbar(im, ax=a)
            out[key] = fig
    return out


def draw_scale(plt, result):
    rows = result["alphas"]
    has_acc = "accuracy" in rows[0]
    fig, a = plt.subplots(figsize=(7, 4.5))
    a.plot([r["alpha"] for r in rows], [r["logprob"] for r in rows], "o-", label="mean log-prob (steered completions)")
    a.set(xlabel="steering scale α", ylabel="mean log-prob")
    if has_acc:
        b = a.twinx()
        b.plot([r["alpha"] for r in rows], [r["accuracy"] for r in rows], "s-", color="C1", label="accuracy")
        b.set(ylabel="accuracy")
        b.legend(loc="lower right")
    a.legend(loc="upper left")
    return {"sweep": fig}

# -----------------------------------------------------------------------------
# Loading


class TokenIds:
    """Stands in for the tokenizer of a model that has none (the random-tiny model of a --task toy
    run): token 5 is '<5>'."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def decode(self, ids: list[int]) -> str:
        return "".join(f"<{i}>" for i in ids)


def load_study(args) -> tuple[Study, dict, str]:
    _, meta = M.read_steering(args.steering)
    model_id = args.model or meta.get("base_model")
    if not model_id:
        raise ValueError(f"{args.steering} names no base_model in its metadata: pass --model")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    folder = M.resolve_checkpoint(model_id)
    if args.tokenizer or (folder / "tokenizer.json").is_file():
        model, tokenizer = M.load_for_cli(model_id, args.tokenizer, args.dtype, device)
    elif getattr(args, "bench", None):
        raise ValueError(f"{folder} has no tokenizer.json (a --task toy run's model has "
                         "none), and this analysis runs on benchmark prompts: pass --tokenizer DIR. `lens.py lens` "
                         "works without one, naming tokens by id")
    else:  # the lens reads only vectors and the head: tokens are named by id
        model = M.Transformer.from_pretrained(folder, dtype=M.auto_dtype(device) if args.dtype == "auto"
                                              else args.dtype, device=device)
        tokenizer = TokenIds(model.config.vocab_size)
    model.load_steering(args.steering, check_base=not args.any_base)
    study = Study(model, tokenizer, model.steering.detach().clone(), tokenizer.vocab_size)
    if getattr(args, "bench", None):
        study.task = math_task(model_id, args.bench, "test", tokenizer=args.tokenizer, data_dir=args.data_dir,
                               limit=args.limit, wrong=0.0, workers=1, lazy_pool=True)
    return study, meta, model_id


def resolve_layer(layer: int | None, num_layers: int) -> int | None:
    if layer is None:
        return None
    if not -num_layers <= layer < num_layers:
        raise ValueError(f"--layer {layer}: the model has layers 0..{num_layers - 1} (or -1..-{num_layers})")
    return layer % num_layers


def check_numbers(args):
    """Before any model loads: every number the subcommand reads can work (NaN fails each rule)."""
    for flag in ("limit", "samples", "max_new_tokens", "batch_size", "top_k"):
        if getattr(args, flag, 1) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if not 0 <= getattr(args, "temperature", 0) < math.inf:
        raise ValueError(f"--temperature {args.temperature}: must be a finite number >= 0 (0 = greedy)")
    alphas = parse_list(getattr(args, "alphas", "1"), float, "--alphas")
    if not alphas or not all(map(math.isfinite, alphas)):
        raise ValueError(f"--alphas {args.alphas!r}: one or more finite scales")


def parse_list(text: str, kind, flag: str) -> list:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} {text!r}: expected a comma-separated list of {kind.__name__}s") from None

# -----------------------------------------------------------------------------
# Subcommands


def header(study: Study, meta: dict, model_id: str, args) -> dict:
    return dict(command=args.command, steering=args.steering, model=model_id, metadata=meta,
                num_layers=study.model.config.num_layers)


def describe(layer: int | None, others: str) -> str:
    if layer is None:
        return "all vectors vs base"
    return f"s_{layer} (other vectors {'as trained' if others == 'keep' else 'zero'})"


def sequences(study: Study, args) -> tuple[Sequences, dict]:
    """The steered model's completions of the problems, and what they look like."""
    seqs = study.generate(study.vectors, args)
    info = dict(bench=args.bench, problems=len(study.task.prompts), sequences=len(seqs.completions),
                mean_length=sum(map(len, seqs.completions)) / len(seqs.completions))
    print(f"{info['sequences']} completions of {info['problems']} {args.bench} problems from the steered "
          f"model (T={args.temperature:g}, seed {args.seed}), mean length {info['mean_length']:.1f} tokens")
    return seqs, info


def run_lens(args):
    study, meta, model_id = load_study(args)
    model = study.model
    lens = logit_lens(study.vectors, model.head_weight, args.top_k, norm=model.norm if args.after_norm else None,
                      vocab_size=study.vocab_size, rank_by=args.rank_by)
    rows = lens_rows(lens, lambda i: study.tokenizer.decode([i]))
    matrix = cosine_matrix(study.vectors).tolist()
    print(f"logit lens of {args.steering} on {model_id} ({'after' if args.after_norm else 'before'} the final "
          f"norm; top {args.top_k} (+) and bottom {args.top_k} (−) tokens by {args.rank_by}; each "
          f"'token cosine (dot product)')")
    print(format_table(rows))
    print("\ncross-layer cosine of the vectors:")
    print(format_matrix(matrix))
    write_outputs(args, "lens", dict(header(study, meta, model_id, args), after_norm=args.after_norm,
                                     top_k=args.top_k, rank_by=args.rank_by, layers=rows, cosine_matrix=matrix),
                  draw_lens)


def run_ablate(args):
    study, meta, model_id = load_study(args)
    L = study.model.config.num_layers
    layers = [resolve_layer(x, L) for x in parse_list(args.layers, int, "--layers")] if args.layers else list(range(L))
    seqs, info = sequences(study, args)
    steered_acc = study.accuracy(seqs) if args.accuracy else None
    result = ablate(study, seqs, layers, args.batch_size, args if args.accuracy else None, steered_acc)
    acc = args.accuracy
    print(f"mean log-prob of the steered completions: steered {result['steered']['logprob']:.4f}, "
          f"base {result['base']['logprob']:.4f}" + (f"; accuracy steered {result['steered']['accuracy']:.3f}, "
                                                      f"base {result['base']['accuracy']:.3f}" if acc else ""))
    head = ["layer", "|s_l|", "Δlogp all but s_l", "Δlogp s_l alone"] + (["acc all but s_l", "acc s_l alone"]
                                                                          if acc else [])
    body = [[f"L{r['layer']}", num(r["norm"]), num(r["delta_without"]), num(r["delta_alone"])]
            + ([f"{r['without']['accuracy']:.3f}", f"{r['alone']['accuracy']:.3f}"] if acc else [])
            for r in result["layers"]]
    print(aligned(head, body))
    write_outputs(args, "ablate", dict(header(study, meta, model_id, args), sequences=info, **result), draw_ablate)


def run_positions(args):
    study, meta, model_id = load_study(args)
    layer = resolve_layer(args.layer, study.model.config.num_layers)
    ref, treat = contrast(study.vectors, layer, args.others)
    seqs, info = sequences(study, args)
    result = positions(study, seqs, ref, treat, args.batch_size, args.top_k)
    what = describe(layer, args.others)
    print(f"KL(steered || base) per generated position, {what}:")
    print(aligned(["t", "KL (nats)", "sequences"], [[str(t), num(k), str(c)] for t, (k, c) in
                                                    enumerate(zip(result["kl"], result["counts"]))]))
    ratio = result["kl_first"] / result["kl_later"] if result["kl_later"] > 0 else float("inf")
    print(f"KL at t = 0: {num(result['kl_first'])}; mean over t >= 1: {num(result['kl_later'])} "
          f"(t = 0 is {ratio:.1f}x the later mean)")
    for key, label in (("rise_first", "log-prob rises most"), ("gain_first", "probability rises most")):
        print(f"\ntokens whose {label} at t = 0 (means over {info['sequences']} sequences):")
        print(aligned(["token", "id", "Δlog p", "p base", "p steered"],
                      [[show_token(t["token"]), str(t["id"]), num(t["logprob_rise"]), num(t["prob_ref"]),
                        num(t["prob_treat"])] for t in result[key]]))
    name = "positions" if layer is None else f"positions_L{layer}"
    write_outputs(args, name, dict(header(study, meta, model_id, args), layer=layer, others=args.others,
                                   sequences=info, **result), draw_positions)


def run_paths(args):
    study, meta, model_id = load_study(args)
    layer = resolve_layer(args.layer, study.model.config.num_layers)
    if not study.vectors[layer].any():
        raise ValueError(f"--layer {layer}: its steering vector is zero, so it has no effect to split")
    ref, treat = contrast(study.vectors, layer, args.others)
    seqs, info = sequences(study, args)
    result = paths(study, seqs, layer, ref, treat, args.batch_size, args.top_k)
    rows = result["paths"]
    parts = [r for r in rows if "top_tokens" in r]
    heads = sorted((r for r in rows if " h" in r["path"]), key=lambda r: -r["kl_share"])[:10]
    other = [r for r in rows if r["path"] in ("total", "all terms together")]

    def line(r):
        tokens = ", ".join(f"{show_token(t['token'])} {t['logit_change']:+.2f}" for t in r.get("top_tokens", []))
        return [r["path"], num(r["kl"]), num(r["kl_share"]), num(r["kl_share_first"]), num(r["logit_share"]), tokens]

    print(f"path patching of {describe(layer, args.others)} over {result['positions']} positions "
          f"({result['first_positions']} at t = 0):")
    head = ["path", "KL", "KL share", "KL share t=0", "logit share", "top tokens (mean Δlogit)"]
    print(aligned(head, [line(r) for r in other + parts]))
    s = result["partition_sums"]
    print(f"sum of the shares over direct + attention + MLP: KL {s['kl_share']:.4f} (non-additive by "
          f"{s['kl_share'] - 1:+.4f}), KL at t = 0 {s['kl_share_first']:.4f} ({s['kl_share_first'] - 1:+.4f}), "
          f"logit {s['logit_share']:.4f} ({s['logit_share'] - 1:+.4f})")
    print(f"all terms together rebuild the steered logits to within {result['rebuild_max_abs_logit_error']:.2e}")
    if heads:
        print("\nattention heads, top 10 by KL share:")
        print(aligned(head[:5], [line(r)[:5] for r in heads]))
    write_outputs(args, f"paths_L{layer}", dict(header(study, meta, model_id, args), others=args.others,
                                                sequences=info, **result), draw_paths)


def run_attention(args):
    study, meta, model_id = load_study(args)
    cfg = study.model.config
    layer = resolve_layer(args.layer, cfg.num_layers)
    if args.control and layer is None:
        raise ValueError("--control needs --layer (a random direction of the same norm as that layer's vector)")
    ref, treat = contrast(study.vectors, layer, args.others)
    seqs, info = sequences(study, args)
    result = attention(study, seqs, ref, treat, args.batch_size)
    if args.control:
        direction = torch.randn(cfg.hidden_size, generator=torch.Generator().manual_seed(args.seed)).to(treat)
        control = treat.clone()
        control[layer] = direction / direction.norm() * treat[layer].norm()
        c = attention(study, seqs, ref, control, args.batch_size)
        result.update(control_jsd=c["jsd"], control_layer_mean=c["layer_mean"], control_layer_max=c["layer_max"])
    what = describe(layer, args.others)
    print(f"JSD (bits) between steered and base attention, mean over {result['positions']} positions, {what}:")
    head = ["layer", "mean", "max head"] + (["control mean"] if args.control else []) + \
        [f"h{h}" for h in range(cfg.num_heads)]
    body = [[f"L{j}", num(result["layer_mean"][j]), num(result["layer_max"][j])]
            + ([num(result["control_layer_mean"][j])] if args.control else [])
            + [num(x) for x in result["jsd"][j]] for j in range(cfg.num_layers)]
    if layer is not None:  # the layers before the vector run on identical inputs: exactly 0, shown as a check
        before = max(result["layer_max"][:layer + 1])
        print(f"layers 0..{layer} (before the vector): max JSD {num(before)}")
        body = body[layer + 1:]
    if body:
        print(aligned(head, body))
    name = "attention" if layer is None else f"attention_L{layer}"
    write_outputs(args, name, dict(header(study, meta, model_id, args), layer=layer, others=args.others,
                                   sequences=info, **result), draw_attention)


def run_scale(args):
    study, meta, model_id = load_study(args)
    alphas = parse_list(args.alphas, float, "--alphas")
    seqs, info = sequences(study, args)
    steered_acc = study.accuracy(seqs) if args.accuracy else None
    rows = scale_sweep(study, seqs, alphas, args.batch_size, args if args.accuracy else None, steered_acc)
    head = ["alpha", "logp (steered completions)"] + (["accuracy", "own logp", "length", "truncated"]
                                                      if args.accuracy else [])
    body = [[f"{r['alpha']:g}", num(r["logprob"])] + ([f"{r['accuracy']:.3f}", num(r["own_logprob"]),
                                                        f"{r['mean_length']:.1f}", f"{r['truncated']:.2f}"]
                                                       if args.accuracy else []) for r in rows]
    print(aligned(head, body))
    write_outputs(args, "scale", dict(header(study, meta, model_id, args), sequences=info, alphas=rows), draw_scale)


COMMANDS = {"lens": run_lens, "ablate": run_ablate, "positions": run_positions, "paths": run_paths,
            "attention": run_attention, "scale": run_scale}


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--steering", required=True, help="steering file (safetensors, one tensor 'steering' (L, d))")
    common.add_argument("--model", help="base model folder or hub id (default: base_model in the file's metadata)")
    common.add_argument("--tokenizer", help="tokenizer folder (default: the model's)")
    common.add_argument("--any-base", action="store_true",
                        help="read a steering file made for other base weights (same shapes) on --model's")
    common.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda when there is one)")
    common.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"],
                        help="compute dtype (auto: model.auto_dtype)")
    common.add_argument("--out", help="folder for <analysis>.json and figures (or a .json file)")

    prompts = argparse.ArgumentParser(add_help=False)
    prompts.add_argument("--bench", default="math500", help=f"benchmark, test split ({', '.join(data.NAMES)})")
    prompts.add_argument("--data-dir", help=f"dataset folder (default ${data.ENV_VAR}, else ../shared/data)")
    prompts.add_argument("--limit", type=int, default=8, help="the first N problems")
    prompts.add_argument("--samples", type=int, default=1, help="completions per problem")
    prompts.add_argument("--max-new-tokens", type=int, default=64, help="completion length cap (tokens)")
    prompts.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0 = greedy)")
    prompts.add_argument("--seed", type=int, default=0, help="sampling seed")
    prompts.add_argument("--batch-size", type=int, default=8, help="sequences per teacher-forced forward")

    layer = argparse.ArgumentParser(add_help=False)
    layer.add_argument("--others", default="keep", choices=["keep", "zero"],
                       help="with --layer: the other vectors as trained (keep) or zero (s_l alone vs base)")

    p = argparse.ArgumentParser(prog="lens.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    s = sub.add_parser("lens", parents=[common], help="logit lens: tokens, dot products, norms, cross-layer cosines")
    s.add_argument("--top-k", type=int, default=10, help="tokens shown per side and layer")
    s.add_argument("--after-norm", action="store_true", help="apply the final RMSNorm to each vector first")
    s.add_argument("--rank-by", default="cosine", choices=["cosine", "dot"], help="what orders the tokens")

    s = sub.add_parser("ablate", parents=[common, prompts], help="per layer: all vectors but s_l, and s_l alone")
    s.add_argument("--layers", help="comma-separated layers to ablate (default: all)")
    s.add_argument("--accuracy", action="store_true", help="also sample and grade every variant (2 runs per layer)")

    s = sub.add_parser("positions", parents=[common, prompts, layer], help="KL per generated position; t = 0 tokens")
    s.add_argument("--layer", type=int, help="only this layer's vector (negative: from the top)")
    s.add_argument("--top-k", type=int, default=10, help="tokens listed at t = 0")

    s = sub.add_parser("paths", parents=[common, prompts, layer], help="path patching of one layer's vector")
    s.add_argument("--layer", type=int, default=-2, help="the vector to split (default: the penultimate layer's)")
    s.add_argument("--top-k", type=int, default=3, help="tokens listed per path")

    s = sub.add_parser("attention", parents=[common, prompts, layer], help="JSD of attention, per layer and head")
    s.add_argument("--layer", type=int, help="only this layer's vector (negative: from the top)")
    s.add_argument("--control", action="store_true", help="also a random direction with the norm of s_layer")

    s = sub.add_parser("scale", parents=[common, prompts], help="accuracy and log-prob against the scale alpha")
    s.add_argument("--alphas", default="0,0.25,0.5,1,1.5,2", help="comma-separated steering scales")
    s.add_argument("--accuracy", action=argparse.BooleanOptionalAction, default=True,
                   help="sample and grade at every alpha")
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] not in COMMANDS and argv[0] not in ("-h", "--help"):
        argv = ["lens", *argv]  # the original interface: python lens.py --steering F ...
    args = build_parser().parse_args(argv)
    try:
        check_numbers(args)
        COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"lens.py {args.command}: {e}") from None


if __name__ == "__main__":
    import cluster
    cluster.run_cli(main)
