"""data/: dataset loading against the real files in ../shared/data (counts and answers from
its SOURCES.md), bad-row handling on hand-written files, the hub path with hf_hub_download
replaced by a local file, and the tokenizer / chat template against transformers (the
reference) on the real Qwen2.5 and Llama 3 tokenizers."""
import functools
import gzip
import json
import os
import warnings
from datetime import datetime
from pathlib import Path

import jinja2
import pytest
from conftest import DATA_DIR, TOKENIZERS

import data
from data import datasets

DATA = Path(os.environ.get(datasets.ENV_VAR) or DATA_DIR)
needs_data = pytest.mark.skipif(not (DATA / "aime24.jsonl").is_file(),
                                reason=f"real datasets not found in {DATA} (set {datasets.ENV_VAR})")


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    """Tests say where data comes from themselves; the hub is never reached."""
    monkeypatch.delenv(datasets.ENV_VAR, raising=False)

    def offline(**kw):
        raise OSError("offline (test)")
    monkeypatch.setattr(datasets, "hf_hub_download", offline)


def write_jsonl(path: Path, lines: list) -> Path:
    """`lines` items are dicts (dumped as JSON) or raw strings (written as they are)."""
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# -----------------------------------------------------------------------------
# Real files


COUNTS = [("gsm8k", "test", 1319), ("gsm8k", "train", 7473), ("math500", None, 500), ("aime24", None, 30),
          ("aime25", None, 30), ("amc23", None, 40), ("minerva", None, 272), ("olympiadbench", None, 675)]


@needs_data
@pytest.mark.parametrize("name,split,count", COUNTS)
def test_real_counts_and_rows(name, split, count):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every row of these files is good: no warning at all
        rows = data.load(name, split, data_dir=DATA)
    assert len(rows) == count
    assert len({r["id"] for r in rows}) == count
    for r in rows:
        assert isinstance(r["problem"], str) and r["problem"].strip()
        assert isinstance(r["answer"], str) and r["answer"].strip()


@needs_data
def test_real_math_drops_the_two_empty_answers():
    with pytest.warns(UserWarning) as record:
        rows = data.load("math", data_dir=DATA)
    assert len(rows) == 12000 - 2
    (w,) = record
    msg = str(w.message)
    assert str(DATA / "math_train.jsonl.gz") in msg and "skipped 2 bad row(s) of 12000" in msg
    # SOURCES.md: train/number_theory/7115.json and 7117.json, rows 5530 and 5532 of the file
    raw = read_jsonl(DATA / "math_train.jsonl.gz")
    assert [raw[5529]["id"], raw[5531]["id"]] == ["train/number_theory/7115.json", "train/number_theory/7117.json"]
    assert "line 5530: empty 'answer'" in msg and "line 5532: empty 'answer'" in msg
    ids = {r["id"] for r in rows}
    assert "train/number_theory/7115.json" not in ids and "train/algebra/0.json" in ids
    assert sum(r["orig_split"] == "train" for r in rows) == 7500 - 2  # extra fields are kept


@needs_data
@pytest.mark.parametrize("split", ["train", "test"])
def test_real_gsm8k_answers_are_plain_numbers(split):
    rows = data.load("gsm8k", split, data_dir=DATA)
    for r in rows:
        assert "," not in r["answer"]
        float(r["answer"])  # raises on anything but a number
        assert r["answer"] == r["solution"].split("####")[-1].strip().replace(",", "")
    # a gold answer that had a thousands separator in the source
    assert any("," in r["solution"].split("####")[-1] for r in rows)


@needs_data
def test_last_boxed_reproduces_the_real_gold_answers():
    # SOURCES.md: MATH500's answer is last_boxed(solution) for 500/500, minerva's by construction
    for name in ("math500", "minerva"):
        rows = data.load(name, data_dir=DATA)
        assert all(datasets.last_boxed(r["solution"]) == r["answer"] for r in rows), name


def test_last_boxed_by_hand():
    assert datasets.last_boxed(r"so \boxed{\frac{1}{2}} or \boxed{x^{2}+1}.") == "x^{2}+1"
    assert datasets.last_boxed(r"\fbox{7} then \boxed{8}") == "8"
    assert datasets.last_boxed(r"\boxed{8} then \fbox{7}") == "7"
    assert datasets.last_boxed(r"\boxed{}") == ""
    assert datasets.last_boxed("no box here") is None
    assert datasets.last_boxed(r"\boxed{unclosed {") is None


# -----------------------------------------------------------------------------
# Names, splits, folders


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError) as err:
        data.load("gsm9k")
    for name in ("gsm8k", "math", "math500", "aime24", "aime25", "amc23", "minerva", "olympiadbench", "deepscaler"):
        assert name in str(err.value)
    assert set(data.NAMES) == {"gsm8k", "math", "math500", "aime24", "aime25", "amc23", "minerva",
                               "olympiadbench", "deepscaler", "arithmetic"}


def test_splits(tmp_path):
    with pytest.raises(ValueError, match=r"gsm8k has splits \['test', 'train'\]"):
        data.load("gsm8k", data_dir=tmp_path)
    with pytest.raises(ValueError, match="no split 'test'.*'train'"):
        data.load("math", "test", data_dir=tmp_path)


def test_env_var_and_data_dir(tmp_path, monkeypatch):
    env_dir, arg_dir = tmp_path / "env", tmp_path / "arg"
    env_dir.mkdir(), arg_dir.mkdir()
    write_jsonl(env_dir / "amc23.jsonl", [{"problem": "from env", "answer": "1"}])
    write_jsonl(arg_dir / "amc23.jsonl", [{"problem": "from arg", "answer": "2"}])
    monkeypatch.setenv(datasets.ENV_VAR, str(env_dir))
    assert data.load("amc23")[0]["problem"] == "from env"
    assert data.load("amc23", data_dir=arg_dir)[0]["problem"] == "from arg"  # the argument wins


def test_gzip_and_gsm8k_answer_from_solution(tmp_path):
    rows = [{"problem": "p", "solution": "a <<1+1=2>>\n#### 14,000"},
            {"problem": "q", "answer": "5", "solution": "#### 6"}]
    with gzip.open(tmp_path / "gsm8k_train.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    got = data.load("gsm8k", "train", data_dir=tmp_path)
    assert [r["answer"] for r in got] == ["14000", "5"]  # a present answer is left alone
    assert [r["id"] for r in got] == ["gsm8k_train/0", "gsm8k_train/1"]


def test_a_file_of_bad_rows_only_is_one_error_naming_the_file(tmp_path):
    """Not 'no problems' further on, nor a blame on --max-prompt-len: the file and its rows."""
    path = write_jsonl(tmp_path / "gsm8k_train.jsonl", [{"question": "q", "answer": "1"}, "[1]", '{"problem": '])
    with pytest.raises(ValueError) as e:
        data.load("gsm8k", split="train", data_dir=tmp_path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: every row is bad (3 of 3): line 1: missing 'problem'"), msg
    assert "line 2: a JSON list" in msg and "line 3: invalid JSON" in msg


def test_bad_rows_are_skipped_counted_and_named(tmp_path):
    path = write_jsonl(tmp_path / "aime24.jsonl", [
        {"id": "a/1", "problem": "p1", "answer": "1"},  # line 1
        '{"problem": "p2", "answer": ',  # line 2: invalid JSON
        {"answer": "3"},  # line 3: no problem
        {"problem": "p4", "answer": "  "},  # line 4: empty answer
        "",  # line 5: blank, not a record
        "[1, 2]",  # line 6: not an object
        {"problem": "p7", "answer": 27.0},  # line 7: numeric answer, kept as text
        {"problem": "p8", "answer": "8", "url": "u"},  # line 8: extra field kept
        {"problem": 9, "answer": "9"},  # line 9: problem is not text
        {"problem": "p10", "answer": None},  # line 10: answer null
    ])
    with pytest.warns(UserWarning) as record:
        rows = data.load("aime24", data_dir=tmp_path)
    assert [(r["problem"], r["answer"]) for r in rows] == [("p1", "1"), ("p7", "27"), ("p8", "8")]
    assert rows[0]["id"] == "a/1" and rows[1]["id"] == "aime24/5" and rows[2]["url"] == "u"
    (w,) = record  # one warning for the file
    msg = str(w.message)
    assert str(path) in msg and "skipped 6 bad row(s) of 9" in msg
    for expected in ("line 2: invalid JSON", "line 3: missing 'problem'", "line 4: empty 'answer'",
                     "line 6: a JSON list, not an object", "line 9: 'problem' is a int, not text",
                     "line 10: missing 'answer'"):
        assert expected in msg
    assert "line 5" not in msg and "line 7" not in msg


def test_missing_file_without_hub_names_paths_and_env_var(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        data.load("aime24", data_dir=tmp_path)
    msg = str(err.value)
    for part in (str(tmp_path / "aime24.jsonl"), str(tmp_path / "aime24.jsonl.gz"), datasets.ENV_VAR,
                 "HuggingFaceTB/math_tasks:data/aime24/test.jsonl", "offline (test)"):
        assert part in msg
    with pytest.raises(FileNotFoundError, match="no data folder given"):
        data.load("aime24")


# -----------------------------------------------------------------------------
# Hub path: hf_hub_download replaced by a function that serves local files


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """hub[(repo, filename)] = rows (a list, written as JSONL, or as one JSON array for .json);
    every download call is recorded in hub.calls."""
    class Hub(dict):
        pass

    hub = Hub()
    hub.calls = []

    def download(repo_id, filename, repo_type=None, **kw):
        hub.calls.append(dict(repo_id=repo_id, filename=filename, repo_type=repo_type, **kw))
        path = tmp_path / "hub" / repo_id / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = hub[(repo_id, filename)]
        if path.suffix == ".json":
            path.write_text(json.dumps(rows), encoding="utf-8")
        else:
            write_jsonl(path, rows)
        return str(path)
    monkeypatch.setattr(datasets, "hf_hub_download", download)
    return hub


TB = "HuggingFaceTB/math_tasks"
HUB_ROWS = {  # (name, split): repo, file, one row in the hub's schema, the (problem, answer, id) we expect
    ("gsm8k", "train"): (TB, "data/gsm8k/train.jsonl",
                         {"question": "Q?", "answer": "x <<2*3=6>>\n#### 1,234"}, ("Q?", "1234", "gsm8k_train/0")),
    ("gsm8k", "test"): (TB, "data/gsm8k/test.jsonl",
                        {"question": "Q?", "answer": "#### -5"}, ("Q?", "-5", "gsm8k_test/0")),
    ("math", "train"): ("di-zhang-fdu/MATH12000", "train.jsonl",
                        {"problem": "P", "answer": "3", "unique_id": "train/a/1.json"}, ("P", "3", "train/a/1.json")),
    ("math500", "test"): ("HuggingFaceH4/MATH-500", "test.jsonl",
                          {"problem": "P", "answer": "3", "unique_id": "test/a/1.json"}, ("P", "3", "test/a/1.json")),
    ("aime24", "test"): (TB, "data/aime24/test.jsonl",
                         {"id": 60, "problem": "P", "answer": "204"}, ("P", "204", "aime24/60")),
    ("aime25", "test"): ("math-ai/aime25", "test.jsonl",
                         {"id": 3, "problem": "P", "answer": "70"}, ("P", "70", "aime25/3")),
    ("amc23", "test"): (TB, "data/amc23/test.jsonl",
                        {"id": 0, "question": "P", "answer": 27.0}, ("P", "27", "amc23/0")),
    ("minerva", "test"): (TB, "data/minerva_math/test.jsonl",
                          {"idx": 4, "problem": "P", "solution": r"so $\boxed{3.83e35}$ kg"},
                          ("P", "3.83e35", "minerva/4")),
    ("olympiadbench", "test"): (TB, "data/olympiadbench/test.jsonl",
                                {"id": 1606, "question": "P", "solution": ["a", "b"], "final_answer": ["$69$,$84$"]},
                                ("P", "69,84", "olympiadbench/1606")),
    ("deepscaler", "train"): ("agentica-org/DeepScaleR-Preview-Dataset", "deepscaler.json",
                              [{"problem": "P", "answer": "1/2", "solution": "S"}], ("P", "1/2", "deepscaler/0")),
}


@pytest.mark.parametrize("name,split", list(HUB_ROWS))
def test_hub_call_and_adapter(name, split, fake_hub, tmp_path):
    repo, filename, row, expected = HUB_ROWS[(name, split)]
    fake_hub[(repo, filename)] = row if isinstance(row, list) else [row]
    # the data folder exists but lacks the file (as deepscaler in ../shared/data): the hub is asked
    rows = data.load(name, split, data_dir=tmp_path)
    assert fake_hub.calls == [dict(repo_id=repo, filename=filename, repo_type="dataset")]
    assert [(r["problem"], r["answer"], r["id"]) for r in rows] == [expected]


def test_hub_without_any_data_folder(fake_hub):
    fake_hub[("HuggingFaceH4/MATH-500", "test.jsonl")] = [{"problem": "P", "answer": "3", "unique_id": "u"}]
    assert data.load("math500")[0]["id"] == "u"


def test_hub_olympiadbench_joins_solutions(fake_hub):
    fake_hub[(TB, "data/olympiadbench/test.jsonl")] = [
        {"id": 1, "question": "P", "solution": ["one", "two"], "final_answer": [r"$\$5$ and $\frac{1}{2}$"]}]
    (row,) = data.load("olympiadbench")
    assert row["solution"] == "one\n\ntwo" and row["answer"] == r"\$5 and \frac{1}{2}"
    assert row["final_answer"] == [r"$\$5$ and $\frac{1}{2}$"]  # the raw list is kept, as in the local file


def test_hub_bad_rows_are_skipped_too(fake_hub):
    fake_hub[(TB, "data/minerva_math/test.jsonl")] = [
        {"idx": 0, "problem": "P", "solution": r"\boxed{1}"}, {"idx": 1, "problem": "P", "solution": "no box"}]
    with pytest.warns(UserWarning, match=r"test\.jsonl: skipped 1 bad row\(s\) of 2: line 2: missing 'answer'"):
        assert len(data.load("minerva")) == 1


# DeepScaleR in the hub's exact layout. What this relies on: the hub repo
# agentica-org/DeepScaleR-Preview-Dataset holds one data file, deepscaler.json (21.5 MB, "Formats:
# json", one train split of 40.3k rows: its file tree and viewer pages), and ../shared/data/SOURCES.md
# names it as the rllm repo's deepscaler/data/train/deepscaler.json, 40,315 rows. The head of that
# file (a public copy of its first 803 rows) is one JSON array written by json.dump without indent,
# each row {"problem", "solution", "answer"} in that order, all strings. The rows below copy that
# shape; their solutions box the choice letter, as the real ones do, so only `answer` is the gold.
DEEPSCALER = [
    {"problem": "If $991+993+995+997+999=5000-N$, then $N=$",
     "solution": "Each term is $1000$ minus a small odd number, so $5000-25=5000-N$.\n\\[\n\\boxed{\\text{E}}\n\\]",
     "answer": "25"},
    {"problem": "Find $HC/JE$.", "solution": "The ratio is $\\boxed{(D) \\frac{5}{3}}$.", "answer": "\\frac{5}{3}"},
    {"problem": "What percent of her hits were single?", "solution": "$\\boxed{\\text{E}}$", "answer": "80\\%"},
]
DEEPSCALER_REPO = "agentica-org/DeepScaleR-Preview-Dataset"


def write_deepscaler(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(DEEPSCALER), encoding="utf-8")
    return path


def check_deepscaler(rows: list[dict]):
    assert [(r["id"], r["problem"], r["answer"], r["solution"]) for r in rows] == [
        (f"deepscaler/{i}", d["problem"], d["answer"], d["solution"]) for i, d in enumerate(DEEPSCALER)]


def test_deepscaler_from_a_data_dir_holding_the_hub_file(tmp_path, monkeypatch):
    write_deepscaler(tmp_path / "deepscaler.json")  # as downloaded from the hub, name unchanged
    check_deepscaler(data.load("deepscaler", data_dir=tmp_path))
    monkeypatch.setenv(datasets.ENV_VAR, str(tmp_path))  # what --data-dir / $STEER_DATA_DIR pass on
    check_deepscaler(data.load("deepscaler", "train"))


def test_deepscaler_from_the_hub(tmp_path, monkeypatch):
    calls = []

    def download(repo_id, filename, repo_type=None, **kw):
        calls.append((repo_id, filename, repo_type))
        return str(write_deepscaler(tmp_path / "cache" / repo_id / filename))
    monkeypatch.setattr(datasets, "hf_hub_download", download)
    check_deepscaler(data.load("deepscaler", data_dir=tmp_path / "empty"))
    assert calls == [(DEEPSCALER_REPO, "deepscaler.json", "dataset")]


@pytest.mark.parametrize("with_folder", [True, False])
def test_deepscaler_offline_names_the_repo_and_where_to_put_the_file(tmp_path, monkeypatch, with_folder):
    # the real hf_hub_download, told to stay off the network: it raises what it raises offline
    from huggingface_hub import hf_hub_download
    monkeypatch.setattr(datasets, "hf_hub_download", functools.partial(
        hf_hub_download, local_files_only=True, cache_dir=tmp_path / "cache"))
    with pytest.raises(FileNotFoundError) as err:
        data.load("deepscaler", data_dir=tmp_path if with_folder else None)
    msg = str(err.value)
    assert "\n" not in msg  # CLIs print it as their one line
    for part in (DEEPSCALER_REPO, "deepscaler.json", "--data-dir", datasets.ENV_VAR, "LocalEntryNotFoundError"):
        assert part in msg, part
    assert (str(tmp_path / "deepscaler.json") in msg) == with_folder


@needs_data
def test_hub_adapters_rebuild_the_real_local_rows(fake_hub, tmp_path):
    """Local rows turned back into the hub's schema go through the hub adapters and come out
    identical to the local rows: the adapters apply the transformations SOURCES.md describes."""
    local = {name: data.load(name, "test", data_dir=DATA) if name == "gsm8k" else data.load(name, data_dir=DATA)
             for name in ("gsm8k", "math500", "aime24", "amc23", "minerva", "olympiadbench")}
    num = lambda row: int(row["id"].split("/")[-1])  # noqa: E731
    fake_hub[(TB, "data/gsm8k/test.jsonl")] = [
        {"question": r["problem"], "answer": r["solution"]} for r in local["gsm8k"]]
    fake_hub[("HuggingFaceH4/MATH-500", "test.jsonl")] = [
        {"unique_id": r["id"], **{k: v for k, v in r.items() if k != "id"}} for r in local["math500"]]
    fake_hub[(TB, "data/aime24/test.jsonl")] = [{**r, "id": num(r)} for r in local["aime24"]]
    fake_hub[(TB, "data/amc23/test.jsonl")] = [
        {"id": num(r), "question": r["problem"], "answer": float(r["answer"]), "url": r["url"]} for r in local["amc23"]]
    fake_hub[(TB, "data/minerva_math/test.jsonl")] = [
        {"idx": num(r), "problem": r["problem"], "solution": r["solution"], "type": r["type"]}
        for r in local["minerva"]]
    fake_hub[(TB, "data/olympiadbench/test.jsonl")] = [
        {**{k: v for k, v in r.items() if k not in ("answer", "problem")}, "id": num(r), "question": r["problem"],
         "solution": [r["solution"]]} for r in local["olympiadbench"]]
    for name, rows in local.items():
        assert data.load(name, "test", data_dir=tmp_path) == rows, name


# -----------------------------------------------------------------------------
# Tokenizer on the real Qwen2.5 and Llama 3 tokenizers, transformers as the reference

KINDS = ["qwen2.5", "llama3"]
needs_tokenizers = pytest.mark.skipif(not all((TOKENIZERS / k / "tokenizer.json").is_file() for k in KINDS),
                                      reason=f"real tokenizers not found in {TOKENIZERS}")


@functools.cache
def tokenizers_of(kind: str):
    transformers = pytest.importorskip("transformers")
    return data.Tokenizer.from_dir(TOKENIZERS / kind), transformers.AutoTokenizer.from_pretrained(TOKENIZERS / kind)


def sample_problems() -> list[str]:
    problems = ["What is 1+1?", "  Janet’s ducks lay 16 eggs per day; 東京 π≈3.14 🙂  \n", "x" * 3]
    if (DATA / "math500.jsonl").is_file():
        problems += [r["problem"] for r in read_jsonl(DATA / "math500.jsonl")[:10]]
    return problems


TEXTS = ["Hello, world!", "  leading, trailing  \n\n\ttabs\r\n", r"Let $f(x) = \frac{1}{2}x^2$; so \boxed{f(3)}.",
         "Janet’s ducks — 16 eggs, 3×4 = 12, π ≈ 3.14159, 東京, 🙂", "1234567890 12,345.678",
         "end<|im_end|>\n<|im_start|>user", "<|begin_of_text|><|eot_id|>x<|end_of_text|>", "a , b . c ?"]


@needs_tokenizers
def test_qwen_prompt_is_exactly_the_chatml_text():
    ours, _ = tokenizers_of("qwen2.5")
    assert ours.render_prompt("What is 2+3?") == (
        f"<|im_start|>system\n{data.SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\nWhat is 2+3?<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert data.SYSTEM_PROMPT == "Please reason step by step, and put your final answer within \\boxed{}."


@needs_tokenizers
def test_llama3_prompt_has_headers_one_bos_and_ends_with_the_assistant_header():
    ours, _ = tokenizers_of("llama3")
    text = ours.render_prompt("What is 2+3?")
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n")
    assert data.SYSTEM_PROMPT + "<|eot_id|>" in text
    assert "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+3?<|eot_id|>" in text
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = ours.encode_prompt("What is 2+3?")
    assert ids[0] == 128000 and ids.count(128000) == 1  # the template's BOS, and no second one


@needs_tokenizers
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("system", [data.SYSTEM_PROMPT, None])
def test_prompt_matches_transformers_apply_chat_template(kind, system):
    ours, ref = tokenizers_of(kind)
    for problem in sample_problems():
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": problem}]
        want_text = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        want_ids = ref.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
        assert ours.render_prompt(problem, system=system) == want_text
        assert ours.encode_prompt(problem, system=system) == want_ids


@needs_tokenizers
@pytest.mark.parametrize("kind", KINDS)
def test_encode_decode_match_transformers(kind):
    ours, ref = tokenizers_of(kind)
    for text in TEXTS + sample_problems():
        ids = ours.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False)
        assert ours.encode(text, add_special_tokens=True) == ref.encode(text)
        assert ours.decode(ids) == text  # byte-level BPE: exact round trip
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(
                ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)


@needs_tokenizers
@pytest.mark.parametrize("kind,vocab,stop,bos,pad", [
    ("qwen2.5", 151665, [151643, 151645], None, 151643),  # <|endoftext|>, <|im_end|>
    ("llama3", 128256, [128001, 128008, 128009], 128000, None),  # <|end_of_text|>, <|eom_id|>, <|eot_id|>
])
def test_special_ids_and_vocab_size(kind, vocab, stop, bos, pad):
    ours, ref = tokenizers_of(kind)
    assert ours.vocab_size == vocab == len(ref)
    assert ours.stop_token_ids == stop and ref.eos_token_id in stop
    assert ref.bos_token_id == bos and ref.pad_token_id == pad
    assert ours.bos_token == ref.bos_token and (bos is None or ours.encode(ours.bos_token) == [bos])
    assert ours.decode([ours.vocab_size - 1]) != ""  # the last id is a real token


# -----------------------------------------------------------------------------
# Tokenizer on a tiny hand-built folder: fallback prompt, stop ids from every config


def tiny_dir(folder: Path, config: dict, generation_config: dict | None = None, model_config: dict | None = None):
    from tokenizers import Tokenizer, models, pre_tokenizers
    tk = Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens(["<s>", "</s>", "<|im_end|>", "<eos2>"])  # ids 2, 3, 4, 5
    folder.mkdir(exist_ok=True)
    tk.save(str(folder / "tokenizer.json"))
    for name, content in (("tokenizer_config.json", config), ("generation_config.json", generation_config),
                          ("config.json", model_config)):
        if content is not None:
            (folder / name).write_text(json.dumps(content))
    return folder


def test_no_chat_template_falls_back_to_the_plain_prompt(tmp_path):
    folder = tiny_dir(tmp_path / "tok", {"bos_token": "<s>", "eos_token": {"__type": "AddedToken", "content": "</s>"}},
                      generation_config={"eos_token_id": [5]}, model_config={"eos_token_id": 3})
    tok = data.Tokenizer.from_dir(folder)
    assert tok.render_prompt("hello") == f"<s>{data.SYSTEM_PROMPT}\n\nProblem: hello\nSolution:"
    assert tok.render_prompt("hello", system=None) == "<s>Problem: hello\nSolution:"
    ids = tok.encode_prompt("hello")
    assert ids[0] == 2 and ids.count(2) == 1
    # tokenizer_config eos (3), config.json (3), generation_config (5), <|im_end|> in the vocab (4)
    assert tok.stop_token_ids == [3, 4, 5]
    assert (tok.bos_token, tok.vocab_size) == ("<s>", 6)


def test_no_bos_no_template(tmp_path):
    tok = data.Tokenizer.from_dir(tiny_dir(tmp_path / "tok", {}))
    assert tok.render_prompt("hello", system="S") == "S\n\nProblem: hello\nSolution:"
    assert tok.stop_token_ids == [4]  # only <|im_end|>, found in the vocabulary


def test_template_sources_and_helpers(tmp_path):
    listed = [{"name": "tool_use", "template": "wrong"},
              {"name": "default", "template": "{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}\n"
                                              "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"}]
    folder = tiny_dir(tmp_path / "tok", {"bos_token": "<s>", "chat_template": listed})
    rendered = data.Tokenizer.from_dir(folder).render_prompt("hello", system="S")
    assert rendered == "<s>[system] S\n[user] hello\n[assistant]"
    # chat_template.jinja, as recent transformers saves it, wins over tokenizer_config's field
    (folder / "chat_template.jinja").write_text("{{ strftime_now('%Y') }}|{{ messages[-1].content }}")
    assert data.Tokenizer.from_dir(folder).render_prompt("hello") == f"{datetime.now().year}|hello"
    # trim_blocks and lstrip_blocks, as transformers renders: block tags leave no whitespace behind
    (folder / "chat_template.jinja").write_text(
        "{% for m in messages %}\n    {% if m.role == 'user' %}\n<{{ m.content }}>\n    {% endif %}\n{% endfor %}")
    assert data.Tokenizer.from_dir(folder).render_prompt("hello") == "<hello>\n"
    (folder / "chat_template.jinja").write_text("{{ raise_exception('system role not supported') }}")
    with pytest.raises(jinja2.exceptions.TemplateError, match="system role not supported"):
        data.Tokenizer.from_dir(folder).render_prompt("hello")


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        data.Tokenizer.from_dir(tmp_path)
    folder = tiny_dir(tmp_path / "tok", {"eos_token": "<|nope|>"})
    with pytest.raises(ValueError, match=r"eos_token '<\|nope\|>' is not in the tokenizer's vocabulary"):
        data.Tokenizer.from_dir(folder)
    (folder / "tokenizer_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer_config.json"):
        data.Tokenizer.from_dir(folder)


def test_data_imports_nothing_of_the_model_side():
    for path in Path(data.__file__).parent.glob("*.py"):
        source = path.read_text()
        for module in ("model", "sample", "train", "eval", "reward", "rloo", "torch", "transformers"):
            assert f"import {module}" not in source and f"from {module} " not in source, (path, module)


# -----------------------------------------------------------------------------
# The generated arithmetic task (train.py --preset cpu-demo)


def test_arithmetic_answers_are_the_true_values_and_splits_are_disjoint():
    train, test = data.load("arithmetic", split="train"), data.load("arithmetic", split="test")
    assert (len(train), len(test)) == (8192, 500)
    for row in train[:300] + test:
        a, op, b = row["problem"].removeprefix("What is ").removesuffix("?").split()
        a, b = int(a), int(b)  # parsed independently of the generator, then recomputed
        assert int(row["answer"]) == {"+": a + b, "-": a - b, "*": a * b}[op]
    assert {op for r in test for op in r["problem"].split()[3:4]} == {"+", "-", "*"}
    problems = [r["problem"] for r in train]
    assert len(set(problems)) == len(problems)
    assert not set(problems) & {r["problem"] for r in test}


def test_arithmetic_is_seeded_and_needs_no_files(tmp_path, monkeypatch):
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path))  # an empty data folder changes nothing
    first = data.load("arithmetic", split="test")
    assert first == data.load("arithmetic", split="test", data_dir=tmp_path / "absent")
    assert first[0] == {"id": "arithmetic-test/0", "problem": "What is 401 - 752?", "answer": "-351"}
    with pytest.raises(ValueError, match="arithmetic has splits"):
        data.load("arithmetic")
    with pytest.raises(ValueError, match="no split 'dev'"):
        data.load("arithmetic", split="dev")
