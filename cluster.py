"""Where this process stands among its peers: rank, world size, device, process group.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR. A plain `python train.py` gets a
one-process group on an in-memory store, so the code above has no single-process branch: every
collective runs, on a group of one. One GPU per process, cuda:LOCAL_RANK (LOCAL_RANK counts from
0 again on every node, so multi-node runs are plain `torchrun --nnodes ...`).
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Cluster:
    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(device: str = "auto") -> Cluster:
    """Join (or make) the process group; `device` is auto (cuda when present, else cpu), cpu or cuda."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    elif device == "cpu":
        dev = torch.device("cpu")
    else:
        raise SystemExit(f"--device {device!r}: use auto, cpu or cuda")
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if "MASTER_ADDR" in os.environ:
        dist.init_process_group(backend, rank=rank, world_size=world, device_id=dev if dev.type == "cuda" else None)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return Cluster(rank, world, dev)


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


def close():
    dist.barrier()
    dist.destroy_process_group()
