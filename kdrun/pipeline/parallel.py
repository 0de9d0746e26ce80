"""Share one machine between the parallel jobs of a sweep: CPU threads split evenly, one GPU per job."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from filelock import FileLock, Timeout

from kdrun.core import distributed

log = logging.getLogger(__name__)


def concurrent_jobs() -> int:
    """How many jobs of this sweep run at once on this machine: the launcher's ``n_jobs``, or 1."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return 1
    n_jobs = HydraConfig.get().launcher.get("n_jobs")
    if not isinstance(n_jobs, int) or n_jobs == 0:
        return 1
    cpus = os.cpu_count() or 1
    return max(1, cpus + 1 + n_jobs if n_jobs < 0 else n_jobs)  # joblib: -1 means all CPUs, -2 all but one


@contextmanager
def job_device(device: str) -> Iterator[str]:
    """The device for this job, held for the whole run.

    Alone, it is ``device`` as given. With ``k`` jobs at once, each CPU job gets ``cpus // k`` threads, and
    with ``device=auto`` and several GPUs each job leases a GPU of its own (a file lock per GPU, released when
    the job ends or dies).
    """
    if distributed.world_size() > 1:
        yield distributed.rank_device(device)
        return
    jobs = concurrent_jobs()
    if jobs == 1:
        yield device
        return
    threads = max(1, (os.cpu_count() or 1) // jobs)
    torch.set_num_threads(threads)
    log.info("%d jobs run at once: %d CPU thread(s) for this one", jobs, threads)
    if str(device) != "auto" or not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        yield device
        return
    with lease_slot(torch.cuda.device_count(), gpu_lock_dir()) as index:
        log.info("this job has GPU %d of %d", index, torch.cuda.device_count())
        yield f"cuda:{index}"


def gpu_lock_dir() -> Path:
    """One lock folder per machine and user: sweeps started side by side share the GPUs too."""
    return Path(tempfile.gettempdir()) / f"kdrun-gpu-locks-{os.getuid()}"


@contextmanager
def lease_slot(n_slots: int, lock_dir: Path, poll_s: float = 1.0) -> Iterator[int]:
    """Hold the first free one of ``n_slots`` slots (a lock file each) until the block ends; wait if all are taken."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    while True:
        for index in range(n_slots):
            lock = FileLock(str(lock_dir / f"slot-{index}.lock"))
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue
            try:
                yield index
            finally:
                lock.release()
            return
        time.sleep(poll_s)
