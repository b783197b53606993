"""Admission: refuse a job that could never be scheduled, instead of letting it wait forever,
and start queued jobs only as the cluster has room for them.

A job needs ``num_workers`` workers of ``cpus_per_worker`` CPUs (and ``gpus_per_worker`` GPUs
with ``use_gpu``); an elastic job (``num_workers: {min, max}``) needs ``min`` of them to start,
is counted at ``min`` while it runs, and grows into whatever else is free. A job can never run
if the cluster has fewer in total, if no single node is big enough for one worker, or if it
asks for GPUs on a cluster without any. An autoscaling limit (``HUTCH_MAX_CLUSTER_CPUS``/
``_GPUS``) replaces the current total and lifts the per-node check for that resource, since
new nodes may be bigger.

Each job's driver also asks for the custom resources of ``HUTCH_DRIVER_RESOURCES`` (one driver
per job, on one node). On a cluster without autoscaling limits, a job is refused while no alive
node offers them, and queued jobs start only while the drivers beside them leave enough: a job
never sits PENDING in Ray for a resource no node has. With autoscaling limits, the driver's
resources are left to Ray and its autoscaler (a node that offers them may be added for it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from trainer.spec import JobSpec


@dataclass(frozen=True)
class ClusterCapacity:
    """Resources of the cluster's alive nodes: summed, and the largest single node's."""

    total: dict[str, float]
    largest_node: dict[str, float]


class Unschedulable(ValueError):
    """The job asks for more than the cluster has or can grow to; ``field`` names the spec part."""

    def __init__(self, field: str | None, message: str) -> None:
        super().__init__(message)
        self.field = field


def check_fits(
    spec: JobSpec,
    capacity: ClusterCapacity,
    max_cpus: float | None = None,
    max_gpus: float | None = None,
    *,
    driver_resources: Mapping[str, float] | None = None,
) -> None:
    """Raise :class:`Unschedulable` if ``spec`` can never be scheduled on the cluster (with its
    driver asking for ``driver_resources``)."""
    if max_cpus is None and max_gpus is None:
        missing = missing_driver_resources(driver_resources or {}, capacity)
        if missing:
            raise Unschedulable(None, missing)
    s = spec.scaling
    needs = [("CPU", s.cpus_per_worker, max_cpus, "scaling.cpus_per_worker")]
    if s.use_gpu:
        needs.append(("GPU", s.gpus_per_worker, max_gpus, "scaling.gpus_per_worker"))
    for resource, per_worker, limit, field in needs:
        hint = (
            " even at its autoscaling limit"
            if limit is not None
            else f" (set HUTCH_MAX_CLUSTER_{resource}S if it autoscales)"
        )
        available = limit if limit is not None else capacity.total.get(resource, 0.0)
        if resource == "GPU" and available == 0:
            raise Unschedulable("scaling.use_gpu", f"the cluster has no GPUs{hint}; set use_gpu: false")
        needed = s.min_workers * per_worker
        if needed > available:
            raise Unschedulable(
                "scaling",
                f"needs {needed:g} {resource}s ({s.min_workers} workers x {per_worker:g}) "
                f"but the cluster has {available:g}{hint}",
            )
        largest = capacity.largest_node.get(resource, 0.0)
        if limit is None and per_worker > largest:
            raise Unschedulable(
                field,
                f"one worker needs {per_worker:g} {resource}s but the largest node has {largest:g}{hint}",
            )


def missing_driver_resources(driver: Mapping[str, float], capacity: ClusterCapacity) -> str | None:
    """Why no node of the cluster can run a job's driver that asks for ``driver`` (custom
    resources), or None if one can (as far as the largest node of each says)."""
    for resource, amount in driver.items():
        largest = capacity.largest_node.get(resource, 0.0)
        if amount > largest + 1e-9:
            has = "none" if largest == 0 else f"at most {largest:g}"
            return (
                f"every job's driver asks for {amount:g} {resource} (HUTCH_DRIVER_RESOURCES) but the "
                f"cluster's nodes offer {has}: start a node with that resource (ray start --resources, "
                f"a KubeRay worker group's rayStartParams or resources), or change HUTCH_DRIVER_RESOURCES "
                f"(set HUTCH_MAX_CLUSTER_CPUS if the cluster autoscales)"
            )
    return None


class QueuedJob(Protocol):
    """What :func:`startable` reads of a job: its stored spec (defaults filled in)."""

    spec: dict[str, Any]


J = TypeVar("J", bound=QueuedJob)


def demand(spec: Mapping[str, Any], driver: Mapping[str, float] | None = None) -> dict[str, float]:
    """The resources a stored job spec needs to start and holds while it runs: its workers' CPUs
    and GPUs (an elastic job's ``min`` workers), and its driver's ``driver`` resources."""
    scaling = spec["scaling"]
    count = scaling["num_workers"]
    workers = count["min"] if isinstance(count, Mapping) else count
    needs = {"CPU": workers * float(scaling["cpus_per_worker"])}
    if scaling.get("use_gpu"):
        needs["GPU"] = workers * float(scaling["gpus_per_worker"])
    for resource, amount in (driver or {}).items():
        needs[resource] = needs.get(resource, 0.0) + float(amount)
    return needs


def startable(
    queue: Sequence[J],
    running: Iterable[QueuedJob],
    room: Mapping[str, float],
    driver: Mapping[str, float] | None = None,
) -> list[J]:
    """The jobs at the head of ``queue`` (in its order) that fit in ``room`` (the cluster's
    resources, or its autoscaling limits) beside the ``running`` ones, each job's driver holding
    ``driver`` besides its workers. Strictly in order: the first job that does not fit waits,
    and so does everything behind it, so a large job is never overtaken forever by smaller ones."""
    free = dict(room)
    for job in running:
        for resource, amount in demand(job.spec, driver).items():
            free[resource] = free.get(resource, 0.0) - amount
    chosen = []
    for job in queue:
        needs = demand(job.spec, driver)
        if any(amount > free.get(resource, 0.0) + 1e-9 for resource, amount in needs.items()):
            break
        for resource, amount in needs.items():
            free[resource] -= amount
        chosen.append(job)
    return chosen
