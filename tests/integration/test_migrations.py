"""Schema migrations on real databases (a SQLite file, a database of its own on a throwaway Postgres
server): what the store does at open for each state a database can be in, ``hutch db upgrade``, and
that the models and the revisions describe the same schema.

The databases to upgrade are made the way the last release before migrations made them: its own DDL
(below) and rows written by plain SQL, without today's models.
"""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import uvicorn
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from typer.testing import CliRunner

from api.cli import app
from service import migrations
from service.lifecycle import JobState
from service.migrations import SchemaError
from service.store import Base, JobStore

# What service/store.py as of cf663ea (the last release before migrations) made at its first start:
# SQLAlchemy's create_all for its models, as emitted on each database.
LANDED_SCHEMA = """
CREATE TABLE jobs (
    seq {serial} NOT NULL,
    id VARCHAR(64) NOT NULL,
    name VARCHAR(200) NOT NULL,
    state VARCHAR(16) NOT NULL,
    spec JSON NOT NULL,
    idempotency_key VARCHAR(200),
    request_hash VARCHAR(64) NOT NULL,
    created_at {timestamp} NOT NULL,
    updated_at {timestamp} NOT NULL,
    started_at {timestamp},
    finished_at {timestamp},
    attempt INTEGER NOT NULL,
    ray_job_id VARCHAR(128),
    failure_reason TEXT,
    cancel_requested BOOLEAN NOT NULL,
    latest_metrics JSON,
    priority INTEGER DEFAULT '0' NOT NULL,
    PRIMARY KEY (seq),
    UNIQUE (id),
    UNIQUE (idempotency_key)
);
CREATE INDEX ix_jobs_state_priority_seq ON jobs (state, priority, seq);
CREATE INDEX ix_jobs_state_seq ON jobs (state, seq);
CREATE TABLE job_events (
    id {serial} NOT NULL,
    job_id VARCHAR(64) NOT NULL,
    at {timestamp} NOT NULL,
    attempt INTEGER NOT NULL,
    state VARCHAR(16) NOT NULL,
    message TEXT,
    PRIMARY KEY (id)
);
CREATE INDEX ix_job_events_job_id ON job_events (job_id);
CREATE TABLE job_labels (
    job_seq INTEGER NOT NULL,
    "key" VARCHAR(200) NOT NULL,
    value VARCHAR(200) NOT NULL,
    PRIMARY KEY (job_seq, "key"),
    FOREIGN KEY(job_seq) REFERENCES jobs (seq) ON DELETE CASCADE
);
CREATE INDEX ix_job_labels_key_value_seq ON job_labels ("key", value, job_seq);
"""
LANDED_TYPES = {
    "sqlite": {"serial": "INTEGER", "timestamp": "DATETIME"},
    "postgresql": {"serial": "SERIAL", "timestamp": "TIMESTAMP WITH TIME ZONE"},
}

# The tables as that release wrote them, for plain inserts (the types only say how values are sent).
JOBS = sa.table(
    "jobs",
    *(sa.column(name) for name in ("seq", "id", "name", "state", "request_hash", "attempt", "priority")),
    *(sa.column(name, sa.JSON()) for name in ("spec", "latest_metrics")),
    *(sa.column(name, sa.DateTime(timezone=True)) for name in ("created_at", "updated_at", "started_at")),
    sa.column("cancel_requested", sa.Boolean()),
)
LABELS = sa.table("job_labels", sa.column("job_seq"), sa.column("key"), sa.column("value"))
EVENTS = sa.table(
    "job_events",
    *(sa.column(name) for name in ("job_id", "attempt", "state", "message")),
    sa.column("at", sa.DateTime(timezone=True)),
)
AT = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
ROOT = Path(__file__).resolve().parents[2]
HEAD = migrations.head()


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database: a new SQLite file, or a new database on the session's Postgres server."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'hutch.db'}"
        return
    server = sa.make_url(request.getfixturevalue("postgres_url"))
    name = f"migrations_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f"CREATE DATABASE {name}")
    try:
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f"DROP DATABASE {name} WITH (FORCE)")
        admin.dispose()


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> CliRunner:
    """The CLI with nothing from this machine's environment but what a test sets."""
    for variable in ("HUTCH_DATABASE_URL", "HUTCH_DATABASE_AUTO_UPGRADE", "HUTCH_RAY_ADDRESS"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HUTCH_DATA_DIR", str(tmp_path / "data"))
    return CliRunner()


def hutch(cli: CliRunner, url: str, *args: str) -> Any:
    return cli.invoke(app, list(args), env={"HUTCH_DATABASE_URL": url})


def engine_of(url: str) -> sa.Engine:
    return sa.create_engine(url)


def make_landed_database(url: str) -> None:
    """A database as the last release before migrations left it: its tables, two jobs (one with
    labels, one finished) and their events."""
    engine = engine_of(url)
    with engine.begin() as connection:
        for statement in filter(
            str.strip, LANDED_SCHEMA.format(**LANDED_TYPES[engine.dialect.name]).split(";")
        ):
            connection.exec_driver_sql(statement)
        for job_id, state, labels, priority in [
            ("old-queued", JobState.QUEUED, {"team": "vision"}, 5),
            ("old-done", JobState.SUCCEEDED, {}, 0),
        ]:
            spec = {"name": job_id, "labels": labels, "priority": priority, "training": {"steps": 10}}
            row = {
                "id": job_id, "name": job_id, "state": str(state), "spec": spec, "request_hash": "h",
                "created_at": AT, "updated_at": AT, "started_at": None, "attempt": 1,
                "cancel_requested": False, "latest_metrics": {"loss": 0.5}, "priority": priority,
            }  # fmt: skip
            seq = connection.execute(sa.insert(JOBS).values(row).returning(JOBS.c.seq)).scalar_one()
            for key, value in labels.items():
                connection.execute(sa.insert(LABELS).values(job_seq=seq, key=key, value=value))
            events = [(JobState.QUEUED, "submitted"), (state, "succeeded")][: 1 + (state != JobState.QUEUED)]
            for event_state, message in events:
                event = {
                    "job_id": job_id,
                    "at": AT,
                    "attempt": 1,
                    "state": str(event_state),
                    "message": message,
                }
                connection.execute(sa.insert(EVENTS).values(event))
    engine.dispose()


def revision_of(url: str) -> str | None:
    engine = engine_of(url)
    try:
        return migrations.current(engine)
    finally:
        engine.dispose()


def schema_differences(url: str) -> list[Any]:
    """What Alembic's autogenerate finds between the models and the database (server defaults too)."""
    engine = engine_of(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_server_default": True})
            return compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()


def upgrade_to(url: str, revision: str) -> None:
    engine = engine_of(url)
    with engine.begin() as connection:
        command.upgrade(migrations._config(connection), revision)
    engine.dispose()


def refused_serve(cli: CliRunner, url: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """``hutch serve`` on ``url``, which must stop before the server would start."""

    def no_server(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the server started on a database it should refuse")

    monkeypatch.setattr(uvicorn, "run", no_server)
    return cli.invoke(
        app, ["serve"], env={"HUTCH_DATABASE_URL": url, "HUTCH_RAY_ADDRESS": "http://127.0.0.1:9"}
    )


def test_the_release_before_migrations_is_refused_then_upgraded_keeping_its_jobs(
    url: str, cli: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_landed_database(url)
    with pytest.raises(
        SchemaError, match=f"revision unversioned .*needs revision {HEAD}.*`hutch db upgrade`"
    ):
        JobStore(url)
    served = refused_serve(cli, url, monkeypatch)
    assert served.exit_code == 2, served.output
    assert served.stderr.startswith("error: the job store at ") and "hutch db upgrade" in served.stderr
    assert "Traceback" not in served.output
    assert revision_of(url) == migrations.UNVERSIONED, "a refused database was changed"

    upgraded = hutch(cli, url, "db", "upgrade")
    assert upgraded.exit_code == 0, upgraded.output
    assert upgraded.stdout.strip().endswith(f"{migrations.describe(migrations.UNVERSIONED)} -> {HEAD}")
    assert revision_of(url) == HEAD and schema_differences(url) == []

    store = JobStore(url)
    try:
        queued, done = store.get("old-queued"), store.get("old-done")
        assert queued is not None and done is not None
        assert (
            queued.state is JobState.QUEUED and queued.labels == {"team": "vision"} and queued.priority == 5
        )
        assert queued.created_at == AT and queued.latest_metrics == {"loss": 0.5}
        assert done.state is JobState.SUCCEEDED
        assert [event.message for event in store.events("old-done")] == ["submitted", "succeeded"]
        assert [job.id for job in store.list(labels={"team": "vision"})[0]] == ["old-queued"]
        store.create("new", {"name": "new", "labels": {"team": "vision"}, "priority": 9})
        assert [job.id for job in store.queue()] == ["new", "old-queued"]
        assert store.delete("old-done") and store.get("old-done") is None
    finally:
        store.close()


def test_an_empty_database_gets_the_schema_of_the_models(url: str, cli: CliRunner) -> None:
    JobStore(url).close()
    assert revision_of(url) == HEAD
    assert schema_differences(url) == [], "the models changed without a migration (service/migrations)"
    store = JobStore(url)  # at head: opened as it is
    store.create("job", {"name": "job"})
    store.close()
    again = hutch(cli, url, "db", "upgrade")
    assert again.exit_code == 0 and again.stdout.strip().endswith(
        f"at revision {HEAD}, this release's; nothing to do"
    )
    shown = hutch(cli, url, "db", "current")
    assert shown.exit_code == 0 and shown.stdout.strip().endswith(f": {HEAD} (this release's)")


def test_the_revisions_go_down_and_up_again(url: str) -> None:
    upgrade_to(url, "head")
    engine = engine_of(url)
    with engine.begin() as connection:
        command.downgrade(migrations._config(connection), "base")
    assert set(sa.inspect(engine).get_table_names()) == {"alembic_version"}
    engine.dispose()
    JobStore(url).close()
    assert revision_of(url) == HEAD and schema_differences(url) == []


def test_an_earlier_revision_is_refused_at_open_and_upgraded_by_the_command(
    url: str, cli: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    upgrade_to(url, migrations.FIRST)
    with pytest.raises(
        SchemaError, match=f"has schema revision {migrations.FIRST}; this release needs revision {HEAD}"
    ):
        JobStore(url)
    assert refused_serve(cli, url, monkeypatch).exit_code == 2
    assert (
        hutch(cli, url, "db", "current")
        .stdout.strip()
        .endswith(f": {migrations.FIRST} (this release needs {HEAD})")
    )
    upgraded = hutch(cli, url, "db", "upgrade")
    assert upgraded.exit_code == 0 and upgraded.stdout.strip().endswith(f": {migrations.FIRST} -> {HEAD}")
    JobStore(url).close()


def test_a_revision_this_release_does_not_know_is_refused_and_left_alone(url: str, cli: CliRunner) -> None:
    JobStore(url).close()
    engine = engine_of(url)
    with engine.begin() as connection:
        connection.exec_driver_sql("UPDATE alembic_version SET version_num = '0999'")
    engine.dispose()
    for upgrade in (False, True):
        with pytest.raises(SchemaError, match="revision 0999, which this release does not know"):
            JobStore(url, upgrade=upgrade)
    refused = hutch(cli, url, "db", "upgrade")
    assert refused.exit_code == 2 and "a newer release of hutch has upgraded it" in refused.stderr
    assert "Traceback" not in refused.output
    assert revision_of(url) == "0999"


# A replica: opens the store once its parent says go (after every replica has imported hutch).
REPLICA = """
import sys
from service.store import JobStore
print("ready", flush=True)
sys.stdin.readline()
JobStore(sys.argv[1]).close()
"""


def test_replicas_opening_an_empty_database_together_migrate_it_once(url: str) -> None:
    """Separate processes, as replicas are: they take turns on the database's migration lock, and
    the ones that wait find the schema made."""
    replicas = [
        subprocess.Popen(
            [sys.executable, "-c", REPLICA, url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for _ in range(2)
    ]
    for replica in replicas:
        assert replica.stdout is not None and replica.stdout.readline() == "ready\n"
    for replica in replicas:
        assert replica.stdin is not None
        replica.stdin.write("go\n")
        replica.stdin.flush()
    failures = [replica.communicate(timeout=60)[1] for replica in replicas if replica.wait(timeout=60)]
    assert failures == [] and revision_of(url) == HEAD


def test_the_embedded_default_upgrades_itself(
    cli: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No HUTCH_DATABASE_URL: the SQLite file under the data dir has no operator to run the command,
    so ``hutch serve`` upgrades it; HUTCH_DATABASE_AUTO_UPGRADE does the same for a configured one."""
    url = f"sqlite:///{tmp_path / 'data' / 'hutch.db'}"
    (tmp_path / "data").mkdir()
    make_landed_database(url)
    started: list[Any] = []
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: started.append(args))
    served = cli.invoke(app, ["serve"], env={"HUTCH_RAY_ADDRESS": "http://127.0.0.1:9"})
    assert served.exit_code == 0 and started, served.output
    assert revision_of(url) == HEAD and schema_differences(url) == []

    configured = f"sqlite:///{tmp_path / 'configured.db'}"
    make_landed_database(configured)
    env = {"HUTCH_DATABASE_URL": configured, "HUTCH_DATABASE_AUTO_UPGRADE": "true"}
    served = cli.invoke(app, ["serve"], env={**env, "HUTCH_RAY_ADDRESS": "http://127.0.0.1:9"})
    assert served.exit_code == 0, served.output
    assert revision_of(configured) == HEAD


# What releases before the queue (695462a) made: no priority column nor the queue's indexes, and two
# narrower indexes that later releases kept (they created what was missing, and dropped nothing).
EARLIEST_SCHEMA = (
    LANDED_SCHEMA.replace("    priority INTEGER DEFAULT '0' NOT NULL,\n", "")
    .replace("CREATE INDEX ix_jobs_state_priority_seq ON jobs (state, priority, seq);", "")
    .replace("ix_jobs_state_seq ON jobs (state, seq)", "ix_jobs_state ON jobs (state)")
    .replace(
        'ix_job_labels_key_value_seq ON job_labels ("key", value, job_seq)',
        'ix_job_labels_key_value ON job_labels ("key", value)',
    )
)


def test_a_database_from_before_the_queue_is_brought_to_the_first_revision(
    tmp_path: Path, cli: CliRunner
) -> None:
    url = f"sqlite:///{tmp_path / 'earliest.db'}"
    engine = engine_of(url)
    with engine.begin() as connection:
        for statement in filter(str.strip, EARLIEST_SCHEMA.format(**LANDED_TYPES["sqlite"]).split(";")):
            connection.exec_driver_sql(statement)
        connection.exec_driver_sql(
            "INSERT INTO jobs (id, name, state, spec, request_hash, created_at, updated_at, attempt, "
            "cancel_requested) VALUES ('old', 'old', 'QUEUED', '{\"name\": \"old\"}', 'h', "
            "'2026-01-02 03:04:05.000000', '2026-01-02 03:04:05.000000', 1, 0)"
        )
    engine.dispose()
    assert hutch(cli, url, "db", "upgrade").exit_code == 0
    assert schema_differences(url) == []
    store = JobStore(url)
    try:
        old = store.get("old")
        assert old is not None and old.priority == 0 and store.queue_position(old) == 1
    finally:
        store.close()


# -- the least-privilege role of deploy/README.md, on Postgres ------------------------------------------


def readme_sql() -> list[str]:
    """The SQL of deploy/README.md: the roles of a new database, then of an earlier release's."""
    return re.findall(r"^```sql\n(.*?)^```", (ROOT / "deploy" / "README.md").read_text(), re.S | re.M)


def run_as_psql(server: sa.URL, sql: str) -> None:
    """Runs ``sql`` as an administrator in psql would: statements end with ';', ``\\connect NAME``
    goes to another database, ``--`` starts a comment; the passwords are left out."""
    database, statement = server.database, ""
    for line in sql.replace("PASSWORD '…'", "").splitlines():
        if line.startswith("\\connect "):
            database = line.split()[1]
        elif not line.startswith("--"):
            statement += line + "\n"
            if line.rstrip().endswith(";"):
                admin = sa.create_engine(server.set(database=database), isolation_level="AUTOCOMMIT")
                with admin.connect() as connection:
                    connection.exec_driver_sql(statement)
                admin.dispose()
                statement = ""
    assert not statement.strip(), f"a statement without its ';': {statement}"


@pytest.fixture
def roles(postgres_url: str) -> Iterator[tuple[sa.URL, str, str]]:
    """The session's Postgres server as its administrator, and the URLs of the database ``hutch`` as
    the owner role and as the run-time role; both roles and the database go at the end."""
    server = sa.make_url(postgres_url)
    as_role = {role: server.set(username=role, database="hutch") for role in ("hutch_owner", "hutch")}
    try:
        yield server, *(url.render_as_string(hide_password=False) for url in as_role.values())
    finally:
        run_as_psql(server, "DROP DATABASE IF EXISTS hutch WITH (FORCE);")
        run_as_psql(server, "DROP ROLE IF EXISTS hutch_owner;\nDROP ROLE IF EXISTS hutch;")


def assert_runs_without_ddl(url: str) -> None:
    """The run-time role does everything the store and the leases need, and cannot change the schema."""
    store = JobStore(url)
    try:
        job, _, _ = store.create("by-the-role", {"name": "by-the-role", "labels": {"team": "nlp"}})
        assert store.move(job.id, JobState.QUEUED, JobState.CANCELLED, attempt=1)
        assert store.retry(job.id) and store.list(labels={"team": "nlp"})[0][0].attempt == 2
        assert store.move(job.id, JobState.QUEUED, JobState.CANCELLED) and store.delete(job.id)
        with store.engine.begin() as connection:
            connection.exec_driver_sql(
                "INSERT INTO leases (name, holder, token, expires_at) VALUES ('r', 'a', 1, 0)"
            )
            connection.exec_driver_sql("SELECT token FROM leases WHERE name = 'r' FOR SHARE")
            connection.exec_driver_sql("UPDATE leases SET holder = 'b', token = token + 1 WHERE name = 'r'")
            connection.exec_driver_sql("DELETE FROM leases")
        for ddl in ("CREATE TABLE other (i INTEGER)", "ALTER TABLE jobs ADD COLUMN other INTEGER",
                    "DROP INDEX ix_jobs_state_seq", "DROP TABLE leases"):  # fmt: skip
            refused = pytest.raises(sa.exc.ProgrammingError, match=r"permission denied|must be owner")
            with refused, store.engine.begin() as connection:
                connection.exec_driver_sql(ddl)
    finally:
        store.close()


def test_the_documented_roles_of_a_new_database(roles: tuple[sa.URL, str, str], cli: CliRunner) -> None:
    server, owner, runtime = roles
    new_database, _ = readme_sql()
    run_as_psql(server, new_database)
    with pytest.raises(SchemaError, match=r"may not make .*permission denied.*`hutch db upgrade`"):
        JobStore(runtime)
    created = hutch(cli, owner, "db", "upgrade")
    assert created.exit_code == 0 and created.stdout.strip().endswith(f"empty (no hutch tables) -> {HEAD}")
    assert_runs_without_ddl(runtime)


def test_the_documented_roles_of_an_earlier_releases_database(
    roles: tuple[sa.URL, str, str], cli: CliRunner
) -> None:
    """The database and its tables owned by the one role that the earlier releases ran as."""
    server, owner, runtime = roles
    run_as_psql(server, "CREATE ROLE hutch LOGIN;\nCREATE DATABASE hutch OWNER hutch;")
    make_landed_database(runtime)
    _, earlier_database = readme_sql()
    run_as_psql(server, earlier_database)
    upgraded = hutch(cli, owner, "db", "upgrade")
    assert upgraded.exit_code == 0, upgraded.output
    store = JobStore(runtime)
    try:
        old = store.get("old-queued")
        assert old is not None and old.labels == {"team": "vision"}
    finally:
        store.close()
    assert_runs_without_ddl(runtime)
