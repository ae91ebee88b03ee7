"""Pictures of a training run, an evaluation and a logit lens, as PNG files.

    python plot.py runs/x                 # a run directory (metrics.jsonl) -> runs/x/metrics.png
    python plot.py runs/x/eval            # an eval.py --out folder (results.json) -> runs/x/eval/results.png
    python plot.py lens.json              # a lens.py --out JSON -> lens.png
    python plot.py PATH --out FILE.png

What the path is comes from its content: a folder holding metrics.jsonl (or that file) is a run,
one holding results.json (or a JSON with "setups") an evaluation, a JSON with "layers" a lens.
The run figure: reward, accuracy, completion length (mean and max), truncated share and gradient
norm per step, and the norm of each layer's vector over the steps (a heatmap, layers up). The
eval figure: one group of bars per benchmark (and Avg.), one bar per setup, ± the std over seeds.
The lens figure: layers × rank heatmaps of the top (and bottom) tokens, each cell its token.

matplotlib is an optional extra (pip install 'steer[plots]'), imported only here, through its
object-oriented API (no pyplot: no display, no global figure state). Each plot function returns
the numbers it drew, read back from the figure's artists, so tests compare them to the input.
"""
import argparse
import json
import math
import warnings
from pathlib import Path

DPI = 100
SHARE = (-0.02, 1.02)  # the y range of a panel whose values are fractions
RUN_PANELS = [  # (metrics.jsonl keys drawn in one panel, its title, fixed y range); the first key is the solid line
    (("reward_mean",), "reward (mean over rollouts)", None),
    (("accuracy",), "accuracy (share of correct rollouts)", SHARE),
    (("completion_len_mean", "completion_len_max"), "completion length (tokens; dashed: max)", None),
    (("truncated_frac",), "share truncated at the token budget", SHARE),
    (("grad_norm",), "gradient norm (before clipping)", None),
]


def _figure(width: float, height: float):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("matplotlib is not installed (an optional extra): pip install 'steer[plots]'") from None
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _integer_ticks(axis):
    """Ticks at whole numbers only (steps, layers); a locator serves one axis, so a new one each."""
    from matplotlib.ticker import MaxNLocator
    axis.set_major_locator(MaxNLocator(integer=True))


def _save(fig, out) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # tokens in scripts the default font lacks draw as boxes: say nothing
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        fig.savefig(out, dpi=DPI)  # no bbox_inches="tight": the image is exactly figsize * DPI pixels
    return out


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e.msg}, line {e.lineno})") from None

# -----------------------------------------------------------------------------
# A run: metrics.jsonl, one JSON object per step (train.py's rl_step)


def read_metrics(path: Path) -> list[dict]:
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {i}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise ValueError(f"{path} line {i}: a metrics line is an object with an integer 'step'")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no steps yet")
    return rows


def plot_run(path, out) -> dict:
    """metrics.jsonl (or its run directory) -> PNG; returns {key: values drawn}, 'steering_norm' as
    (layers, steps) rows."""
    path = Path(path)
    path = path / "metrics.jsonl" if path.is_dir() else path
    rows = read_metrics(path)
    steps = [r["step"] for r in rows]
    fig = _figure(15, 8)
    axes = fig.subplots(2, 3).flat
    drawn = {"step": steps}
    for ax, (keys, title, ylim) in zip(axes, RUN_PANELS):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        _integer_ticks(ax.xaxis)
        if ylim:
            ax.set_ylim(*ylim)
        for key, style in zip(keys, ("-", "--")):
            if any(key in r for r in rows):  # a missing value (an older run's line) is a gap
                values = [math.nan if r.get(key) is None else float(r[key]) for r in rows]
                (line,) = ax.plot(steps, values, style, marker="." if len(steps) < 50 else None, color="C0")
                drawn[key] = list(line.get_ydata())
        if not ax.lines:
            ax.text(0.5, 0.5, f"no {keys[0]} in metrics.jsonl", ha="center", va="center", transform=ax.transAxes)
    ax = axes[len(RUN_PANELS)]
    ax.set_title("|steering[l]| per layer", fontsize=10)
    norms = [r.get("steering_norm") for r in rows]
    if all(isinstance(n, list) and len(n) == len(norms[0]) > 0 for n in norms):
        layers = len(norms[0])
        grid = [[norms[s][layer] for s in range(len(steps))] for layer in range(layers)]  # (L, steps)
        # one column per line of metrics.jsonl, placed at its step (steps are consecutive in a run)
        image = ax.imshow(grid, aspect="auto", origin="lower", interpolation="nearest", cmap="viridis",
                          extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, layers - 0.5))
        fig.colorbar(image, ax=ax)
        ax.set_xlabel("step")
        ax.set_ylabel("layer")
        _integer_ticks(ax.xaxis)
        _integer_ticks(ax.yaxis)
        drawn["steering_norm"] = image.get_array().tolist()
    else:
        ax.text(0.5, 0.5, "no per-layer steering_norm in every line", ha="center", va="center",
                transform=ax.transAxes)
    fig.suptitle(str(path.parent))
    _save(fig, out)
    return drawn

# -----------------------------------------------------------------------------
# An evaluation: eval.py's results.json


def plot_eval(path, out) -> dict:
    """results.json (or its folder) -> grouped bar chart; returns groups, setups and the bar
    heights / error half-widths drawn, one list per setup."""
    path = Path(path)
    path = path / "results.json" if path.is_dir() else path
    doc = _read_json(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("setups"), list) or not doc["setups"] \
            or not isinstance(doc.get("benchmarks"), list):
        raise ValueError(f"{path}: not eval.py's results.json (needs a 'benchmarks' list and a 'setups' list)")
    benches = doc["benchmarks"]
    groups = benches + (["Avg."] if len(benches) > 1 else [])
    fig = _figure(max(6.0, 1.6 + 0.55 * len(groups) * (len(doc["setups"]) + 1)) + 3.5, 5)  # + the legend
    ax = fig.subplots()
    width = 0.8 / len(doc["setups"])
    drawn = dict(groups=groups, setups=[], mean=[], std=[])
    for i, s in enumerate(doc["setups"]):
        try:
            cells = [s["benchmarks"][b] for b in benches] + ([s["avg"]] if len(benches) > 1 else [])
            means, stds = [c["mean"] for c in cells], [c["std"] for c in cells]
            name, temperature = s["name"], s["temperature"]
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path}: setup {i} lacks {e} (not eval.py's results.json layout)") from None
        label = f"{_short(name)} ({'greedy' if temperature == 0 else f'T={temperature:g}'})"
        bars = ax.bar([g + (i - (len(doc["setups"]) - 1) / 2) * width for g in range(len(groups))], means, width,
                      yerr=stds, capsize=3, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=8, padding=2)
        segments = bars.errorbar.lines[2][0].get_segments()  # one vertical segment per bar: mean ± std
        drawn["setups"].append(label)
        drawn["mean"].append([b.get_height() for b in bars])
        drawn["std"].append([(seg[1][1] - seg[0][1]) / 2 for seg in segments])
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("percent correct (± std over seeds)")
    ax.set_ylim(0, max(100.0, ax.get_ylim()[1]))
    fig.legend(loc="outside right upper", fontsize=8)  # beside the axes, never over a bar
    ax.set_title(str(path.parent))
    _save(fig, out)
    return drawn


def _short(name: str) -> str:
    """'runs/demo-s0/steering.safetensors' -> 'demo-s0/steering.safetensors': legends stay short."""
    parts = Path(name).parts
    return "/".join(parts[-2:]) if len(parts) > 2 else name

# -----------------------------------------------------------------------------
# A logit lens: lens.py --out, {"layers": [{"layer", "norm", "top": [{"token", "score"}], "bottom": ...}]}


def _score_field(doc: dict, entry: dict) -> str:
    """Which number of a token entry is its score: 'score', else what the lens ranked by, else 'cosine'."""
    for name in ("score", doc.get("rank_by"), "cosine"):
        if name in entry:
            return name
    raise ValueError(f"token entry {entry} has no 'score' (or 'cosine') field")


def plot_lens(path, out) -> dict:
    """A lens JSON -> heatmaps layers × rank, one for the top tokens (and one for the bottom ones
    when every layer has them); returns layers, tokens and scores per side, as drawn."""
    from lens import show_token
    path = Path(path)
    doc = _read_json(path)
    rows = doc.get("layers") if isinstance(doc, dict) else None
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{path}: not a logit-lens JSON (needs a non-empty 'layers' list, as lens.py --out writes)")
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or "layer" not in r or not isinstance(r.get("top"), list) or not r["top"] \
                or not all(isinstance(e, dict) and "token" in e for e in r["top"]):
            raise ValueError(f"{path}: layers[{i}] has no 'layer' and 'top' list of {{token, score}} entries "
                             "(not a logit-lens JSON)")
    sides = ["top"] + (["bottom"] if all(isinstance(r.get("bottom"), list) and r["bottom"] for r in rows) else [])
    field = _score_field(doc, rows[0]["top"][0])
    k = max(len(r[s]) for r in rows for s in sides)
    fig = _figure(2.0 + 1.35 * k * len(sides), 1.2 + 0.32 * len(rows))
    axes = fig.subplots(1, len(sides), squeeze=False)[0]
    limit = max(abs(float(e[field])) for r in rows for s in sides for e in r[s]) or 1.0
    drawn = {"layers": [r["layer"] for r in rows]}
    for ax, side in zip(axes, sides):
        # (L, k), a rank a layer lacks is blank
        scores = [[float(e[field]) for e in r[side]] + [math.nan] * (k - len(r[side])) for r in rows]
        tokens = [[e["token"] for e in r[side]] for r in rows]
        image = ax.imshow(scores, aspect="auto", origin="lower", cmap="RdBu_r", vmin=-limit, vmax=limit,
                          interpolation="nearest")
        for y, row in enumerate(tokens):
            for x, token in enumerate(row):
                ax.text(x, y, show_token(token, 12), ha="center", va="center", fontsize=7)
        ax.set_xticks(range(k), [str(i + 1) for i in range(k)])
        ax.set_yticks(range(len(rows)), [f"L{r['layer']}" for r in rows])
        ax.set_xlabel("rank")
        ax.set_title(f"{side} tokens ({field})", fontsize=10)
        fig.colorbar(image, ax=ax)
        drawn[side] = dict(tokens=tokens, scores=image.get_array().tolist())
    fig.suptitle(f"logit lens of {doc.get('steering', path.name)}")
    _save(fig, out)
    return drawn

# -----------------------------------------------------------------------------
# CLI


PLOTS = {"run": (plot_run, "metrics.png"), "eval": (plot_eval, "results.png"), "lens": (plot_lens, None)}


def detect(path) -> str:
    """'run', 'eval' or 'lens', from what the path holds."""
    p = Path(path)
    if p.is_dir():
        for name, kind in (("metrics.jsonl", "run"), ("results.json", "eval")):
            if (p / name).is_file():
                return kind
        raise FileNotFoundError(f"{path}: holds no metrics.jsonl (a run) or results.json (an evaluation)")
    if not p.is_file():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if p.suffix == ".jsonl":
        return "run"
    doc = _read_json(p) if p.suffix == ".json" else None
    if isinstance(doc, dict) and "setups" in doc:
        return "eval"
    if isinstance(doc, dict) and "layers" in doc:
        return "lens"
    raise ValueError(f"{path}: not a metrics.jsonl, an eval.py results.json ('setups') or a lens.py JSON ('layers')")


def default_out(path, kind: str) -> Path:
    p = Path(path)
    name = PLOTS[kind][1]
    if name is None:
        return p.with_suffix(".png")
    return (p if p.is_dir() else p.parent) / name


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="run directory / metrics.jsonl, eval folder / results.json, or lens JSON")
    p.add_argument("--out", help="PNG to write (default: beside the input, see above)")
    args = p.parse_args(argv)
    try:
        kind = detect(args.path)
        out = Path(args.out) if args.out else default_out(args.path, kind)
        PLOTS[kind][0](args.path, out)
    except (ValueError, FileNotFoundError, ImportError) as e:  # user errors: one line, no traceback
        raise SystemExit(f"plot.py: {e}") from None
    print(f"wrote {out} ({kind})")


if __name__ == "__main__":
    import cluster
    cluster.run_cli(main)
