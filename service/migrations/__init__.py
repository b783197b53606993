"""The job store's schema, versioned with Alembic: what the service checks when it opens the store
and what ``hutch db upgrade`` applies.

Each revision in ``versions/`` changes the schema of the one before it; revision 0001 is the schema
hutch made before it had migrations. Opening the store (:func:`prepare`) gives an empty database
this release's schema, opens one at this release's revision as it is, and refuses any other, with
the command to run, unless told to upgrade it (the embedded default, which has no operator).
Nothing here changes a database whose revision this release does not know.

The configuration is built in code (no alembic.ini), so the migrations ship inside the package. A
schema change is a change of the models in service/store.py plus a revision, which Alembic writes
from the difference against a database at head (pyproject.toml's [tool.alembic] points it here):

    export HUTCH_DATABASE_URL=sqlite:////tmp/hutch-head.db
    hutch db upgrade && alembic revision --autogenerate --rev-id 0003 -m "what changes"

tests/integration/test_migrations.py fails while the models and the revisions differ.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.operations import Operations
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection, Engine

log = logging.getLogger(__name__)

FIRST = "0001"
"""The schema hutch made before it had migrations (up to commit cf663ea)."""
UNVERSIONED = "unversioned"
"""The revision of a database with hutch's tables and no ``alembic_version``: made before migrations."""
UPGRADE_COMMAND = "hutch db upgrade"

# Postgres: the advisory lock that migrations of one database take turns on (any constant key).
_LOCK_KEY = int.from_bytes(b"hutch-db", "big")
# Alembic's `context` and `op` are module-wide: migrations in one process run one at a time.
_ONE_AT_A_TIME = threading.Lock()


class SchemaError(Exception):
    """The database's schema is not the one this release uses, and was left as it is."""


def _config(connection: Connection | None = None) -> Config:
    """Alembic's configuration, in code: the scripts next to this file, run on ``connection``."""
    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent).replace("%", "%%"))
    config.attributes["connection"] = connection
    return config


@cache
def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(_config())


def head() -> str:
    """The revision this release's models are at."""
    revision = _scripts().get_current_head()
    assert revision is not None, "service/migrations/versions holds no revision"
    return revision


@cache
def _known() -> frozenset[str]:
    return frozenset(script.revision for script in _scripts().walk_revisions())


def _found(connection: Connection) -> str | None:
    """The database's revision: :data:`UNVERSIONED` for one made before migrations, None for one
    without hutch's tables (an empty database, or one other applications' tables share)."""
    heads = MigrationContext.configure(connection).get_current_heads()
    if heads:
        return ",".join(heads)  # several only in a branched history, which this release does not have
    return UNVERSIONED if sa.inspect(connection).has_table("jobs") else None


def current(engine: Engine) -> str | None:
    """The revision of the database behind ``engine`` (see :func:`_found`); changes nothing."""
    with engine.connect() as connection:
        return _found(connection)


def describe(revision: str | None) -> str:
    """A revision as people read it."""
    if revision is None:
        return "empty (no hutch tables)"
    if revision == UNVERSIONED:
        return "unversioned (made by a release before migrations; no alembic_version table)"
    return revision if revision in _known() else f"{revision} (unknown to this release)"


def prepare(engine: Engine, upgrade: bool) -> None:
    """Make sure the database has the schema this release uses, as the store opens it: an empty
    one is brought to head; one at head is left alone; one at an earlier revision (or made before
    migrations) is upgraded if ``upgrade``, refused otherwise; one at a revision this release does
    not know is refused. Refusals are :class:`SchemaError` saying what to do."""
    found = current(engine)
    if found == head():
        return
    where = engine.url.render_as_string(hide_password=True)
    upgrade_first = (
        f"Upgrade it first, as a database role that may change the schema: run `{UPGRADE_COMMAND}` with "
        "the same HUTCH_DATABASE_URL (deploy/README.md, The job store's database), then start again"
    )
    if found is None or (upgrade and (found == UNVERSIONED or found in _known())):
        try:
            before, after = migrate(engine)
        except sa.exc.ProgrammingError as error:  # Postgres: the role may not change the schema
            reason = str(error.orig).strip().splitlines()[0]
            raise SchemaError(
                f"the job store at {where}, {describe(found)}, needs this release's schema, revision "
                f"{head()}, which its role may not make ({reason}). {upgrade_first}"
            ) from None
        if before != after:
            log.info("job store schema: %s -> %s", describe(before), after)
        return
    if found == UNVERSIONED or found in _known():
        raise SchemaError(
            f"the job store at {where} has schema revision {describe(found)}; this release needs "
            f"revision {head()}. {upgrade_first}"
        )
    raise _unknown(found, where)


def migrate(engine: Engine) -> tuple[str | None, str]:
    """Bring the database to head: create the schema in an empty one, stamp one made before
    migrations as revision 0001 (first bringing an even older one to exactly 0001), and apply the
    revisions after its own. All in one transaction that holds the database's migration lock, so
    that services starting together on an empty database migrate it once. Returns (the revision
    found, head); a revision this release does not know is a :class:`SchemaError`, untouched."""
    with _ONE_AT_A_TIME, _migrating(engine) as connection:
        found = _found(connection)
        if found not in (None, UNVERSIONED) and found not in _known():
            raise _unknown(found, engine.url.render_as_string(hide_password=True))
        config = _config(connection)
        if found == UNVERSIONED:
            _make_first(connection)
            command.stamp(config, FIRST)
        command.upgrade(config, "head")
    return found, head()


def _unknown(found: str, where: str) -> SchemaError:
    return SchemaError(
        f"the job store at {where} has schema revision {found}, which this release does not know (its "
        f"newest is {head()}): a newer release of hutch has upgraded it. Run that release or a later one; "
        "this one has left the database as it is"
    )


@contextmanager
def _migrating(engine: Engine) -> Iterator[Connection]:
    """A transaction that holds the database's migration lock (Postgres: an advisory lock; SQLite:
    the write lock, taken at once). Both databases change their schema inside a transaction, so a
    migration that fails leaves the database as it was; others wait, then find it migrated."""
    sqlite = engine.dialect.name == "sqlite"
    with engine.connect() as connection:
        try:
            if sqlite:
                # Foreign keys off while the schema changes: Alembic's batch mode alters a SQLite
                # table by copying it, and dropping `jobs` would cascade to `job_labels`. The
                # pragma is ignored inside a transaction, hence before BEGIN.
                connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
                connection.exec_driver_sql("BEGIN IMMEDIATE")
            elif engine.dialect.name == "postgresql":
                connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})
            yield connection
            connection.commit()
        finally:
            if sqlite:
                connection.invalidate()  # closed, not pooled: later connections keep foreign keys on


# Releases before migrations created what they were missing at start and dropped nothing: the
# first ones had no `priority` column nor the queue's indexes, and indexes the wider ones replaced.
_REPLACED_INDEXES = {"ix_jobs_state": "jobs", "ix_job_labels_key_value": "job_labels"}
_FIRST_INDEXES = {
    "ix_jobs_state_priority_seq": ("jobs", ["state", "priority", "seq"]),
    "ix_jobs_state_seq": ("jobs", ["state", "seq"]),
    "ix_job_labels_key_value_seq": ("job_labels", ["key", "value", "job_seq"]),
}


def _make_first(connection: Connection) -> None:
    """Bring a database made before migrations to exactly revision 0001 (the last such release's
    is already: then nothing changes)."""
    inspector = sa.inspect(connection)
    op = Operations(MigrationContext.configure(connection))
    if "priority" not in {column["name"] for column in inspector.get_columns("jobs")}:
        op.add_column("jobs", sa.Column("priority", sa.Integer(), nullable=False, server_default="0"))
    present = {index["name"] for table in ("jobs", "job_labels") for index in inspector.get_indexes(table)}
    for name, table in _REPLACED_INDEXES.items():
        if name in present:
            op.drop_index(name, table_name=table)
    for name, (table, columns) in _FIRST_INDEXES.items():
        if name not in present:
            op.create_index(name, table, columns)
