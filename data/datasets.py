"""Math datasets as plain lists of dicts: `id`, `problem`, `answer` (the gold final answer as a
string), `solution` where the source has one, and any extra fields the source keeps.

`load(name, split=None, data_dir=None)` reads `<data folder>/<file>.jsonl` (or `.jsonl.gz`),
the layout of ../shared/data (its SOURCES.md gives provenance and transformations), or
`<file>.json`, one JSON array of rows (DeepScaleR's file as the hub serves it). The data
folder is the `data_dir` argument, else the STEER_DATA_DIR environment variable. When neither
is set, or the folder lacks the file, the file comes from the Hugging Face Hub instead
(`hf_hub_download`, cached by huggingface_hub), and a small per-dataset adapter maps the hub's
field names onto ours. Only JSON / JSONL hub files are used, so no parquet reader is needed.

  name           splits       local file             hub dataset repo : file
  gsm8k          train, test  gsm8k_{split}.jsonl    HuggingFaceTB/math_tasks : data/gsm8k/{split}.jsonl
  math           train        math_train.jsonl.gz    di-zhang-fdu/MATH12000 : train.jsonl
  math500        test         math500.jsonl          HuggingFaceH4/MATH-500 : test.jsonl
  aime24         test         aime24.jsonl           HuggingFaceTB/math_tasks : data/aime24/test.jsonl
  aime25         test         aime25.jsonl           math-ai/aime25 : test.jsonl
  amc23          test         amc23.jsonl            HuggingFaceTB/math_tasks : data/amc23/test.jsonl
  minerva        test         minerva.jsonl          HuggingFaceTB/math_tasks : data/minerva_math/test.jsonl
  olympiadbench  test         olympiadbench.jsonl    HuggingFaceTB/math_tasks : data/olympiadbench/test.jsonl
  deepscaler     train        deepscaler.json[l]     agentica-org/DeepScaleR-Preview-Dataset : deepscaler.json
  arithmetic     train, test  (generated: data/arithmetic.py, seeded; no file, no hub)

HuggingFaceTB/math_tasks mirrors the Qwen2.5-Math evaluation data, the same source as the
local aime24 / amc23 / minerva / olympiadbench files; MATH12000 and MATH-500 are PRM800K's
MATH splits. The hub adapters reproduce the local transformations:
  gsm8k          question -> problem; the source `answer` (full solution) -> solution;
                 answer = the text after `####`, commas removed ("14,000" -> "14000")
  math, math500  unique_id -> id
  aime24, amc23  question -> problem; id -> "{name}/{id}"; numeric answers as text (27.0 -> "27")
  aime25         same; NOTE this hub copy words a few problems differently from the local
                 MathArena file (see SOURCES.md)
  minerva        idx -> id; answer = content of the last \\boxed{} of the solution
  olympiadbench  question -> problem; solution list joined by blank lines;
                 answer = final_answer[0] with every unescaped `$` removed
  deepscaler     one JSON array of {problem, solution, answer} (40,315 rows); used as is. Its
                 solutions often box the choice letter (\\boxed{\\text{E}}): `answer` is the gold

Splits: a dataset with one split defaults to it; gsm8k has two, and its split must be named,
so that a training run cannot pick up the test set by accident (and the reverse).

Bad rows (invalid JSON, not an object, missing / empty / non-text problem or answer) are
skipped, and one warning per file names the file, the count and each line. MATH's 12k train
split has 2 rows whose answer is empty (their solutions end in `\\boxed{}`), so
`load("math")` returns 11,998 rows.
"""
import gzip
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from huggingface_hub import hf_hub_download

from data import arithmetic

ENV_VAR = "STEER_DATA_DIR"
_SHOWN_BAD_ROWS = 20  # bad rows listed one by one in the warning; the rest are only counted

# -----------------------------------------------------------------------------
# Row adapters: raw row (dict) -> our schema. They never fail on a malformed row: a row that
# lacks a field keeps lacking it, and the check in load() reports it with its line number.


def _as_is(row: dict) -> dict:
    return row


def _move(row: dict, old: str, new: str) -> None:
    if old in row:
        row[new] = row.pop(old)


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}) in `text`, braces balanced; None if
    there is none or it never closes. (reward.py grades completions with its own extractor;
    this one only builds gold answers, and keeps data/ free of math-verify.)"""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    first = text.index("{", start) + 1
    depth = 1
    for i in range(first, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[first:i]
    return None


def _gsm8k_answer(row: dict) -> dict:
    """Fill a missing gsm8k answer from the solution's final `#### N` line."""
    solution = row.get("solution")
    if not row.get("answer") and isinstance(solution, str) and "####" in solution:
        row["answer"] = solution.split("####")[-1].strip().replace(",", "")
    return row


def _hub_gsm8k(row: dict) -> dict:
    row = dict(row)
    _move(row, "question", "problem")
    _move(row, "answer", "solution")  # the source's "answer" is the whole worked solution
    return _gsm8k_answer(row)


def _hub_prm800k(row: dict) -> dict:
    row = dict(row)
    _move(row, "unique_id", "id")
    return row


def _hub_qwen(name: str) -> Callable[[dict], dict]:
    """Qwen2.5-Math evaluation rows: `question` or `problem`, an `id` or `idx` number."""
    def adapt(row: dict) -> dict:
        row = dict(row)
        _move(row, "question", "problem")
        _move(row, "idx", "id")
        if "id" in row:
            row["id"] = f"{name}/{row['id']}"
        return row
    return adapt


def _hub_minerva(row: dict) -> dict:
    row = _hub_qwen("minerva")(row)
    if isinstance(row.get("solution"), str):
        row["answer"] = last_boxed(row["solution"])
    return row


def _hub_olympiadbench(row: dict) -> dict:
    row = _hub_qwen("olympiadbench")(row)
    if isinstance(row.get("solution"), list):
        row["solution"] = "\n\n".join(row["solution"])
    final = row.get("final_answer")
    if isinstance(final, list) and final and isinstance(final[0], str):
        # "$\frac{1}{2}$" -> "\frac{1}{2}", "$69$,$84$" -> "69,84"; an escaped \$ stays
        row["answer"] = re.sub(r"(?<!\\)\$", "", final[0])
    return row


# -----------------------------------------------------------------------------
# The registry: where each dataset lives, locally and on the hub.


@dataclass(frozen=True)
class Source:
    files: dict[str, str]  # split -> local file stem: <data folder>/<stem>.jsonl[.gz]
    hub_repo: str  # a dataset repo on the Hugging Face Hub
    hub_files: dict[str, str]  # split -> path of the file inside hub_repo
    from_hub: Callable[[dict], dict] = _as_is
    from_local: Callable[[dict], dict] = _as_is


_TB = "HuggingFaceTB/math_tasks"
SOURCES: dict[str, Source] = {
    "gsm8k": Source({"train": "gsm8k_train", "test": "gsm8k_test"}, _TB,
                    {"train": "data/gsm8k/train.jsonl", "test": "data/gsm8k/test.jsonl"},
                    from_hub=_hub_gsm8k, from_local=_gsm8k_answer),
    "math": Source({"train": "math_train"}, "di-zhang-fdu/MATH12000", {"train": "train.jsonl"},
                   from_hub=_hub_prm800k),
    "math500": Source({"test": "math500"}, "HuggingFaceH4/MATH-500", {"test": "test.jsonl"},
                      from_hub=_hub_prm800k),
    "aime24": Source({"test": "aime24"}, _TB, {"test": "data/aime24/test.jsonl"}, from_hub=_hub_qwen("aime24")),
    "aime25": Source({"test": "aime25"}, "math-ai/aime25", {"test": "test.jsonl"}, from_hub=_hub_qwen("aime25")),
    "amc23": Source({"test": "amc23"}, _TB, {"test": "data/amc23/test.jsonl"}, from_hub=_hub_qwen("amc23")),
    "minerva": Source({"test": "minerva"}, _TB, {"test": "data/minerva_math/test.jsonl"}, from_hub=_hub_minerva),
    "olympiadbench": Source({"test": "olympiadbench"}, _TB, {"test": "data/olympiadbench/test.jsonl"},
                            from_hub=_hub_olympiadbench),
    "deepscaler": Source({"train": "deepscaler"}, "agentica-org/DeepScaleR-Preview-Dataset",
                         {"train": "deepscaler.json"}),
}
# Generated datasets: split -> rows, computed here (no file, no download).
GENERATED: dict[str, Callable[[str], list[dict]]] = {"arithmetic": arithmetic.rows}
SPLITS = {name: tuple(src.files) for name, src in SOURCES.items()}
SPLITS["arithmetic"] = tuple(arithmetic.SPLIT_SEEDS)
NAMES = tuple(SPLITS)

# -----------------------------------------------------------------------------
# Reading and checking rows.


def _records(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, value) per record: `value` is the parsed JSON, or the JSONDecodeError of a line
    that does not parse. JSONL lines count from 1; blank lines are not records. A `.json` file
    is one array of rows (DeepScaleR's hub file)."""
    if path.suffix == ".json":
        with open(path, encoding="utf-8") as f:
            rows = json.load(f)
        if not isinstance(rows, list):
            raise ValueError(f"{path}: expected a JSON array of rows, got {type(rows).__name__}")
        for i, row in enumerate(rows, 1):
            yield f"row {i}", row
        return
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"line {lineno}", json.loads(line)
            except json.JSONDecodeError as err:
                yield f"line {lineno}", err


def _answer_text(value: Any) -> Any:
    """Numeric gold answers become text: 27 -> "27", 27.0 -> "27", 0.5 -> "0.5"."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return value


def _why_bad(row: dict) -> str | None:
    """Why this row is unusable, or None when it is fine."""
    for key in ("problem", "answer"):
        if row.get(key) is None:
            return f"missing {key!r}"
        if not isinstance(row[key], str):
            return f"{key!r} is a {type(row[key]).__name__}, not text"
        if not row[key].strip():
            return f"empty {key!r}"
    return None


def _read(path: Path, adapt: Callable[[dict], dict], id_prefix: str) -> list[dict]:
    rows, bad = [], []
    for index, (where, value) in enumerate(_records(path)):
        if isinstance(value, json.JSONDecodeError):
            bad.append(f"{where}: invalid JSON ({value.msg})")
            continue
        if not isinstance(value, dict):
            bad.append(f"{where}: a JSON {type(value).__name__}, not an object")
            continue
        row = adapt(value)
        row["answer"] = _answer_text(row.get("answer"))
        reason = _why_bad(row)
        if reason:
            bad.append(f"{where}: {reason}")
            continue
        row.setdefault("id", f"{id_prefix}/{index}")  # 0-based record number, like the local gsm8k ids
        rows.append(row)
    if bad:
        shown = "; ".join(bad[:_SHOWN_BAD_ROWS]) + ("; ..." if len(bad) > _SHOWN_BAD_ROWS else "")
        if not rows:  # nothing to skip to: the file is wrong, not its rows
            raise ValueError(f"{path}: every row is bad ({len(bad)} of {len(bad)}): {shown}; each line must be a "
                             "JSON object with a 'problem' and an 'answer'")
        warnings.warn(f"{path}: skipped {len(bad)} bad row(s) of {len(rows) + len(bad)}: {shown}", stacklevel=3)
    return rows


# -----------------------------------------------------------------------------
# The entry point.


def _local_file(folder: Path, stem: str) -> tuple[Path | None, list[Path]]:
    """The first of <stem>.jsonl / <stem>.jsonl.gz / <stem>.json that exists, and the paths tried."""
    tried = [folder / f"{stem}.jsonl", folder / f"{stem}.jsonl.gz", folder / f"{stem}.json"]
    return next((p for p in tried if p.is_file()), None), tried


def default_dir(explicit: str | os.PathLike | None = None) -> str | None:
    """The data folder every CLI uses: `explicit` (a --data-dir flag) when given, else
    $STEER_DATA_DIR, else ../shared/data beside the repository when it exists, else None (the hub)."""
    if explicit:
        return str(explicit)
    if os.environ.get(ENV_VAR):
        return os.environ[ENV_VAR]
    shared = Path(__file__).resolve().parents[2] / "shared" / "data"
    return str(shared) if shared.is_dir() else None


def load(name: str, split: str | None = None, data_dir: str | os.PathLike | None = None) -> list[dict]:
    """Rows of dataset `name` (one of NAMES) for `split`; see the module docstring."""
    if name not in SPLITS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(NAMES)}")
    splits = SPLITS[name]
    if split is None:
        if len(splits) > 1:
            raise ValueError(f"{name} has splits {sorted(splits)}: pass split= explicitly")
        split = splits[0]
    if split not in splits:
        raise ValueError(f"{name} has no split {split!r}; it has {sorted(splits)}")
    if name in GENERATED:
        return GENERATED[name](split)
    src = SOURCES[name]
    stem = src.files[split]

    folder = data_dir if data_dir is not None else os.environ.get(ENV_VAR)
    tried: list[Path] = []
    if folder:
        path, tried = _local_file(Path(folder), stem)
        if path is not None:
            return _read(path, src.from_local, stem)

    hub_file = src.hub_files[split]
    try:
        path = Path(hf_hub_download(repo_id=src.hub_repo, filename=hub_file, repo_type="dataset"))
    except Exception as err:  # offline, no network, missing repo: all end the same way here
        local = f"tried {', '.join(map(str, tried))}" if tried else "no data folder given"
        why = " ".join(f"{type(err).__name__}: {err}".split())  # one line: CLIs print this message as it is
        raise FileNotFoundError(
            f"{name} ({split}): no local file ({local}), and the download of {hub_file} from the Hugging "
            f"Face Hub dataset {src.hub_repo} ({src.hub_repo}:{hub_file}) failed ({why}). Put {stem}.jsonl "
            f"(or .jsonl.gz, or {stem}.json as one JSON array) in a folder and pass it with --data-dir "
            f"(data_dir= in Python) or set ${ENV_VAR}.") from err
    return _read(path, src.from_hub, stem)

