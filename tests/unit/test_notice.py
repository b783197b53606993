"""Notice of a stop (trainer.notice): the first SIGTERM is a notice, a second does what SIGTERM
did before; the preStop hook finds Ray Train workers by their process title and waits for them.

Real processes and real signals throughout. The SIGTERM's effect on a whole job (checkpoint at
the next step, the retry resuming there) is tested in tests/e2e/test_faults.py.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from benchmarks.harness import wait_for
from trainer.losses import CheckedLoss, UserCodeRaised
from trainer.notice import StoppedOnNotice, stop_train_workers, train_worker_pids

TAKES_NOTICE = """
import signal, sys, time
from trainer.notice import SIGTERM_RECEIVED, take_sigterm_as_notice

def previous(signum, frame):
    print("previous handler", flush=True)
    sys.exit(3)

signal.signal(signal.SIGTERM, previous)
take_sigterm_as_notice()
print("ready", flush=True)
while not SIGTERM_RECEIVED.is_set():
    time.sleep(0.01)
print("notice", flush=True)
while True:
    time.sleep(0.01)
"""


def test_the_first_sigterm_is_a_notice_and_the_second_does_what_sigterm_did() -> None:
    child = subprocess.Popen([sys.executable, "-c", TAKES_NOTICE], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        child.terminate()
        assert child.stdout.readline().strip() == "notice"
        assert child.poll() is None  # still running: the notice stops nothing by itself
        child.terminate()
        assert child.wait(timeout=30) == 3
        assert child.stdout.read().strip() == "previous handler"
    finally:
        child.kill()


def test_the_prestop_hook_finds_ray_train_workers_by_title_and_waits_until_they_are_gone() -> None:
    # A process titled as Ray titles a Ray Train worker (argv[0]), and one that is not.
    worker = subprocess.Popen(["ray::RayTrainWorker.run_train_fn", "60"], executable="sleep")
    other = subprocess.Popen(["ray::IDLE", "60"], executable="sleep")
    try:
        found = wait_for(lambda: worker.pid in train_worker_pids(), 10, "the worker's title in /proc")
        assert found and other.pid not in train_worker_pids()

        def ours() -> list[int]:  # SIGTERM only this test's process, never a real job's
            return [pid for pid in train_worker_pids() if pid == worker.pid]

        began = time.monotonic()
        assert stop_train_workers(timeout=30, pids=ours) == 0
        assert worker.wait(timeout=5) == -15 and time.monotonic() - began < 30
        assert other.poll() is None
    finally:
        worker.kill()
        other.kill()


def test_train_worker_pids_skips_what_it_cannot_read(tmp_path: Path) -> None:
    for pid, title in ((11, b"ray::RayTrainWorker.run_train_fn\x00"), (12, b"python\x00x"), (13, None)):
        (tmp_path / str(pid)).mkdir()
        if title is not None:
            (tmp_path / str(pid) / "cmdline").write_bytes(title)
    (tmp_path / "self").mkdir()
    assert train_worker_pids(tmp_path) == [11]


def test_errors_that_cross_ray_keep_their_message() -> None:
    """Ray pickles a worker's exception to the controller: both errors must survive the trip."""
    import pickle

    notice = pickle.loads(pickle.dumps(StoppedOnNotice(1, 317)))
    assert (notice.rank, notice.step) == (1, 317)
    assert str(notice).startswith("stopped on notice: rank 1 got SIGTERM")

    def loss(model: object, batch: object) -> None:
        raise KeyError("labels")

    try:
        CheckedLoss(loss, "objectives:loss")(None, None)  # type: ignore[arg-type]
    except UserCodeRaised as raised:
        error = pickle.loads(pickle.dumps(raised))
    assert str(error) == "the job's own code raised: training.loss: objectives:loss raised KeyError: 'labels'"
