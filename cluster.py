"""Where this process stands among its peers: rank, world size, device, process group.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR. A plain `python train.py` gets a
one-process group on an in-memory store, so the code above has no single-process branch: every
collective runs, on a group of one. One GPU per process, cuda:LOCAL_RANK (LOCAL_RANK counts from
0 again on every node, so multi-node runs are plain `torchrun --nnodes ...`).
"""
import os
import sys
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

USER_ERRORS = (SystemExit, ValueError, OSError)  # what a CLI reports in one line, without a traceback (OSError: a
# missing file, a full disk, no permission, no network)


class RankError(SystemExit):
    """A user-facing error that one rank alone may hit (its share of the data, its memory): printed
    by whichever rank raises it, prefixed with the rank."""


@dataclass(frozen=True)
class Cluster:
    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(device: str = "auto", timeout_s: float = 1800.0) -> Cluster:
    """Join (or make) the process group; `device` is auto (cuda when present, else cpu), cpu or cuda.
    Every collective waits at most `timeout_s`: a rank whose peer died exits with an error instead
    of hanging until the scheduler's wall-clock limit."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA GPU is visible to this process (torch.cuda.is_available() is "
                             "False): use --device cpu, or auto")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    elif device == "cpu":
        dev = torch.device("cpu")
    else:
        raise SystemExit(f"--device {device!r}: use auto, cpu or cuda")
    backend, device_id = ("nccl", dev) if dev.type == "cuda" else ("gloo", None)
    if "MASTER_ADDR" in os.environ:
        dist.init_process_group(backend, store=restart_store(world, timeout_s), rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s), device_id=device_id)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                timeout=timedelta(seconds=timeout_s), device_id=device_id)
    return Cluster(rank, world, dev)


class CpuShare:
    """Keeps torch's CPU thread count at the cores other processes leave free.

    Why: PyTorch's intra-op threads meet at a barrier after every parallel op. When another process
    holds one of the cores, the thread that lost its core keeps the others waiting for a scheduler
    time slice at every op, and decode is thousands of small ops: on 2 cores with one busy neighbour,
    sample.py on SmolLM2-135M took 136-160 s with 2 threads and 9.5 s with 1 (README, "A busy CPU").
    So from the machine's busy time (/proc/stat) minus this process's own CPU time, over the last
    `interval` seconds, it counts the cores others use, and uses the rest: between 1 and the
    threads torch started with. Off when the user chose (OMP_NUM_THREADS) or /proc/stat is absent."""

    def __init__(self, interval: float = 2.0, first_look: float = 0.25):
        self.interval, self.max_threads = interval, torch.get_num_threads()
        self.cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self.enabled = "OMP_NUM_THREADS" not in os.environ and os.path.exists("/proc/stat")
        if self.enabled:
            self.last = self.read()
            time.sleep(first_look)  # idle meanwhile: whatever is busy now is someone else
            self.adjust(force=True)

    @staticmethod
    def read() -> tuple[float, float, float]:
        """(now, seconds of CPU the whole machine spent busy, seconds this process spent)."""
        with open("/proc/stat") as f:  # cpu  user nice system idle iowait irq softirq steal ...
            ticks = [int(x) for x in f.readline().split()[1:9]]
        busy = sum(ticks) - ticks[3] - ticks[4]
        return time.monotonic(), busy / os.sysconf("SC_CLK_TCK"), time.process_time()

    def adjust(self, force: bool = False) -> int:
        """Re-count (at most every `interval` seconds, unless forced) and set the thread count."""
        if not self.enabled:
            return torch.get_num_threads()
        now = self.read()
        wall = now[0] - self.last[0]
        if wall <= 0 or (wall < self.interval and not force):
            return torch.get_num_threads()
        others = max(0.0, (now[1] - self.last[1]) - (now[2] - self.last[2])) / wall  # cores busy elsewhere
        self.last = now
        threads = max(1, min(self.max_threads, round(self.cores - others)))
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        return threads


_cpu_share = None


def cpu_share() -> CpuShare:
    """The process's one CpuShare (the thread count is the whole process's), made on first use."""
    global _cpu_share
    if _cpu_share is None:
        _cpu_share = CpuShare()
    return _cpu_share


def restart_store(world: int, timeout_s: float):
    """The store the process group meets in. torchrun's agent hosts one store for the whole job
    (TORCHELASTIC_USE_AGENT_STORE) and keeps it across `--max-restarts` relaunches, so a relaunched
    rank would read the addresses the dead attempt's ranks published there and connect to ports
    nobody listens on any more (gloo: "connectFullMesh ... Connection refused", or a hang; NCCL: a
    stale unique id; pytorch/pytorch#135712). Each attempt therefore meets under its own prefix.
    None (plain env://) when no agent hosts the store."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    agent = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=timedelta(seconds=timeout_s))
    return dist.PrefixStore(f"steer/attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", agent)


def broadcast(obj, cluster: Cluster):
    """Rank 0's Python object, on every rank (run-directory decisions, resume state)."""
    box = [obj if cluster.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(items: list, cluster: Cluster) -> list:
    """Every rank's list, concatenated in rank order, on every rank."""
    parts = [None] * cluster.world
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def reduce_metrics(sums: dict[str, float], maxima: dict[str, float], device) -> tuple[dict, dict]:
    """Sums and maxima over ranks of named numbers, in one collective: every rank's values are
    gathered, then added up or maxed locally (fp64, so token counts stay exact)."""
    names = list(sums) + list(maxima)
    local = torch.tensor([*sums.values(), *maxima.values()], dtype=torch.float64, device=device)
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local)
    stacked = torch.stack(parts)  # (world, names)
    total, top = stacked.sum(0).tolist(), stacked.amax(0).tolist()
    n = len(sums)
    return dict(zip(names[:n], total[:n])), dict(zip(names[n:], top[n:]))


def synchronize(device):
    """Wait for the device's queued work (CUDA), so that host timers measure it; nothing on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def max_divergence(tensors: list) -> float:
    """Largest |tensor - rank 0's| over ranks and tensors: 0.0 when every rank holds the same
    values, as identical gradients and optimizer states guarantee for the trainable ones."""
    diff = torch.zeros(1, dtype=torch.float64, device=tensors[0].device)
    for t in tensors:
        ref = t.detach().clone()
        dist.broadcast(ref, src=0)
        diff = torch.maximum(diff, (t.detach() - ref).abs().max().double().reshape(1))
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return diff.item()


def run_cli(main, argv=None):
    """Run a CLI's main(). A user error (a bad flag, a missing file, a config that cannot work:
    SystemExit with a message, ValueError, OSError: a missing file, a full disk) prints one line, `error: ...`, from
    rank 0 only (under torchrun every rank hits the same error), and exits 2. A failed collective
    (a dead peer, a timeout) prints one line from each rank that saw it and exits 3. Anything else
    is a bug and keeps its traceback."""
    try:
        main(argv)
    except RuntimeError as e:  # a collective that failed: a peer died or --collective-timeout passed
        if not (isinstance(e, dist.DistError) or "gloo" in str(e)):  # gloo reports a lost peer as a RuntimeError
            raise
        rank = int(os.environ.get("RANK", 0))
        first = str(e).strip().splitlines()[0][:300]
        print(f"error: rank {rank}: a collective with the other ranks failed (a rank died or stopped "
              f"answering for longer than the collective timeout): {first}", file=sys.stderr, flush=True)
        os._exit(3)
    except USER_ERRORS as e:
        if isinstance(e, SystemExit) and not isinstance(e.code, str):
            raise  # sys.exit(0), argparse's exit after --help or its own usage error
        rank = int(os.environ.get("RANK", 0))
        if rank == 0 or isinstance(e, RankError):
            text = e.code if isinstance(e, SystemExit) else str(e)
            print(f"error: {f'rank {rank}: ' if isinstance(e, RankError) else ''}{text}", file=sys.stderr, flush=True)
        else:  # the first rank to exit makes torchrun stop the others: give rank 0 time to say why
            time.sleep(3)
        sys.stdout.flush()
        if dist.is_initialized():
            os._exit(2)  # a live process group (peers, gloo threads) can block a normal exit
        sys.exit(2)


def close():
    dist.barrier()
    dist.destroy_process_group()
