"""plot.py: each figure from a constructed input is a real PNG of the promised size that is not
blank, and the numbers drawn (read back from the figure's artists) are the input's."""
import json
import math
import struct
import sys

import pytest

pytest.importorskip("matplotlib")
import plot  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path) -> tuple[int, int]:
    """(width, height) from the PNG signature and IHDR chunk; fails on anything else."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE and head[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def assert_drawn_png(path, size):
    from matplotlib.image import imread
    assert png_size(path) == size
    pixels = imread(path)
    assert pixels.shape[:2] == (size[1], size[0]) and pixels[..., :3].std() > 0.01  # decodes, not blank


def same(a, b):
    return all(x == y or (math.isnan(x) and math.isnan(y)) for x, y in zip(a, b, strict=True))


def write_metrics(folder, steps=6, layers=3):
    rows = []
    for s in range(1, steps + 1):
        rows.append(dict(step=s, reward_mean=0.1 * s, accuracy=0.05 * s, completion_len_mean=90.0 - 5 * s,
                         completion_len_max=96, truncated_frac=1 / s, grad_norm=2.0 / s, lr=1e-3,
                         steering_norm=[0.01 * s * (layer + 1) for layer in range(layers)]))
    del rows[2]["grad_norm"]  # a line without a key is a gap, not an error
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_run_plot_draws_every_metric_and_the_norm_heatmap(tmp_path):
    rows = write_metrics(tmp_path / "run")
    assert plot.detect(tmp_path / "run") == "run" and plot.detect(tmp_path / "run" / "metrics.jsonl") == "run"
    out = tmp_path / "run.png"
    drawn = plot.plot_run(tmp_path / "run", out)
    assert_drawn_png(out, (15 * plot.DPI, 8 * plot.DPI))
    assert drawn["step"] == [1, 2, 3, 4, 5, 6]
    for key in ("reward_mean", "accuracy", "completion_len_mean", "completion_len_max", "truncated_frac"):
        assert same(drawn[key], [r[key] for r in rows]), key
    assert same(drawn["grad_norm"], [r.get("grad_norm", math.nan) for r in rows])
    # layers up, steps across: the transpose of the per-step lists
    assert drawn["steering_norm"] == [[r["steering_norm"][layer] for r in rows] for layer in range(3)]


def test_run_plot_rejects_a_bad_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "reward_mean": \n')
    with pytest.raises(ValueError, match=r"metrics.jsonl line 2: not JSON"):
        plot.plot_run(tmp_path, tmp_path / "x.png")


def eval_results(folder):
    """results.json in eval.py's write_outputs layout: benchmarks, then one entry per setup with
    its name, temperature, per-benchmark mean/std and avg."""
    def cell(mean, std):
        return dict(metric="pass@1", problems=10, seeds=[0], per_seed=[mean], mean=mean, std=std)
    setups = [dict(name="base", steering=None, temperature=0.0, seeds=[0],
                   benchmarks=dict(math500=cell(30.0, 0.0), gsm8k=cell(50.0, 0.0)), avg=dict(mean=40.0, std=0.0)),
              dict(name="runs/demo-s0/steering.safetensors", steering="runs/demo-s0/steering.safetensors",
                   temperature=1.0, seeds=[0, 1, 2], benchmarks=dict(math500=cell(42.5, 2.5), gsm8k=cell(61.0, 4.0)),
                   avg=dict(mean=51.75, std=1.5))]
    folder.mkdir(parents=True, exist_ok=True)
    doc = dict(config={}, unit="percent correct", benchmarks=["math500", "gsm8k"], setups=setups)
    (folder / "results.json").write_text(json.dumps(doc))


def test_eval_plot_bars_are_the_table(tmp_path):
    eval_results(tmp_path / "eval")
    assert plot.detect(tmp_path / "eval") == "eval" and plot.detect(tmp_path / "eval" / "results.json") == "eval"
    out = plot.default_out(tmp_path / "eval", "eval")
    assert out == tmp_path / "eval" / "results.png"
    drawn = plot.plot_eval(tmp_path / "eval", out)
    assert drawn["groups"] == ["math500", "gsm8k", "Avg."]
    assert drawn["setups"] == ["base (greedy)", "demo-s0/steering.safetensors (T=1)"]
    assert drawn["mean"] == [[30.0, 50.0, 40.0], [42.5, 61.0, 51.75]]
    assert drawn["std"] == [pytest.approx([0, 0, 0]), pytest.approx([2.5, 4.0, 1.5])]
    width, height = png_size(out)
    assert_drawn_png(out, (width, 5 * plot.DPI))


def lens_json(path, layers=4, k=3, score="score"):
    rows = [dict(layer=layer, norm=0.5 * layer,
                 top=[{"id": layer * 10 + r, "token": f" tok{layer}_{r}", score: 0.9 - 0.1 * r - 0.01 * layer}
                      for r in range(k)],
                 bottom=[{"id": 100 + r, "token": "\n" if r == 0 else f"-{r}", score: -0.8 + 0.1 * r}
                         for r in range(k)])
            for layer in range(layers)]
    path.write_text(json.dumps(dict(steering="s.safetensors", model="m", top_k=k, layers=rows)))
    return rows


@pytest.mark.parametrize("score", ["score", "cosine"])  # lens.py's layout now, and with cosine/dot entries
def test_lens_heatmap_holds_every_token_and_score(tmp_path, score):
    rows = lens_json(tmp_path / "lens.json", score=score)
    assert plot.detect(tmp_path / "lens.json") == "lens"
    assert plot.default_out(tmp_path / "lens.json", "lens") == tmp_path / "lens.png"
    drawn = plot.plot_lens(tmp_path / "lens.json", tmp_path / "lens.png")
    assert drawn["layers"] == [0, 1, 2, 3]
    for side in ("top", "bottom"):
        assert drawn[side]["tokens"] == [[e["token"] for e in r[side]] for r in rows]
        assert drawn[side]["scores"] == [[pytest.approx(e[score]) for e in r[side]] for r in rows]
    width, height = png_size(tmp_path / "lens.png")
    assert_drawn_png(tmp_path / "lens.png", (width, height))
    # more layers, a taller picture; more ranks, a wider one
    lens_json(tmp_path / "big.json", layers=12, k=6, score=score)
    plot.plot_lens(tmp_path / "big.json", tmp_path / "big.png")
    big_w, big_h = png_size(tmp_path / "big.png")
    assert big_w > width and big_h > height


def test_lens_other_layouts_fail_clearly(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(dict(layers=[dict(layer=0, without=-0.1, alone=0.2)])))
    with pytest.raises(ValueError, match=r"layers\[0\] has no 'layer' and 'top' list"):
        plot.plot_lens(tmp_path / "a.json", tmp_path / "a.png")
    (tmp_path / "b.json").write_text(json.dumps(dict(layers=[dict(layer=0, top=[dict(token="x", logit=1)])])))
    with pytest.raises(ValueError, match="has no 'score'"):
        plot.plot_lens(tmp_path / "b.json", tmp_path / "b.png")
    (tmp_path / "c.json").write_text(json.dumps(dict(rows=[])))
    with pytest.raises(ValueError, match="not a metrics.jsonl, an eval.py results.json"):
        plot.detect(tmp_path / "c.json")


def test_cli_writes_beside_the_input_or_to_out(tmp_path, capsys):
    write_metrics(tmp_path / "run")
    plot.main([str(tmp_path / "run")])
    assert png_size(tmp_path / "run" / "metrics.png") == (1500, 800)
    plot.main([str(tmp_path / "run"), "--out", str(tmp_path / "pics" / "r.png")])
    assert png_size(tmp_path / "pics" / "r.png") == (1500, 800)
    assert f"wrote {tmp_path}/pics/r.png (run)" in capsys.readouterr().out


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "no such file or directory"),
    (lambda p: p.mkdir(), "holds no metrics.jsonl (a run) or results.json"),
    (lambda p: p.write_text("{"), "not JSON"),
])
def test_cli_user_errors_are_one_line(tmp_path, make, message):
    target = tmp_path / "thing.json"
    make(target)
    with pytest.raises(SystemExit) as exit_:
        plot.main([str(target)])
    text = str(exit_.value.code)
    assert message in text and "\n" not in text and text.startswith("plot.py: ")


def test_missing_matplotlib_is_one_line(tmp_path, monkeypatch):
    write_metrics(tmp_path / "run")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what `import matplotlib` sees when it is absent
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(SystemExit) as exit_:
        plot.main([str(tmp_path / "run")])
    assert str(exit_.value.code) == "plot.py: matplotlib is not installed (an optional extra): pip install 'steer[plots]'"
