"""Where a job's metric records go: the run directory's metrics file and Ray metrics.

Records are written by rank 0 only. After a restart from a checkpoint at step s, records past
s are dropped before new ones are appended, so the file holds each step once. The same values
are exported as Ray gauges tagged with the job's id, so they appear on every Ray node's
Prometheus endpoint (as ``ray_hutch_<name>``) and in the dashboard's metrics views. Every rank
also exports its own step time and throughput (:class:`WorkerGauges`), tagged with its rank: a
slow worker holds the whole group back, and only a per-rank view shows which one it is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trainer.rundir import records_after

GAUGES = {
    "step": "Training steps done",
    "loss": "Training loss (mean over the global batch)",
    "lr": "Learning rate",
    "hessian_trace": "Hutchinson estimate of the Hessian trace at the last Hessian step",
    "hessian_steps": "Steps that estimated the Hessian diagonal (every hessian_update_freq-th)",
    "grad_norm": "L2 norm of the averaged gradient",
    "samples_per_s": "Training throughput, samples per second",
    "eval_loss": "Held-out loss",
    "eval_accuracy": "Held-out accuracy",
    "eval_perplexity": "Held-out perplexity (language models)",
}


WORKER_GAUGES = {
    "worker_step_seconds": "Seconds this rank took for its last logged training step",
    "worker_samples_per_s": "Samples per second of this rank's share of the batch, last logged step",
}


class WorkerGauges:
    """One rank's own step time and throughput, as Ray gauges tagged with the job and the rank."""

    def __init__(self, job_id: str, rank: int) -> None:
        from ray.util.metrics import Gauge

        self.tags = {"job_id": job_id, "rank": str(rank)}
        self._gauges = {
            name: Gauge(f"hutch_{name}", description=text, tag_keys=("job_id", "rank"))
            for name, text in WORKER_GAUGES.items()
        }

    def set(self, step_seconds: float, samples: int) -> None:
        self._gauges["worker_step_seconds"].set(step_seconds, tags=self.tags)
        if step_seconds > 0:
            self._gauges["worker_samples_per_s"].set(samples / step_seconds, tags=self.tags)


class MetricsSink:
    """Appends records to the run's metrics file (:class:`trainer.rundir.RunDir`) and mirrors them
    to Ray gauges."""

    def __init__(self, path: Path, job_id: str, resume_step: int = 0, export_to_ray: bool = True) -> None:
        self.path = path
        self.job_id = job_id
        path.parent.mkdir(parents=True, exist_ok=True)
        self._drop_records_after(resume_step)
        kept = records_after(path, None)
        # Hessian steps are counted from the start of training, across restarts.
        self.resumed_hessian_steps = int(kept[-1].get("hessian_steps", 0)) if kept else 0
        self._gauges: dict[str, Any] = {}
        if export_to_ray:
            from ray.util.metrics import Gauge

            self._gauges = {
                name: Gauge(f"hutch_{name}", description=text, tag_keys=("job_id",))
                for name, text in GAUGES.items()
            }

    def _drop_records_after(self, step: int) -> None:
        """Keep the records up to ``step``; a last line cut short (a write the storage refused
        when full) goes too, rather than failing every restart that reads it."""
        if not self.path.exists():
            return
        kept = [record for record in records_after(self.path, None) if record.get("step", 0) <= step]
        self.path.write_text("".join(json.dumps(record) + "\n" for record in kept))

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as out:
            out.write(json.dumps(record) + "\n")
        for name, value in record.items():
            gauge = self._gauges.get(name)
            if gauge is not None and value is not None:
                gauge.set(float(value), tags={"job_id": self.job_id})
