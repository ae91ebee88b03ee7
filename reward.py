"""Verifiable math reward: does the last \\boxed{} of a completion equal the reference answer?

The RL signal of the paper: `correct` (1.0, or +1 in train.py) when the completion's final
boxed answer is mathematically equal to the gold answer, else `wrong` (0.0, or -1).

Completions are untrusted model output and arrive by the thousand per step, so the work is
split in two:

1. In the calling process, cheaply: extract the last box (linear time), then decide only what
   math-verify would surely decide the same way - no box, identical text, two plain numbers
   (12, 0.5, 1,234, \\frac34), or an answer too long / too deeply nested to be a real one
   (math-verify's parser is exponential in bracket depth). The text is never rewritten: to
   math-verify `1 2`, `2\\,3` and `1, 234` are 3, 5 and the set {1, 234}, not 12, 23, 1234.
   Most correct answers end here without any IPC.
2. Everything else goes to math-verify in worker processes, called as the paper grades:
   `verify(parse("\\boxed{gold}"), parse("\\boxed{last box}"))`, gold first (it is not
   symmetric), default options. math-verify's own time limit is `signal.alarm`, which cannot
   interrupt C-level sympy work, only works in a main thread and raises a BaseException, so it
   is switched off; the hard limit is that the parent kills a worker whose current item runs
   past `timeout` seconds, scores that item wrong and hands the rest of that worker's chunk to
   a fresh worker. A worker that dies otherwise (killed from outside, OOM killer) is replaced
   and everything it had not answered is scored again by the fresh one; a worker is also
   recycled after `recycle_after` items, so that sympy's caches stay bounded over long runs.

`RewardPool` keeps the workers alive across calls: a caller that scores batch after batch
(train.py, eval.py) creates one and reuses it. The module-level `score_batch` / `score` are for
one-off use: each call runs its own pool and stops its workers before returning.

Security: model text is never evaluated as Python. Only math-verify's LaTeX extraction is
used; its plain-expression extraction (`ExprExtractionConfig`, the other half of parse()'s
default) goes through sympy's `parse_expr`, which calls `eval`, so it is deliberately left out.
That is the one way this grader departs from the paper's: an answer only the plain-expression
parser reads (tests/test_reward.py lists the cases measured) is compared as math-verify's text.
"""
import ctypes
import functools
import logging
import multiprocessing as mp
import os
import re
import signal
import sys
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from fractions import Fraction
from multiprocessing.connection import wait

# Imported here, not in the workers: the import takes 1-2 s and forked workers inherit it.
from math_verify import LatexExtractionConfig, parse, verify
from sympy import Basic, Integer, MatrixBase

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 5.0  # s per item; legitimate answers verify in < 0.1 s, math-verify's own default is 5 s
MAX_ANSWER_CHARS = 1000  # longest gold in ../shared/data is 210 characters
MAX_ANSWER_DEPTH = 10  # deepest gold nests brackets 4 levels; parsing depth 10 already takes ~0.5 s
CACHE_SIZE = 1 << 16  # (prediction, gold) verdicts remembered by a pool
RECYCLE_AFTER = 2000  # items a worker verifies before it is replaced: sympy's and math-verify's caches grow
MAX_DEATHS = 2  # deaths of workers on one item before it scores wrong (then it is what kills them)

# -----------------------------------------------------------------------------
# extracting the final answer


def extract_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} or \\fbox{...} in `text` (nested braces balanced),
    `\\boxed 5` without braces gives "5"; None when there is no box, the box is empty or its
    braces never close. Linear in len(text): one backwards search plus one brace scan."""
    boxed, fbox = text.rfind("\\boxed"), text.rfind("\\fbox")
    while True:
        start = max(boxed, fbox)
        if start < 0:
            return None
        pos = start + (6 if start == boxed else 5)
        if pos < len(text) and text[pos].isalpha():  # \boxedsomething is another macro: look further back
            if start == boxed:  # search on from here only, so each macro's rfind scans the text once
                boxed = text.rfind("\\boxed", 0, start)
            else:
                fbox = text.rfind("\\fbox", 0, start)
            continue
        break
    rest = text[pos:].lstrip()
    if not rest.startswith("{"):  # `\boxed 5`: the argument is a single token
        content = re.match(r"[^\s$}]*", rest).group()
        return content or None
    depth = 0
    for m in re.finditer(r"[{}]", rest):
        depth += 1 if m.group() == "{" else -1
        if depth == 0:
            return rest[1:m.start()] or None
    return None  # unbalanced: the answer never ended


# -----------------------------------------------------------------------------
# the cheap decisions, made in the calling process

_INTEGER = re.compile(r"-?\d{1,50}")
_NUMBER = re.compile(r"""(-?)(?:
    ([1-9]\d{0,2}(?:,\d{3}){1,16})                       # 1,234,567 (0,111 is a decimal to math-verify)
  | (\d{0,50}\.\d{1,50})                                # 0.5, .5
  | (\d{1,50})(?:/(\d{1,50}))?                          # 12, 3/4
  | \\[dt]?frac(?:\{(\d{1,50})\}\{(\d{1,50})\}|(\d)(\d))  # \frac{3}{4}, \dfrac34
)""", re.VERBOSE)


def _number(s: str) -> Fraction | None:
    """The exact value of a plain number, written the way math-verify reads it as that number:
    12, -0.5, .5, 1,234, 3/4, \\frac{3}{4}, \\dfrac34. None for anything else, spaces included."""
    m = _NUMBER.fullmatch(s)
    if m is None:
        return None
    sign, grouped, decimal, num, den, fnum, fden, dnum, dden = m.groups()
    try:
        if grouped or decimal:
            value = Fraction((grouped or "").replace(",", "") or decimal)
        else:
            value = Fraction(int(num or fnum or dnum), int(den or fden or dden or 1))
    except ZeroDivisionError:
        return None
    return -value if sign else value


def _depth(s: str) -> int:
    depth = deepest = 0
    for c in s:
        if c in "([{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in ")]}":
            depth -= 1
    return deepest


def decide_cheap(pred: str | None, answer: str) -> tuple[bool | None, str]:
    """(verdict, reason) for what a string comparison settles; verdict None means "ask
    math-verify". `pred` is the extracted box. Only identical text (math-verify compares its own
    text fallbacks, so it says equal too) and values of plain numbers are decided; anything
    else, however close to a number (`1 2`, `1,23`, `2\\,3`, `5~000`, `12.`), goes to math-verify."""
    if pred is None:
        return False, "no_box"
    p, g = pred.strip(), answer.strip()
    if not p or not g:
        return False, "empty"
    if p == g:
        return True, "string_match"
    a, b = _number(p), _number(g)
    if a is not None and b is not None:
        if a == b:  # AIME's "025" equals 25, 0.5 equals \frac12
            return True, "numbers"
        # math-verify compares decimals to 6 places: only values this far apart are surely unequal
        if abs(a - b) > 1e-4 * max(1, abs(a), abs(b)):
            return False, "numbers"
    if len(pred) > MAX_ANSWER_CHARS or _depth(pred) > MAX_ANSWER_DEPTH:
        return False, "implausible"
    return None, "needs_verify"


# -----------------------------------------------------------------------------
# the math-verify side, run inside worker processes

# parse()'s default LaTeX extraction, as the paper calls it; no ExprExtractionConfig: it eval()s
_LATEX_ONLY = [LatexExtractionConfig()]


def _parse_box(s: str) -> list:
    """math-verify's parse of `\\boxed{s}`, the paper's way (text as it is, no rewriting)."""
    if _INTEGER.fullmatch(s):  # the commonest answer; what math-verify returns, without its ~15 ms LaTeX parse
        return [Integer(int(s)), s]
    # parsing_timeout=None: no signal.alarm; the parent's kill is the time limit
    return parse("\\boxed{" + s + "}", extraction_config=_LATEX_ONLY, parsing_timeout=None)


def judge(pred: str, answer: str, golds: dict) -> tuple[bool, bool]:
    """(math-verify says pred equals answer, gold parsed into sympy). `golds` caches parsed golds
    per answer. A gold that parses into no sympy object is still judged by `verify` (which then
    compares math-verify's text fallbacks, as the paper's grading does); the pool reports it.
    Module-level so tests can monkeypatch it (forked workers see the patched version)."""
    if answer not in golds:
        if len(golds) > 4096:
            golds.clear()
        golds[answer] = _parse_box(answer)
    gold = golds[answer]
    ok = bool(verify(gold, _parse_box(pred), timeout_seconds=None))
    return ok, any(isinstance(g, (Basic, MatrixBase)) for g in gold)


@functools.cache
def _warm_parser():
    """Parse once in the parent: math-verify's first LaTeX parse builds ANTLR's parser (~0.3 s, seconds
    on a busy machine), and every forked worker - replacements and recycled ones included - inherits
    it built instead of spending its first item's time limit on it."""
    quiet = logging.getLogger("math_verify")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its "timeout disabled" warning is for workers, where the parent kills
    try:
        _parse_box("\\frac{1}{2}")
    finally:
        quiet.setLevel(level)


def _die_with_parent():
    """Ask Linux to SIGKILL this worker when its parent dies, so that a parent killed mid-step
    leaves no busy worker behind (idle ones exit on EOF anyway). The signal follows the
    *thread* that forked: create pools from a long-lived thread (normally the main one)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def _worker_main(conn, parent_end):
    parent_end.close()  # our copy of the parent's end would keep EOF from ever arriving
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _die_with_parent()
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout disabled" warning, per-item debug noise
    golds = {}
    try:
        while (chunk := conn.recv()) is not None:
            for pred, answer in chunk:  # one reply per item: the parent times each item separately
                try:
                    verdict = judge(pred, answer, golds)
                except Exception:  # math-verify returns False on its own errors; this is sympy's or ours
                    verdict = (False, True)
                conn.send(verdict)
    except (EOFError, OSError):  # the parent is gone
        return


# -----------------------------------------------------------------------------
# the pool


@dataclass
class _Worker:
    proc: mp.process.BaseProcess
    conn: object  # multiprocessing Connection, parent's end
    chunk: deque = field(default_factory=deque)  # (pred, answer) keys sent, not yet answered
    started: float = 0.0  # when chunk[0] began, as seen by us: never before it really did, so no early kill
    answered: int = 0  # items it has verified: at `recycle_after` it is replaced


def default_workers() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


class RewardPool:
    """Persistent math-verify worker processes with a hard per-item time limit.

        with RewardPool(workers=2) as pool:
            rewards = pool.score_batch(completions, answers, correct=1.0, wrong=-1.0)

    Start method: "fork" on Linux. Measured by `python bench/reward.py` (2 workers, until
    each has verified one item): fork 0.34 s, forkserver 1.4 s, spawn 1.6 s, because forked
    workers inherit the imported math_verify while the others re-import it, and re-run the
    caller's main module (train.py: torch and all), in every new worker, replacements after
    a kill included. Workers never touch torch, so forking a process that imported torch is
    safe; still, create the pool early (`RewardPool(...).start()` before CUDA and thread pools
    start) so that it forks a small single-threaded process, and reuse it every step: workers
    also get ~2x faster over their first few hundred items as math-verify's ANTLR parser
    caches its decisions. Not thread-safe: one caller at a time.

    Workers come and go under the caller's feet, each item still scored exactly once:
    - a worker whose item runs past `timeout` is killed; that item scores wrong (a prediction
      that once ran past the limit scores wrong against any answer from then on, remembered per
      pool, so a repeated pathological answer hangs a worker only once);
    - a worker that dies by itself or is killed by someone else (SIGKILL, the OOM killer) is
      replaced, and the fresh worker scores again everything the dead one had not answered.
      Only an item that was current at MAX_DEATHS deaths scores wrong (it is what kills them);
    - after `recycle_after` verified items a worker is replaced between two chunks, so a long
      run's workers stay at their start-up memory.

    `stats` (a Counter, for train.py's metrics): one count per item and reason (no_box, empty,
    string_match, numbers, implausible, cached, needs_verify), `verified` (items workers
    answered), `timeouts`, `crashes` (items scored wrong after MAX_DEATHS deaths), `replaced`
    (workers that died unasked), `rescored` (items handed again to a fresh worker after a
    death), `recycled` (workers retired after `recycle_after` items), `timed_out_before`,
    `gold_unparsed`.
    """

    def __init__(self, workers: int | None = None, timeout: float = DEFAULT_TIMEOUT,
                 start_method: str | None = None, max_chunk: int = 32, recycle_after: int = RECYCLE_AFTER):
        if recycle_after < 1:
            raise ValueError(f"RewardPool: recycle_after must be >= 1, got {recycle_after}")
        self.workers = workers or default_workers()
        self.timeout = timeout
        self.max_chunk = max_chunk
        self.recycle_after = recycle_after
        self.ctx = mp.get_context(start_method or ("fork" if sys.platform.startswith("linux") else "spawn"))
        self.stats = Counter()
        self._verdicts = OrderedDict()  # (pred, answer) -> bool, LRU
        self._timed_out = OrderedDict()  # preds that once ran past the limit -> score wrong from then on
        self._bad_golds = set()
        self._owner = os.getpid()
        self._pool: list[_Worker] = []  # started on first need, or by start()

    def start(self) -> "RewardPool":
        """Start the workers now (otherwise the first batch that needs math-verify does)."""
        if os.getpid() != self._owner:
            raise RuntimeError("RewardPool: used from a forked child; create a pool in this process")
        if self.ctx.get_start_method() == "fork":
            _warm_parser()
        while len(self._pool) < self.workers:
            self._pool.append(self._spawn())
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _spawn(self) -> _Worker:
        parent_end, child_end = self.ctx.Pipe()
        proc = self.ctx.Process(target=_worker_main, args=(child_end, parent_end), daemon=True,
                                name="reward-worker")
        proc.start()
        child_end.close()
        return _Worker(proc, parent_end)

    def _kill(self, w: _Worker):
        if w.proc.is_alive():
            w.proc.kill()
        w.proc.join()
        w.conn.close()

    def _stop(self, w: _Worker, wait: float):
        """Ask an idle worker to exit (EOF ends its loop), give it `wait` seconds, then kill it."""
        try:
            w.conn.send(None)
        except OSError:  # already dead
            pass
        w.proc.join(wait)
        self._kill(w)

    def close(self):
        """Stop every worker (idle ones are asked, busy ones killed) and wait for them. The pool
        stays usable: the next batch that needs math-verify starts new workers."""
        if os.getpid() != self._owner:  # a forked child must not touch our workers
            return
        for w in self._pool:
            if not w.chunk:
                try:
                    w.conn.send(None)
                except OSError:
                    pass
        deadline = time.monotonic() + 1.0
        for w in self._pool:
            w.proc.join(max(0.0, deadline - time.monotonic()) if not w.chunk else 0)
            self._kill(w)
        self._pool = []

    def pids(self) -> list[int]:
        return [w.proc.pid for w in self._pool]

    # -- scoring

    def score_batch(self, completions: list[str], answers: list[str], correct: float = 1.0, wrong: float = 0.0,
                    timeout: float | None = None) -> list[float]:
        """One reward per completion: `correct` if its last box equals the answer, else `wrong`.
        An item that runs past `timeout` seconds (default: the pool's) in math-verify is wrong."""
        if len(completions) != len(answers):
            raise ValueError(f"score_batch: {len(completions)} completions but {len(answers)} answers")
        verdicts = [None] * len(completions)
        todo = {}  # (pred, answer) -> indices waiting on it; identical pairs are verified once
        for i, (text, answer) in enumerate(zip(completions, answers)):
            if not isinstance(text, str) or not isinstance(answer, str):
                raise TypeError(f"score_batch: item {i}: completion and answer must be str, got "
                                f"{type(text).__name__} and {type(answer).__name__}")
            pred = extract_boxed(text)
            verdict, reason = decide_cheap(pred, answer)
            if verdict is None and (pred, answer) in self._verdicts:
                verdict, reason = self._verdicts[(pred, answer)], "cached"
                self._verdicts.move_to_end((pred, answer))
            self.stats[reason] += 1
            if verdict is None:
                todo.setdefault((pred, answer), []).append(i)
            else:
                verdicts[i] = verdict
        if todo:
            try:
                found = self._run(list(todo), timeout or self.timeout)
            except BaseException:  # KeyboardInterrupt included: leave no worker mid-item behind
                self.close()
                raise
            for key, verdict in found.items():
                for i in todo[key]:
                    verdicts[i] = verdict
        return [correct if v else wrong for v in verdicts]

    def _run(self, keys: list, timeout: float) -> dict:
        """Verify every (pred, answer) key in the workers; returns key -> bool."""
        self.start()
        # Identical predictions (against different answers) go in one chunk, never split: when
        # one hangs, the rest of its chunk is dropped instead of each copy hanging a worker.
        keys.sort()
        size = max(1, min(self.max_chunk, -(-len(keys) // (4 * self.workers))))  # >= 4 chunks per worker
        chunks = deque()
        for key in keys:
            if not chunks or (len(chunks[-1]) >= size and key[0] != chunks[-1][-1][0]):
                chunks.append([])
            chunks[-1].append(key)
        found = {}
        deaths = Counter()  # key -> workers that died while it was their current item

        def replace(w: _Worker) -> _Worker:
            """A fresh worker in w's place; what w had not answered goes first, to the fresh one."""
            self._kill(w)
            if w.chunk:
                chunks.appendleft(list(w.chunk))
                w.chunk = deque()  # handed on: nothing here may be scored from the dead worker
            fresh = self._spawn()
            self._pool[self._pool.index(w)] = fresh
            return fresh

        def feed(w: _Worker):
            while chunks and not w.chunk:
                if w.answered >= self.recycle_after:  # between chunks: nothing of its work is lost
                    self._stop(w, wait=1.0)
                    w = replace(w)
                    self.stats["recycled"] += 1
                chunk = [k for k in chunks.popleft() if not self._known_to_hang(found, k)]
                if chunk:
                    w.chunk, w.started = deque(chunk), time.monotonic()
                    try:
                        w.conn.send(chunk)
                    except OSError:  # it died while idle (killed, OOM killer): nothing of this chunk is to blame
                        died(w)
                        w = replace(w)

        def died(w: _Worker):
            """Count (and reap: then exitcode says how it died) a worker that died unasked."""
            self._kill(w)
            self.stats["replaced"] += 1
            self.stats["rescored"] += len(w.chunk)
            log.warning("reward: worker %d died (exit code %s, killed from outside?) with %d items unanswered; "
                        "a fresh worker scores them again", w.proc.pid, w.proc.exitcode, len(w.chunk))

        def lost(w: _Worker):
            """w died under us mid-chunk: its current item is blamed only at its MAX_DEATHS-th death."""
            key = w.chunk[0]
            deaths[key] += 1
            if deaths[key] >= MAX_DEATHS:
                w.chunk.popleft()
                self._record(found, key, False)
                self.stats["crashes"] += 1
                log.warning("reward: %d workers died on answer %r, prediction %.200r: scored wrong",
                            deaths[key], key[1], key[0])
            died(w)
            feed(replace(w))

        def timed_out(w: _Worker):
            key = w.chunk.popleft()  # the item it was on scores wrong
            self._record(found, key, False)
            self.stats["timeouts"] += 1
            self._timed_out[key[0]] = True
            if len(self._timed_out) > CACHE_SIZE:
                self._timed_out.popitem(last=False)
            log.warning("reward: timeout on answer %r, prediction %.200r", key[1], key[0])
            feed(replace(w))

        for w in self._pool:
            feed(w)
        while any(w.chunk for w in self._pool):
            busy = [w for w in self._pool if w.chunk]
            next_deadline = min(w.started for w in busy) + timeout
            ready = wait([w.conn for w in busy], timeout=max(0.0, next_deadline - time.monotonic()))
            for w in busy:
                if w.conn in ready:
                    try:
                        while w.chunk and w.conn.poll():
                            ok, gold_parsed = w.conn.recv()
                            key = w.chunk.popleft()
                            w.started = time.monotonic()  # the next item began at the latest now
                            w.answered += 1
                            self._record(found, key, ok)
                            self.stats["verified"] += 1
                            if not gold_parsed:
                                self._gold_unparsed(key[1])
                    except (EOFError, OSError):  # died under us (killed from outside, OOM killer, segfault)
                        lost(w)
                        continue
                if w.chunk and time.monotonic() - w.started > timeout:
                    timed_out(w)
            for w in self._pool:
                feed(w)
        return found

    def _known_to_hang(self, found: dict, key) -> bool:
        if key[0] not in self._timed_out:
            return False
        self._record(found, key, False)
        self.stats["timed_out_before"] += 1
        return True

    def _record(self, found: dict, key, ok: bool):
        found[key] = ok
        self._verdicts[key] = ok
        if len(self._verdicts) > CACHE_SIZE:
            self._verdicts.popitem(last=False)

    def _gold_unparsed(self, answer: str):
        self.stats["gold_unparsed"] += 1
        if answer not in self._bad_golds:
            self._bad_golds.add(answer)
            log.warning("reward: math-verify parses gold answer %r into no expression; it compares text", answer)


# -----------------------------------------------------------------------------
# one-off scoring: a pool for the call


def score_batch(completions: list[str], answers: list[str], correct: float = 1.0, wrong: float = 0.0,
                workers: int | None = None, timeout: float = DEFAULT_TIMEOUT) -> list[float]:
    """`RewardPool.score_batch` on a pool of its own, whose workers start only if an item needs
    math-verify and are stopped before this returns."""
    with RewardPool(workers, timeout) as pool:
        return pool.score_batch(completions, answers, correct, wrong)


def score(completion: str, answer: str, timeout: float = DEFAULT_TIMEOUT) -> float:
    """1.0 if the last box of `completion` equals `answer`, else 0.0 (math-verify, where needed, runs
    in a worker with a hard time limit, so a pathological completion still ends within `timeout`)."""
    return score_batch([completion], [answer], timeout=timeout)[0]
