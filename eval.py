"""Benchmark evaluation: the base model and its steered versions side by side, scored and laid
out like Table 1 of the paper (benchmarks as columns, then Avg.; one row per setup).

    for each setup (the base model = steering zero, then each steering file), side by side:
        for each benchmark, for each seed:
            sample k completions per problem, grade the last \\boxed{} against the gold answer
            score = mean over problems of the mean correctness of that problem's k samples
        report mean ± std over seeds of the per-seed scores (in percent)

Metrics. pass@1 estimated from k samples per problem and "avg@k" are the same number: the mean
correctness of a problem's samples, averaged over problems. The name says how many samples
there were (pass@1 for k = 1, avg@k otherwise); with k > 1 the table adds the pass@1 of each
problem's FIRST sample alone (a '1st' column), as the paper reports for AIME/AMC. The std over
seeds is the SAMPLE std (n - 1 denominator: the seeds are a sample of possible runs) unless
--std population (n, numpy's np.std, the paper's: 1.22x smaller with 3 seeds); with one seed it
is 0. Avg. is the mean over benchmarks, and its std is the std over seeds of the per-seed averages.

Side by side: the base model and every steering file sampled alike (the same temperature and
seeds; e.g. a run's whole history with --checkpoints all) run in ONE sampler pass, each file a row
of the model's table of vectors and each problem once per row in the same generate calls (sample.py:
"Many vectors, one batch"). A problem draws the same random numbers under every row, so the results
equal evaluating the setups one after another (--sequential does that, for comparison): bit for
bit on CPU in fp32; on GPU the logits move by float rounding with the batch's shape, which can flip
a draw at a CDF boundary, as any change of batch does. LoRA and full fine-tuning setups run alone.

Greedy decoding (temperature 0) is deterministic, so a greedy setup is run ONCE with ONE
sample per problem, whatever --seeds and --samples say, and reports std 0: k identical samples
and identical seeds would only cost time.

--protocol paper fills in what was not given on the command line: benchmarks AIME24, AIME25,
AMC23, MATH500, Minerva, OlympiadBench; base model greedy, steered models T = 1; avg@32 on
AIME24/25 and AMC23, pass@1 (one sample) elsewhere; 3 seeds; population std; and the paper's
length caps: prompt + completion <= min(the model's context, 32768) IN TOTAL (4096 for
Qwen2.5-Math, whose context it is), the completion taking what its prompt leaves.

Length, always: prompt + completion <= --max-len, by default the model's context
(max_position_embeddings), so generation never runs past what the model was trained for;
--max-new-tokens (default 4096) caps the completion within that.

A run directory of train.py can stand in for a steering file: --checkpoints picks its latest
vector, every steering-step{N} of its history, given steps, or "best" (every one, with the best
Avg. marked: chosen on the very test sets reported, as the paper did, so optimistic). A run of
several vectors (train.py --lrs / --seeds) stands for each of its members' folders.

Prompts are the model's chat template around the problem with the paper's system prompt
(data.SYSTEM_PROMPT); the tokenizer (the model folder's, or --tokenizer) gives the stop ids and
the vocabulary size the sampler may draw from.

Runs on one GPU, on CPU (small models), or on several GPUs under torchrun:

    python eval.py --model Qwen/Qwen2.5-Math-1.5B --steering runs/x/steering.safetensors --protocol paper
    torchrun --nproc_per_node 8 eval.py --model ... --steering ... --protocol paper

Under torchrun each rank takes a contiguous share of the problems; rank 0 gathers every sample
(all_gather_object), scores and writes. The outputs in --out: results.md (the table),
results.json (the same numbers, with per-seed scores) and samples.jsonl (one row per sample).
Sampling seeds: a problem's random draws are hashed from --seed, the benchmark, the problem's
index and the sample (rl_task.Task.evaluate, the one evaluation that training's --eval-every
also runs): they do not depend on the world size, --batch-prompts or the setup, so every row
sees the same random numbers and one vector gets the same score here and in training.
"""
import argparse
import json
import math
import os
import statistics
import sys
import time
import types
import typing
from collections import defaultdict
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from tqdm import tqdm

import adapters
import cluster
import data
import hub
import memory
import model as M
import reward
import train_config
from rl_task import EVAL_GRADE_TIMEOUT, Task, completion_budget, math_task
from run_lifecycle import config_dir
from sample import Sampler

# -----------------------------------------------------------------------------
# Config: every field is a command-line flag (--max-new-tokens for max_new_tokens). None means
# "not given": the protocol, or the plain default, decides.


@dataclass
class EvalConfig:
    model: str = field(metadata={"help": "checkpoint folder or hub id of the base model"})
    steering: str = field(default="", metadata={
        "help": "comma-separated adapter files (steering or LoRA), full fine-tuning folders, train.py run "
                "directories or hub repos org/name[:file], one setup (table row) each; 'none' = the base model"})
    checkpoints: str = field(default="last", metadata={
        "help": "for a run directory: last (steering.safetensors), all (every steering-step{N}), comma-separated "
                "steps (e.g. 106,212,314), or best: all of them plus a row for the best by Avg. -- chosen ON THE "
                "TEST BENCHMARKS being reported (what the paper did for Table 1), so optimistic, and labelled so"})
    base: bool = field(default=True, metadata={
        "help": "also evaluate the base model (steering zero) as the first row (--no-base to skip)"})
    bench: str | None = field(default=None, metadata={
        "help": f"comma-separated benchmarks (test splits of: {', '.join(data.NAMES)}); "
                "default math500, or the paper's six with --protocol paper"})
    protocol: str = field(default="", metadata={"help": "'paper': the paper's evaluation settings (see above)"})
    samples: int | None = field(default=None, metadata={
        "help": "samples per problem per seed for sampled setups (default 1; paper: 32 on AIME/AMC)"})
    seeds: int | None = field(default=None, metadata={"help": "seeds for sampled setups (default 1; paper: 3)"})
    seed: int = field(default=0, metadata={"help": "first seed; the others follow it"})
    temperature: float | None = field(default=None, metadata={
        "help": "sampling temperature of every setup, 0 = greedy (default 0; paper: base 0, steered 1)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling threshold"})
    max_new_tokens: int | None = field(default=None, metadata={
        "help": "completion length cap (tokens; default 4096, or whatever --max-len leaves with --protocol paper)"})
    max_len: int | None = field(default=None, metadata={
        "help": "prompt + completion cap (tokens); default the model's context (max_position_embeddings in its "
                "config.json); --protocol paper: min(context, 32768), the paper's caps (4096 for Qwen2.5-Math)"})
    std: str | None = field(default=None, metadata={
        "help": "the ± over seeds: sample (n - 1 denominator; default) or population (n, numpy's np.std: the "
                "paper's; default with --protocol paper)"})
    limit: int | None = field(default=None, metadata={"help": "only the first N problems of each benchmark"})
    out: str = field(default="", metadata={
        "help": "output folder (default: runs/eval-<hash of the other flags>; the same command writes the same one)"})
    data_dir: str | None = field(default=None, metadata={
        "help": f"dataset folder (default ${data.ENV_VAR}, else ../shared/data next to the repo)"})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer folder (default: the model's)"})
    dtype: str = field(default="auto", metadata={
        "help": "float32, bfloat16, float16, or auto (model.auto_dtype: bfloat16 on CUDA and on CPUs with "
                "native bf16 matmuls, else float32)"})
    device: str | None = field(default=None, metadata={
        "help": "default cuda (cuda:LOCAL_RANK under torchrun), else cpu"})
    steering_scale: float = field(default=1.0, metadata={"help": "alpha in h + alpha * steering[l]"})
    any_base: bool = field(default=False, metadata={
        "help": "load adapter files made for other base weights (same shapes): a vector's transfer to a sibling"})
    kv_cache_tokens: int | None = field(default=None, metadata={
        "help": "KV cache size in tokens (default: the memory plan's: one generate call's sequences, at most 90 %% "
                "of the memory the weights leave)"})
    batch_prompts: int = field(default=64, metadata={
        "help": "problems per generate call, each under every setup run side by side (the progress bar moves "
                "once per call)"})
    sequential: bool = field(default=False, metadata={
        "help": "evaluate the setups one after another, not side by side in one batch (the same results; "
                "for comparison, or to hold one setup's sequences in memory at a time)"})
    grade_workers: int = field(default=4, metadata={"help": "grading processes"})
    grade_timeout: float = field(default=EVAL_GRADE_TIMEOUT, metadata={"help": "seconds allowed to grade one sample"})
    wandb_project: str = field(default="", metadata={
        "help": "log the config and the results table to this Weights & Biases project (needs wandb)"})


def parse_args(argv=None) -> EvalConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(EvalConfig):
        flag, helptext = "--" + f.name.replace("_", "-"), f.metadata["help"]
        kind = f.type
        if isinstance(kind, types.UnionType):  # "int | None" -> int
            kind = next(t for t in typing.get_args(kind) if t is not type(None))
        if kind is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=helptext)
        elif f.default is MISSING:
            p.add_argument(flag, type=kind, required=True, help=helptext)
        else:
            p.add_argument(flag, type=kind, default=f.default, help=helptext)
    return EvalConfig(**vars(p.parse_args(argv)))


# The paper's protocol: avg@32 on the small competition sets, one sample elsewhere.
PAPER_BENCHES = "aime24,aime25,amc23,math500,minerva,olympiadbench"
PAPER_SAMPLES = {"aime24": 32, "aime25": 32, "amc23": 32}
PAPER_SEEDS = 3
DISPLAY = {"aime24": "AIME24", "aime25": "AIME25", "amc23": "AMC23", "math500": "MATH500",
           "minerva": "Minerva", "olympiadbench": "OlympiadBench", "gsm8k": "GSM8K"}


def apply_protocol(cfg: EvalConfig) -> EvalConfig:
    if cfg.protocol not in ("", "paper"):
        raise ValueError(f"--protocol '{cfg.protocol}' is unknown (use 'paper' or leave it out)")
    paper = cfg.protocol == "paper"
    if cfg.bench is None:
        cfg = replace(cfg, bench=PAPER_BENCHES if paper else "math500")
    if cfg.seeds is None:
        cfg = replace(cfg, seeds=PAPER_SEEDS if paper else 1)
    if cfg.std is None:
        cfg = replace(cfg, std="population" if paper else "sample")
    if cfg.std not in ("sample", "population"):
        raise ValueError(f"--std '{cfg.std}': use sample or population")
    if not (cfg.checkpoints in ("last", "all", "best") or all(x.strip().isdigit() for x in cfg.checkpoints.split(","))):
        raise ValueError(f"--checkpoints '{cfg.checkpoints}': use last, all, best or comma-separated step numbers")
    for name in ("samples", "seeds", "max_new_tokens", "max_len", "batch_prompts", "limit"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if cfg.temperature is not None and not 0 <= cfg.temperature < math.inf:  # (NaN fails every comparison)
        raise ValueError(f"--temperature {cfg.temperature}: must be a finite number >= 0 (0 = greedy)")
    if not 0 < cfg.top_p <= 1:
        raise ValueError(f"--top-p {cfg.top_p}: must be in (0, 1]")
    if not math.isfinite(cfg.steering_scale):
        raise ValueError(f"--steering-scale {cfg.steering_scale}: must be a finite number")
    return cfg


@dataclass
class Setup:
    """One row of the table: the base model or one steering file, with how it is sampled."""
    name: str  # "base", or the steering file as given
    steering: str | None
    temperature: float
    seeds: list[int]
    run: str | None = None  # the run directory the file came from (--checkpoints)
    step: int | None = None  # its training step


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file() and not (path / M.ADAPTER_JSON).is_file()


def run_members(run_dir: Path) -> list[Path]:
    """The members' folders of a run of several vectors (train.py --lrs / --seeds), each a run
    directory of its own; [] for a run of one."""
    try:
        saved = json.loads((run_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--steering {run_dir}: unreadable config.json ({e})") from None
    if not (saved.get("lrs") or saved.get("seeds")):
        return []
    fields = ("lrs", "seeds", "lr", "seed")
    return [run_dir / m.name for m in train_config.members(types.SimpleNamespace(**{k: saved[k] for k in fields}))]


def run_checkpoints(run_dir: Path, which: str) -> list[tuple[Path, int | None]]:
    """The adapter files of a train.py run directory that --checkpoints asks for, oldest first: the
    run's adapter names them (Adapter.latest_file, and its history {kind}-step{N}.safetensors, when
    it keeps one: full fine-tuning keeps only its latest folder, full/)."""
    try:  # runs from before adapters wrote no 'adapter': steering
        kind = json.loads((run_dir / "config.json").read_text()).get("adapter", adapters.Steering.kind)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--steering {run_dir}: unreadable config.json ({e})") from None
    if kind not in adapters.ADAPTERS:
        raise ValueError(f"--steering {run_dir}: config.json names an unknown adapter '{kind}'")
    adapter = adapters.ADAPTERS[kind]
    history = {step: f for f in run_dir.iterdir() if (step := adapter.file_step(f.name)) is not None}
    if which == "last" or not adapter.keeps_history:
        latest = run_dir / adapter.latest_file()
        if which != "last":
            raise ValueError(f"--checkpoints {which}: a run of the '{kind}' adapter keeps only its latest weights "
                             f"({latest})")
        if not latest.exists():
            raise FileNotFoundError(f"--steering {run_dir}: no {latest.name} (not a train.py run directory, "
                                    "or no checkpoint yet)")
        return [(latest, max(history) if history else None)]
    if not history:
        raise FileNotFoundError(f"--steering {run_dir}: no {adapter.step_file('{N}')} checkpoints")
    steps = sorted(history) if which in ("all", "best") else [int(x) for x in which.split(",")]
    missing = [s for s in steps if s not in history]
    if missing:
        raise FileNotFoundError(f"--steering {run_dir}: no checkpoint at step(s) {missing}; it has {sorted(history)}")
    return [(history[s], s) for s in steps]


def make_setups(cfg: EvalConfig) -> list[Setup]:
    entries = []  # (file or None, run directory, step)
    for spec in (s.strip() for s in cfg.steering.split(",") if s.strip()):
        if spec.lower() == "none":
            entries.append((None, None, None))
        elif is_run_dir(Path(spec)):  # a run of several vectors (--lrs / --seeds): each member's folder
            for run in run_members(Path(spec)) or [Path(spec)]:
                entries += [(str(f), str(run), step) for f, step in run_checkpoints(run, cfg.checkpoints)]
        elif Path(spec).exists():  # an adapter file, or a full fine-tuning folder
            entries.append((spec, None, None))
        else:  # a shared vector: org/name[:file] on the hub
            entries.append((str(hub.resolve(spec)), None, None))
    if cfg.base and (None, None, None) not in entries:
        entries.insert(0, (None, None, None))
    entries = list(dict.fromkeys(entries))  # drop repeats, keep order
    if not entries:
        raise ValueError("nothing to evaluate: --no-base and no --steering file")
    setups = []
    for path, run, step in entries:
        if cfg.temperature is not None:
            temperature = cfg.temperature
        else:  # the paper: greedy base, steered models sampled at T = 1
            temperature = 1.0 if cfg.protocol == "paper" and path is not None else 0.0
        seeds = [cfg.seed] if temperature == 0 else [cfg.seed + i for i in range(cfg.seeds)]
        setups.append(Setup("base" if path is None else path, path, temperature, seeds, run, step))
    return setups


def best_checkpoints(results: dict, setups: list[Setup]) -> dict[str, str]:
    """--checkpoints best: per run directory, the setup with the highest Avg. Chosen on the test
    benchmarks being reported, as the paper chose its Table 1 checkpoint: an optimistic number."""
    best = {}
    for s in setups:
        if s.run is not None and (s.run not in best or
                                  results[s.name]["avg"]["mean"] > results[best[s.run]]["avg"]["mean"]):
            best[s.run] = s.name
    return best


def resolve_lengths(cfg: EvalConfig, context: int | None) -> EvalConfig:
    """--max-len defaults to the model's context; --protocol paper caps it at 32K (the paper's
    eval cap; Qwen2.5-Math's own context is 4K) and lets the completion take what the prompt
    leaves. Generation never runs past max_len in total."""
    max_len = cfg.max_len
    if max_len is None:
        max_len = min(context or 32768, 32768) if cfg.protocol == "paper" else context
    if max_len is not None and context is not None and max_len > context:
        raise ValueError(f"--max-len {max_len} is beyond the model's context of {context} tokens "
                         "(max_position_embeddings in its config.json)")
    max_new = cfg.max_new_tokens
    if max_new is None:
        max_new = max_len if cfg.protocol == "paper" and max_len else 4096
    return replace(cfg, max_len=max_len, max_new_tokens=max_new)


def samples_per_problem(cfg: EvalConfig, bench: str, temperature: float) -> int:
    if temperature == 0:
        return 1  # greedy: every sample would be the same
    if cfg.samples is not None:
        return cfg.samples
    return PAPER_SAMPLES.get(bench, 1) if cfg.protocol == "paper" else 1

# -----------------------------------------------------------------------------
# Metrics: small pure functions over correctness lists (one list of 0/1 per problem).


def pass_at_1(correct: list[list[float]]) -> float:
    """Mean over problems of the mean correctness of each problem's samples (any number of
    samples per problem: the unbiased pass@1 estimate)."""
    if not correct or any(not c for c in correct):
        raise ValueError("pass@1 needs at least one problem, each with at least one sample")
    return sum(sum(c) / len(c) for c in correct) / len(correct)


def avg_at_k(correct: list[list[float]], k: int) -> float:
    """avg@k: every problem has exactly k samples; the mean over problems of their mean."""
    bad = [i for i, c in enumerate(correct) if len(c) != k]
    if bad:
        raise ValueError(f"avg@{k}: problems {bad[:10]} do not have exactly {k} samples")
    return pass_at_1(correct)


def metric_name(k: int) -> str:
    return "pass@1" if k == 1 else f"avg@{k}"


def mean_std(values: list[float], population: bool = False) -> tuple[float, float]:
    """Mean and std over seeds: the SAMPLE std (n - 1) by default, the POPULATION std (n, as
    numpy's np.std, which the paper's tables use) when asked; std 0 for a single value."""
    if not values:
        raise ValueError("mean_std of no values")
    if len(values) == 1:
        return values[0], 0.0
    return statistics.fmean(values), statistics.pstdev(values) if population else statistics.stdev(values)

# -----------------------------------------------------------------------------
# The evaluation core: generate -> decode -> grade, one record per sample. The sampler, the
# tokenizer and the grader come in as arguments so tests can swap in fakes.


def evaluate_setups(sampler, setups: list[Setup], tasks: dict[str, Task], cfg: EvalConfig, rank: int = 0,
                    world: int = 1, progress: tqdm | None = None, rows: list[int] | None = None) -> list[dict]:
    """Every sample of the setups on this rank's share of each benchmark, graded by its Task. One
    setup runs on the model's adapter as it is (rows None); several, sampled alike, run side by side,
    setup i as row rows[i] of the model's steering table (load_table)."""
    first, records = setups[0], []
    name = first.name if len(setups) == 1 else f"{len(setups)} setups"
    by_row = dict(zip(rows or [None], setups))
    for bench, task in tasks.items():
        k = samples_per_problem(cfg, bench, first.temperature)
        for seed in first.seeds:
            def report(done, tokens, final):  # the bar, or one line in a log file
                rate = tokens / max(time.time() - progress.started, 1e-9)
                progress.set_description(f"{name} {bench} seed {seed}", refresh=False)
                progress.set_postfix_str(f"{rate:.0f} tok/s", refresh=not final)
                if progress.plain:
                    print(f"{name} {bench} seed {seed}: {done}/{progress.total} samples, {rate:.0f} tok/s",
                          file=sys.stderr, flush=True)

            def shown(groups):  # after each generate call
                progress.tokens = getattr(progress, "tokens", 0) + sum(len(c.tokens) for g in groups for c in g)
                progress.done = getattr(progress, "done", 0) + len(groups) * k
                progress.update(len(groups) * k)
                report(progress.done, progress.tokens, final=True)

            def beat(stats):  # within a long generate call, every sample.PROGRESS_SECONDS
                report(getattr(progress, "done", 0) + stats.finished, getattr(progress, "tokens", 0) +
                       stats.decode_tokens, final=False)
            if progress is not None:
                sampler.on_progress = beat
            done = task.evaluate(sampler, samples=k, temperature=first.temperature, seed=seed,
                                 max_new_tokens=cfg.max_new_tokens or 4096, max_len=cfg.max_len, top_p=cfg.top_p,
                                 rank=rank, world=world, batch_prompts=cfg.batch_prompts,
                                 progress=shown if progress is not None else None, vectors=rows)
            for s in done:
                p, text = task.rows[s.index], task.decode(s.tokens)
                records.append(dict(setup=by_row[s.vector].name, bench=bench, index=s.index, id=p["id"], seed=seed,
                                    sample=s.sample, answer=p["answer"], extracted=reward.extract_boxed(text),
                                    reward=s.correct, finish_reason=s.finish_reason, n_tokens=len(s.tokens),
                                    completion=text))
    return records


def summarize(records: list[dict], setups: list[str], benches: list[str], population: bool = False) -> dict:
    """Per setup and benchmark: metric, per-seed scores, mean ± std (percent; sample std, or
    population std when asked); and Avg. With several samples per problem (avg@32 on AIME/AMC)
    also `first_sample`: the pass@1 of each problem's first sample alone, per seed; and
    `headroom`: pass@k, and the problems whose k samples are all right / all wrong (mean over seeds)."""
    runs = defaultdict(lambda: defaultdict(list))  # (setup, bench, seed) -> problem index -> rewards
    for r in records:
        runs[(r["setup"], r["bench"], r["seed"])][r["index"]].append(r["reward"])
    results = {}
    for setup in setups:
        seeds = sorted({seed for (s, _, seed) in runs if s == setup})
        if not seeds:
            raise ValueError(f"no samples for setup {setup}")
        row = {}
        for bench in benches:
            per_seed, first, ks, counts, spread = [], [], set(), set(), []
            for seed in seeds:
                correct = list(runs[(setup, bench, seed)].values())
                if not correct:
                    raise ValueError(f"no samples for setup {setup}, benchmark {bench}, seed {seed}")
                k = len(correct[0])
                per_seed.append(100 * avg_at_k(correct, k))
                first.append(100 * pass_at_1([c[:1] for c in correct]))  # records arrive in sample order
                tests = {f"pass@{k}": any, "all_right": all, "all_wrong": lambda c: not any(c)}
                spread.append({name: 100 * statistics.fmean(map(test, correct)) for name, test in tests.items()})
                ks.add(k)
                counts.add(len(correct))
            if len(ks) != 1 or len(counts) != 1:
                raise ValueError(f"setup {setup}, benchmark {bench}: seeds differ in samples {ks} or problems {counts}")
            mean, std = mean_std(per_seed, population)
            k = ks.pop()
            row[bench] = dict(metric=metric_name(k), problems=counts.pop(), seeds=seeds,
                              per_seed=per_seed, mean=mean, std=std)
            if k > 1:
                first_mean, first_std = mean_std(first, population)
                row[bench]["first_sample"] = dict(metric="pass@1 (first sample)", per_seed=first,
                                                  mean=first_mean, std=first_std)
                # the headroom RL works in: pass@k bounds what sharpening can reach, and a problem whose
                # k samples all agree gives a group of k rollouts no signal
                row[bench]["headroom"] = {name: statistics.fmean(s[name] for s in spread) for name in spread[0]}
        avg_per_seed = [statistics.fmean(row[b]["per_seed"][i] for b in benches) for i in range(len(seeds))]
        mean, std = mean_std(avg_per_seed, population)
        results[setup] = dict(benchmarks=row, avg=dict(per_seed=avg_per_seed, mean=mean, std=std))
    return results


def markdown_table(results: dict, setups: list[Setup], benches: list[str], model_name: str,
                   population: bool = False, best: dict[str, str] | None = None) -> str:
    """Table 1's layout. Benchmarks sampled several times per problem get a second column, the
    pass@1 of the first sample alone (the paper reports both for AIME/AMC)."""
    best = set((best or {}).values())

    def label(s: Setup) -> str:
        how = "greedy" if s.temperature == 0 else f"T={s.temperature:g}"
        text = f"{model_name} ({how})" if s.steering is None else f"{model_name} + {s.steering} ({how})"
        return text + (" **best Avg. of its run, chosen on these test sets**" if s.name in best else "")

    def cell(m: dict) -> str:
        return f"{m['mean']:.1f} ± {m['std']:.1f}"

    multi = [b for b in benches if any("first_sample" in results[s.name]["benchmarks"][b] for s in setups)]
    head = ["Setup"]
    for b in benches:
        head += [DISPLAY.get(b, b)] + ([f"{DISPLAY.get(b, b)} 1st"] if b in multi else [])
    head.append("Avg.")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + [":---:"] * (len(head) - 1)) + "|"]
    for s in setups:
        row, cells = results[s.name], [label(s)]
        for b in benches:
            m = row["benchmarks"][b]
            cells += [cell(m)] + ([cell(m.get("first_sample", m))] if b in multi else [])
        lines.append("| " + " | ".join(cells + [cell(row["avg"])]) + " |")
    notes = []
    for s in setups:
        metrics = ", ".join(f"{DISPLAY.get(b, b)} {results[s.name]['benchmarks'][b]['metric']}" for b in benches)
        seeds = results[s.name]["benchmarks"][benches[0]]["seeds"]
        runs = "one deterministic run (greedy), std 0" if s.temperature == 0 else f"{len(seeds)} seed(s) {seeds}"
        notes.append(f"- {label(s)}: {metrics}; {runs}")
        for b in benches:
            if "headroom" in results[s.name]["benchmarks"][b]:
                (name, reach), (_, right), (_, wrong) = results[s.name]["benchmarks"][b]["headroom"].items()
                notes.append(f"  - {DISPLAY.get(b, b)}: {name} {reach:.1f}; every sample right on {right:.1f} % "
                             f"of the problems, every one wrong on {wrong:.1f} %")
    std = "population std (n, np.std: the paper's)" if population else "sample std (n-1)"
    legend = f"Percent correct, mean ± {std} over seeds."
    if multi:
        legend += " A '1st' column is the pass@1 of each problem's first sample alone."
    return "\n".join(lines + ["", legend, *notes]) + "\n"

# -----------------------------------------------------------------------------
# Running it: data, model, distributed plumbing, outputs.


def bench_names(cfg: EvalConfig) -> list[str]:
    names = [b.strip() for b in cfg.bench.split(",") if b.strip()]
    if not names:
        raise ValueError("--bench names no benchmark")
    unknown = [b for b in names if b not in data.NAMES]
    if unknown:
        raise ValueError(f"--bench {','.join(unknown)}: unknown (known: {', '.join(data.NAMES)})")
    return names


def side_by_side(setups: list[Setup], sequential: bool = False) -> list[list[Setup]]:
    """The setups in groups that run in one sampler pass: the base and the steering files sampled
    alike (temperature and seeds) and steering at one --steer-at point; a LoRA or full fine-tuning
    setup, or every setup with `sequential`, alone. Groups in the order of their first setup."""
    groups = []  # [how it is sampled, its --steer-at point (None: the base alone so far), its setups]
    for s in setups:
        meta = M.adapter_metadata(Path(s.steering)) if s.steering is not None else {}
        if sequential or meta.get("kind", adapters.Steering.kind) != adapters.Steering.kind:
            groups.append([None, None, [s]])
            continue
        alike = (s.temperature, tuple(s.seeds))
        point = meta.get("steer_at", "post-block") if s.steering is not None else None  # the base: any point
        group = next((g for g in groups if g[0] == alike and (point is None or g[1] in (None, point))), None)
        if group is None:
            groups.append([alike, point, [s]])
        else:
            group[1] = group[1] or point
            group[2].append(s)
    return [members for _, _, members in groups]


def load_table(model: M.Transformer, setups: list[Setup], scale: float, base_folder: Path, any_base: bool = False
               ) -> list[int]:
    """The setups' vectors, as the forward adds each, into the model's steering table; returns
    each setup's row (the base: 0, no steering). A full fine-tune's weights are read back first."""
    if model.adapter.trains_base:
        M.load_weights(model, base_folder, model.embed_tokens.weight.dtype, model.embed_tokens.weight.device)
    vectors, rows, point = [], [], "post-block"
    for s in setups:
        if s.steering is None:
            rows.append(0)
            continue
        model.load_adapter(s.steering, check_base=not any_base)
        vectors.append(model.adapter.in_force())
        rows.append(len(vectors))
        point = model.adapter.steer_at
    model.set_adapter("steering", steer_at=point)
    model.adapter.set_table(torch.stack(vectors) if vectors else torch.zeros(0, *model.steering.shape))
    model.steering_scale = scale
    return rows


def apply_setup(model: M.Transformer, setup: Setup, scale: float, base_folder: Path, any_base: bool = False):
    """The row's adapter on the model: none (the base: a zero steering vector), a steering or
    LoRA file, or a full fine-tuning folder (its weights, loaded in place). After a full row the
    base weights are read back from `base_folder`, so every later row starts from the base."""
    if model.adapter.trains_base:
        M.load_weights(model, base_folder, model.embed_tokens.weight.dtype, model.embed_tokens.weight.device)
    if setup.steering is None or model.adapter.trains_base:
        model.set_adapter("steering")  # zeros: the base model
    if setup.steering is not None:
        model.load_adapter(setup.steering, check_base=not any_base)
    model.steering_scale = scale


def write_outputs(out: Path, cfg: EvalConfig, setups: list[Setup], benches: list[str], records: list[dict],
                  results: dict, table: str, best: dict[str, str]):
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(table)
    std = "population std (n)" if cfg.std == "population" else "sample std (n-1)"
    summary = dict(config=asdict(cfg), unit="percent correct", std=f"{std} over seeds; 0 for one run",
                   benchmarks=benches, setups=[dict(asdict(s), **results[s.name]) for s in setups],
                   best=dict(by_run=best, selected_on="the test benchmarks reported here") if best else None)
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    order = {s.name: i for i, s in enumerate(setups)}
    bench_order = {b: i for i, b in enumerate(benches)}
    records = sorted(records, key=lambda r: (order[r["setup"]], bench_order[r["bench"]], r["seed"],
                                             r["index"], r["sample"]))
    with open(out / "samples.jsonl", "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def log_to_wandb(cfg: EvalConfig, results: dict, setups: list[Setup], benches: list[str]):
    import wandb  # optional: only when asked for
    run = wandb.init(project=cfg.wandb_project, config=asdict(cfg), job_type="eval")
    columns = ["setup", "temperature"] + benches + ["avg"]
    rows = [[s.name, s.temperature] + [results[s.name]["benchmarks"][b]["mean"] for b in benches]
            + [results[s.name]["avg"]["mean"]] for s in setups]
    run.log({"results": wandb.Table(columns=columns, data=rows)})
    run.finish()


def main(argv=None):
    cfg = apply_protocol(parse_args(argv))
    setups = make_setups(cfg)
    for setup in setups:  # broken numbers are refused before the model loads
        if setup.steering is not None:
            M.check_adapter_file(setup.steering)
    names = bench_names(cfg)
    if cfg.wandb_project:
        try:
            import wandb  # noqa: F401  (checked before anything loads)
        except ImportError:
            raise SystemExit("--wandb-project needs the wandb package: pip install wandb") from None
    # graders fork first, from a small process (before the model and CUDA take memory)
    pool = reward.RewardPool(cfg.grade_workers, cfg.grade_timeout).start()
    c = cluster.init(cfg.device or "auto")
    tasks = {b: math_task(cfg.model, b, "test", tokenizer=cfg.tokenizer, data_dir=cfg.data_dir, limit=cfg.limit,
                          wrong=0.0, pool=pool) for b in names}
    vocab_size = next(iter(tasks.values())).vocab_size
    available = memory.available_bytes(c.device)  # before the weights load: the plan counts them
    model, _ = M.load_for_cli(cfg.model, cfg.tokenizer, cfg.dtype, c.device)
    for setup in setups:  # every file made for this base, before the first row runs
        if setup.steering is not None and not cfg.any_base:
            model.check_made_for(setup.steering)
    cfg = resolve_lengths(cfg, model.config.max_position_embeddings)
    # the KV pool from the memory plan: one generate call's sequences at once (--batch-prompts x the
    # most samples per problem), at most 90 % of what the weights leave (no backward here)
    for bench, task in tasks.items():  # checked on every rank, for every problem: all ranks stop alike
        too_long = [i for i, p in enumerate(task.prompts) if cfg.max_len and len(p) >= cfg.max_len]
        if too_long:
            raise ValueError(f"{bench}: problems {too_long[:10]} have prompts of {cfg.max_len} tokens or more, the "
                             "--max-len cap (default: the model's context): no room for an answer")
    prompts = [p for task in tasks.values() for p in task.prompts]
    longest = max(len(p) + completion_budget(len(p), cfg.max_new_tokens or 4096, cfg.max_len) for p in prompts)
    groups = side_by_side(setups, cfg.sequential)
    most = max(samples_per_problem(cfg, b, g[0].temperature) * len(g) for g in groups for b in names)
    plan = memory.plan(model.config, model.embed_tokens.weight.dtype, c.device, available=available, trainable=0,
                       sequences=min(cfg.batch_prompts, len(prompts)) * most, longest=longest, backward=False,
                       kv_cache_tokens=cfg.kv_cache_tokens, gpu_memory_fraction=0.9,
                       share=int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if c.device.type == "cpu" else 1)
    if c.is_main:
        print(plan.summary(), file=sys.stderr)
    sampler = Sampler(model, vocab_size=vocab_size, kv_cache_tokens=plan.kv_cache_tokens,
                      max_seq_len=longest)

    total = sum(len(tasks[b].share(c.rank, c.world)) * samples_per_problem(cfg, b, s.temperature) * len(s.seeds)
                for s in setups for b in names)
    progress = tqdm(total=total, unit="sample", disable=not (c.is_main and sys.stderr.isatty()))
    progress.plain, progress.started = c.is_main and not sys.stderr.isatty(), time.time()
    started, records = time.time(), []
    base_folder = M.resolve_checkpoint(cfg.model)
    for group in groups:
        rows = None
        if len(group) == 1:
            apply_setup(model, group[0], cfg.steering_scale, base_folder, cfg.any_base)
        else:
            rows = load_table(model, group, cfg.steering_scale, base_folder, cfg.any_base)
        records += evaluate_setups(sampler, group, tasks, cfg, c.rank, c.world, progress, rows)
    progress.close()
    pool.close()
    del sampler  # its KV pool: the gather below stages every rank's records on the GPU under NCCL
    if c.device.type == "cuda":
        torch.cuda.empty_cache()
    records = cluster.gather(records, c)
    if c.is_main:
        population = cfg.std == "population"
        results = summarize(records, [s.name for s in setups], names, population)
        best = best_checkpoints(results, setups) if cfg.checkpoints == "best" else {}
        table = markdown_table(results, setups, names, Path(cfg.model).name, population, best)
        out = Path(cfg.out or config_dir("eval", {k: v for k, v in asdict(cfg).items() if k != "out"}))
        write_outputs(out, cfg, setups, names, records, results, table, best)
        print(table)
        tokens = sum(r["n_tokens"] for r in records)
        elapsed = time.time() - started
        print(f"{len(records)} samples, {tokens} generated tokens in {elapsed:.0f}s ({tokens / max(elapsed, 1e-9):.0f} "
              f"tok/s); wrote {out}/results.md, results.json, samples.jsonl", file=sys.stderr)
        if cfg.wandb_project:
            log_to_wandb(cfg, results, setups, names)
    cluster.close()


if __name__ == "__main__":
    cluster.run_cli(main)
