"""Alembic's environment: the migrations run on the connection (and in the transaction) that
:mod:`service.migrations` hands over; the ``alembic`` command, which has none to hand over (a
developer writing a revision), gets one to the database of the service's settings."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine
from sqlalchemy.engine import Connection

from service.settings import Settings
from service.store import Base


def run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        # SQLite alters a table by copying it: revisions written for it use batch operations.
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


given = context.config.attributes.get("connection")
if given is not None:
    run(given)
else:
    with create_engine(Settings().resolved_database_url).connect() as connection:
        run(connection)
