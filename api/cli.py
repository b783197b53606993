"""The ``hutch`` command line: drive a control plane (submit, watch, cancel, retry jobs), run one
(``hutch serve``), or train without one (``hutch train``, ``hutch demo``).

Exit codes: 0 success; 2 bad input (an invalid spec file, a malformed option, or the server
refusing the request as invalid, too large or conflicting with the job's state); 1 any other
failure (no such job, an unreachable server, a job that did not succeed).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from api.client import (
    DEFAULT_URL,
    Client,
    Conflict,
    HutchError,
    InvalidRequest,
    PayloadTooLarge,
    settings_problems,
)
from api.packing import PackingError
from api.schemas import Job
from service.lifecycle import JobState
from service.settings import SettingError, Settings, settings_table
from trainer.spec import SpecError, load_spec

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

app = typer.Typer(
    help="hutch: distributed training with a sharded, delayed-Hessian AdaHessian.", no_args_is_help=True
)

_PAGE_SIZE = 50
_PIPED_WIDTH = 1000
_NOT_IN_SUMMARY = frozenset({"step", "time"})

_JobId = Annotated[str, typer.Argument(metavar="ID", help="The job's id.")]


def _positive(value: float) -> float:
    if value <= 0:
        raise typer.BadParameter(f"must be positive, got {value}")
    return value


@dataclass(frozen=True)
class _Target:
    """The control plane the commands talk to (None: the client's defaults)."""

    url: str | None
    token: str | None


@app.callback()
def main(
    ctx: typer.Context,
    url: Annotated[
        str | None,
        typer.Option(envvar="HUTCH_URL", show_default=DEFAULT_URL, help="The control plane's URL."),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            envvar="HUTCH_TOKEN",
            show_default="HUTCH_API_TOKENS or the local server's token file",
            help="Bearer token for the API.",
        ),
    ] = None,
) -> None:
    """hutch: distributed training with a sharded, delayed-Hessian AdaHessian."""
    ctx.obj = _Target(url, token)


# -- helpers -----------------------------------------------------------------------------------


def _fail(message: str, code: int) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@contextmanager
def _client(ctx: typer.Context) -> Iterator[Client]:
    """A client of the chosen control plane; turns its errors (and spec errors) into a message
    on stderr and the documented exit code, never a traceback."""
    target: _Target = ctx.obj
    try:
        with Client(target.url, target.token) as client:
            yield client
    except (SpecError, PackingError) as error:
        _fail(str(error), 2)
    except (InvalidRequest, PayloadTooLarge, Conflict) as error:
        _fail(str(error), 2)
    except HutchError as error:
        _fail(str(error), 1)


def _parse_labels(items: Sequence[str] | None) -> dict[str, str]:
    """``["team=ml", "run=3"]`` -> ``{"team": "ml", "run": "3"}``; a malformed item exits 2."""
    labels: dict[str, str] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="'--label'")
        labels[key.strip()] = value.strip()
    return labels


def _shown(value: Any) -> str:
    """A metric or field value for people: 4 significant digits for floats, '-' for none."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _age(moment: datetime) -> str:
    """How long ago, coarsely: 42s, 7m, 3h, 2d."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    seconds = max(0, int((datetime.now(timezone.utc) - moment).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _progress(job: Job) -> str:
    step = (job.latest_metrics or {}).get("step")
    return f"{_shown(step)}/{job.steps}"


def _metrics_line(metrics: dict[str, Any] | None) -> str:
    """``loss=0.1  lr=0.01 ...``: the record without its step (shown as progress) and wall-clock time."""
    shown = {key: value for key, value in (metrics or {}).items() if key not in _NOT_IN_SUMMARY}
    return "  ".join(f"{key}={_shown(value)}" for key, value in shown.items()) or "-"


def _console() -> Console:
    """Rich output on stdout; when it is piped, wide enough that no table cell is cut."""
    console = Console()
    return console if console.is_terminal else Console(width=_PIPED_WIDTH)


def _report_outcome(client: Client, job_id: str) -> NoReturn:
    """Wait for the job with a progress bar, print how it ended, exit 0 only if it succeeded."""
    try:
        job = client.wait(job_id, progress=True)
    except KeyboardInterrupt:
        _fail(f"stopped waiting; {job_id} goes on (`hutch status {job_id}`, `hutch cancel {job_id}`)", 130)
    typer.echo(f"{job.id} {job.state.value} (attempt {job.attempt}, {_progress(job)} steps)")
    if job.failure_reason:
        typer.echo(f"failure: {job.failure_reason}")
    typer.echo(f"metrics: {_metrics_line(job.latest_metrics)}")
    raise typer.Exit(0 if job.state is JobState.SUCCEEDED else 1)


_STATE_STYLES = {
    JobState.SUCCEEDED: "green",
    JobState.FAILED: "red",
    JobState.CANCELLED: "yellow",
    JobState.RUNNING: "cyan",
}


# -- the control plane -------------------------------------------------------------------------


def _settings_epilog() -> str:
    """Every ``HUTCH_*`` setting with its default and meaning, for ``hutch serve --help``."""
    rows = [
        escape(f"{variable}  [default: {default or 'unset'}]\n{description}")
        for variable, default, description in settings_table()
    ]
    return "Settings (environment variables):\n\n" + "\n\n".join(rows)


@app.command(epilog=_settings_epilog())
def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on (0.0.0.0 for all).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port to listen on.")] = 8000,
) -> None:
    """Run the control plane: the REST API, the job store and the reconciler (settings below)."""
    from sqlalchemy.exc import OperationalError

    from api.server import serve as run_server
    from service.migrations import SchemaError

    try:
        run_server(host=host, port=port)
    except ValidationError as error:
        if error.title != "Settings":
            raise
        _fail(f"invalid settings:\n{settings_problems(error)}", 2)
    except SettingError as error:
        _fail(f"invalid settings:\n  {error}", 2)
    except SchemaError as error:
        _fail(str(error), 2)
    except OperationalError as error:  # at start: the store is checked before anything listens
        _fail(f"cannot use the job store's database: {error.orig}", 1)


db_app = typer.Typer(
    help="The job store's schema: bring it to this release's revision, or show its revision.",
    no_args_is_help=True,
)
app.add_typer(db_app, name="db")


@contextmanager
def _database() -> Iterator[tuple[Engine, str]]:
    """The database of HUTCH_DATABASE_URL (or the default SQLite file) and its URL without password,
    for the ``db`` commands; bad settings and schema errors exit 2, an unreachable database 1."""
    from sqlalchemy import create_engine
    from sqlalchemy.exc import OperationalError

    from service.migrations import SchemaError

    try:
        settings = Settings()
    except ValidationError as error:
        _fail(f"invalid settings:\n{settings_problems(error)}", 2)
    engine = create_engine(settings.resolved_database_url)
    where = engine.url.render_as_string(hide_password=True)
    try:
        yield engine, where
    except SchemaError as error:
        _fail(str(error), 2)
    except OperationalError as error:
        _fail(f"cannot use the database {where}: {error.orig}", 1)
    finally:
        engine.dispose()


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Bring the job store to this release's schema (HUTCH_DATABASE_URL, or the default SQLite file).

    Run it as a database role that may change the schema, before starting a release that needs a
    newer revision: the service refuses to start on an earlier one and names this command. A
    database made by a release before migrations is recognised and upgraded, its jobs kept; one that
    a newer release has upgraded is left as it is (exit 2). Prints the revision before and after.
    """
    from service import migrations

    with _database() as (engine, where):
        before, after = migrations.migrate(engine)
    if before == after:
        typer.echo(f"{where}: at revision {after}, this release's; nothing to do")
    else:
        typer.echo(f"{where}: {migrations.describe(before)} -> {after}")


@db_app.command("current")
def db_current() -> None:
    """Show the job store's schema revision and the one this release needs; changes nothing."""
    from service import migrations

    with _database() as (engine, where):
        found = migrations.current(engine)
    needed = "this release's" if found == migrations.head() else f"this release needs {migrations.head()}"
    typer.echo(f"{where}: {migrations.describe(found)} ({needed})")


@app.command()
def submit(
    ctx: typer.Context,
    spec: Annotated[Path, typer.Argument(help="Job spec, YAML or JSON (see examples/).")],
    wait: Annotated[
        bool, typer.Option("--wait", help="Show progress until the job ends; exit 0 only if it succeeded.")
    ] = False,
    label: Annotated[
        list[str] | None,
        typer.Option("--label", "-l", metavar="KEY=VALUE", help="Add or override a label (repeatable)."),
    ] = None,
    idempotency_key: Annotated[
        str | None,
        typer.Option(help="Submitting again with the same key returns the first job, not a new one."),
    ] = None,
    working_dir: Annotated[
        Path | None,
        typer.Option(
            "--working-dir",
            help="Ship this directory with the job (packed and uploaded; .hutchignore and .gitignore "
            "are honoured): its modules can be named in the spec, e.g. model: mynet:build.",
        ),
    ] = None,
    priority: Annotated[
        int | None,
        typer.Option(
            min=-1000,
            max=1000,
            show_default="the spec's, else 0",
            help="Queue order while the cluster is busy: higher starts first, then older.",
        ),
    ] = None,
) -> None:
    """Validate a job spec here, submit it, and print the new job's id."""
    labels = _parse_labels(label)
    with _client(ctx) as client:
        job_spec = load_spec(spec)
        if labels:
            job_spec = job_spec.model_copy(update={"labels": {**job_spec.labels, **labels}})
        if priority is not None:
            job_spec = job_spec.model_copy(update={"priority": priority})
        job = client.submit(job_spec, idempotency_key=idempotency_key, working_dir=working_dir)
        typer.echo(job.id)
        if wait:
            _report_outcome(client, job.id)


@app.command()
def jobs(
    ctx: typer.Context,
    state: Annotated[
        list[JobState] | None,
        typer.Option("--state", "-s", case_sensitive=False, help="Only jobs in this state (repeatable)."),
    ] = None,
    label: Annotated[
        list[str] | None,
        typer.Option("--label", "-l", metavar="KEY=VALUE", help="Only jobs with this label (repeatable)."),
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="Show at most this many jobs.")] = 20,
    all_jobs: Annotated[
        bool, typer.Option("--all", help="Show every matching job (ignores --limit).")
    ] = False,
    mine: Annotated[bool, typer.Option("--mine", help="Only jobs submitted with this token.")] = False,
) -> None:
    """List jobs, newest first: id, name, state, attempt, step/steps, loss, age, who submitted it."""
    labels = _parse_labels(label)
    with _client(ctx) as client:
        by = client.whoami().name if mine else None
        found = client.iter_jobs(state, labels, page_size=_PAGE_SIZE, submitted_by=by)
        shown = list(found if all_jobs else itertools.islice(found, limit + 1))
    more = not all_jobs and len(shown) > limit
    shown = shown[:limit] if more else shown
    if not shown:
        typer.echo("no matching jobs", err=True)
        return
    table = Table(box=None)
    for column in ("id", "name", "state", "attempt", "step", "loss", "age", "by"):
        # In a narrow terminal only the name is shortened (the id starts with it).
        table.add_column(column, no_wrap=column != "name")
    for job in shown:
        table.add_row(
            escape(job.id),
            escape(job.name),
            f"[{_STATE_STYLES.get(job.state, 'default')}]{job.state.value}[/]",
            str(job.attempt),
            _progress(job),
            _shown((job.latest_metrics or {}).get("loss")),
            _age(job.created_at),
            escape(_shown(job.submitted_by)),
        )
    _console().print(table)
    if more:
        typer.echo(f"(newest {limit} shown; --limit N or --all for more)", err=True)


@app.command()
def status(
    ctx: typer.Context,
    job_id: _JobId,
    as_json: Annotated[bool, typer.Option("--json", help="Print the job as the API returns it.")] = False,
) -> None:
    """Show one job: state, attempt (and why it was retried), progress, failure reason, Ray
    dashboard link, latest metrics."""
    with _client(ctx) as client:
        job = client.get(job_id)
        retried = None
        if job.attempt > 1 and not as_json:
            starts = [e for e in client.events(job_id) if e.attempt == job.attempt and e.state == "QUEUED"]
            retried = starts[-1].message if starts else None
    if as_json:
        typer.echo(job.model_dump_json(indent=2))
        return
    state = job.state.value + (" (cancel requested)" if job.cancel_requested else "")
    if job.queue_position is not None:
        state += f" (position {job.queue_position} in the queue)"
    rows = {
        "id": job.id,
        "name": job.name,
        "state": state,
        "attempt": str(job.attempt) + (f" ({retried})" if retried else ""),
        "priority": str(job.priority),
        "workers": _workers(job.spec, job.latest_metrics),
        "labels": ", ".join(f"{k}={v}" for k, v in job.labels.items()) or "-",
        "by": _shown(job.submitted_by),
        "steps": _progress(job),
        "created": f"{job.created_at.isoformat()} ({_age(job.created_at)} ago)",
        "started": _shown(job.started_at and job.started_at.isoformat()),
        "finished": _shown(job.finished_at and job.finished_at.isoformat()),
        "failure": _shown(job.failure_reason),
        "ray job": _shown(job.ray_job_id),
        "dashboard": _shown(job.ray_dashboard_url),
        "metrics": _metrics_line(job.latest_metrics),
    }
    for key, value in rows.items():
        typer.echo(f"{key + ':':<11}{value}")


def _workers(spec: dict[str, Any], metrics: dict[str, Any] | None) -> str:
    """The spec's worker count, or an elastic job's range and how many train now."""
    count = spec.get("scaling", {}).get("num_workers", 1)
    if not isinstance(count, dict):
        return str(count)
    now = (metrics or {}).get("workers")
    return f"{count['min']}-{count['max']} (elastic" + (f"; {now} now)" if now else ")")


@app.command()
def logs(
    ctx: typer.Context,
    job_id: _JobId,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new lines until the job ends.")
    ] = False,
    tail: Annotated[int | None, typer.Option(min=0, help="Only the last N lines.")] = None,
    attempt: Annotated[
        int | None, typer.Option(min=1, show_default="the current one", help="Print this attempt's log.")
    ] = None,
) -> None:
    """Print a job's log, streamed as it is written."""
    with _client(ctx) as client:
        for line in client.logs(job_id, tail=tail, follow=follow, attempt=attempt):
            typer.echo(line)


@app.command()
def metrics(
    ctx: typer.Context,
    job_id: _JobId,
    since: Annotated[int | None, typer.Option(help="Only records after this step.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the records as JSON.")] = False,
) -> None:
    """Show a job's metric records (step, loss, lr, Hessian trace, eval results) as a table."""
    with _client(ctx) as client:
        found = client.metrics(job_id, since=since)
    if as_json:
        typer.echo(found.model_dump_json(indent=2))
        return
    if not found.records:
        typer.echo(f"no metrics for {job_id} yet", err=True)
        return
    # Step first, the rest as they come; "time" (Unix seconds) is left to --json.
    columns = list(dict.fromkeys(key for record in found.records for key in record if key != "time"))
    columns.sort(key=lambda key: key != "step")
    # "eval accuracy" can wrap in a narrow terminal where "eval_accuracy" would be cut.
    table = Table(*(escape(column.replace("_", " ")) for column in columns), box=None)
    for record in found.records:
        table.add_row(*(escape(_shown(record.get(column))) for column in columns))
    _console().print(table)


@app.command()
def checkpoints(ctx: typer.Context, job_id: _JobId) -> None:
    """List a job's kept checkpoints, oldest first (a retry resumes from the newest)."""
    with _client(ctx) as client:
        found = client.checkpoints(job_id)
    if not found.checkpoints:
        typer.echo(f"no checkpoints for {job_id} yet", err=True)
        return
    table = Table("name", "step", "created", box=None)
    table.add_column("path", overflow="fold")  # cut, a path is useless
    for checkpoint in found.checkpoints:
        table.add_row(
            escape(checkpoint.name),
            str(checkpoint.step),
            _age(checkpoint.created_at) + " ago",
            escape(checkpoint.path),
        )
    _console().print(table)


@app.command()
def cancel(ctx: typer.Context, job_id: _JobId) -> None:
    """Cancel a job: a queued one at once, a running one shortly after (its workers are stopped)."""
    with _client(ctx) as client:
        job = client.cancel(job_id)
    if job.state is JobState.CANCELLED:
        typer.echo(f"{job.id} CANCELLED")
    else:
        typer.echo(f"{job.id} cancel requested ({job.state.value}); it stops shortly")


@app.command()
def retry(
    ctx: typer.Context,
    job_id: _JobId,
    wait: Annotated[
        bool, typer.Option("--wait", help="Show progress until the job ends; exit 0 only if it succeeded.")
    ] = False,
) -> None:
    """Run a FAILED or CANCELLED job again as a new attempt, resuming from its latest checkpoint."""
    with _client(ctx) as client:
        job = client.retry(job_id)
        typer.echo(f"{job.id} attempt {job.attempt} {job.state.value}")
        if wait:
            _report_outcome(client, job.id)


@app.command()
def delete(ctx: typer.Context, job_id: _JobId) -> None:
    """Delete a finished job (SUCCEEDED, FAILED or CANCELLED); cancel an active one first."""
    with _client(ctx) as client:
        client.delete(job_id)
    typer.echo(f"{job_id} deleted")


# -- without a control plane -------------------------------------------------------------------


@app.command()
def demo(
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps.")] = 300,
    batch_size: Annotated[int, typer.Option(min=1, help="Examples per step.")] = 64,
    lr: Annotated[float, typer.Option(callback=_positive, help="Learning rate (positive).")] = 0.15,
    hessian_update_freq: Annotated[
        int, typer.Option(min=1, help="Estimate the Hessian every this many steps.")
    ] = 2,
    seed: Annotated[int, typer.Option(help="Seed for initialisation, data order and Hessian probes.")] = 0,
    out_dir: Annotated[Path, typer.Option(help="Where result.json and loss.png go.")] = Path("runs/demo"),
) -> None:
    """Train a small CNN on the digits data with AdaHessian in this process."""
    from trainer.demo import run_demo

    run_demo(steps, batch_size, lr, hessian_update_freq, seed, out_dir)


@app.command()
def train(
    spec: Annotated[Path, typer.Argument(help="Job spec, YAML or JSON (see examples/).")],
    run_dir: Annotated[Path | None, typer.Option(help="Where metrics.jsonl and result.json go.")] = None,
    job_id: Annotated[str | None, typer.Option(show_default="NAME-random", help="The job's id.")] = None,
) -> None:
    """Run a job spec on Ray Train: the cluster in RAY_ADDRESS, or a local one started for it."""
    from trainer.__main__ import main as run_entrypoint

    argv = [str(spec)]
    if run_dir is not None:
        argv += ["--run-dir", str(run_dir)]
    if job_id is not None:
        argv += ["--job-id", job_id]
    raise typer.Exit(run_entrypoint(argv))


if __name__ == "__main__":
    app()
