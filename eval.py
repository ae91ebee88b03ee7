"""Benchmark evaluation: the base model and its steered versions side by side, scored and laid
out like Table 1 of the paper (benchmarks as columns, then Avg.; one row per setup).

    for each setup (the base model = steering zero, then each steering file):
        for each benchmark, for each seed:
            sample k completions per problem, grade the last \\boxed{} against the gold answer
            score = mean over problems of the mean correctness of that problem's k samples
        report mean ± std over seeds of the per-seed scores (in percent)

Metrics. pass@1 estimated from k samples per problem and "avg@k" are the same number: the mean
correctness of a problem's samples, averaged over problems. The name says how many samples
there were (pass@1 for k = 1, avg@k otherwise). The std over seeds is the SAMPLE std (n - 1
denominator: the seeds are a sample of possible runs); with one seed it is 0. Avg. is the mean
over benchmarks, and its std is the std over seeds of the per-seed averages.

Greedy decoding (temperature 0) is deterministic, so a greedy setup is run ONCE with ONE
sample per problem, whatever --seeds and --samples say, and reports std 0: k identical samples
and identical seeds would only cost time.

--protocol paper fills in what was not given on the command line: benchmarks AIME24, AIME25,
AMC23, MATH500, Minerva, OlympiadBench; base model greedy, steered models T = 1; avg@32 on
AIME24/25 and AMC23, pass@1 (one sample) elsewhere; 3 seeds. Length: the paper caps
Qwen2.5-Math-1.5B at 4096 tokens IN TOTAL (its context length); --max-new-tokens (default 4096)
caps only the completion, so for that model pass about 4096 minus the prompt length (~3500).

Prompts are the model's chat template around the problem with the paper's system prompt
(data.SYSTEM_PROMPT); the tokenizer (the model folder's, or --tokenizer) gives the stop ids and
the vocabulary size the sampler may draw from.

Runs on one GPU, on CPU (small models), or on several GPUs under torchrun:

    python eval.py --model Qwen/Qwen2.5-Math-1.5B --steering runs/x/steering.safetensors --protocol paper
    torchrun --nproc_per_node 8 eval.py --model ... --steering ... --protocol paper

Under torchrun rank r takes the problems i with i % world == r; rank 0 gathers every sample
(all_gather_object), scores and writes. The outputs in --out: results.md (the table),
results.json (the same numbers, with per-seed scores) and samples.jsonl (one row per sample).
Sampling seeds: each generate call gets a seed made of --seed, the benchmark and the index of its
first problem (call_seed), so the random streams depend on how problems are grouped into calls
(world size, --batch-prompts), but not on the setup: every row sees the same random numbers.
"""
import argparse
import json
import statistics
import sys
import time
import types
import typing
import zlib
from collections import defaultdict
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from tqdm import tqdm

import cluster
import data
import model as M
import reward
from sample import Sampler

# -----------------------------------------------------------------------------
# Config: every field is a command-line flag (--max-new-tokens for max_new_tokens). None means
# "not given": the protocol, or the plain default, decides.


@dataclass
class EvalConfig:
    model: str = field(metadata={"help": "checkpoint folder or hub id of the base model"})
    steering: str = field(default="", metadata={
        "help": "comma-separated steering files, one setup (table row) each; 'none' = the base model"})
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
    max_new_tokens: int = field(default=4096, metadata={"help": "completion length cap (tokens)"})
    limit: int | None = field(default=None, metadata={"help": "only the first N problems of each benchmark"})
    out: str = field(default="eval_out", metadata={"help": "output folder"})
    data_dir: str | None = field(default=None, metadata={
        "help": f"dataset folder (default ${data.ENV_VAR}, else ../shared/data next to the repo)"})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer folder (default: the model's)"})
    dtype: str = field(default="auto", metadata={
        "help": "float32, bfloat16, float16, or auto (model.auto_dtype: bfloat16 on CUDA and on CPUs with "
                "native bf16 matmuls, else float32)"})
    device: str | None = field(default=None, metadata={
        "help": "default cuda (cuda:LOCAL_RANK under torchrun), else cpu"})
    steering_scale: float = field(default=1.0, metadata={"help": "alpha in h + alpha * steering[l]"})
    kv_cache_tokens: int | None = field(default=None, metadata={
        "help": "KV cache size in tokens (default: the sampler's)"})
    batch_prompts: int = field(default=64, metadata={
        "help": "problems per generate call (the progress bar moves once per call)"})
    grade_workers: int = field(default=4, metadata={"help": "grading processes"})
    grade_timeout: float = field(default=10.0, metadata={"help": "seconds allowed to grade one sample"})


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
    for name in ("samples", "seeds", "max_new_tokens", "batch_prompts", "limit"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    return cfg


@dataclass
class Setup:
    """One row of the table: the base model or one steering file, with how it is sampled."""
    name: str  # "base", or the steering file as given
    steering: str | None
    temperature: float
    seeds: list[int]


def make_setups(cfg: EvalConfig) -> list[Setup]:
    files = [s.strip() for s in cfg.steering.split(",") if s.strip()]
    paths = [None if f.lower() == "none" else f for f in files]
    if cfg.base and None not in paths:
        paths.insert(0, None)
    paths = list(dict.fromkeys(paths))  # drop repeats, keep order
    if not paths:
        raise ValueError("nothing to evaluate: --no-base and no --steering file")
    setups = []
    for path in paths:
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"--steering: {path} is not a file")
        if cfg.temperature is not None:
            temperature = cfg.temperature
        else:  # the paper: greedy base, steered models sampled at T = 1
            temperature = 1.0 if cfg.protocol == "paper" and path is not None else 0.0
        seeds = [cfg.seed] if temperature == 0 else [cfg.seed + i for i in range(cfg.seeds)]
        setups.append(Setup("base" if path is None else path, path, temperature, seeds))
    return setups


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


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and SAMPLE std (n - 1) over seeds; std 0 for a single value."""
    if not values:
        raise ValueError("mean_std of no values")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0

# -----------------------------------------------------------------------------
# The evaluation core: generate -> decode -> grade, one record per sample. The sampler, the
# tokenizer and the grader come in as arguments so tests can swap in fakes.


def call_seed(seed: int, bench: str, first_index: int) -> int:
    """The sampler's seed for one generate call: distinct per benchmark and group of problems (the
    sampler hashes it with the prompt's position in the call), the same for every setup, so base
    and steered rows see the same random numbers."""
    return seed * 2 ** 32 + zlib.crc32(f"{bench}/{first_index}".encode())


def evaluate_setup(sampler, tokenizer, setup: Setup, benches: dict[str, list[dict]], cfg: EvalConfig,
                   grade, rank: int = 0, world: int = 1, progress: tqdm | None = None) -> list[dict]:
    """Every sample of one setup on this rank's share of each benchmark, graded."""
    records = []
    for bench, problems in benches.items():
        mine = [(i, p) for i, p in enumerate(problems) if i % world == rank]
        prompts = [tokenizer.encode_prompt(p["problem"]) for _, p in mine]
        k = samples_per_problem(cfg, bench, setup.temperature)
        for seed in setup.seeds:
            completions = []
            for start in range(0, len(mine), cfg.batch_prompts):
                completions += sampler.generate(
                    prompts[start:start + cfg.batch_prompts], n=k, max_new_tokens=cfg.max_new_tokens,
                    temperature=setup.temperature, top_p=cfg.top_p, stop_token_ids=tokenizer.stop_token_ids,
                    seed=call_seed(seed, bench, mine[start][0]))
                if progress is not None:
                    progress.set_description(f"{setup.name} {bench} seed {seed}", refresh=False)
                    progress.update(len(prompts[start:start + cfg.batch_prompts]) * k)
            flat = [(i, p, j, c) for (i, p), group in zip(mine, completions) for j, c in enumerate(group)]
            texts = [tokenizer.decode(c.tokens, skip_special_tokens=True) for _, _, _, c in flat]
            rewards = grade(texts, [p["answer"] for _, p, _, _ in flat])
            for (i, p, j, c), text, r in zip(flat, texts, rewards):
                records.append(dict(setup=setup.name, bench=bench, index=i, id=p["id"], seed=seed, sample=j,
                                    answer=p["answer"], extracted=reward.extract_boxed(text), reward=float(r),
                                    finish_reason=c.finish_reason, n_tokens=len(c.tokens), completion=text))
    return records


def summarize(records: list[dict], setups: list[str], benches: list[str]) -> dict:
    """Per setup and benchmark: metric, per-seed scores, mean ± sample std (percent); and Avg."""
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
            per_seed, ks, counts = [], set(), set()
            for seed in seeds:
                correct = list(runs[(setup, bench, seed)].values())
                if not correct:
                    raise ValueError(f"no samples for setup {setup}, benchmark {bench}, seed {seed}")
                k = len(correct[0])
                per_seed.append(100 * avg_at_k(correct, k))
                ks.add(k)
                counts.add(len(correct))
            if len(ks) != 1 or len(counts) != 1:
                raise ValueError(f"setup {setup}, benchmark {bench}: seeds differ in samples {ks} or problems {counts}")
            mean, std = mean_std(per_seed)
            row[bench] = dict(metric=metric_name(ks.pop()), problems=counts.pop(), seeds=seeds,
                              per_seed=per_seed, mean=mean, std=std)
        avg_per_seed = [statistics.fmean(row[b]["per_seed"][i] for b in benches) for i in range(len(seeds))]
        mean, std = mean_std(avg_per_seed)
        results[setup] = dict(benchmarks=row, avg=dict(per_seed=avg_per_seed, mean=mean, std=std))
    return results


def markdown_table(results: dict, setups: list[Setup], benches: list[str], model_name: str) -> str:
    def label(s: Setup) -> str:
        how = "greedy" if s.temperature == 0 else f"T={s.temperature:g}"
        return f"{model_name} ({how})" if s.steering is None else f"{model_name} + {s.steering} ({how})"

    def cell(m: dict) -> str:
        return f"{m['mean']:.1f} ± {m['std']:.1f}"

    head = ["Setup"] + [DISPLAY.get(b, b) for b in benches] + ["Avg."]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + [":---:"] * (len(head) - 1)) + "|"]
    for s in setups:
        row = results[s.name]
        lines.append("| " + " | ".join([label(s)] + [cell(row["benchmarks"][b]) for b in benches]
                                       + [cell(row["avg"])]) + " |")
    notes = []
    for s in setups:
        metrics = ", ".join(f"{DISPLAY.get(b, b)} {results[s.name]['benchmarks'][b]['metric']}" for b in benches)
        seeds = results[s.name]["benchmarks"][benches[0]]["seeds"]
        runs = "one deterministic run (greedy), std 0" if s.temperature == 0 else f"{len(seeds)} seed(s) {seeds}"
        notes.append(f"- {label(s)}: {metrics}; {runs}")
    return "\n".join(lines + ["", "Percent correct, mean ± sample std (n-1) over seeds.", *notes]) + "\n"

# -----------------------------------------------------------------------------
# Running it: data, model, distributed plumbing, outputs.


def load_benches(cfg: EvalConfig) -> dict[str, list[dict]]:
    benches = {}
    for name in [b.strip() for b in cfg.bench.split(",") if b.strip()]:
        problems = data.load(name, split="test", data_dir=data.default_dir(cfg.data_dir))
        benches[name] = problems[:cfg.limit] if cfg.limit is not None else problems
        if not benches[name]:
            raise ValueError(f"benchmark {name}: no problems (--limit {cfg.limit})")
    if not benches:
        raise ValueError("--bench names no benchmark")
    return benches


def set_steering(model: M.Transformer, setup: Setup, scale: float):
    if setup.steering is None:
        with torch.no_grad():
            model.steering.zero_()
    else:
        model.load_steering(setup.steering)
    model.steering_scale = scale


def write_outputs(out: Path, cfg: EvalConfig, setups: list[Setup], benches: list[str], records: list[dict],
                  results: dict, table: str):
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(table)
    summary = dict(config=asdict(cfg), unit="percent correct", std="sample std (n-1) over seeds; 0 for one run",
                   benchmarks=benches, setups=[dict(asdict(s), **results[s.name]) for s in setups])
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    order = {s.name: i for i, s in enumerate(setups)}
    bench_order = {b: i for i, b in enumerate(benches)}
    records = sorted(records, key=lambda r: (order[r["setup"]], bench_order[r["bench"]], r["seed"],
                                             r["index"], r["sample"]))
    with open(out / "samples.jsonl", "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main(argv=None):
    cfg = apply_protocol(parse_args(argv))
    setups = make_setups(cfg)
    benches = load_benches(cfg)
    # graders fork first, from a small process (before the model and CUDA take memory)
    pool = reward.RewardPool(cfg.grade_workers, cfg.grade_timeout).start()
    c = cluster.init(cfg.device or "auto")
    tokenizer = data.Tokenizer.from_dir(cfg.tokenizer or M.resolve_checkpoint(cfg.model))
    dtype = M.auto_dtype(c.device) if cfg.dtype == "auto" else cfg.dtype
    model = M.Transformer.from_pretrained(cfg.model, dtype=dtype, device=c.device)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but {cfg.model} only "
                         f"{model.config.vocab_size} embedding rows: wrong --tokenizer?")
    sampler_args = {} if cfg.kv_cache_tokens is None else dict(kv_cache_tokens=cfg.kv_cache_tokens)
    sampler = Sampler(model, vocab_size=tokenizer.vocab_size, **sampler_args)

    total = sum(len(range(c.rank, len(problems), c.world)) * samples_per_problem(cfg, b, s.temperature)
                * len(s.seeds) for s in setups for b, problems in benches.items())
    progress = tqdm(total=total, unit="sample", disable=not (c.is_main and sys.stderr.isatty()))
    started, records = time.time(), []
    for setup in setups:
        set_steering(model, setup, cfg.steering_scale)
        records += evaluate_setup(sampler, tokenizer, setup, benches, cfg, pool.score_batch, c.rank, c.world,
                                  progress)
    progress.close()
    pool.close()
    records = cluster.gather(records, c)
    if c.is_main:
        names = list(benches)
        results = summarize(records, [s.name for s in setups], names)
        table = markdown_table(results, setups, names, Path(cfg.model).name)
        write_outputs(Path(cfg.out), cfg, setups, names, records, results, table)
        print(table)
        print(f"{len(records)} samples in {time.time() - started:.0f}s; wrote {cfg.out}/results.md, "
              f"results.json, samples.jsonl", file=sys.stderr)
    cluster.close()


if __name__ == "__main__":
    main()
