"""The metadata database: SQLite by default, PostgreSQL for several machines; migrated on open.

SQLite runs in WAL mode (readers never wait for the writer) and write transactions start with
``BEGIN IMMEDIATE``, so concurrent publishers queue for the write lock instead of deadlocking.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url

from adapterdeck.core.errors import AdapterdeckError
from adapterdeck.registry.private import create_private, private_dir

MIGRATIONS = Path(__file__).parent / "migrations"
_BEGIN_MODE = "adapterdeck_begin_mode"


def _alembic_config(connection: Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    head = ScriptDirectory.from_config(config).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def make_engine(url: str) -> Engine:
    """An engine for ``url``, set up for concurrent use by several processes."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            # SQLite gives its -wal and -shm files the database file's mode: create it private.
            database = Path(parsed.database).expanduser()
            private_dir(database.parent)
            create_private(database)
        engine = create_engine(url, connect_args={"timeout": 60})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # transactions are begun below, not by the driver
            dbapi_conn.execute("PRAGMA journal_mode=WAL")
            dbapi_conn.execute("PRAGMA foreign_keys=ON")
            dbapi_conn.execute("PRAGMA busy_timeout=60000")

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            conn.exec_driver_sql(f"BEGIN {conn.info.get(_BEGIN_MODE, '')}".strip())

        return engine
    try:
        return create_engine(url, pool_pre_ping=True)
    except Exception as exc:  # a missing driver, a malformed URL
        raise AdapterdeckError(
            f"cannot use database {parsed.render_as_string(hide_password=True)}: {exc}"
        ) from exc


@contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """A transaction that takes the write lock up front (SQLite) or behaves as usual (PostgreSQL)."""
    with engine.connect() as conn:
        conn.info[_BEGIN_MODE] = "IMMEDIATE"
        try:
            with conn.begin():
                yield conn
        finally:
            conn.info.pop(_BEGIN_MODE, None)


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision; safe when several processes open it at once."""
    head = head_revision()
    try:
        if current_revision(engine) == head:
            return
    except Exception as exc:
        raise AdapterdeckError(f"cannot open the registry database: {_why(engine, exc)}") from exc
    with write_transaction(engine) as conn:
        if engine.dialect.name == "postgresql":
            # One migrator at a time across machines; the others wait, then find nothing to do.
            conn.execute(text("SELECT pg_advisory_xact_lock(8731504)"))
        command.upgrade(_alembic_config(conn), "head")


def _why(engine: Engine, exc: Exception) -> str:
    """The driver's own message (without SQLAlchemy's link), and for a SQLite file the likely cause."""
    reason = str(getattr(exc, "orig", None) or exc)
    path = engine.url.database if engine.dialect.name == "sqlite" else None
    if path and path != ":memory:":
        folder = Path(path).expanduser().parent
        try:
            if os.statvfs(folder).f_flag & os.ST_RDONLY:
                reason += f" ({folder} is on a read-only file system)"
            elif not os.access(folder, os.W_OK):
                reason += f" ({folder} is not writable)"
        except OSError as err:
            reason += f" ({folder}: {err.strerror})"
    return reason
