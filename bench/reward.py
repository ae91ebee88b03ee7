"""Throughput of reward.RewardPool.score_batch on MATH train reference solutions, and what
adversarial completions (exponential parses, towers sympy evaluates in C, 100 KB of junk) cost.

    python bench/reward.py [--data-dir DIR] [--n 2048] [--workers W] [--timeout 5] [--seed 0]

Prints the workers' start-up time per start method, then one row per scenario: items sent to
math-verify, timeouts, wall seconds, completions/s and worker CPU ms per verified item (a figure
other load on the machine does not skew).
"""
import argparse
import logging
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repo's reward.py, not this one

import data  # noqa: E402
from reward import DEFAULT_TIMEOUT, RewardPool, default_workers  # noqa: E402


def adversarial(rng) -> list[str]:
    junk = "".join(rng.choice("{}()[]^_\\$ abcx0123456789+-*/!") for _ in range(100_000))
    return [
        "\\boxed{" + "(" * 500 + "1" + ")" * 500 + "}",  # parser is exponential in depth
        "The answer is \\boxed{9^{9^{9^{9}}}}",  # sympy evaluates the tower in C: only a kill stops it
        "The answer is \\boxed{10^{10^{10}}!}",
        junk,  # 100 KB, no box
        "\\boxed{" + junk + "}",  # 100 KB in a box
        "\\boxed{\\frac{1}{2" + "{" * 5000,  # never closes
        "",
    ]


def worker_cpu(pool) -> dict:
    """pid -> CPU seconds (user + system) of each live worker, read from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    return {pid: sum(map(int, Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[11:13])) / ticks
            for pid in pool.pids()}


def seconds_to_score(pool, completions, golds) -> float:
    t0 = time.perf_counter()
    pool.score_batch(completions, golds)
    return time.perf_counter() - t0


def print_startup(workers: int, timeout: float):
    """Fork inherits the imported math_verify; forkserver and spawn import it again in each worker."""
    print(f"worker start-up ({workers} workers, until each has verified one item):")
    for method in ("fork", "forkserver", "spawn"):
        t0 = time.perf_counter()
        with RewardPool(workers, timeout, start_method=method) as pool:
            pool.score_batch([f"\\boxed{{x+{i}}}" for i in range(workers)], ["y"] * workers)
            print(f"  {method:10s} {time.perf_counter() - t0:6.2f} s")


def bench(data_dir: str | None, n: int, workers: int | None, timeout: float, seed: int):
    rows = data.load("math", data_dir=data_dir)  # rows with an empty answer are already dropped
    rng = random.Random(seed)
    rng.shuffle(rows)
    rows, warm_rows = rows[:n], rows[n:2 * n]
    solutions, answers = [r["solution"] for r in rows], [r["answer"] for r in rows]
    others = answers[1:] + answers[:1]  # another problem's answer: mostly wrong, mostly reaches math-verify
    attacks = adversarial(rng)
    mixed = [attacks[(i // 20) % len(attacks)] if i % 20 == 0 else s for i, s in enumerate(solutions)]  # 5 %
    workers = workers or default_workers()
    print_startup(workers, timeout)

    print(f"\nscore_batch on {n} MATH train completions, {workers} workers, timeout {timeout:g} s:")
    print(f"  {'scenario':44s} {'to workers':>10s} {'timeouts':>8s} {'seconds':>8s} {'compl/s':>8s} "
          f"{'worker CPU ms/item':>18s}")
    took = {}
    for name, completions, golds, warm in [
        ("(a) reference solutions, own answers", solutions, answers, False),
        ("(b) (a) + 5 % adversarial", mixed, answers, False),
        ("(c) solutions vs another problem's answer", solutions, others, False),
        (f"(c) warm workers (after {n} other items)", solutions, others, True),
        ("(d) (c) + 5 % adversarial, warm", mixed, others, True),
    ]:
        with RewardPool(workers, timeout).start() as pool:
            if warm:  # ANTLR's parser caches its decisions: a worker gets ~2x faster over its first items
                seconds_to_score(pool, [r["solution"] for r in warm_rows],
                                 [r["answer"] for r in warm_rows[1:] + warm_rows[:1]])
                pool.stats.clear()
            cpu = worker_cpu(pool)
            took[name[:3]] = seconds = seconds_to_score(pool, completions, golds)
            cpu = sum(t - cpu.get(pid, 0.0) for pid, t in worker_cpu(pool).items())  # killed workers not counted
            cpu *= 1000 / max(1, pool.stats["verified"])
            print(f"  {name:44s} {pool.stats['verified'] + pool.stats['timeouts']:10d} "
                  f"{pool.stats['timeouts']:8d} {seconds:8.2f} {n / seconds:8.0f} {cpu:18.1f}")
    limit = took["(a)"] + 2 * timeout
    print(f"\n(a) >= 300 completions/s: {'yes' if n / took['(a)'] >= 300 else 'NO'}; "
          f"(b) {took['(b)']:.2f} s <= (a) + 2 x timeout = {limit:.2f} s: {'yes' if took['(b)'] <= limit else 'NO'}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--data-dir", help=f"folder holding math_train.jsonl.gz (default ${data.ENV_VAR}, "
                                           "else ../shared/data)")
    parser.add_argument("--n", type=int, default=2048, help="completions per scenario (128 prompts x 16 rollouts)")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: CPUs, at most 8)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="per-item limit in seconds")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # the timeouts of (b) are expected
    bench(data.default_dir(args.data_dir), args.n, args.workers, args.timeout, args.seed)


if __name__ == "__main__":
    import cluster
    cluster.run_cli(main)
