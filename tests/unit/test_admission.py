"""Admission arithmetic: which jobs can never be scheduled on a cluster of given nodes, and which
queued jobs fit beside the running ones now (drivers' resources, HUTCH_DRIVER_RESOURCES, included).

The cluster's resources are given as numbers here; the service reads them from Ray's nodes API
(exercised with a real local Ray head in tests/e2e/test_service_ray.py)."""

from __future__ import annotations

import math
import traceback
from typing import Any

import pytest

from benchmarks.harness import free_port
from service.admission import ClusterCapacity, Unschedulable, check_fits, demand, startable
from service.launcher import RayLauncher, RayUnavailable
from service.lifecycle import JobState
from service.reconciler import Reconciler
from service.store import JobStore
from trainer.rundir import RunLayout
from trainer.spec import validate_spec

TWO_NODES = ClusterCapacity(total={"CPU": 8.0, "GPU": 2.0}, largest_node={"CPU": 4.0, "GPU": 1.0})
CPU_ONLY = ClusterCapacity(total={"CPU": 8.0}, largest_node={"CPU": 4.0})


def spec(**scaling: Any) -> Any:
    batch = 8 * scaling.get("num_workers", 1)
    return validate_spec(
        {
            "name": "a",
            "model": "mlp",
            "data": "digits",
            "scaling": scaling,
            "training": {"global_batch_size": batch},
        }
    )


@pytest.mark.parametrize(
    ("scaling", "capacity", "limits", "field", "fragment"),
    [
        ({"num_workers": 9}, CPU_ONLY, {}, "scaling", "needs 9 CPUs (9 workers x 1) but the cluster has 8"),
        (
            {"num_workers": 1, "cpus_per_worker": 6},
            CPU_ONLY,
            {},
            "scaling.cpus_per_worker",
            "largest node has 4",
        ),
        ({"use_gpu": True, "gpus_per_worker": 1}, CPU_ONLY, {}, "scaling.use_gpu", "no GPUs"),
        ({"num_workers": 3, "use_gpu": True, "gpus_per_worker": 1}, TWO_NODES, {}, "scaling", "needs 3 GPUs"),
        (
            {"use_gpu": True, "gpus_per_worker": 2},
            TWO_NODES,
            {},
            "scaling.gpus_per_worker",
            "largest node has 1",
        ),
        ({"num_workers": 20}, CPU_ONLY, {"max_cpus": 16}, "scaling", "even at its autoscaling limit"),
        ({"use_gpu": True, "gpus_per_worker": 1}, CPU_ONLY, {"max_gpus": 0}, "scaling.use_gpu", "no GPUs"),
    ],
)
def test_jobs_that_can_never_run_are_refused(
    scaling: dict, capacity: ClusterCapacity, limits: dict, field: str, fragment: str
) -> None:
    with pytest.raises(Unschedulable) as refused:
        check_fits(spec(**scaling), capacity, **limits)
    assert refused.value.field == field and fragment in str(refused.value)


@pytest.mark.parametrize(
    ("scaling", "capacity", "limits"),
    [
        ({"num_workers": 8}, CPU_ONLY, {}),
        ({"num_workers": 2, "use_gpu": True, "gpus_per_worker": 1}, TWO_NODES, {}),
        ({"num_workers": 16}, CPU_ONLY, {"max_cpus": 16}),  # the cluster can grow to it
        ({"cpus_per_worker": 6}, CPU_ONLY, {"max_cpus": 16}),  # bigger nodes may come
        ({"num_workers": 4, "use_gpu": True, "gpus_per_worker": 1}, CPU_ONLY, {"max_gpus": 8}),
    ],
)
def test_jobs_that_fit_now_or_after_scaling_are_admitted(
    scaling: dict, capacity: ClusterCapacity, limits: dict
) -> None:
    check_fits(spec(**scaling), capacity, **limits)


class Queued:
    """A job as the reconciler sees it: only its stored spec matters to the queue."""

    def __init__(self, name: str, num_workers: int = 1, cpus: float = 1.0, gpus: float = 0.0) -> None:
        self.name = name
        scaling = {"num_workers": num_workers, "cpus_per_worker": cpus}
        if gpus:
            scaling.update(use_gpu=True, gpus_per_worker=gpus)
        self.spec = spec(**scaling).model_dump(mode="json")


def names(jobs: list[Queued]) -> list[str]:
    return [job.name for job in jobs]


def test_demand_counts_every_worker() -> None:
    assert demand(Queued("a", num_workers=3, cpus=2).spec) == {"CPU": 6.0}
    assert demand(Queued("g", num_workers=2, gpus=0.5).spec) == {"CPU": 2.0, "GPU": 1.0}


def test_queued_jobs_start_in_order_while_they_fit() -> None:
    queue = [Queued("a", 2), Queued("b", 1), Queued("c", 1), Queued("d", 1)]
    assert names(startable(queue, [], {"CPU": 4})) == ["a", "b", "c"]
    assert names(startable(queue, [Queued("busy", 2)], {"CPU": 4})) == ["a"]
    assert startable(queue, [Queued("busy", 3)], {"CPU": 4}) == []


def test_the_head_of_the_queue_is_not_overtaken_by_smaller_jobs() -> None:
    queue = [Queued("big", 4), Queued("small", 1)]
    assert startable(queue, [Queued("busy", 1)], {"CPU": 4}) == []  # small waits behind big


def test_gpus_are_counted_apart_from_cpus() -> None:
    queue = [Queued("g1", 1, gpus=1), Queued("g2", 1, gpus=1), Queued("cpu", 1)]
    assert names(startable(queue, [], {"CPU": 8, "GPU": 1})) == ["g1"]
    assert startable([Queued("g", 1, gpus=1)], [], {"CPU": 8}) == []  # no GPU at all: it waits


def test_a_kept_capacity_failure_holds_no_callers_frames(tmp_path: Any) -> None:
    # The launcher keeps Ray's failure for 10 s so a burst of submissions asks Ray once. Raising
    # that one exception again grew its traceback by every caller's frames (each request's spec
    # and records with them): the API's memory and garbage-collector pauses grew under load.
    launcher = RayLauncher(f"http://127.0.0.1:{free_port()}", RunLayout(tmp_path))  # nothing listens
    raised = []
    for _ in range(3):
        with pytest.raises(RayUnavailable) as failure:
            launcher.capacity()
        raised.append(failure.value)
    assert len({id(error) for error in raised}) == 3
    depths = [len(traceback.extract_tb(error.__traceback__)) for error in raised]
    assert depths[0] == depths[-1] == 2, depths  # this test's frame and capacity()'s
    assert {str(error) for error in raised} == {str(raised[0])}


def elastic(low: int, high: int) -> Any:
    counts = range(low, high + 1)
    return validate_spec({
        "name": "elastic", "model": "mlp", "data": "digits",
        "scaling": {"num_workers": {"min": low, "max": high}},
        "training": {"global_batch_size": math.lcm(*counts)},
    })  # fmt: skip


def test_an_elastic_job_needs_its_minimum_to_start_and_is_counted_at_it() -> None:
    check_fits(elastic(8, 10), CPU_ONLY)  # 8 fit the 8 CPUs; it grows no further than they allow
    with pytest.raises(Unschedulable, match=r"needs 9 CPUs \(9 workers x 1\) but the cluster has 8"):
        check_fits(elastic(9, 10), CPU_ONLY)
    stored = elastic(2, 4).model_dump(mode="json")
    assert demand(stored) == {"CPU": 2.0}
    job = Queued("e")
    job.spec = stored
    assert names(startable([job, Queued("b", num_workers=2)], [], {"CPU": 4.0})) == ["e", "b"]
    assert names(startable([Queued("c")], [job], {"CPU": 2.0})) == []


# -- the drivers' resources (HUTCH_DRIVER_RESOURCES) -------------------------------------------

DRIVER = {"hutch-driver": 1.0}
WITH_DRIVERS = ClusterCapacity(
    total={"CPU": 8.0, "hutch-driver": 2.0}, largest_node={"CPU": 4.0, "hutch-driver": 1.0}
)


def test_a_job_is_refused_while_no_node_offers_the_drivers_resources() -> None:
    with pytest.raises(Unschedulable) as refused:
        check_fits(spec(), CPU_ONLY, driver_resources=DRIVER)
    assert refused.value.field is None  # no field of the job's: the service's setting
    assert "every job's driver asks for 1 hutch-driver (HUTCH_DRIVER_RESOURCES)" in str(refused.value)
    assert "nodes offer none" in str(refused.value)
    with pytest.raises(Unschedulable, match="nodes offer at most 1"):  # one driver runs on one node
        check_fits(spec(), WITH_DRIVERS, driver_resources={"hutch-driver": 2.0})
    check_fits(spec(), WITH_DRIVERS, driver_resources=DRIVER)
    check_fits(spec(), CPU_ONLY)  # no driver resources: as before


def test_an_autoscaling_cluster_leaves_the_drivers_resources_to_ray() -> None:
    check_fits(spec(), CPU_ONLY, 16, driver_resources=DRIVER)  # a node offering them may be added
    check_fits(spec(), CPU_ONLY, None, 0, driver_resources=DRIVER)


def test_each_started_job_holds_its_drivers_resources() -> None:
    assert demand(Queued("a", num_workers=2).spec, DRIVER) == {"CPU": 2.0, "hutch-driver": 1.0}
    queue = [Queued("a"), Queued("b"), Queued("c")]
    room = {"CPU": 8.0, "hutch-driver": 2.0}
    assert names(startable(queue, [], room, DRIVER)) == ["a", "b"]  # CPUs for 8, drivers for 2
    assert names(startable(queue, [Queued("busy")], room, DRIVER)) == ["a"]
    assert startable(queue, [], {"CPU": 8.0}, DRIVER) == []  # no node offers it: all wait
    assert names(startable(queue, [], {"CPU": 8.0})) == ["a", "b", "c"]  # without the setting


class FakeLauncher:
    """What the reconciler asks of the launcher to start queued jobs; Ray's resources are set."""

    def __init__(self, layout: RunLayout, capacity: ClusterCapacity) -> None:
        self.layout = layout
        self.cluster = capacity
        self.submitted: list[str] = []

    def capacity(self) -> ClusterCapacity:
        return self.cluster

    @staticmethod
    def submission_id(job_id: str, attempt: int) -> str:
        return RayLauncher.submission_id(job_id, attempt)

    def status(self, submission_id: str) -> None:
        return None  # never submitted before

    def submit(self, job_id: str, attempt: int, spec: Any, name: str) -> str:
        self.submitted.append(job_id)
        return self.submission_id(job_id, attempt)


@pytest.mark.parametrize("autoscaling", [False, True])
def test_queued_jobs_wait_with_a_reason_while_no_node_offers_the_drivers_resources(
    tmp_path: Any, autoscaling: bool
) -> None:
    store = JobStore(f"sqlite:///{tmp_path / 'hutch.db'}")
    try:
        launcher = FakeLauncher(RunLayout(tmp_path / "storage"), CPU_ONLY)
        limits = {"CPU": 16.0} if autoscaling else {}
        reconciler = Reconciler(
            store,
            launcher,  # type: ignore[arg-type]
            autoscaling_limits=limits,
            driver_resources=DRIVER,
        )
        job, _, _ = store.create("waits", Queued("waits").spec)  # accepted while Ray could not be asked
        reconciler.reconcile_once()
        if autoscaling:  # Ray and its autoscaler place the driver: handed to Ray at once
            assert launcher.submitted == [job.id] and reconciler.last_error is None
            return
        assert launcher.submitted == [] and store.get(job.id).state == JobState.QUEUED  # type: ignore[union-attr]
        assert reconciler.last_error is not None  # what /readyz shows as job_submission
        assert (
            "1 hutch-driver (HUTCH_DRIVER_RESOURCES) but the cluster's nodes offer none"
            in reconciler.last_error
        )

        launcher.cluster = WITH_DRIVERS  # a node offering it joined
        reconciler.reconcile_once()
        assert launcher.submitted == [job.id] and reconciler.last_error is None
        assert store.get(job.id).state == JobState.STARTING  # type: ignore[union-attr]
    finally:
        store.close()
