"""One run on several processes (``torchrun --nproc_per_node=N -m kdrun ...``): DistributedDataParallel.

Every rank runs the whole pipeline on the same config; each training batch is split between the ranks (the
configured batch size is the global one, so a run on N processes takes the same steps as on one). Rank 0
alone writes the run dir, logs, TensorBoard, checkpoints and cache entries; the others keep identical models.
Collectives use NCCL for CUDA tensors and gloo for CPU tensors.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from kdrun.core.errors import KdrunError


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env() -> Ranks:
    """Join the process group that torchrun's environment describes (a no-op for a single process)."""
    if not launched_by_torchrun():
        return Ranks()
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return ranks()


def ranks() -> Ranks:
    """This process's place in the run: rank 0 of 1 unless a process group is initialised."""
    if not _initialized():
        return Ranks()
    return Ranks(
        dist.get_rank(),
        dist.get_world_size(),
        int(os.environ.get("LOCAL_RANK", 0)),
        int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size())),
    )


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_main() -> bool:
    """Whether this process writes the run's files (rank 0, or the only process)."""
    return not _initialized() or dist.get_rank() == 0


def world_size() -> int:
    return dist.get_world_size() if _initialized() else 1


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (any picklable object)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the ranks (in place, returned)."""
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on any rank: every rank takes the same branch afterwards."""
    return max_over_ranks(int(flag)) > 0


def max_over_ranks(value: int) -> int:
    """The largest of the ranks' ``value`` (a CPU tensor: gloo carries it on GPU runs too)."""
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def sync_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics) on every rank, so that all ranks validate the same model."""
    if world_size() > 1:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def average_gradients(params) -> None:
    """Average the gradients of parameters that DDP does not manage (e.g. a FitNet adapter) over the ranks."""
    world = world_size()
    if world > 1:
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad /= world


def rank_device(device: str) -> str:
    """This rank's device: with CUDA, the GPU of its local rank; on CPU the cores are split between local ranks."""
    here = ranks()
    if str(device) in ("auto", "cuda") and torch.cuda.is_available():
        torch.cuda.set_device(here.local_rank)
        return f"cuda:{here.local_rank}"
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // here.local_world))  # torchrun's default is 1 thread
    return "cpu" if str(device) == "auto" else str(device)


def hydra_overrides(argv: list[str]) -> list[str]:
    """The command line of a rank: one run dir for all (rank 0's clock), Hydra's files and logs from rank 0 only.

    Without this each rank's Hydra would name its own timestamped run dir: the known Hydra + DDP trap.
    """
    if any(a in ("-m", "--multirun") or a.startswith("hydra/launcher=") for a in argv):
        raise KdrunError(
            "torchrun runs one run on several processes; a sweep (-m) cannot run inside it: start the sweep with "
            "kdrun -m and a Hydra launcher instead (see Scaling out in the README)"
        )
    extra = []
    if not any(a.startswith("hydra.run.dir=") for a in argv):
        run_dir = broadcast(datetime.datetime.now().strftime("outputs/%Y-%m-%d/%H-%M-%S") if is_main() else None)
        extra.append(f"hydra.run.dir={run_dir}")
    if not is_main():
        extra += ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    return [*argv, *extra]


def shutdown() -> None:
    if _initialized():
        dist.destroy_process_group()
