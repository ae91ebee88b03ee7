"""reward.py: box extraction, the cheap string decisions, math-verify in killable workers, and
the real MATH / GSM8K reference solutions graded against their own (and other) answers."""
import ast
import gzip
import json
import multiprocessing as mp
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import DATA_DIR
from math_verify import parse

import reward

DATA = Path(os.environ.get("STEER_DATA_DIR") or DATA_DIR)
needs_data = pytest.mark.skipif(not (DATA / "math_train.jsonl.gz").exists(),
                                reason=f"shared data folder {DATA} absent (set STEER_DATA_DIR)")


def load(name: str) -> list[dict]:
    path = DATA / name
    with (gzip.open(path, "rt", encoding="utf-8") if name.endswith(".gz") else open(path, encoding="utf-8")) as f:
        return [json.loads(line) for line in f]


def other_answers(answers: list[str]) -> list[str]:
    """Each row paired with the next row's answer that differs from its own."""
    out = []
    for i, a in enumerate(answers):
        j = (i + 1) % len(answers)
        while answers[j] == a:
            j = (j + 1) % len(answers)
        out.append(answers[j])
    return out


def children() -> set[int]:
    """Live (not zombie) child processes of this process, read from /proc."""
    pids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited while we looked
            continue
        if int(fields[1]) == os.getpid() and fields[0] != "Z":
            pids.add(int(stat.parent.name))
    return pids


@pytest.fixture
def pool():
    before = children()
    with reward.RewardPool(workers=2, timeout=5.0) as p:
        yield p
    assert children() <= before, "reward workers left running after close()"


# -----------------------------------------------------------------------------
# extraction


@pytest.mark.parametrize("text, expected", [
    ("so the answer is $\\boxed{42}$.", "42"),
    ("\\boxed{1} then \\boxed{2}", "2"),  # the last one
    ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{1}{\\sqrt{2}}"),  # nested braces
    ("\\fbox{7}", "7"),
    ("\\boxed{1} \\fbox{x^{2}}", "x^{2}"),
    ("\\fbox{1} \\boxed{3}", "3"),
    ("$\\boxed 5$.", "5"),  # no braces: one token
    ("\\boxed {12}", "12"),
    ("\\boxed{}", None),
    ("\\boxed{3} and \\boxed{}", None),  # the last box is empty, not the one before it
    ("no box here", None),
    ("", None),
    ("\\boxed{\\frac{1}{2}", None),  # never closes
    ("\\boxed{4} \\boxedfoo{5}", "4"),  # \boxedfoo is another macro
])
def test_extract_boxed(text, expected):
    assert reward.extract_boxed(text) == expected


def test_extract_boxed_pathological_inputs_are_linear():
    # a quadratic scan would take minutes on these 1 MB strings; the answers are known
    assert reward.extract_boxed("\\boxed{" * 150_000) is None
    assert reward.extract_boxed("\\boxed{1}" + "{" * 1_000_000) == "1"
    assert reward.extract_boxed("\\boxed{" + "{}" * 500_000 + "}") == "{}" * 500_000
    assert reward.extract_boxed("\\boxedx" * 150_000) is None


@needs_data
def test_extract_boxed_reproduces_math_train_answers():
    # SOURCES.md: answer = last_boxed(solution) for every MATH row (2 have \boxed{} -> "")
    rows = load("math_train.jsonl.gz")
    assert len(rows) == 12000
    mismatches = [r["id"] for r in rows if (reward.extract_boxed(r["solution"]) or "") != r["answer"]]
    assert mismatches == []


# -----------------------------------------------------------------------------
# cheap decisions in the parent


@pytest.mark.parametrize("raw, expected", [
    ("$\\left( 1, 2 \\right)$", "(1,2)"),
    ("\\dfrac{1}{2}", "\\frac{1}{2}"),
    ("\\tfrac12.", "\\frac12"),
    ("1,000,000", "1000000"),
    ("(1,000)", "(1,000)"),  # only a bare integer loses its commas
    ("\\text{13}", "13"),
    ("5\\!\\,\\;000", "5000"),
    ("x \\rightarrow 3", "x\\rightarrow3"),  # \right inside \rightarrow stays
])
def test_normalize(raw, expected):
    assert reward.normalize(raw) == expected


@pytest.mark.parametrize("pred, answer, verdict, reason", [
    (None, "3", False, "no_box"),
    ("", "3", False, "empty"),
    ("5", "", False, "empty"),
    ("$1,000$", "1000", True, "string_match"),
    ("025", "25", True, "numbers"),  # AIME zero padding
    ("0.5", "\\frac{1}{2}", True, "numbers"),
    ("3/4", "\\frac34", True, "numbers"),
    ("-7", "7", False, "numbers"),
    ("0.333333", "\\frac{1}{3}", None, "needs_verify"),  # close: math-verify's rounding decides
    ("\\sqrt{2}", "2", None, "needs_verify"),
    ("(" * 11 + "1" + ")" * 11, "1", False, "implausible"),
    ("1+" * 600 + "1", "1", False, "implausible"),
])
def test_decide_cheap(pred, answer, verdict, reason):
    assert reward.decide_cheap(pred, answer) == (verdict, reason)


def test_number_decisions_agree_with_math_verify():
    # every pair the parent settles by value must get the same verdict from math-verify itself
    rng = random.Random(0)
    forms = ["0", "7", "-7", "025", "12", "0.5", ".5", "2.5", "-0.25", "\\frac{1}{2}", "\\frac12", "\\frac{5}{2}",
             "-\\frac{3}{4}", "3/4", "100", "99.99", "1.0001", "1000000"]
    pairs = [(a, b) for a in forms for b in forms]
    decided = [(p, g, reward.decide_cheap(p, g)) for p, g in rng.sample(pairs, 120)]
    decided = [(p, g, v) for p, g, (v, why) in decided if why == "numbers"]
    assert len(decided) > 80 and {v for _, _, v in decided} == {True, False}
    golds = {}
    for p, g, v in decided:
        assert reward.judge(p, g, golds)[0] == v, (p, g)


def test_integer_fast_parse_matches_math_verify():
    config = reward._LATEX_ONLY
    for s in ["0", "7", "-3", "007", "123456789012345678901234567890"]:
        assert reward._parse_box(s) == parse("\\boxed{" + s + "}", extraction_config=config, parsing_timeout=None)


@needs_data
def test_every_gold_passes_the_plausibility_guards():
    # the length / depth guards must never reject a real answer
    for name in ["math_train.jsonl.gz", "math500.jsonl", "gsm8k_train.jsonl", "minerva.jsonl",
                 "olympiadbench.jsonl", "aime24.jsonl", "aime25.jsonl", "amc23.jsonl"]:
        for r in load(name):
            assert reward.decide_cheap(r["answer"] + " ", r["answer"])[1] != "implausible", (name, r["id"])


# -----------------------------------------------------------------------------
# math-verify through the pool


EQUIVALENT = [  # (completion's box, gold)
    ("\\frac12", "0.5"), ("0.5", "\\frac12"), ("\\dfrac{1}{2}", "\\frac{1}{2}"),
    ("1,000", "1000"), ("1000", "1,000"), ("\\text{13}", "13"),
    ("90^\\circ", "90"), ("90", "90^\\circ"), ("50\\%", "50"), ("50", "50\\%"),
    ("x = 3", "3"), ("3", "x=3"), ("(1, 2)", "(1,2)"), ("\\left(3, -\\frac{1}{2}\\right)", "(3,-\\frac12)"),
    ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}"), ("2\\sqrt{3}", "\\sqrt{12}"), ("x^2+2x+1", "(x+1)^2"),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}"),
]
DIFFERENT = [
    ("\\frac13", "0.5"), ("1001", "1,000"), ("(2, 1)", "(1,2)"), ("x = 4", "3"), ("91", "90^\\circ"),
    ("\\sqrt{3}", "\\sqrt{2}"), ("x^2+1", "(x+1)^2"), ("[1, 2]", "(1,2)"), ("\\text{Monday}", "\\text{Tuesday}"),
]


def test_equivalent_forms_score_one_and_different_values_zero(pool):
    cases = EQUIVALENT + DIFFERENT
    got = pool.score_batch([f"The answer is $\\boxed{{{p}}}$." for p, _ in cases], [g for _, g in cases])
    assert got == [1.0] * len(EQUIVALENT) + [0.0] * len(DIFFERENT)
    assert pool.stats["timeouts"] == pool.stats["crashes"] == 0


def test_score_and_signed_rewards():
    assert reward.score("so \\boxed{\\dfrac{2}{4}}", "\\frac12") == 1.0
    assert reward.score("so \\boxed{x+1}", "x+2") == 0.0
    assert reward.score("no answer", "3") == 0.0
    got = reward.score_batch(["\\boxed{\\sqrt{4}}", "\\boxed{3}", "\\boxed{1}"], ["2", "2", "2"],
                             correct=1.0, wrong=-1.0)
    assert got == [1.0, -1.0, -1.0]
    # each call ran its own pool (\sqrt{4} vs 2 needs math-verify) and stopped it before returning
    assert not any(c.name == "reward-worker" for c in mp.active_children())


def test_known_misgrade_factorials(pool):
    # math-verify compares numbers to a fixed precision, so 1/2006! and 1/2004! (both ~1e-5700) come
    # out equal: a known false positive, recorded here so a change in math-verify is noticed.
    assert pool.score_batch(["\\boxed{\\frac{1}{2006!}}"], ["\\frac{1}{2004!}"]) == [1.0]


def test_unparsable_gold_falls_back_to_strings(pool, caplog):
    # a real MATH gold that math-verify turns into no sympy object (its unit stripping eats b and c)
    gold = "a + b + c"
    assert not [g for g in reward._parse_box(gold) if not isinstance(g, str)]
    got = pool.score_batch(["\\boxed{c+b+a}", "\\boxed{a+b}", "\\boxed{a+b+c}"], [gold] * 3)
    assert got == [0.0, 0.0, 1.0]  # only the string comparison can say yes
    assert pool.stats["gold_unparsed"] == 2 and pool.stats["string_match"] == 1
    assert caplog.text.count("cannot parse gold answer 'a + b + c'") == 1  # logged once per answer


def test_bad_arguments_name_the_problem(pool):
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        pool.score_batch(["a", "b"], ["1"])
    with pytest.raises(TypeError, match="item 1"):
        pool.score_batch(["a", None], ["1", "2"])


def test_identical_pairs_verified_once(pool):
    got = pool.score_batch(["\\boxed{\\sqrt{2}}"] * 5 + ["\\boxed{\\sqrt{3}}"], ["\\frac{2}{\\sqrt{2}}"] * 6)
    assert got == [1.0] * 5 + [0.0]
    assert pool.stats["verified"] == 2
    assert pool.score_batch(["\\boxed{\\sqrt{2}}"], ["\\frac{2}{\\sqrt{2}}"]) == [1.0]
    assert pool.stats["verified"] == 2 and pool.stats["cached"] == 1


# -----------------------------------------------------------------------------
# untrusted completions


def test_injection_strings_score_zero_and_do_nothing(pool, tmp_path):
    marker = tmp_path / "pwned"
    touch = f"__import__('os').system('touch {marker}')"
    texts = [
        touch, f"\\boxed{{{touch}}}", f"\\boxed{{eval(\"open('{marker}', 'w')\")}}",
        f"\\boxed{{exec(\"open('{marker}', 'w')\")}}", f"\\boxed{{\\exec{{{touch}}}}}",
        f"\\boxed{{{marker.name}}}", f"$\\boxed{{\\text{{{touch}}}}}$",
    ]
    got = pool.score_batch(texts, ["5"] * len(texts)) + pool.score_batch(texts, ["x+1"] * len(texts))
    assert got == [0.0] * (2 * len(texts))
    assert not marker.exists()


def test_reward_never_evaluates_text_as_python():
    # math-verify's ExprExtractionConfig goes through sympy's parse_expr, i.e. eval(): reward.py
    # must use LaTeX extraction only and call nothing that executes strings.
    assert [type(c).__name__ for c in reward._LATEX_ONLY] == ["LatexExtractionConfig"]
    forbidden = {"eval", "exec", "compile", "__import__", "parse_expr", "sympify", "ExprExtractionConfig"}
    for node in ast.walk(ast.parse(Path(reward.__file__).read_text())):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
            is_re_compile = isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "re"
            assert name not in forbidden or is_re_compile, f"reward.py line {node.lineno} calls {name}"
        if isinstance(node, ast.ImportFrom):
            assert not {a.name for a in node.names} & forbidden, f"reward.py line {node.lineno} imports {node.names}"


ADVERSARIAL = [
    "\\boxed{" + "(" * 500 + "1" + ")" * 500 + "}",
    "\\boxed{9^{9^{9^{9}}}}",
    "\\boxed{10^{10^{10}}!}",
    "".join(random.Random(0).choice("{}()[]^_\\$ ax019+-!") for _ in range(100_000)),
    "\\boxed{" + "7+" * 50_000 + "7}",
    "\\boxed{\\frac{1}{2" + "{" * 1000,
    "}}}{{{\\boxed}",
    "",
]


def test_adversarial_completions_score_zero_and_the_batch_finishes():
    before = children()
    normal = [("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}", 1.0), ("\\boxed{x^2-1}", "(x-1)(x+1)", 1.0),
              ("\\boxed{\\sqrt{5}}", "5", 0.0), ("\\boxed{3}", "3", 1.0)]
    texts = ADVERSARIAL + [t for t, _, _ in normal]
    golds = ["1"] * len(ADVERSARIAL) + [g for _, g, _ in normal]
    with reward.RewardPool(workers=2, timeout=2.0) as pool:
        pids = pool.start().pids()
        assert pool.score_batch(texts, golds) == [0.0] * len(ADVERSARIAL) + [v for _, _, v in normal]
        assert 1 <= pool.stats["timeouts"] <= 2  # the two towers: sympy evaluates them in C
        assert pool.stats["implausible"] == 2
        # a prediction that once hung scores 0 against any gold without hanging a worker again
        assert pool.score_batch(ADVERSARIAL[1:3], ["2", "3"]) == [0.0, 0.0]
        assert pool.stats["timeouts"] <= 2
    assert children() <= before
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)


# -----------------------------------------------------------------------------
# the kill path, driven by a monkeypatched judge (forked workers inherit the patch)


def hanging_judge(pred, answer, golds):
    if pred == "HANG":
        while True:  # pure Python here; sympy stuck in C code would not see signals either
            pass
    if pred == "CRASH":
        os.kill(os.getpid(), signal.SIGKILL)
    return reward.normalize(pred) == reward.normalize(answer) + "0", True  # a verdict only the worker gives


def test_hung_worker_is_killed_and_the_rest_of_its_chunk_is_scored(monkeypatch):
    monkeypatch.setattr(reward, "judge", hanging_judge)
    before = children()
    with reward.RewardPool(workers=1, timeout=1.0, start_method="fork") as pool:
        first = pool.start().pids()
        texts = ["\\boxed{HANG}", "\\boxed{a0}", "\\boxed{b}", "\\boxed{CRASH}", "\\boxed{c0}"]
        golds = ["z", "a", "b1", "y", "c"]  # CRASH, HANG sort first: the only worker is lost twice
        assert pool.score_batch(texts, golds) == [0.0, 1.0, 0.0, 0.0, 1.0]
        assert pool.stats["timeouts"] == 1 and pool.stats["crashes"] == 1 and pool.stats["verified"] == 3
        assert not Path(f"/proc/{first[0]}").exists()
        assert pool.pids() != first
        assert pool.score_batch(["\\boxed{d0}"], ["d"]) == [1.0]  # the replacement keeps working
    assert children() <= before


def test_worker_that_died_while_idle_is_replaced(pool):
    victim = pool.start().pids()[0]
    os.kill(victim, signal.SIGKILL)
    while Path(f"/proc/{victim}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        time.sleep(0.01)
    cases = EQUIVALENT[:8]
    assert pool.score_batch([f"\\boxed{{{p}}}" for p, _ in cases], [g for _, g in cases]) == [1.0] * len(cases)
    assert victim not in pool.pids() and pool.stats["crashes"] == 0


def test_keyboard_interrupt_leaves_no_worker_behind(monkeypatch):
    monkeypatch.setattr(reward, "judge", hanging_judge)
    before = children()
    pool = reward.RewardPool(workers=2, timeout=60.0, start_method="fork")
    pids = pool.start().pids()

    def interrupt(*_):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.5)
    try:
        with pytest.raises(KeyboardInterrupt):
            pool.score_batch(["\\boxed{HANG}", "\\boxed{a0}"], ["x", "a"])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)
    assert children() <= before
    assert pool.score_batch(["\\boxed{a0}"], ["a"]) == [1.0]  # usable again: starts new workers
    pool.close()
    assert children() <= before


def test_workers_die_with_a_killed_parent(tmp_path):
    # the worst case for orphans: the parent is SIGKILLed while its workers are stuck in sympy
    script = tmp_path / "parent.py"
    script.write_text(
        "import reward\n"
        "pool = reward.RewardPool(workers=2, timeout=600).start()\n"
        "print(*pool.pids(), flush=True)\n"
        "pool.score_batch(['\\\\boxed{9^{9^{9^{9}}}}', '\\\\boxed{10^{10^{10}}!}'], ['1', '2'])\n")
    env = dict(os.environ, PYTHONPATH=str(Path(reward.__file__).parent))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, env=env, text=True)
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 2
        time.sleep(1.0)  # both workers are now busy with a tower
    finally:
        parent.kill()
        parent.wait()

    def alive(pid):
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    deadline = time.monotonic() + 10
    while any(map(alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(map(alive, pids)), "workers outlived their killed parent"


def test_fork_is_safe_after_torch_started_its_threads(pool):
    import torch  # already imported by conftest; this runs its thread pool before the workers fork
    torch.manual_seed(0)
    (torch.randn(256, 256) @ torch.randn(256, 256)).sum().item()
    assert pool.score_batch(["\\boxed{\\frac{\\pi}{2}}", "\\boxed{\\pi}"], ["\\frac{2\\pi}{4}", "2\\pi"]) == [1.0, 0.0]


# -----------------------------------------------------------------------------
# real data: reference solutions against their own and another problem's answer


@needs_data
def test_math_train_solutions_against_own_and_other_answers(pool):
    rows = [r for r in load("math_train.jsonl.gz") if r["answer"]]  # 2 rows have \boxed{}
    assert len(rows) == 11998
    own = pool.score_batch([r["solution"] for r in rows], [r["answer"] for r in rows])
    assert sum(own) / len(own) >= 0.995
    # All 12k against another answer send ~4700 items to math-verify, over a minute on 2 busy
    # cores: a fixed seeded subset of 2000 rows keeps the test fast.
    sample = random.Random(0).sample(rows, 2000)
    other = pool.score_batch([r["solution"] for r in sample], other_answers([r["answer"] for r in sample]))
    assert sum(other) / len(other) <= 0.01
    assert pool.stats["timeouts"] == 0


@needs_data
def test_gsm8k_solutions_against_own_and_other_answers(pool):
    rows = load("gsm8k_train.jsonl") + load("gsm8k_test.jsonl")
    # the solution ends "#### 14,000" (commas kept); the gold is "14000"
    texts = [re.sub(r"####\s*(.+?)\s*$", r"The answer is $\\boxed{\1}$.", r["solution"]) for r in rows]
    assert all("\\boxed" in t for t in texts)
    answers = [r["answer"] for r in rows]
    own = pool.score_batch(texts, answers)
    assert sum(own) / len(own) >= 0.995
    other = pool.score_batch(texts, other_answers(answers))
    assert sum(other) / len(other) <= 0.01
