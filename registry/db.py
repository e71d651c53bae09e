"""The metadata database: SQLite by default, PostgreSQL for several machines; migrated on open.

SQLite runs in WAL mode (readers never wait for the writer) and write transactions start with
``BEGIN IMMEDIATE``, so concurrent publishers queue for the write lock instead of deadlocking.
The helpers every table's code shares live here too: the time, insert-or-ignore, get-or-create a
tenant, and pages of a list.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Column, Connection, Engine, Row, Select, Table, create_engine, event, select, text
from sqlalchemy.engine import make_url

import adapterdeck.registry.schema as t
from adapterdeck.core.errors import AdapterdeckError
from adapterdeck.registry.errors import StorageFault
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
        raise StorageFault(f"cannot open the registry database: {_why(engine, exc)}") from exc
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


# -- shared helpers --------------------------------------------------------------------------


def now() -> datetime:
    return datetime.now(UTC)


def utc(value: datetime | None) -> datetime | None:
    """A stored time with its UTC offset (SQLite hands it back without one)."""
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def iso(value: Any) -> str:
    """A stored time as ISO 8601 with its offset; SQLite hands back the UTC time without one."""
    if not isinstance(value, datetime):
        return str(value)
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()


def insert_ignore(conn: Connection, table: Table, values: dict[str, Any], keys: list[str]) -> None:
    """Insert a row unless one with the same ``keys`` exists (safe against a concurrent insert)."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    conn.execute(insert(table).values(**values).on_conflict_do_nothing(index_elements=keys))


def ensure_tenant(conn: Connection, name: str) -> int:
    """The id of tenant ``name``, recorded first if it is new (callers check the name)."""
    insert_ignore(conn, t.tenants, {"name": name, "created_at": now()}, ["name"])
    return conn.execute(select(t.tenants.c.id).where(t.tenants.c.name == name)).scalar_one()


@dataclass
class Page:
    items: list[Any]
    has_more: bool
    extra: dict[str, Any] = field(default_factory=dict)


def fetch_page(
    conn: Connection,
    query: Select,
    column: Column,
    *,
    after: Any,
    limit: int,
    descending: bool = True,
    item: Callable[[Row], Any] = lambda row: row,
) -> Page:
    """Up to ``limit`` rows of ``query`` ordered by ``column``, starting past the value ``after``
    (None: from the start); one row more is read to tell whether another page follows."""
    if after is not None:
        query = query.where(column < after if descending else column > after)
    rows = conn.execute(query.order_by(column.desc() if descending else column).limit(limit + 1)).all()
    return Page([item(r) for r in rows[:limit]], len(rows) > limit)
