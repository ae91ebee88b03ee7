"""The life of a training run around the method: its directory (config.json, metrics.jsonl,
checkpoints), resuming by re-running the same command, stopping cleanly on SIGTERM / Ctrl-C,
and the metrics log (W&B optional). train.py holds the method; this file holds what keeps a run
alive on a real cluster.

Every file is written to a temporary name and renamed (model.atomic_write), so a crash never
leaves a half-written one; checkpoint.pt is written last and is the commit point.
"""
import copy
import hashlib
import json
import math
import os
import signal
import socket
import sys
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from tqdm import tqdm

import model as M

# -----------------------------------------------------------------------------
# The run directory


def build_tiny_model(folder: Path, cfg):
    """Write a tiny random Llama checkpoint (config.json + model.safetensors) with model.py's own
    classes, deterministic in cfg.seed. Embeddings are scaled down so the initial next-token
    distribution is broad (every token has some probability): the toy reward then starts low
    but non-zero, and a steering vector can raise it."""
    from safetensors.torch import save_file
    d = cfg.tiny_dim
    raw = dict(model_type="llama", vocab_size=cfg.tiny_vocab, hidden_size=d, intermediate_size=2 * d,
               num_hidden_layers=cfg.tiny_layers, num_attention_heads=4, num_key_value_heads=2,
               rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=True, torch_dtype="float32")
    torch.manual_seed(cfg.seed)
    net = M.Transformer(M.Config.from_dict(raw))
    with torch.no_grad():
        net.embed_tokens.weight.mul_(0.15)  # logits = norm(h) . e: std ~ 0.15 sqrt(d) instead of sqrt(d)
    tensors = {k: v.detach().contiguous() for k, v in net.base_weights().items()}
    folder.mkdir(parents=True, exist_ok=True)
    M.atomic_write(folder / "model.safetensors", lambda tmp: save_file(tensors, str(tmp)))
    M.atomic_write(folder / "config.json", lambda tmp: tmp.write_text(json.dumps(raw, indent=2)))


def write_text(path: Path, text: str):
    M.atomic_write(path, lambda tmp: tmp.write_text(text))


def save_checkpoint(run_dir: Path, model, optimizer, cfg, step: int, epoch: int, offset: int,
                    data_fingerprint: str, snapshot=None):
    """The adapter's files, as it names them (Adapter.checkpoint_files): {kind}-step{N}.safetensors (the
    history: a few KB each for steering) and {kind}.safetensors (the latest, the file eval.py reads;
    full fine-tuning: the folder full/, no history: each would be a whole model; a population: both
    in each member's folder), then checkpoint.pt:
    the checkpoint is the commit point, and resuming reads nothing else. A full or unwritable disk
    stops the run with the path named; every file is renamed into place only once complete, so the
    previous checkpoint stays intact.
    With a `snapshot` (StopSignals) the trainable state comes from that CPU copy, not the live model:
    nothing here then touches the device."""
    if snapshot is not None:
        names = [name for name, _ in model.adapter.named_parameters()]  # steering / LoRA: trainable() order
        tensors, trainable = dict(zip(names, snapshot.trainable)), snapshot.trainable
        optimizer_state = snapshot.optimizer
    else:
        tensors, optimizer_state = dict(model.adapter.named_parameters()), optimizer.state_dict()
        trainable = [p.detach().cpu().clone() for p in model.trainable_parameters()]
    target = run_dir / "checkpoint.pt"
    try:
        for name, file_tensors in model.adapter.checkpoint_files(step, tensors):
            target = run_dir / name
            target.parent.mkdir(exist_ok=True)  # a population's member folders
            model.save_adapter(target, file_tensors, step=step, task=cfg.task, dataset=cfg.dataset)
        state = dict(step=step, epoch=epoch, offset=offset, data=data_fingerprint,
                     trainable=trainable, optimizer=optimizer_state, config=asdict(cfg))
        target = run_dir / "checkpoint.pt.tmp"

        def synced(tmp):  # on disk before the rename: the commit point must survive a power loss
            with open(tmp, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
        M.atomic_write(run_dir / "checkpoint.pt", synced)
    except OSError as e:
        for leftover in [*run_dir.glob("*.tmp"), *run_dir.glob("*/*.tmp")]:  # (a population's member folders)
            leftover.unlink(missing_ok=True)
        raise SystemExit(f"checkpoint of step {step} could not be written to {getattr(e, 'filename', None) or target} "
                         f"({e.strerror or e}); the previous checkpoint in {run_dir} is intact: free space or fix "
                         "permissions, then re-run the same command to continue from it") from None


def load_checkpoint(run_dir: Path) -> dict | None:
    path = run_dir / "checkpoint.pt"  # a leftover checkpoint.pt.tmp is an interrupted write: ignored
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise SystemExit(f"{path}: unreadable checkpoint ({type(e).__name__}: {e})") from None


# Where a run lives and what it records, not what it computes: a continued run may change them.
NOT_COMPUTED = ("out_dir", "resume", "log_rollouts")


def config_differences(saved: dict, cfg) -> list[str]:
    """The fields (other than NOT_COMPUTED) on which a saved config.json and `cfg` differ."""
    mine, defaults = asdict(cfg), asdict(type(cfg)())  # a field newer than the saved run: it ran the default
    return [f"--{k.replace('_', '-')} {saved.get(k, defaults[k])!r} (saved) != {mine[k]!r} (given)"
            for k in mine if k not in NOT_COMPUTED and saved.get(k, defaults[k]) != mine[k]]


def step_files(run_dir: Path, cfg) -> list[Path]:
    """The run's files of one JSON line per step (metrics.jsonl) or per rollout (rollouts*.jsonl,
    --log-rollouts): its own, or each member's (--lrs / --seeds) in its folder."""
    from train_config import members
    folders = [run_dir / m.name for m in members(cfg)]
    rollouts = [p for f in folders if f.is_dir() for p in sorted(f.glob("rollouts*.jsonl"))]
    return [f / "metrics.jsonl" for f in folders] + rollouts


def prepare_run_dir(cfg) -> tuple[Path, dict | None]:
    """Rank 0: the run directory and the checkpoint to continue from, if any. A directory that
    holds a run of the same config continues it (a re-run of the same command, a torchrun restart,
    a scheduler requeue); one that holds anything else is refused. metrics.jsonl (and
    rollouts*.jsonl) is cut back to the checkpoint's step, so the lines a killed run wrote after
    its last checkpoint are replaced, not duplicated."""
    run_dir = Path(cfg.resume or cfg.out_dir or default_run_dir(cfg))
    config_file = run_dir / "config.json"
    if not cfg.resume and config_file.is_file():
        try:
            saved = json.loads(config_file.read_text())
        except json.JSONDecodeError as e:
            raise SystemExit(f"{config_file}: not valid JSON ({e}); choose another --out-dir") from None
        differ = config_differences(saved, cfg)
        if differ and (run_dir / "checkpoint.pt").is_file():
            raise SystemExit(f"run directory {run_dir} holds a run with another config ({'; '.join(differ)}): "
                             "re-run it with its own flags (or --resume it), or choose another --out-dir")
        if differ:  # no checkpoint, nothing to protect: a run that failed at startup, started again fixed
            print(f"{run_dir}: no checkpoint yet; starting it again with the new config ({'; '.join(differ)})")
            config_file.unlink()
    elif not cfg.resume and run_dir.exists() and any(run_dir.iterdir()):
        raise SystemExit(f"run directory {run_dir} exists, is not empty and holds no config.json: "
                         "choose another --out-dir")
    cfg.out_dir = str(run_dir)
    if not config_file.is_file():  # a new run
        run_dir.mkdir(parents=True, exist_ok=True)
        for lines in step_files(run_dir, cfg):
            lines.unlink(missing_ok=True)
        write_text(config_file, json.dumps(asdict(cfg), indent=2))
        return run_dir, None
    state = load_checkpoint(run_dir)
    for lines in step_files(run_dir, cfg):
        if lines.is_file():
            kept = [ln for ln in lines.read_text().splitlines() if state and metrics_step(ln) <= state["step"]]
            write_text(lines, "".join(ln + "\n" for ln in kept))
    return run_dir, state


def open_run(cfg, c) -> tuple[Path, dict | None]:
    """Every rank: the run directory and the checkpoint state to continue from (None for a new
    run). Rank 0 decides (prepare_run_dir); only its decision crosses ranks (the checkpoint of a
    full fine-tune is 12 bytes per weight): every rank then reads checkpoint.pt itself, from the
    run directory's shared filesystem. A refusal is raised on every rank alike."""
    import cluster
    decision = None
    if c.is_main:
        try:
            run_dir, state = prepare_run_dir(cfg)
            decision = (run_dir, state is not None)
        except SystemExit as e:
            decision = e
        except OSError as e:  # a read-only mount, a path through a file, a full disk
            decision = SystemExit(f"run directory {getattr(e, 'filename', None) or cfg.out_dir}: cannot be written "
                                  f"({e.strerror or e}): choose a writable --out-dir")
    decision = cluster.broadcast(decision, c)
    if isinstance(decision, SystemExit):
        raise decision
    run_dir, resuming = decision
    cfg.out_dir = str(run_dir)
    return run_dir, load_checkpoint(run_dir) if resuming else None


def run_model(cfg, run_dir: Path, c) -> Path | str:
    """--model, or for 'random-tiny' the tiny model rank 0 writes into the run directory (once)."""
    if cfg.model != "random-tiny":
        return cfg.model
    folder = run_dir / "model"
    if c.is_main and not (folder / "model.safetensors").is_file():
        build_tiny_model(folder, cfg)
    dist.barrier()  # (several nodes need the run directory on a shared filesystem here)
    return folder


def check_resume(state: dict, run_dir: Path, data_fingerprint: str, position: tuple[int, int]):
    """A checkpoint continues only on the data it was trained on, at the position its step implies."""
    if state["data"] != data_fingerprint:
        raise SystemExit(f"{run_dir}/checkpoint.pt: the training prompts differ from the ones the run began "
                         "with (dataset, data dir, tokenizer or template changed?)")
    if (state["epoch"], state["offset"]) != position:
        raise SystemExit(f"{run_dir}/checkpoint.pt: data position {(state['epoch'], state['offset'])} does not "
                         f"match step {state['step']} (the dataset changed since the run began?)")


def restore(state: dict, model, optimizer):
    """The checkpoint's trainable tensors and AdamW state into the live model and optimizer."""
    with torch.no_grad():  # in place: the sampler's CUDA graphs hold these tensors
        for p, saved in zip(model.trainable_parameters(), state["trainable"], strict=True):
            p.copy_(saved)
    model.trainable_to_weights()
    optimizer.load_state_dict(state["optimizer"])


def metrics_step(line: str) -> float:
    """The step of a metrics.jsonl (or rollouts.jsonl) line; a torn last line (a crash mid-write)
    counts as past every checkpoint."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def config_dir(name: str, config: dict) -> str:
    """runs/<name>-<hash of the config>: the same command finds the same directory again (a re-run
    continues a training run, a torchrun restart finds the run it began; an evaluation overwrites
    its own results), another config another one."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:8]
    return f"runs/{name}-{digest}"


def default_run_dir(cfg) -> str:
    """Hashed over the fields that differ from their defaults: an option added later (at its default)
    leaves every existing run's directory name as it was."""
    defaults = asdict(type(cfg)())
    return config_dir(cfg.preset or cfg.task, {k: v for k, v in asdict(cfg).items()
                                                if k not in NOT_COMPUTED and v != defaults[k]})

# -----------------------------------------------------------------------------
# Stopping: SIGTERM (schedulers before pre-emption, torchrun when a peer failed) and SIGINT
# (Ctrl-C) end the run in a checkpoint of its last completed step.


@dataclass
class Snapshot:
    """The trainable state as of a completed step, on the CPU (what a signal's checkpoint writes)."""
    step: int
    trainable: list  # CPU copies, in model.trainable_parameters() order
    optimizer: dict  # AdamW's state_dict with CPU tensors


def to_cpu(obj):
    """A copy of a (nested) state dict with every tensor on the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return copy.deepcopy(obj)


class StopSignals:
    """At the start of every step the trainable state (the vector and AdamW's moments: a few
    hundred KB for steering) is copied to the CPU. A signal then writes the checkpoint of the last
    completed step from that copy at once, without waiting for the step in flight (its sampling
    may take minutes), and exits 128 + signal: re-running the same command continues from there,
    exactly as if never stopped. Every rank gets the signal (torchrun forwards it; schedulers
    signal the whole job) and they all hold the same state, so rank 0 writes and all exit.

    The writing happens on a watcher thread woken through signal.set_wakeup_fd, not in a Python
    signal handler: those run only when the main thread returns to the interpreter, and the main
    thread may be blocked for minutes inside a collective (waiting for a peer that already exited)
    or a CUDA sync. The watcher touches no device memory (the copy is on the CPU), so a stuck
    stream cannot stall it. A checkpoint being written when the signal comes is finished first
    (one lock).

    Full fine-tuning is too big to copy every step (3x the model in fp32): there the signal is
    noted, the step in flight completes, and all ranks agree (one all-reduce per step) to
    checkpoint it and exit."""
    SNAPSHOT_LIMIT = 1 << 26  # trainable numbers up to which a per-step copy is cheap (steering, LoRA)

    def __init__(self, run, save: Callable):
        self.run, self.save = run, save  # save(step, snapshot or None): rank 0 writes that checkpoint
        self.snapshot: Snapshot | None = None
        self.saved_step = run.start  # the step the checkpoint on disk holds
        self.lock = threading.Lock()  # held while a checkpoint is written
        self.requested = 0  # deferred mode: the signal that came
        self.deferred = run.model.num_trainable() > self.SNAPSHOT_LIMIT
        self.wake_read, wake_write = socket.socketpair()
        wake_write.setblocking(False)
        signal.set_wakeup_fd(wake_write.fileno(), warn_on_full_buffer=False)
        self.wake_write = wake_write  # (kept alive: its descriptor is the wakeup fd)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: None)  # the watcher acts; the interpreter must not die
        threading.Thread(target=self.watch, name="stop-signals", daemon=True).start()

    def take_snapshot(self, step: int):
        run = self.run
        if not self.deferred:
            self.snapshot = Snapshot(step, [to_cpu(p) for p in run.model.trainable_parameters()],
                                     to_cpu(run.optimizer.state_dict()))

    def watch(self):
        while True:
            signum = self.wake_read.recv(1)[0]
            if signum in (signal.SIGTERM, signal.SIGINT):
                break
        if self.deferred:
            self.requested = signum  # stop_after, on the main thread, does the rest
        else:
            self.exit(signum)

    def stop_after(self, step: int):
        """Deferred mode, after each step: if any rank got a signal, checkpoint `step` and exit."""
        if not self.deferred:
            return
        flag = torch.tensor([float(self.requested)], device=self.run.model.grad_buffer.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            if self.saved_step != step:
                self.checkpoint(step)
            self.exit(int(flag.item()))

    def checkpoint(self, step: int):
        """The regular checkpoint after `step` completed steps (rank 0 writes, every rank waits)."""
        run = self.run
        with self.lock:
            if run.cluster.is_main:
                self.save(step, None)
            self.saved_step = step
        dist.barrier()  # nobody runs ahead of a checkpoint that may still be written

    def exit(self, signum: int):
        run, name = self.run, signal.Signals(signum).name
        with self.lock:  # a checkpoint in progress is completed first
            snap = self.snapshot
            if run.cluster.is_main and snap is not None and snap.step > self.saved_step:
                self.save(snap.step, snap)
                self.saved_step = snap.step
            if run.cluster.is_main:
                print(f"{name}: stopped; {run.run_dir}/checkpoint.pt holds step {self.saved_step}: re-run the "
                      "same command to continue", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(128 + signum)  # not SystemExit: peers and gloo threads may be mid-collective


class Tracker:
    """--wandb-project: the config once, then every step's numbers (rank 0 only)."""

    def __init__(self, cfg, run_dir: Path):
        import wandb  # optional: only when asked for
        run_id = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]  # a resumed run logs on
        self.run = wandb.init(project=cfg.wandb_project, name=run_dir.name, id=run_id, resume="allow",
                              config=asdict(cfg), dir=str(run_dir))

    def log(self, m: dict, prefix: str = ""):
        """prefix: a population member's name (its numbers under name/...) in the run's one W&B run."""
        numbers = {k: v for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        numbers.update({f"steering_norm/{i}": v for i, v in enumerate(m.get("steering_norm", []))})
        self.run.log({prefix + k: v for k, v in numbers.items()}, step=m["step"])

    def close(self):
        self.run.finish()


def step_metrics(sums: dict, top: dict, *, step, epoch, lr, prompts, step_s, grad_norm, model,
                 dynamic: bool, micro_batches, micro_batch_tokens, skipped_prompts, member=None) -> dict:
    """One metrics.jsonl line from rl_step's numbers summed (`sums`) and maxed (`top`) over ranks:
    means per rollout, shares per prompt, the slowest rank's phase times; what trains and what
    crossed ranks (the adapter's own numbers: per-layer vector norms for steering; a member's
    own with `member`, its index in a population)."""
    n, buf = sums["rollouts"], model.grad_buffer
    return dict(step=step, epoch=epoch, lr=lr, reward_mean=sums["reward"] / n, accuracy=sums["correct"] / n,
                adv_abs_mean=sums["adv_abs"] / n, adv_std=math.sqrt(max(sums["adv_sq"] / n, 0.0)),
                zero_adv_prompts=sums["zero_adv_prompts"] / prompts, completion_len_mean=sums["tokens"] / n,
                completion_len_max=int(top["completion_len"]), truncated_frac=sums["truncated"] / n,
                loss=sums["loss"], logprob_gap=sums["gap"] / max(sums["gap_tokens"], 1.0), sample_s=top["sample_s"],
                reward_s=top["reward_s"], train_s=top["train_s"], step_s=step_s,
                tokens_per_s=sums["tokens"] / max(top["sample_s"], 1e-9), grad_norm=grad_norm,
                trainable_params=model.num_trainable(), bytes_allreduced=buf.numel() * buf.element_size(),
                **(model.adapter.metrics() if member is None else model.adapter.member_metrics(member)),
                backward_tokens=int(sums["forwarded"]), backward_padded_tokens=int(sums["padded"]),
                backward_tokens_naive=int(sums["naive"]),
                signal_prompts=sums["signal_prompts"] / prompts,
                **(dict(dynamic_draws=int(sums["dynamic_draws"]), refill_s=top["refill_s"]) if dynamic else {}),
                micro_batches=micro_batches, oom_retries=int(sums["oom_retries"]),
                micro_batch_tokens=micro_batch_tokens,
                **{k: int(sums[k]) for k in ("reward_timeouts", "reward_crashes", "reward_workers_replaced",
                                             "reward_workers_recycled")},
                skipped_prompts=skipped_prompts)


def log_line(m: dict) -> str:
    return (f"step {m['step']} reward {m['reward_mean']:+.3f} acc {m['accuracy']:.3f} "
            f"len {m['completion_len_mean']:.0f} trunc {m['truncated_frac']:.2f} | {m['step_s']:.1f}s "
            f"(sample {m['sample_s']:.1f} reward {m['reward_s']:.1f} train {m['train_s']:.1f}) "
            f"{m['tokens_per_s']:.0f} tok/s")


class RunLog:
    """Rank 0's record of the run: one JSON line per step in metrics.jsonl (and to W&B with
    --wandb-project), and a progress line: a bar on a terminal, one plain line per step in a log
    file. Other ranks hold no file and print nothing."""

    def __init__(self, cfg, run_dir: Path, is_main: bool, start: int, total: int, label: str = "",
                 tracker: Tracker | None = None):
        """label: a population member's name, which starts each of its lines (plain lines, no bar),
        logged into the population's `tracker` (its one W&B run, which its owner closes)."""
        self.is_main, self.total, self.label = is_main, total, label
        self.file = open(run_dir / "metrics.jsonl", "a") if is_main else None
        self.tracker = tracker if label else Tracker(cfg, run_dir) if cfg.wandb_project and is_main else None
        self.bar = tqdm(total=total, initial=start, unit="step", file=sys.stdout,
                        disable=not (is_main and sys.stdout.isatty()) or bool(label))

    def record(self, m: dict):
        if self.is_main:
            self.file.write(json.dumps(m) + "\n")
            self.file.flush()
            if self.tracker:
                self.tracker.log(m, f"{self.label}/" if self.label else "")

    def show(self, m: dict):
        if not self.is_main:
            return
        if self.bar.disable:
            print(f"[{m['step']}/{self.total}] " + (f"{self.label}: " if self.label else "") + log_line(m), flush=True)
        else:
            self.bar.set_postfix_str(log_line(m).split(" ", 2)[2], refresh=False)
            self.bar.update(1)

    def close(self):
        self.bar.close()
        if self.is_main:
            self.file.close()
            if self.tracker and not self.label:
                self.tracker.close()


class RolloutLog:
    """--log-rollouts: every rollout this rank sampled for one member, a JSON line each, in the
    member's folder: rollouts.jsonl, or rollouts-rank{R}.jsonl per rank when there are several
    (no text crosses ranks). What a curve hides - the answers' form, code, length - can be read
    from it without sampling again."""

    def __init__(self, folder: Path, rank: int, world: int):
        self.file = open(folder / ("rollouts.jsonl" if world == 1 else f"rollouts-rank{rank}.jsonl"), "a")

    def write(self, rows: list[dict]):
        self.file.write("".join(json.dumps(r) + "\n" for r in rows))
        self.file.flush()

    def close(self):
        self.file.close()
