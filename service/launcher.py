"""Ray's side of a job: where its files live, submitting it as a Ray Job, following and stopping it.

Each attempt of a hutch job is one Ray Job whose submission id is ``hutch-<job id>-<attempt>``:
deterministic, so a submission repeated after a crash is answered "already exists" by Ray
instead of starting a second run. Its entrypoint is the trainer's (``python -m trainer``), its
metadata carries hutch's job id, and it shows in the Ray dashboard's Jobs page with its logs.

Run directories, checkpoints and packages live under the shared storage path, seen by the
service and by every Ray node (:class:`trainer.rundir.RunLayout`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shlex
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx

from service.admission import ClusterCapacity
from service.packages import PackageStore, UnknownPackage
from service.settings import SettingError, read_token_file
from trainer.rundir import RunLayout
from trainer.spec import PACKAGE_URI

log = logging.getLogger("hutch.launcher")
T = TypeVar("T")


@dataclass(frozen=True)
class RayJob:
    """What Ray says about one submission."""

    status: str  # PENDING, RUNNING, STOPPED, SUCCEEDED, FAILED
    message: str | None


@dataclass(frozen=True)
class CheckpointInfo:
    name: str
    step: int
    path: str
    created_at: datetime


class RayUnavailable(RuntimeError):
    """The Ray cluster's job API cannot be reached, or cannot take jobs right now."""


class RayAuthFailed(RayUnavailable):
    """Ray answered 401 or 403: the cluster has token authentication on and our token is missing
    or wrong. Not a refusal of one job: every call fails the same way until the token is fixed,
    so jobs wait QUEUED, as in an outage."""


class RayRefused(RuntimeError):
    """Ray refused this particular submission (a 4xx answer): retrying will not help."""


class StorageUnavailable(RuntimeError):
    """The shared storage cannot be written (full, read-only, gone), so no job can be started:
    they wait QUEUED, as in a Ray outage, and start once it can be written again."""


def unwritable(path: Path, error: OSError) -> StorageUnavailable:
    return StorageUnavailable(f"the storage cannot be written ({path}): {error.strerror or error}")


TOKEN_HINT = "HUTCH_RAY_AUTH_TOKEN (on KubeRay: the Secret named after the RayCluster, key auth_token)"


def token_file_hint(path: Path) -> str:
    """Where to look when the token of a token file is rejected (the path, never the token)."""
    return (
        f"HUTCH_RAY_AUTH_TOKEN_FILE ({path}, read again on every rejection; on KubeRay: key auth_token "
        "of the Secret the RayCluster's authOptions use, mounted as a volume without subPath)"
    )


def auth_failure(address: str, status: int, token_sent: bool, hint: str = TOKEN_HINT) -> RayAuthFailed:
    """The error for a 401/403 from Ray, saying which of the two token problems it is."""
    if status == 401 or not token_sent:
        return RayAuthFailed(
            f"Ray at {address} has token authentication on and refused the request ({status}): "
            f"no Ray token is configured; set {hint}"
        )
    return RayAuthFailed(
        f"Ray at {address} rejected the Ray token ({status} Forbidden: invalid authentication token); "
        f"check {hint}"
    )


class RayLauncher:
    """Submits, follows and stops the Ray Jobs of hutch jobs on one Ray cluster.

    With ``auth_token`` every call carries ``Authorization: Bearer <token>``: Ray's job client
    and the dashboard calls made here alike (Ray's client would only find a token in this
    process's own ``RAY_AUTH_*`` environment, and the dashboard calls would carry none).

    With ``auth_token_file`` the token is read from that file (now, unless ``auth_token`` is its
    content, read already; a :class:`~service.settings.SettingError` if it cannot be), and again
    whenever Ray rejects it (401/403): a new token there replaces the old one for every later
    call, and the rejected call is made once more with it, so a rotated Secret is followed
    without a restart.

    ``driver_resources`` (custom resource -> amount) go with every submission as the Ray job's
    ``entrypoint_resources``: Ray runs the driver only on a node that offers them."""

    def __init__(
        self,
        address: str,
        layout: RunLayout,
        dashboard_url: str | None = None,
        local: bool = False,
        auth_token: str | None = None,
        auth_token_file: Path | None = None,
        driver_resources: Mapping[str, float] | None = None,
    ):
        self.address = address
        self.layout = layout
        self.packages = PackageStore(layout.package_root)
        self.dashboard_url = (dashboard_url or address).rstrip("/")
        self._dashboard_is_address = dashboard_url is None
        # A local head runs this very interpreter; a remote cluster's image has `python` with hutch.
        self.python = sys.executable if local else "python"
        self.driver_resources = dict(driver_resources or {})
        self._token_file = auth_token_file
        if auth_token is None and auth_token_file is not None:
            auth_token = read_token_file(auth_token_file)
        self._token = auth_token
        self._token_hint = token_file_hint(auth_token_file) if auth_token_file is not None else TOKEN_HINT
        self._unreadable: str | None = None  # the token file's last read error, said once
        self._headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
        self._client: Any = None
        self._lock = threading.Lock()
        # One HTTP client for the dashboard calls: a new one per call costs ~35 ms of CPU (TLS setup).
        self._http = httpx.Client(base_url=self.address, headers=self._headers, timeout=10)
        self._capacity: tuple[float, ClusterCapacity | RayUnavailable] | None = None

    @property
    def client(self) -> Any:
        """Ray's ``JobSubmissionClient``, created on first use (its constructor calls the cluster)."""
        with self._lock:
            if self._client is None:
                from ray.job_submission import JobSubmissionClient

                try:
                    self._client = JobSubmissionClient(self.address, headers=dict(self._headers))
                except Exception as error:
                    raise self._unavailable(error) from error
            return self._client

    def _unavailable(self, error: Exception) -> RayUnavailable:
        """What a failed call to Ray means: a token problem, or Ray out of reach."""
        from ray.exceptions import AuthenticationError

        if isinstance(error, RayUnavailable):  # already said (by the ``client`` property)
            return error
        if isinstance(error, AuthenticationError):
            status = 403 if "Forbidden" in str(error) or "invalid" in str(error) else 401
            return auth_failure(self.address, status, bool(self._headers), self._token_hint)
        if isinstance(error, httpx.HTTPStatusError) and error.response.status_code in (401, 403):
            return auth_failure(
                self.address, error.response.status_code, bool(self._headers), self._token_hint
            )
        return RayUnavailable(f"Ray at {self.address} is not reachable: {error}")

    def _with_token(self, call: Callable[[], T]) -> T:
        """``call()``; if Ray rejects the token and the token file now holds another one, once
        more with that one."""
        rejected = self._token
        try:
            return call()
        except RayAuthFailed:
            if not self._renew_token(rejected):
                raise
        return call()

    def _renew_token(self, rejected: str | None) -> bool:
        """After Ray rejected the token ``rejected``: read the token file again and, if it holds
        a new token, use it for every later call (new clients, no cached capacity). True if the
        token in use now differs from the rejected one (a call worth making again)."""
        if self._token_file is None:
            return False
        try:
            token = read_token_file(self._token_file)
        except SettingError as error:  # rewritten right now, or gone: keep the token we have
            if str(error) != self._unreadable:
                log.warning("Ray rejected the token; reading it again failed: %s", error)
            self._unreadable = str(error)
            return False
        self._unreadable = None
        with self._lock:
            if token != self._token:
                self._token = token
                self._headers = {"Authorization": f"Bearer {token}"}
                self._client = None
                # The old HTTP client is left to the garbage collector, as in reconnect().
                self._http = httpx.Client(base_url=self.address, headers=self._headers, timeout=10)
                self._capacity = None
                log.warning("Ray rejected the token; using the new token found in %s", self._token_file)
            return self._token != rejected

    @staticmethod
    def submission_id(job_id: str, attempt: int) -> str:
        return f"hutch-{job_id}-{attempt}"

    def dashboard_job_url(self, submission_id: str) -> str:
        return f"{self.dashboard_url}/#/jobs/{submission_id}"

    def entrypoint(self, job_id: str, attempt: int, spec: Mapping[str, Any] | None = None) -> str:
        run = self.layout.run(job_id)
        # With a pip runtime_env, Ray activates a virtualenv (on top of the image's packages) for
        # the entrypoint: its `python` sees the job's packages, this interpreter would not.
        pip = bool(((spec or {}).get("runtime_env") or {}).get("pip"))
        words = [
            "python" if pip else self.python, "-m", "trainer", str(run.spec_file),
            "--run-dir", str(run.path), "--job-id", job_id,
            "--storage-path", str(self.layout.checkpoint_root),
            "--log-file", str(run.log_file(attempt)),
        ]  # fmt: skip
        return shlex.join(words)

    def runtime_env(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        """Ray's ``runtime_env`` for a job: the spec's (an uploaded package as its file, which
        Ray's job client uploads to the cluster) and the variables every hutch job runs with."""
        user = dict(spec.get("runtime_env") or {})
        hutch_vars = {"RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", "RAY_COLOR_PREFIX": "0"}
        env: dict[str, Any] = {"env_vars": {**user.get("env_vars", {}), **hutch_vars}}
        working_dir = user.get("working_dir")
        if working_dir:
            is_package = PACKAGE_URI.fullmatch(working_dir)
            env["working_dir"] = str(self.packages.path(working_dir)) if is_package else working_dir
        for field in ("py_modules", "pip"):
            if user.get(field):
                env[field] = list(user[field])
        return env

    def submit(self, job_id: str, attempt: int, spec: Mapping[str, Any], name: str) -> str:
        """Start attempt ``attempt`` of a job (resuming from its checkpoints, if any); idempotent.
        Its driver asks Ray for :attr:`driver_resources`, if any."""
        run = self.layout.run(job_id)
        # The trainer does not need the runtime_env (Ray applies it), and its env_vars may be secrets.
        trainer_spec = {key: value for key, value in spec.items() if key != "runtime_env"}
        try:
            run.write_spec(json.dumps(trainer_spec, indent=2))
        except OSError as error:  # full or read-only: nothing was submitted, the job waits
            raise unwritable(run.path, error) from error
        submission_id = self.submission_id(job_id, attempt)
        try:
            runtime_env = self.runtime_env(spec)
        except UnknownPackage as missing:  # removed from the storage after the job was accepted
            raise RayRefused(str(missing)) from missing
        entrypoint = self.entrypoint(job_id, attempt, spec)
        # `job_name` is the key the Ray dashboard's Jobs page shows in its "Job name" column.
        metadata = {"job_name": name, "hutch_job_id": job_id, "hutch_attempt": str(attempt)}
        return self._with_token(lambda: self._submit(submission_id, entrypoint, metadata, runtime_env))

    def _submit(
        self, submission_id: str, entrypoint: str, metadata: dict[str, str], runtime_env: dict[str, Any]
    ) -> str:
        client = self.client
        try:
            client.submit_job(
                entrypoint=entrypoint,
                submission_id=submission_id,
                metadata=metadata,
                runtime_env=runtime_env,
                entrypoint_resources=dict(self.driver_resources) or None,
            )
        except RuntimeError as error:
            if "already exists" in str(error):  # submitted before a crash: that one is ours
                return submission_id
            if re.search(r"status code 4\d\d", str(error)):
                raise RayRefused(f"Ray refused the submission: {error}") from error
            raise RayUnavailable(f"Ray cannot take the submission now: {error}") from error
        except Exception as error:  # requests' ConnectionError, a token problem, and friends
            raise self._unavailable(error) from error
        return submission_id

    def status(self, submission_id: str) -> RayJob | None:
        """Ray's view of a submission; None if Ray has no such job."""
        return self._with_token(lambda: self._status(submission_id))

    def _status(self, submission_id: str) -> RayJob | None:
        client = self.client
        try:
            info = client.get_job_info(submission_id)
        except RuntimeError as error:
            if "does not exist" in str(error):
                return None
            raise RayUnavailable(str(error)) from error
        except Exception as error:
            raise self._unavailable(error) from error
        return RayJob(str(info.status.value if hasattr(info.status, "value") else info.status), info.message)

    def stop(self, submission_id: str) -> None:
        """Ask Ray to stop a submission (SIGTERM, then SIGKILL, to its driver and workers)."""
        self._with_token(lambda: self._stop(submission_id))

    def _stop(self, submission_id: str) -> None:
        client = self.client
        try:
            client.stop_job(submission_id)
        except RuntimeError as error:
            if "does not exist" not in str(error):
                raise RayUnavailable(str(error)) from error
        except Exception as error:
            raise self._unavailable(error) from error

    def driver_output_tail(self, submission_id: str, lines: int) -> list[str]:
        """The last ``lines`` of the driver's output as Ray keeps it, beside the run's log on
        the storage: Ray's copy is there also when the storage was full or read-only. Best
        effort: [] if Ray cannot say."""
        try:
            text = self.client.get_job_logs(submission_id)
        except Exception:  # Ray gone or the job forgotten: the caller has other sources
            return []
        return text.splitlines()[-lines:]

    def delete(self, submission_id: str) -> None:
        """Forget a finished submission in Ray (best effort)."""
        with contextlib.suppress(Exception):  # already gone, or never there: nothing to forget
            self.client.delete_job(submission_id)

    def reconnect(self, address: str) -> None:
        """Follow the cluster at a new address (the local head, restarted on another port): new
        clients, no cached capacity. The old HTTP client is left to the garbage collector rather
        than closed, since a request of another thread may still be on it."""
        with self._lock:
            self.address = address
            if self._dashboard_is_address:
                self.dashboard_url = address.rstrip("/")
            self._client = None
            self._http = httpx.Client(base_url=address, headers=self._headers, timeout=10)
            self._capacity = None

    def close(self) -> None:
        self._http.close()

    def ping(self) -> None:
        self._with_token(self._ping)

    def _ping(self) -> None:
        try:
            response = self._http.get("/api/version", timeout=3)
            response.raise_for_status()
        except httpx.HTTPError as error:
            raise self._unavailable(error) from error

    def capacity(self, max_age_s: float = 10.0) -> ClusterCapacity:
        """Resources (``CPU``, ``GPU``, …) of the cluster's alive nodes. The answer, or the
        failure to get one, is kept for ``max_age_s`` so a burst of submissions asks Ray once."""
        now = time.monotonic()
        kept = self._capacity
        if kept is not None and isinstance(kept[1], RayAuthFailed) and self._renew_token(self._token):
            kept = None  # the token file holds a new token: ask with it now, not when the answer expires
        if kept is None or now - kept[0] >= max_age_s:
            rejected = self._token
            answer = self._read_capacity()
            if isinstance(answer, RayAuthFailed) and self._renew_token(rejected):
                answer = self._read_capacity()
            kept = self._capacity = (now, answer)
        answer = kept[1]
        if isinstance(answer, RayUnavailable):
            # A new exception each time: raising the kept one again would add every caller's
            # frames (and the requests they hold) to its traceback until the failure expires.
            raise type(answer)(*answer.args)
        return answer

    def _read_capacity(self) -> ClusterCapacity | RayUnavailable:
        try:
            response = self._http.get("/api/v0/nodes", params={"detail": "true"})
            response.raise_for_status()
            nodes = response.json()["data"]["result"]["result"]
        except httpx.HTTPStatusError as error:
            if error.response.status_code in (401, 403):
                return self._unavailable(error)
            return RayUnavailable(f"cannot read the cluster's resources from {self.address}: {error}")
        except (httpx.HTTPError, ValueError, KeyError) as error:
            return RayUnavailable(f"cannot read the cluster's resources from {self.address}: {error}")
        totals: dict[str, float] = {}
        largest: dict[str, float] = {}
        for node in nodes:
            if node.get("state") != "ALIVE":
                continue
            for resource, amount in (node.get("resources_total") or {}).items():
                totals[resource] = totals.get(resource, 0.0) + float(amount)
                largest[resource] = max(largest.get(resource, 0.0), float(amount))
        return ClusterCapacity(totals, largest)

    def checkpoints(self, job_id: str) -> list[CheckpointInfo]:
        """The job's checkpoints that Ray Train registered (the ones a retry can resume from),
        oldest first. Read from Ray Train's own snapshot: a directory written while the job was
        being stopped, but never registered, is not listed."""
        run = self.layout.checkpoint_dir(job_id)
        try:
            snapshot = json.loads((run / "checkpoint_manager_snapshot.json").read_text())
        except (OSError, ValueError):
            return []
        found = []
        for result in snapshot.get("checkpoint_results", []):
            directory = run / result["checkpoint_dir_name"]
            if not directory.exists():
                continue
            created = datetime.fromtimestamp(directory.stat().st_mtime, UTC)
            step = int(result["metrics"]["step"])
            found.append(CheckpointInfo(directory.name, step, str(directory), created))
        return sorted(found, key=lambda c: c.step)
