"""Notice that the platform is about to stop a worker, turned into a checkpoint at the next step.

Two notices reach a job before its workers are killed:

- a **SIGTERM** to a worker process: what Kubernetes sends a pod that is drained or preempted,
  ``terminationGracePeriodSeconds`` before it kills it (and what ``kill`` sends by default).
  The first one is taken as a notice; the group agrees on it at the next step boundary, saves a
  checkpoint of that step and stops, and the attempt fails as an infrastructure failure, which
  the service retries from that checkpoint: no finished step is lost. A second SIGTERM does what
  SIGTERM did before (under Ray: the worker exits at once).
- **Ray's word that a node is being drained** (a spot reclaim, an autoscaler scale-down, ``ray
  drain-node``): Ray Train's preemption watcher sees it and :func:`ray.train.get_preemption_info`
  returns it. The group saves a checkpoint once and keeps training, as Ray Train recommends:
  when the node goes, Ray Train restarts the group from that checkpoint.

Python runs a signal handler on the process's main thread, and Ray Train runs the training
function on another one, so the handler is installed by the job's Ray Train backend when the
worker group starts (:func:`take_sigterm_as_notice`, on each worker's main thread).

On Kubernetes the SIGTERM of a pod goes to its first process (there, a shell running ``ray
start``, which ignores it), so the Ray worker pods' preStop hook passes it on:
``python -m trainer.notice`` SIGTERMs this machine's Ray Train workers and waits until they are
gone (``deploy/base/raycluster.yaml``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

SIGTERM_RECEIVED = threading.Event()
"""Set by this process's first SIGTERM once :func:`take_sigterm_as_notice` ran."""


class StoppedOnNotice(RuntimeError):
    """Raised on every rank after the checkpoint a SIGTERM asked for is registered: the attempt
    ends as an infrastructure failure, which is retried from that checkpoint."""

    MARK = "stopped on notice"
    """In the message, which reaches the driver inside Ray Train's error (see trainer.launch)."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step
        super().__init__(
            f"{self.MARK}: rank {rank} got SIGTERM (a drain or preemption gives one before the kill); "
            f"the checkpoint at step {step} is saved and a retry resumes from it"
        )

    def __reduce__(self) -> tuple[type[StoppedOnNotice], tuple[int, int]]:
        return type(self), (self.rank, self.step)  # Ray pickles it to the controller


def take_sigterm_as_notice() -> None:
    """Make this process's first SIGTERM a notice (:data:`SIGTERM_RECEIVED`); a second one does
    what the handler before it did. Must run on the main thread (Python's rule for handlers)."""
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        if not SIGTERM_RECEIVED.is_set():
            SIGTERM_RECEIVED.set()
            return
        signal.signal(signal.SIGTERM, previous)
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_sigterm)


def rank_given_notice(device: torch.device) -> int | None:
    """Collective: the lowest rank whose process got a SIGTERM, or None if none did.

    One integer all-reduced per step: every rank learns of a notice at the same step boundary,
    so all of them checkpoint that step."""
    import torch
    import torch.distributed as dist

    world = dist.get_world_size()
    mine = dist.get_rank() if SIGTERM_RECEIVED.is_set() else world
    lowest = torch.tensor([mine], dtype=torch.int64, device=device)
    dist.all_reduce(lowest, op=dist.ReduceOp.MIN)
    rank = int(lowest.item())
    return rank if rank < world else None


TRAIN_WORKER_TITLE = b"ray::RayTrainWorker"
"""How a Ray Train worker process shows in ``/proc/<pid>/cmdline`` (Ray sets the title)."""


def train_worker_pids(proc: Path = Path("/proc")) -> list[int]:
    """The Ray Train worker processes on this machine (Linux)."""
    pids = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes()
        except OSError:  # gone, or not ours to read
            continue
        if title.startswith(TRAIN_WORKER_TITLE):
            pids.append(int(entry.name))
    return pids


def stop_train_workers(timeout: float, pids: Callable[[], list[int]] = train_worker_pids) -> int:
    """SIGTERM this machine's Ray Train workers (``pids``) and wait until they are gone, at most
    ``timeout`` seconds; how many are left."""
    for pid in pids():
        with contextlib.suppress(ProcessLookupError):  # ended meanwhile
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while (left := pids()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return len(left)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.notice",
        description="Give this machine's Ray Train workers notice (SIGTERM): each job checkpoints its "
        "next step and stops. Waits until they are gone; a Kubernetes preStop hook.",
    )
    parser.add_argument("--timeout", type=float, default=280, help="seconds to wait at most (default 280)")
    left = stop_train_workers(parser.parse_args().timeout)
    print(f"[hutch] notice given; {left} Ray Train worker process(es) still running", flush=True)


if __name__ == "__main__":
    main()
