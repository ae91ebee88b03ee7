"""train.py end to end on CPU: the quickstart learns, two gloo ranks equal one process, a run
killed with SIGKILL and resumed ends bit-identical to an uninterrupted one, checkpoints survive
a crash mid-write, a non-finite loss stops the run (and never updates). train.py is run as a program (it is one);
the checkpoint and update functions are also called in-process."""
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

import model as M
import rollout_groups as RG
from conftest import needs_math_verify

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "train.py")
# a small toy run: 4 prompts x 4 rollouts x 8 tokens per step
SMALL = ["--quickstart", "--prompts-per-step", "4", "--rollouts", "4", "--max-new-tokens", "8"]


# one thread per process: the runs are tiny, and several at once on 2 cores would oversubscribe
ENV = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def run(args, timeout=240):
    return subprocess.run([sys.executable, TRAIN, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def check(proc):
    assert proc.returncode == 0, f"train.py exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def steering(run_dir):
    return load_file(str(Path(run_dir) / "steering.safetensors"))["steering"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_help_documents_every_flag():
    out = check(run(["--help"])).stdout
    import dataclasses
    import importlib.util
    spec = importlib.util.spec_from_file_location("train_for_help", TRAIN)
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    for f in dataclasses.fields(train.TrainConfig):
        assert "--" + f.name.replace("_", "-") in out, f"--help does not document {f.name}"
    assert "--quickstart" in out


def test_quickstart_reward_rises(tmp_path):
    run_dir = tmp_path / "run"
    check(run(["--quickstart", "--max-steps", "10", "--out-dir", str(run_dir)]))
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 11))
    first, last = rows[0]["reward_mean"], sum(r["reward_mean"] for r in rows[-3:]) / 3
    assert 0 < first < 0.1, f"the toy reward should start low but non-zero, got {first}"
    assert last > first + 0.4, f"reward did not rise: {[round(r['reward_mean'], 3) for r in rows]}"
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["task"] == "toy" and cfg["max_steps"] == 10 and cfg["lr"] == 0.01
    # the saved vector is a regular steering file for the model the run built
    model = M.Transformer.from_pretrained(run_dir / "model")
    meta = model.load_steering(run_dir / "steering.safetensors")
    assert meta["step"] == "10" and model.steering.abs().max() > 0
    L, d = model.steering.shape
    assert all(r["bytes_allreduced"] == 4 * L * d for r in rows)
    assert all(len(r["steering_norm"]) == L for r in rows)
    assert rows[-1]["logprob_gap"] < 1e-4  # sampler and trainer score the same distribution


@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_the_baselines_learn_the_quickstart(tmp_path, adapter):
    """--quickstart --adapter lora|full: the paper's baselines learn the toy reward through the same
    loop (measured over 30 steps: LoRA 0.03 -> 0.54 at step 13 -> 0.99; full 0.03 -> 1.0 by step 4)."""
    run_dir = tmp_path / "run"
    check(run(["--quickstart", "--adapter", adapter, "--max-steps", "16", "--out-dir", str(run_dir)]))
    rows = metrics(run_dir)
    first, last = rows[0]["reward_mean"], sum(r["reward_mean"] for r in rows[-3:]) / 3
    assert last > first + 0.3, f"{adapter}: reward did not rise: {[round(r['reward_mean'], 3) for r in rows]}"
    base = sum(t.numel() for t in load_file(str(run_dir / "model" / "model.safetensors")).values())
    assert rows[0]["trainable_params"] == (2 * 4 * (128 + 64) if adapter == "lora" else base)  # r L (ffn + d)
    assert rows[0]["bytes_allreduced"] == 4 * rows[0]["trainable_params"]


@pytest.mark.parametrize("flag,value,says", [
    ("--lr", "inf", "--lr inf: must be a number in (0, 1]"), ("--lr", "nan", "--lr nan: must be a number in (0, 1]"),
    ("--lr", "1e38", "--lr 1e+38: must be a number in (0, 1]"),
    ("--grad-clip", "nan", "--grad-clip nan: must be a finite number >= 0"),
    ("--warmup", "2", "--warmup 2.0: is a fraction of the steps, in [0, 1)"),
    ("--max-steps", "-5", "--max-steps -5: must be >= 0"), ("--epochs", "0", "--epochs 0: must be >= 1"),
    ("--micro-batch-tokens", "1", "--micro-batch-tokens 1: must be 0 (the memory plan's) or hold one whole sequence"),
    ("--micro-batch-tokens", "-5", "--micro-batch-tokens -5: must be 0"),
    ("--prompts-per-step", "0", "--prompts-per-step 0: must be >= 1"),
    ("--tiny-layers", "0", "--tiny-layers 0: must be >= 1"),
    ("--max-new-tokens", "-1", "--max-new-tokens -1: must be >= 0"),
    ("--lrs", "1e-3,nan", "--lrs 1e-3,nan: nan must be a number in (0, 1]"),
    ("--lrs", "0.1,x", "--lrs '0.1,x': comma-separated learning rates"),
    ("--lrs", "0.1,0.1", "two members named lr0.1-seed0 (the same lr and seed"),
    ("--seeds", "1,2,3 --lrs 0.1,0.2", "--lrs gives 2 learning rates and --seeds 3 seeds"),
    ("--seeds", "1,2 --adapter lora", "--adapter lora trains one adapter per run"),
    ("--layer-lr", "depth", "--layer-lr 'depth': use uniform or stream"),
    ("--layer-lr", "stream --adapter full", "--adapter full has none"),
    ("--overlong-buffer", "8 --max-new-tokens 8", "--overlong-buffer 8: tokens at the end of the completion budget (8)")])
def test_a_number_that_cannot_work_is_one_line_before_anything_loads(tmp_path, flag, value, says):
    """Each refused as a user does it: exit 2, one line naming the flag and its rule, no run directory
    made (nothing loaded or written first)."""
    proc = run(["--quickstart", flag, *value.split(" "), "--out-dir", str(tmp_path / "run")], timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: config error: "), proc.stderr
    assert says in lines[0], lines[0]
    assert not (tmp_path / "run").exists()


def test_warmup_never_spends_a_step_at_learning_rate_zero(tmp_path):
    """--max-steps 1 with warmup: the one step still moves the vector (its lr is lr / warmup steps,
    never 0); and over 10 steps with 3 of warmup the lr climbs lr/3, 2lr/3, lr, then stays."""
    one = check(run([*SMALL, "--max-steps", "1", "--warmup", "0.03", "--out-dir", str(tmp_path / "one")]))
    assert "done:" in one.stdout and steering(tmp_path / "one").abs().max().item() == pytest.approx(0.01)
    check(run([*SMALL, "--max-steps", "10", "--warmup", "0.3", "--out-dir", str(tmp_path / "ten")]))
    assert [r["lr"] for r in metrics(tmp_path / "ten")] == pytest.approx([0.01 / 3, 0.02 / 3] + [0.01] * 8)


def test_overlong_filter_gives_no_gradient_when_every_rollout_is_truncated(tmp_path):
    """The toy task's completions all run to their budget (truncated_frac 1): with --overlong-filter
    nothing is backpropagated and the vector stays exactly zero; without it, it moves."""
    check(run([*SMALL, "--max-steps", "2", "--overlong-filter", "--out-dir", str(tmp_path / "on")]))
    rows = metrics(tmp_path / "on")
    assert all(r["truncated_frac"] == 1.0 and r["backward_tokens"] == 0 for r in rows), rows
    assert not steering(tmp_path / "on").any()
    check(run([*SMALL, "--max-steps", "2", "--out-dir", str(tmp_path / "off")]))
    assert steering(tmp_path / "off").any()


def test_overlong_buffer_shapes_each_reward_by_its_own_budget(train_module):
    """--overlong-buffer 4, --max-new-tokens 10, --max-len 16: prompt 0 (4 tokens) may take 10 tokens,
    prompt 1 (10 tokens) only 6: 6 tokens cost prompt 0's rollout nothing (6 <= 10 - 4), 5 tokens cost
    prompt 1's 3/4 of a point (3 into its buffer, tokens 2..6), either budget reached costs 1; correctness
    is not shaped."""
    from types import SimpleNamespace
    task = train_module.Task(name="len", prompts=[[1] * 4, [1] * 10], answers=None, stop_token_ids=[],
                             vocab_size=None, skipped_prompts=0,
                             reward=lambda completions, owners: ([1.0] * len(owners), [1.0] * len(owners)))
    comps = [SimpleNamespace(tokens=[2] * n) for n in (6, 10, 5, 6, 2)]
    owners = [0, 0, 1, 1, 1]
    cfg = train_module.TrainConfig(task="toy", max_new_tokens=10, max_len=16, overlong_buffer=4)
    rewards, correct = train_module.rewards_of(task, cfg, comps, owners)
    assert rewards == pytest.approx([1, 0, 1 / 4, 0, 1]) and correct == [1.0] * 5
    off = train_module.TrainConfig(task="toy", max_new_tokens=10, max_len=16)
    assert train_module.rewards_of(task, off, comps, owners) == ([1.0] * 5, [1.0] * 5)


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path):
    """The loss turns NaN at step 4 (the loss function poisoned from its 4th call: one micro-batch a
    step here): one line naming the step and the checkpoint kept, exit 2, no NaN written anywhere;
    the same command, unpoisoned, continues from step 2."""
    run_dir = tmp_path / "run"
    args = [*SMALL, "--max-steps", "5", "--checkpoint-every", "2", "--out-dir", str(run_dir)]
    poisoned = (f"import sys; sys.argv = ['train.py', *{args!r}]; sys.path.insert(0, {str(ROOT)!r})\n"
                "import rloo, train, cluster\n"
                "real, calls = rloo.policy_loss, []\n"
                "def policy_loss(*a, **k):\n"
                "    calls.append(1)\n"
                "    return real(*a, **k) * (float('nan') if len(calls) >= 4 else 1.0)\n"
                "rloo.policy_loss = policy_loss\n"
                "cluster.run_cli(train.main)\n")
    proc = subprocess.run([sys.executable, "-c", poisoned], cwd=ROOT, capture_output=True, text=True, timeout=240,
                          env=ENV)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: step 4: the loss or the gradient is not finite"), lines[0]
    assert f"The last checkpoint, step 2 in {run_dir}, is kept" in lines[0], lines[0]
    assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3]  # the bad step is not logged
    assert "NaN" not in (run_dir / "metrics.jsonl").read_text()
    assert torch.isfinite(steering(run_dir)).all()
    again = check(run(args))
    assert f"resuming {run_dir} at step 2/5" in again.stdout
    assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3, 4, 5]


def test_device_cuda_without_a_gpu_is_one_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    proc = run(["--quickstart", "--device", "cuda", "--out-dir", str(tmp_path / "run")], timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: --device cuda: no CUDA GPU is visible to this process (torch.cuda.is_available() is False): use "
        "--device cpu, or auto"], proc.stderr


def test_an_unwritable_run_directory_is_one_line(tmp_path):
    """--out-dir where nothing can be written (here: a path through a regular file; a read-only
    mount reads the same): one line naming the path, exit 2."""
    (tmp_path / "a-file").write_text("")
    proc = run(["--quickstart", "--out-dir", str(tmp_path / "a-file" / "run")], timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: run directory {tmp_path / 'a-file'}")
    assert "choose a writable --out-dir" in lines[0]


def test_the_same_command_without_out_dir_finds_its_run_again(tmp_path):
    """No --out-dir: the run directory is named by the config, so re-running the same command
    continues (here: finds it finished) instead of starting a new folder; another config, another."""
    def go(*extra):
        return check(subprocess.run([sys.executable, TRAIN, *SMALL, "--max-steps", "2", *extra], cwd=tmp_path,
                                    capture_output=True, text=True, timeout=120, env=ENV))
    first = go()
    assert len(list((tmp_path / "runs").iterdir())) == 1
    again = go()
    assert "is finished (step 2/2): nothing to do" in again.stdout, again.stdout
    go("--seed", "1")
    assert len(list((tmp_path / "runs").iterdir())) == 2 and first.returncode == 0


def test_refuses_a_non_empty_run_dir(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    proc = run([*SMALL, "--max-steps", "1", "--out-dir", str(tmp_path)])
    assert proc.returncode != 0 and "not empty" in proc.stderr
    assert (tmp_path / "notes.txt").read_text() == "keep me" and not (tmp_path / "config.json").exists()
    proc = run(["--resume", str(tmp_path), "--lr", "0.5"])
    assert proc.returncode != 0 and "remove ['lr']" in proc.stderr


ADAPTERS = ["steering", "lora", "full"]


def latest(run_dir, adapter) -> dict:
    """The run's latest trainable tensors, whatever the adapter."""
    if adapter == "full":
        return load_file(str(Path(run_dir) / "full" / "model.safetensors"))
    return load_file(str(Path(run_dir) / f"{adapter}.safetensors"))


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_two_ranks_equal_one_process(tmp_path, adapter):
    args = [*SMALL, "--max-steps", "4", "--checkpoint-every", "2", "--adapter", adapter]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={free_port()}", TRAIN, *args, "--out-dir", str(tmp_path / "two")],
                         cwd=ROOT, capture_output=True, text=True, timeout=240, env=ENV)
    check(two)
    check(run([*args, "--out-dir", str(tmp_path / "one")]))
    one_rows, two_rows = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    # the same rollouts: the sampler's draws hang on the prompt's index within the step, not the rank
    for a, b in zip(one_rows, two_rows, strict=True):
        assert a["reward_mean"] == b["reward_mean"] and a["completion_len_mean"] == b["completion_len_mean"]
    # both ranks hold the same adapter (checked in the run at every checkpoint: 0.0 difference)
    assert [r["rank_divergence"] for r in two_rows] == [None, 0.0, None, 0.0]
    # one all-reduce of 4 bytes per trainable number; steering keeps its per-layer norms
    assert {r["bytes_allreduced"] for r in two_rows} == {4 * two_rows[0]["trainable_params"]}
    assert ("steering_norm" in two_rows[0]) == (adapter == "steering")
    one, two = latest(tmp_path / "one", adapter), latest(tmp_path / "two", adapter)
    assert one.keys() == two.keys()
    # two ranks sum the gradient in another order (float rounding, ~1e-9); AdamW divides by
    # sqrt(v) + 1e-8, so a weight whose gradient is that rounding noise (embedding rows never
    # sampled) moves by up to lr either way: full fine-tuning is compared to lr / 100
    tolerance = 1e-4 if adapter == "full" else 1e-6
    for name in one:
        assert (one[name] - two[name]).abs().max() <= tolerance, name
    if adapter == "full":  # the weights moved away from the random base the run started from
        base = load_file(str(tmp_path / "one" / "model" / "model.safetensors"))
        assert not all(torch.equal(one["model." + k], w) for k, w in base.items())
    else:
        assert max(t.abs().max() for k, t in one.items() if k != "lora_A") > 0


def killed_after_a_checkpoint(args, run_dir) -> int:
    """Start train.py with `args` in run_dir and SIGKILL it once its first checkpoint exists; the
    step that checkpoint holds."""
    proc = subprocess.Popen([sys.executable, TRAIN, *args, "--out-dir", str(run_dir)], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while not (run_dir / "checkpoint.pt").exists():
        assert proc.poll() is None, f"run ended before its first checkpoint: {proc.stderr.read()[-3000:]}"
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)["step"]


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_sigkill_then_resume_is_bit_identical(tmp_path, adapter):
    args = [*SMALL, "--max-steps", "6", "--checkpoint-every", "2", "--adapter", adapter]
    check(run([*args, "--out-dir", str(tmp_path / "full")]))

    killed = tmp_path / "killed"
    saved = killed_after_a_checkpoint(args, killed)
    assert saved < 6, "the run finished before it could be killed"
    (killed / "checkpoint.pt.tmp").write_bytes(b"half a checkpoint")  # as if killed mid-write: ignored

    out = check(run(["--resume", str(killed)])).stdout
    assert f"resuming {killed} at step {saved}/6" in out
    a, b = latest(killed, adapter), latest(tmp_path / "full", adapter)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    full, resumed = metrics(tmp_path / "full"), metrics(killed)
    assert [r["step"] for r in resumed] == list(range(1, 7))  # lines after the checkpoint were replaced
    assert [r["reward_mean"] for r in resumed] == [r["reward_mean"] for r in full]


def test_members_trained_side_by_side_equal_their_own_runs(tmp_path):
    """--lrs / --seeds: 3 members trained in one run (one sampler call, backward, all-reduce and AdamW
    step a step, each member its own row, prompts, normaliser, clip and param group) equal 3 runs
    of one member each, step by step; and a member whose seed is --seed equals the plain run of its
    lr (the toy task's prompts and the tiny model come from --seed, so a plain run of another seed
    trains on other prompts). fp32: equal rewards, vectors equal to float rounding."""
    args = [*SMALL, "--max-steps", "4", "--checkpoint-every", "2", "--grad-clip", "0.05"]
    pairs = [("0.01", "0"), ("0.03", "1"), ("0.02", "2")]
    check(run([*args, "--lrs", ",".join(lr for lr, _ in pairs), "--seeds", ",".join(s for _, s in pairs),
               "--out-dir", str(tmp_path / "together")]))
    for lr, seed in pairs:
        check(run([*args, "--lrs", lr, "--seeds", seed, "--out-dir", str(tmp_path / f"alone{seed}")]))
    check(run([*args, "--lr", "0.01", "--out-dir", str(tmp_path / "plain")]))
    for lr, seed in pairs:
        name = f"lr{lr}-seed{seed}"
        together, alone = tmp_path / "together" / name, tmp_path / f"alone{seed}" / name
        rows, want = metrics(together), metrics(alone)
        assert [r["reward_mean"] for r in rows] == [r["reward_mean"] for r in want], name
        assert [r["lr"] for r in rows] == [float(lr)] * 4
        assert rows[0]["bytes_allreduced"] == 3 * want[0]["bytes_allreduced"]
        torch.testing.assert_close(steering(together), steering(alone), rtol=0, atol=1e-6)
        assert sorted(p.name for p in together.iterdir()) == [
            "config.json", "metrics.jsonl", "steering-step2.safetensors", "steering-step4.safetensors",
            "steering.safetensors"]
        assert json.loads((together / "config.json").read_text())["lr"] == float(lr)  # the run it stands for
    vectors = [steering(tmp_path / "together" / f"lr{lr}-seed{seed}") for lr, seed in pairs]
    assert (vectors[0] - vectors[1]).abs().max() > 0.01  # the members did train apart
    assert [r["reward_mean"] for r in metrics(tmp_path / "plain")] == \
        [r["reward_mean"] for r in metrics(tmp_path / "together" / "lr0.01-seed0")]
    torch.testing.assert_close(steering(tmp_path / "plain"), vectors[0], rtol=0, atol=1e-6)
    # eval.py reads a member's folder as a run directory: its whole history, side by side
    assert [s.step for s in ev_setups(tmp_path / "together" / "lr0.01-seed0")] == [None, 2, 4]
    # ... and the run's own folder as all of its members' folders
    assert [(Path(s.run).name, s.step) for s in ev_setups(tmp_path / "together")[1:]] == \
        [(f"lr{lr}-seed{seed}", step) for lr, seed in pairs for step in (2, 4)]


def ev_setups(run_dir):
    import importlib.util
    spec = importlib.util.spec_from_file_location("eval_under_test", ROOT / "eval.py")
    ev = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ev)
    return ev.make_setups(ev.apply_protocol(ev.EvalConfig(model="m", steering=str(run_dir), checkpoints="all")))


def test_members_resume_as_if_never_stopped(tmp_path):
    """A run of 2 members killed after a checkpoint continues from it: the same vectors and the same
    per-member metrics as a run never stopped (lines after the checkpoint replaced, in every folder)."""
    args = [*SMALL, "--max-steps", "6", "--checkpoint-every", "2", "--lrs", "0.01,0.03"]
    check(run([*args, "--out-dir", str(tmp_path / "full")]))
    killed = tmp_path / "killed"
    assert killed_after_a_checkpoint(args, killed) < 6
    check(run(["--resume", str(killed)]))
    for name in ("lr0.01-seed0", "lr0.03-seed0"):
        assert torch.equal(steering(killed / name), steering(tmp_path / "full" / name))
        assert metrics(killed / name) == [dict(r, step_s=r2["step_s"], sample_s=r2["sample_s"], reward_s=r2["reward_s"],
                                               train_s=r2["train_s"], tokens_per_s=r2["tokens_per_s"])
                                          for r, r2 in zip(metrics(tmp_path / "full" / name), metrics(killed / name),
                                                           strict=True)]


def test_rollouts_log_what_each_step_trained_on(tmp_path, train_module):
    """--log-rollouts: one line per rollout with the toy reward recomputable from its tokens, RLOO's
    advantages of its group, the step's metrics as their mean; switched on when a killed run
    continues, it logs exactly the steps an uninterrupted run logged from there on."""
    import rloo
    args = [*SMALL, "--max-steps", "4", "--checkpoint-every", "2"]
    check(run([*args, "--log-rollouts", "--out-dir", str(tmp_path / "full")]))
    rows = [json.loads(line) for line in (tmp_path / "full" / "rollouts.jsonl").read_text().splitlines()]
    assert len(rows) == 4 * 4 * 4
    for step, m in enumerate(metrics(tmp_path / "full"), start=1):
        mine = [r for r in rows if r["step"] == step]
        assert [(r["prompt"] == mine[0]["prompt"], r["rollout"]) for r in mine[:4]] == [(True, k) for k in range(4)]
        for r in mine:  # the toy reward: the share of completion tokens that are token 5
            assert r["reward"] == pytest.approx(r["completion"].count(5) / len(r["completion"]))
            assert r["tokens"] == len(r["completion"]) and r["finish_reason"] in ("stop", "length")
        rewards = torch.tensor([r["reward"] for r in mine], dtype=torch.float64).view(4, 4)
        advantages = rloo.advantages(rewards).view(-1).tolist()
        assert [r["advantage"] for r in mine] == pytest.approx(advantages)
        assert m["reward_mean"] == pytest.approx(rewards.mean().item())
        assert m["completion_len_mean"] == pytest.approx(sum(r["tokens"] for r in mine) / 16)

    killed = tmp_path / "killed"
    saved = killed_after_a_checkpoint(args, killed)  # started without the flag
    check(run([*args, "--out-dir", str(killed), "--log-rollouts"]))  # the same run, continued, logging
    assert (killed / "rollouts.jsonl").read_text().splitlines() == \
        [json.dumps(r) for r in rows if r["step"] > saved]
    assert train_module.parse_args(["--resume", str(killed), "--log-rollouts"], train_module.__doc__).log_rollouts


def test_resume_refuses_changed_training_data(tmp_path):
    run_dir = tmp_path / "run"
    check(run([*SMALL, "--max-steps", "2", "--checkpoint-every", "2", "--out-dir", str(run_dir)]))
    config = json.loads((run_dir / "config.json").read_text())
    config.update(max_steps=4, toy_prompt_len=config["toy_prompt_len"] + 1)  # same count, other prompts
    (run_dir / "config.json").write_text(json.dumps(config))
    proc = run(["--resume", str(run_dir)])
    assert proc.returncode != 0 and "training prompts differ" in proc.stderr + proc.stdout


def test_the_same_command_continues_a_run_and_another_config_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    args = [*SMALL, "--max-steps", "2", "--checkpoint-every", "2", "--out-dir", str(run_dir)]
    check(run(args))
    again = check(run(args))  # a finished run: says so, exits 0, touches nothing
    assert f"{run_dir} is finished (step 2/2)" in again.stdout
    assert [r["step"] for r in metrics(run_dir)] == [1, 2]
    other = run([*args, "--lr", "0.5", "--rollouts", "2"])
    assert other.returncode == 2
    assert other.stderr.strip().count("\n") == 0 and "Traceback" not in other.stderr  # one line
    assert "--lr 0.01 (saved) != 0.5 (given)" in other.stderr and "--rollouts 4 (saved) != 2 (given)" in other.stderr
    # the history keeps every checkpoint's vector beside the latest
    assert torch.equal(load_file(str(run_dir / "steering-step2.safetensors"))["steering"], steering(run_dir))


def wait_for_step(proc, run_dir, step, timeout=180):
    deadline = time.time() + timeout
    while not ((run_dir / "metrics.jsonl").exists() and len(metrics(run_dir)) >= step):
        assert proc.poll() is None, f"run ended early: {proc.stderr.read()[-3000:] if proc.stderr else ''}"
        assert time.time() < deadline, f"step {step} never came"
        time.sleep(0.02)


def test_sigterm_checkpoints_the_last_step_and_the_same_command_continues(tmp_path):
    """SIGTERM in the middle of a run with no periodic checkpoint yet: the run writes the
    checkpoint of its last completed step at once and exits 143; the same command then finishes
    the run bit-identical to one never stopped."""
    args = [*SMALL, "--max-steps", "8", "--checkpoint-every", "100"]
    check(run([*args, "--out-dir", str(tmp_path / "full")]))
    stopped = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, TRAIN, *args, "--out-dir", str(stopped)], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_step(proc, stopped, 3)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    saved = torch.load(stopped / "checkpoint.pt", weights_only=True)["step"]
    assert 3 <= saved < 8, saved
    assert f"holds step {saved}" in proc.stderr.read()
    out = check(run([*args, "--out-dir", str(stopped)])).stdout
    assert f"resuming {stopped} at step {saved}/8" in out
    assert torch.equal(steering(stopped), steering(tmp_path / "full"))
    assert [r["reward_mean"] for r in metrics(stopped)] == [r["reward_mean"] for r in metrics(tmp_path / "full")]


def children(pid: int) -> list[int]:
    """Process ids whose parent is `pid` (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def torchrun(args, max_restarts=0):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--max-restarts={max_restarts}",
            f"--master_port={free_port()}", TRAIN, *args]


def test_torchrun_restart_after_a_killed_worker_equals_an_uninterrupted_run(tmp_path):
    """One worker is SIGKILLed after step 3; torchrun (--max-restarts=1) relaunches both, which meet
    again in the agent's store (under a fresh prefix: cluster.restart_store) and resume from the
    step-2 checkpoint: the run equals one never interrupted."""
    args = [*SMALL, "--max-steps", "6", "--checkpoint-every", "2"]
    check(subprocess.run(torchrun([*args, "--out-dir", str(tmp_path / "full")]), cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env=ENV))
    run_dir = tmp_path / "restarted"
    proc = subprocess.Popen(torchrun([*args, "--out-dir", str(run_dir)], max_restarts=1), cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_step(proc, run_dir, 3)
    workers = children(proc.pid)
    assert len(workers) == 2, workers
    os.kill(max(workers), signal.SIGKILL)  # one worker dies; torchrun stops the other and relaunches both
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
    assert torch.equal(steering(run_dir), steering(tmp_path / "full"))
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, 7))


def test_without_restarts_a_dead_rank_makes_the_other_exit(tmp_path):
    port = free_port()
    args = [sys.executable, TRAIN, *SMALL, "--max-steps", "50", "--collective-timeout", "20",
            "--out-dir", str(tmp_path / "run")]
    procs = [subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env=dict(ENV, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=str(port))) for r in range(2)]
    wait_for_step(procs[0], tmp_path / "run", 2)
    procs[1].kill()
    t0 = time.time()
    code = procs[0].wait(timeout=120)
    assert code != 0 and time.time() - t0 < 60, (code, time.time() - t0)
    err = procs[0].stderr.read()
    assert err.startswith("error: ") and "Traceback" not in err, err[-2000:]


def test_sigterm_while_blocked_in_a_collective_still_checkpoints(tmp_path):
    """Rank 1 is frozen (SIGSTOP), so rank 0 blocks inside a collective, in C, where no Python
    signal handler could run. SIGTERM to rank 0 must still write the checkpoint of its last
    completed step (from the CPU copy, on the watcher thread) and exit 143 at once."""
    port = free_port()
    run_dir = tmp_path / "run"
    args = [sys.executable, TRAIN, *SMALL, "--max-steps", "50", "--checkpoint-every", "100",
            "--collective-timeout", "300", "--out-dir", str(run_dir)]
    procs = [subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env=dict(ENV, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=str(port))) for r in range(2)]
    try:
        wait_for_step(procs[0], run_dir, 2)
        procs[1].send_signal(signal.SIGSTOP)
        done = len(metrics(run_dir))
        time.sleep(2)  # rank 0 is now waiting for rank 1 in the next step's first collective
        procs[0].send_signal(signal.SIGTERM)
        assert procs[0].wait(timeout=30) == 128 + signal.SIGTERM
        saved = torch.load(run_dir / "checkpoint.pt", weights_only=True)["step"]
        assert done <= saved <= done + 1 and len(metrics(run_dir)) == saved
        assert (run_dir / f"steering-step{saved}.safetensors").is_file()
    finally:
        procs[1].kill()
        procs[1].wait()


def test_a_user_error_under_torchrun_prints_one_line_once(tmp_path):
    proc = subprocess.run(torchrun([*SMALL, "--task", "math", "--dataset", "nope", "--model", "some/model",
                                    "--out-dir", str(tmp_path / "r")]), cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=ENV)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "--dataset 'nope'" in lines[0], proc.stderr[-3000:]
    assert not (tmp_path / "r").exists()  # refused before anything was made or loaded


FAKE_WANDB = """
import json, os
LOG = os.environ["FAKE_WANDB_LOG"]
def _write(kind, **kw):
    with open(LOG, "a") as f:
        f.write(json.dumps(dict(kind=kind, **kw), default=str) + "\\n")
class _Run:
    def log(self, data, step=None):
        _write("log", data=data, step=step)
    def finish(self):
        _write("finish")
def init(**kw):
    _write("init", **kw)
    return _Run()
class Table:
    def __init__(self, columns, data):
        self.columns, self.data = columns, data
"""


@needs_math_verify
def test_eval_during_training_equals_eval_py_and_is_tracked(tmp_path, tiny_with_tokenizer):
    """--eval-every scores the live model with the training sampler; its numbers equal eval.py's on
    the saved vectors, sampled at T = 1 (one Task.evaluate: the same problems, seeds and draws), and
    --wandb-project gets every metrics line. The
    tracker is a stand-in module (wandb itself is not a dependency here): what train.py hands it
    is recorded and checked."""
    import eval as ev
    from conftest import DATA_DIR
    fake = tmp_path / "fake"
    (fake / "wandb").mkdir(parents=True)
    (fake / "wandb" / "__init__.py").write_text(FAKE_WANDB)
    log = tmp_path / "wandb.jsonl"
    env = dict(ENV, PYTHONPATH=str(fake), FAKE_WANDB_LOG=str(log))
    run_dir = tmp_path / "run"
    args = ["--model", str(tiny_with_tokenizer), "--task", "math", "--dataset", "arithmetic", "--data-dir",
            str(DATA_DIR), "--prompts-per-step", "4", "--rollouts", "2", "--max-new-tokens", "8", "--max-len", "256",
            "--max-prompt-len", "200", "--max-steps", "2", "--lr", "0.5", "--eval-every", "2", "--eval-bench",
            "arithmetic", "--eval-limit", "6", "--eval-samples", "2", "--eval-temperature", "1", "--dtype", "float32",
            "--device", "cpu", "--reward-workers", "1", "--wandb-project", "steer-test", "--out-dir", str(run_dir)]
    check(subprocess.run([sys.executable, TRAIN, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=env))
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert "eval_accuracy" in rows[0] and "eval_accuracy" not in rows[1] and "eval_accuracy" in rows[2]
    for row, steering_file in ((rows[0], None), (rows[2], run_dir / "steering-step2.safetensors")):
        out = tmp_path / f"eval{row['step']}"
        ev.main(["--model", str(tiny_with_tokenizer), "--bench", "arithmetic", "--limit", "6", "--max-new-tokens",
                 "8", "--max-len", "256", "--temperature", "1", "--samples", "2", "--seeds", "1", "--dtype", "float32",
                 "--device", "cpu", "--data-dir", str(DATA_DIR), "--grade-workers", "1", "--out", str(out)]
                + (["--no-base", "--steering", str(steering_file)] if steering_file else []))
        samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
        assert row["eval_problems"] == 6 and len(samples) == 12  # sampled at T = 1: the same draws in both
        assert row["eval_len_mean"] == pytest.approx(sum(s["n_tokens"] for s in samples) / 12)
        assert row["eval_accuracy"] == pytest.approx(sum(s["reward"] for s in samples) / 12)
        assert row["eval_truncated_frac"] == pytest.approx(sum(s["finish_reason"] == "length" for s in samples) / 12)

    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert calls[0]["kind"] == "init" and calls[0]["project"] == "steer-test"
    assert calls[0]["config"]["eval_every"] == 2 and calls[-1]["kind"] == "finish"
    logged = [c for c in calls if c["kind"] == "log"]
    assert [c["step"] for c in logged] == [0, 1, 2]
    assert logged[1]["data"]["reward_mean"] == rows[1]["reward_mean"]
    assert logged[1]["data"]["steering_norm/1"] == rows[1]["steering_norm"][1]


@needs_math_verify
def test_evaluate_reads_the_live_vector(tmp_path, tiny_with_tokenizer, train_module):
    """train.evaluate on the live model with a random vector equals eval.py on that vector saved,
    sample for sample at T = 1: one Task.evaluate, and the evaluation shares the trained tensors
    (no reload, no copy)."""
    import cluster
    import eval as ev
    from conftest import DATA_DIR
    cfg = train_module.TrainConfig(model=str(tiny_with_tokenizer), dataset="arithmetic", data_dir=str(DATA_DIR),
                                   prompts_per_step=4, rollouts=2, max_new_tokens=8, max_len=256, max_prompt_len=200,
                                   eval_every=1, eval_bench="arithmetic", eval_limit=5, eval_samples=2,
                                   eval_temperature=1.0, seed=3, dtype="float32", device="cpu", reward_workers=1,
                                   out_dir=str(tmp_path / "run"))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    run = train_module.setup(cfg, cluster.Cluster(0, 1, torch.device("cpu")))
    seen, score = [], run.eval_task.reward  # what evaluate() generated, on its way to the reward
    run.eval_task.reward = lambda completions, owners: (seen.append(completions), score(completions, owners))[1]
    try:
        [base] = train_module.evaluate(run)
        torch.manual_seed(0)
        with torch.no_grad():
            run.model.steering.copy_(20 * torch.randn_like(run.model.steering))  # in place, as AdamW does
        [steered] = train_module.evaluate(run)
        run.model.save_steering(tmp_path / "v.safetensors")
    finally:
        run.task.close()
        run.eval_task.close()
        dist.destroy_process_group()  # eval.py makes its own
    assert seen[0] != seen[1] and base["eval_problems"] == 5  # the live vector changed the completions
    ev.main(["--model", str(tiny_with_tokenizer), "--bench", "arithmetic", "--limit", "5", "--max-new-tokens", "8",
             "--max-len", "256", "--temperature", "1", "--samples", "2", "--seeds", "1", "--seed", "3",
             "--batch-prompts", "2", "--dtype", "float32", "--device", "cpu", "--data-dir", str(DATA_DIR),
             "--grade-workers", "1", "--no-base", "--steering", str(tmp_path / "v.safetensors"),
             "--out", str(tmp_path / "eval")])
    samples = [json.loads(line) for line in (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()]
    import data
    tok = data.Tokenizer.from_dir(tiny_with_tokenizer)
    # the same sampled completions (T = 1, 2 samples, seed 3), although eval.py asks in calls of 2 problems
    assert [tok.decode(c, skip_special_tokens=True) for c in seen[1]] == [s["completion"] for s in samples]
    assert steered["eval_accuracy"] == pytest.approx(sum(s["reward"] for s in samples) / 10)
    assert steered["eval_len_mean"] == pytest.approx(sum(s["n_tokens"] for s in samples) / 10)
    assert steered["eval_truncated_frac"] == pytest.approx(sum(s["finish_reason"] == "length" for s in samples) / 10)


def test_eval_during_training_scores_each_member(tmp_path, tiny_with_tokenizer, train_module):
    """--eval-every with --lrs: every member evaluated side by side in one pass, each scored as
    eval.py scores its vector (here: member 0 at zero, the base; member 1 a random vector)."""
    import cluster
    import eval as ev
    from conftest import DATA_DIR
    cfg = train_module.TrainConfig(model=str(tiny_with_tokenizer), dataset="arithmetic", data_dir=str(DATA_DIR),
                                   prompts_per_step=4, rollouts=2, max_new_tokens=8, max_len=256, max_prompt_len=200,
                                   eval_every=1, eval_bench="arithmetic", eval_limit=5, eval_samples=2,
                                   eval_temperature=1.0, seed=3, dtype="float32", device="cpu", reward_workers=1,
                                   lrs="0.01,0.02", out_dir=str(tmp_path / "run"))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    run = train_module.setup(cfg, cluster.Cluster(0, 1, torch.device("cpu")))
    try:
        torch.manual_seed(0)
        with torch.no_grad():
            run.model.adapter.members[1].copy_(20 * torch.randn_like(run.model.adapter.members[1]))
        seen, score = [], run.eval_task.reward  # what evaluate() generated, on its way to the reward
        run.eval_task.reward = lambda completions, owners: (seen.append(completions), score(completions, owners))[1]
        scores = train_module.evaluate(run)
        run.model.set_adapter("steering")  # member 1's vector, as a file eval.py reads
        torch.manual_seed(0)
        with torch.no_grad():
            run.model.steering.copy_(20 * torch.randn_like(run.model.steering))
        run.model.save_steering(tmp_path / "v.safetensors")
    finally:
        run.task.close()
        run.eval_task.close()
        dist.destroy_process_group()  # eval.py makes its own
    ev.main(["--model", str(tiny_with_tokenizer), "--bench", "arithmetic", "--limit", "5", "--max-new-tokens", "8",
             "--max-len", "256", "--temperature", "1", "--samples", "2", "--seeds", "1", "--seed", "3",
             "--dtype", "float32", "--device", "cpu", "--data-dir", str(DATA_DIR), "--grade-workers", "1",
             "--steering", f"none,{tmp_path / 'v.safetensors'}", "--out", str(tmp_path / "eval")])
    samples = [json.loads(line) for line in (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()]
    import data
    tok = data.Tokenizer.from_dir(tiny_with_tokenizer)
    [generated] = seen  # one grading call: member 0's 10 samples, then member 1's
    for k, (score, setup) in enumerate(zip(scores, ["base", str(tmp_path / "v.safetensors")], strict=True)):
        mine = [r for r in samples if r["setup"] == setup]
        assert [tok.decode(c, skip_special_tokens=True) for c in generated[10 * k:10 * (k + 1)]] == \
            [r["completion"] for r in mine]
        assert score["eval_accuracy"] == pytest.approx(sum(r["reward"] for r in mine) / 10)
        assert score["eval_len_mean"] == pytest.approx(sum(r["n_tokens"] for r in mine) / 10)
    assert generated[:10] != generated[10:]  # the members' vectors differ, and so do their samples


# -----------------------------------------------------------------------------
# In-process: the checkpoint writer and the update step


@pytest.fixture
def train_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("train_under_test", TRAIN)
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    return train


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def random_groups(vocab=96, prompts=(5, 9, 3, 7), rollouts=4, seed=0):
    """Prompts of several lengths with `rollouts` completions each (lengths 1..12, advantages
    random), one group flat (all advantages 0) and a few single zero advantages among the rest."""
    g = torch.Generator().manual_seed(seed)
    groups = []
    for k, length in enumerate(prompts):
        rows = []
        for j in range(rollouts):
            n = 1 if (k, j) == (0, 0) else int(torch.randint(2, 13, (1,), generator=g))
            adv = 0.0 if k == 2 or (k, j) == (1, 2) else float(torch.randn(1, generator=g))
            rows.append(RG.Rollout(torch.randint(0, vocab, (n,), generator=g).tolist(), adv,
                                      (-torch.rand(n, generator=g)).tolist()))
        groups.append(RG.Group(torch.randint(0, vocab, (length,), generator=g).tolist(), rows))
    return groups


def naive_gradient(model, groups, cfg, totals, weight=None):
    """The reference: every rollout forwarded alone as prompt + completion, zero advantages included.
    weight(log-probs (1, T), the rollout) -> per-token weights (1, T), optional."""
    import rloo
    from conftest import token_logprobs
    model.reset_grads()
    for group in groups:
        for r in group.rollouts:
            seq = torch.tensor(group.prompt + r.completion)
            lp = token_logprobs(model, seq[None, :-1], seq[None, 1:], cfg.temperature)[:, len(group.prompt) - 1:]
            loss = rloo.policy_loss(lp, torch.ones_like(lp, dtype=torch.bool), torch.tensor([r.advantage]),
                                    cfg.loss_norm, **totals, weights=weight(lp.detach(), r) if weight else None)
            loss.backward()
    return model.grad_buffer.clone()


def test_truncated_importance_sampling_weights_each_token(tiny_qwen, train_module):
    """--tis-cap C: each token's log-prob counts min(pi_train / pi_sampler, C). The sampler's
    log-probs are set off the trainer's by -log 2 and +log 2 at alternate tokens (ratios 2 and 1/2):
    the backward equals the naive one with weights min(2, 1.5) and 1/2 at those tokens, token by
    token, and differs from the unweighted gradient."""
    from conftest import token_logprobs
    model = M.Transformer.from_pretrained(tiny_qwen)
    with torch.no_grad():
        model.steering.copy_(0.1 * torch.randn_like(model.steering))
    groups = RG.with_signal(random_groups())
    shift = lambda n: torch.tensor([-math.log(2.0) if t % 2 == 0 else math.log(2.0) for t in range(n)])
    with torch.no_grad():
        for g in groups:
            for r in g.rollouts:
                seq = torch.tensor(g.prompt + r.completion)
                true = token_logprobs(model, seq[None, :-1], seq[None, 1:])[0, len(g.prompt) - 1:]
                r.sampler_logprobs = (true + shift(len(r.completion))).tolist()
    rows = [r for g in groups for r in g.rollouts]
    totals = dict(total_tokens=float(sum(len(r.completion) for r in rows)))
    cfg = train_module.TrainConfig(task="toy", tis_cap=1.5)
    want = naive_gradient(model, groups, cfg, totals,
                          weight=lambda lp, r: torch.where(shift(lp.shape[1]) < 0, 1.5, 0.5)[None])
    train_module.accumulate_gradient(model, [(groups, totals, None)], cfg, None, torch.device("cpu"), 1000)
    torch.testing.assert_close(model.grad_buffer, want, rtol=1e-4, atol=1e-6)
    plain = naive_gradient(model, groups, cfg, totals)
    assert (plain - want).abs().max() > 0.1 * want.abs().max()


@pytest.mark.parametrize("family", ["qwen2-tied", "llama31"])
@pytest.mark.parametrize("kind,options,recompute", [
    ("steering", {}, False), ("steering", {}, True), ("steering", dict(layers="1", steer_at="post-attn"), False),
    ("lora", dict(lora_rank=2), False), ("full", {}, True)])
def test_backward_savings_give_the_naive_gradient(tmp_path, train_module, family, kind, options, recompute):
    """Zero-advantage rollouts skipped and each prompt forwarded once for its rollouts: the same
    gradient as one forward per rollout (fp32), at any micro-batch budget, including budgets that
    split a group into pieces; and the forwarded tokens are counted as the metrics report them."""
    from conftest import write_checkpoint
    model = M.Transformer.from_pretrained(write_checkpoint(tmp_path, family))
    torch.manual_seed(1)
    model.set_adapter(kind, **options)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))  # steering and LoRA's B start at zero
    model.trainable_to_weights()
    model.checkpoint_blocks = recompute
    groups = random_groups()
    cfg = train_module.TrainConfig(task="toy", temperature=0.7)
    rows = [r for g in groups for r in g.rollouts]
    totals = dict(total_sequences=len(rows), max_completion_len=16,
                  total_tokens=float(sum(len(r.completion) for r in rows)))
    want = naive_gradient(model, groups, cfg, totals)
    assert want.abs().max() > 0
    signal = RG.with_signal(groups)
    assert [len(g.rollouts) for g in signal] == [4, 3, 4]  # group 2 is flat, one zero in group 1
    for budget in (1000, 40, 1):
        [record] = train_module.accumulate_gradient(model, [(signal, totals, None)], cfg, None, torch.device("cpu"),
                                                    budget)
        torch.testing.assert_close(model.grad_buffer, want, rtol=1e-5, atol=1e-6)
        pieces = [g for b in RG.micro_batches(signal, budget) for g in b]
        assert record.forwarded_tokens == sum(len(g.prompt) + sum(len(r.completion) - 1 for r in g.rollouts)
                                              for g in pieces)
        assert record.micro_batches == (1 if budget == 1000 else len(pieces) if budget == 1 else record.micro_batches)
        assert record.padded_tokens == sum(map(RG.padded_tokens, RG.micro_batches(signal, budget)))
    assert sum(len(g.prompt) for g in signal) + sum(len(r.completion) - 1 for g in signal for r in g.rollouts) < \
        sum(len(g.prompt) + len(r.completion) - 1 for g in groups for r in g.rollouts)


def test_a_step_without_signal_is_a_zero_gradient(tiny_qwen, train_module):
    model = M.Transformer.from_pretrained(tiny_qwen)
    flat = [g for g in random_groups() if all(r.advantage == 0 for r in g.rollouts)]
    [record] = train_module.accumulate_gradient(model, [(RG.with_signal(flat), dict(total_tokens=1.0), None)],
                                                train_module.TrainConfig(), None, torch.device("cpu"), 1000)
    assert record.forwarded_tokens == 0 and record.micro_batches == 0 and not record.bad_loss
    assert torch.equal(model.grad_buffer, torch.zeros_like(model.grad_buffer))


class ParitySampler:
    """A stand-in sampler: rollout j of prompt [i] is the completion [i, j]; records each call."""
    def __init__(self):
        self.calls = []

    def generate(self, prompts, n, prompt_ids=(0,), **_):
        from types import SimpleNamespace
        self.calls.append(([p[0] for p in prompts], prompt_ids[0]))
        return [[SimpleNamespace(tokens=[p[0], j], logprobs=[0.0, 0.0], finish_reason="stop") for j in range(n)]
                for p in prompts]


def parity_run(train, rounds, size=100, odd=True):
    """Even prompts: every rollout scores 1 (no signal); odd ones: rollout j scores j % 2."""
    from types import SimpleNamespace

    def reward(completions, owners):
        rewards = [float(c[1] % 2) if i % 2 and odd else 1.0 for c, i in zip(completions, owners)]
        return rewards, rewards
    task = train.Task(name="parity", prompts=[[i] for i in range(size)], answers=None, stop_token_ids=[],
                      vocab_size=None, skipped_prompts=0, reward=reward)
    cfg = train.TrainConfig(task="toy", rollouts=4, prompts_per_step=4, dynamic_sampling=rounds)
    return SimpleNamespace(cfg=cfg, cluster=SimpleNamespace(rank=0, world=1), task=task, sampler=ParitySampler(),
                           members=train.members(cfg))


def first_groups(train, run, indices):
    completions = [c for group in run.sampler.generate([run.task.prompts[i] for i in indices], n=4)
                   for c in group]
    run.sampler.calls.clear()
    rewards, _ = run.task.reward([c.tokens for c in completions], [i for i in indices for _ in range(4)])
    import rloo
    return RG.as_groups([run.task.prompts[i] for i in indices], completions,
                        rloo.advantages(torch.tensor(rewards).view(-1, 4)))


def dynamic(train, run, step, groups):
    """rl_step's dynamic sampling: rollout_groups.refill drawing with train.fresh_groups."""
    import functools
    return RG.refill(groups, run.cfg.dynamic_sampling, functools.partial(train.fresh_groups, run, step))


def test_dynamic_sampling_replaces_prompts_without_signal(train_module):
    """Prompts 0 and 2 have no signal: fresh random prompts are drawn for them, round after round,
    until the step holds 4 prompts with signal; the draws are seeded by step, so a resumed run
    draws the same; fresh prompts are sampled under offsets past the step's own prompts."""
    run = parity_run(train_module, rounds=5)
    groups, draws = dynamic(train_module, run, 7, first_groups(train_module, run, [0, 1, 2, 3]))
    assert len(groups) == 4 and all(map(RG.has_signal, groups))
    assert [g.prompt[0] % 2 for g in groups] == [1, 1, 1, 1] and groups[0].prompt == [1] and groups[1].prompt == [3]
    assert draws == sum(len(indices) for indices, _ in run.sampler.calls) and 2 <= draws <= 10
    assert [offset for _, offset in run.sampler.calls] == [4 * (r + 1) for r in range(len(run.sampler.calls))]
    again = parity_run(train_module, rounds=5)
    assert dynamic(train_module, again, 7, first_groups(train_module, again, [0, 1, 2, 3])) == (groups, draws)
    other = parity_run(train_module, rounds=5)
    dynamic(train_module, other, 8, first_groups(train_module, other, [0, 1, 2, 3]))
    assert other.sampler.calls != run.sampler.calls  # another step draws other prompts


def test_dynamic_sampling_is_bounded(train_module):
    """No prompt has signal: --dynamic-sampling 3 draws 3 rounds of 4 prompts, then the step goes on
    with the prompts it was given."""
    run = parity_run(train_module, rounds=3, odd=False)
    given = first_groups(train_module, run, [0, 1, 2, 3])
    groups, draws = dynamic(train_module, run, 0, given)
    assert draws == 12 and len(run.sampler.calls) == 3 and groups == given


def test_out_of_memory_halves_the_micro_batch_and_gives_the_same_gradient(tiny_qwen, train_module, monkeypatch):
    model = M.Transformer.from_pretrained(tiny_qwen)
    with torch.no_grad():
        model.steering.copy_(0.1 * torch.randn_like(model.steering))
    groups = RG.with_signal(random_groups())
    cfg = train_module.TrainConfig(task="toy")
    rows = [r for g in groups for r in g.rollouts]
    totals = dict(total_sequences=len(rows), max_completion_len=16,
                  total_tokens=float(sum(len(r.completion) for r in rows)))

    def run(budget):
        [record] = train_module.accumulate_gradient(model, [(groups, totals, None)], cfg, None, torch.device("cpu"),
                                                    budget)
        return record
    clean = run(1000)
    reference = model.steering.grad.clone()
    assert clean.micro_batches == 1 and clean.oom_retries == 0

    real_backward = train_module.backward

    def small_memory(model, batch, *a):  # "GPU memory" for 40 padded tokens per micro-batch
        if RG.padded_tokens(batch) > 40:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real_backward(model, batch, *a)
    monkeypatch.setattr(train_module, "backward", small_memory)
    squeezed = run(1000)
    assert squeezed.oom_retries == 5 and squeezed.budget == 1000 // 32 and squeezed.micro_batches > 1
    assert torch.allclose(model.steering.grad, reference, rtol=1e-5, atol=1e-7)
    assert squeezed.loss == pytest.approx(clean.loss, rel=1e-5)

    monkeypatch.setattr(train_module, "backward", lambda *a: (_ for _ in ()).throw(torch.OutOfMemoryError("oom")))
    longest = max(len(g.prompt) + max(len(r.completion) for r in g.rollouts) - 1 for g in groups)
    with pytest.raises(SystemExit, match=f"out of memory in the backward of a single {longest}-token sequence"):
        run(1000)


def test_a_non_finite_gradient_never_updates(train_module, one_rank_group, tiny_qwen):
    cfg = train_module.TrainConfig(grad_clip=2.0)
    model = M.Transformer.from_pretrained(tiny_qwen)
    steer = model.steering
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=0.1)
    shape, n = steer.shape, steer.numel()

    model.reset_grads().fill_(3.0)  # the flat buffer steer.grad is a view of
    [norm], skipped = train_module.reduce_and_step(model, opt, cfg, [0.1], bad_loss=False)
    assert not skipped and norm == pytest.approx(3.0 * math.sqrt(n))
    after_good = steer.detach().clone()
    assert torch.allclose(after_good, torch.full(shape, -0.1))  # Adam's first step: -lr * sign
    assert model.grad_buffer.norm().item() == pytest.approx(2.0, rel=1e-5)  # clipped to --grad-clip
    state_step = opt.state[steer]["step"].item()

    for value, bad_loss in ((float("nan"), False), (float("inf"), False), (1.0, True)):
        model.reset_grads().fill_(value)
        [norm], skipped = train_module.reduce_and_step(model, opt, cfg, [0.1], bad_loss=bad_loss)
        assert skipped and not math.isfinite(norm)
        assert torch.equal(steer.detach(), after_good) and opt.state[steer]["step"].item() == state_step


def test_layer_lr_stream_measures_the_base_stream_and_scales_each_layers_step(tmp_path, train_module, one_rank_group):
    """--layer-lr stream: the factors are the residual-stream norms after each block as HF's own
    decoder layers produce them (first token left out), over their mean on the trained layers,
    whatever the vectors already hold (a resumed run measures the base model again); and each
    layer's AdamW step, decay included, is its plain step times its factor, in a population's too."""
    from conftest import hf_model
    hf, outputs = hf_model("qwen2-tied", layers=4), []
    with torch.no_grad():  # small embeddings: the blocks' outputs then dominate, and the stream grows with depth
        hf.model.embed_tokens.weight.mul_(0.01)
    hf.save_pretrained(tmp_path)
    model = M.Transformer.from_pretrained(tmp_path, dtype=torch.float32)
    model.set_adapter("steering", layers="1-3")
    with torch.no_grad():
        model.steering.normal_()  # a resumed run's vectors: not what the factors measure
    prompts = [[5, 9, 3, 7, 1], [2, 8, 4], [11, 12, 13, 14, 15, 16, 17]]
    hooks = [layer.register_forward_hook(lambda _m, _i, out: outputs.append(out[0] if isinstance(out, tuple) else out))
             for layer in hf.model.layers]
    norms = torch.zeros(4)
    with torch.no_grad():
        for p in prompts:
            outputs.clear()
            hf(torch.tensor([p]))
            norms += torch.stack([h[0, 1:].norm(dim=-1).sum() for h in outputs])
    for hook in hooks:
        hook.remove()
    norms /= sum(len(p) - 1 for p in prompts)
    scale = train_module.stream_scale(model, prompts, model.adapter.layers)
    torch.testing.assert_close(scale, norms / norms[1:].mean(), rtol=1e-5, atol=0)
    assert scale.max() / scale.min() > 1.05  # the layers' factors differ: the test can tell them apart

    cfg = train_module.TrainConfig(grad_clip=0.0)
    for population in (False, True):
        steps = []
        for factors in (None, scale):
            model.set_population(["a", "b"]) if population else model.set_adapter("steering")
            params = model.trainable_parameters()
            with torch.no_grad():
                for p in params:  # not zero, so that the decay moves them too
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
            start = [p.detach().clone() for p in params]
            opt = torch.optim.AdamW([dict(params=[p]) for p in params], lr=0.1, weight_decay=0.5)
            model.reset_grads().copy_(torch.randn(model.grad_buffer.shape, generator=torch.Generator().manual_seed(2)))
            train_module.reduce_and_step(model, opt, cfg, [0.1] * len(params), bad_loss=False, layer_scale=factors)
            steps.append([p.detach() - p0 for p, p0 in zip(params, start)])
        for plain, scaled in zip(*steps, strict=True):
            torch.testing.assert_close(scaled, plain * scale[:, None], rtol=1e-5, atol=1e-6)


# -----------------------------------------------------------------------------
# The real-model demonstration (skipped without ../shared/tools/real_models.sh's checkpoints)


@pytest.mark.slow
def test_cpu_demo_preset_raises_the_reward_of_a_real_model(tmp_path):
    """A few steps of `--preset cpu-demo` on the real Qwen2.5-Coder-0.5B-Instruct: the reward of
    the last steps beats the first steps' (measured: -0.72, -0.53, -0.28, +0.09 over steps 1-4)."""
    from conftest import REAL_MODELS
    folder = REAL_MODELS / "qwen2.5-coder-0.5b-instruct"
    if not (folder / "config.json").is_file():
        pytest.skip(f"{folder} absent (run ../shared/tools/real_models.sh)")
    env = {k: v for k, v in ENV.items() if k != "OMP_NUM_THREADS"}  # one real run: every core
    proc = subprocess.run([sys.executable, TRAIN, "--preset", "cpu-demo", "--model", str(folder), "--max-steps", "4",
                           "--out-dir", str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True,
                          timeout=1800, env=env)
    check(proc)
    rewards = [r["reward_mean"] for r in metrics(tmp_path / "run")]
    assert sum(rewards[2:]) / 2 > sum(rewards[:2]) / 2, f"reward did not rise: {rewards}"
