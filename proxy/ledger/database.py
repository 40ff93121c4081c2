"""Opening the database of record and migrating it.

`LEDGER_DATABASE_URL` is `postgresql://user:pass@host:port/db` (asyncpg) or
`sqlite:///relative/path` / `sqlite:////absolute/path` (aiosqlite). SQLite runs in WAL
mode and takes its write lock when a transaction begins (BEGIN IMMEDIATE), so two
writers queue instead of failing halfway through a batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import event, func, inspect, select
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from proxy.errors import ConfigError, LedgerNotMigrated
from proxy.ledger.schema import MIGRATIONS, SCHEMA_VERSION, ledger_schema

SQLITE_BUSY_TIMEOUT_MS = 30_000


def async_url(url: str) -> URL:
    """The SQLAlchemy URL with the async driver for a plain `postgresql://`/`sqlite://`."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(f"LEDGER_DATABASE_URL: not a database URL: {url!r}") from None
    backend = parsed.get_backend_name()
    if backend in ("postgresql", "postgres"):
        return parsed.set(drivername="postgresql+asyncpg")
    if backend == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        return parsed.set(drivername="sqlite+aiosqlite")
    raise ConfigError(
        f"LEDGER_DATABASE_URL: unsupported database {backend!r} (postgresql or sqlite)"
    )


def open_engine(url: str) -> AsyncEngine:
    engine = create_async_engine(async_url(url), pool_pre_ping=True)
    if engine.dialect.name == "sqlite":
        _sqlite_transactions(engine)
    return engine


def _sqlite_transactions(engine: AsyncEngine) -> None:
    # pysqlite's own transaction handling begins lazily and deferred; take over so
    # every transaction is BEGIN IMMEDIATE (see the module docstring).
    @event.listens_for(engine.sync_engine, "connect")
    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


# SQLSTATE classes that say "try again", not "this data is wrong": connection (08),
# transaction rollback: serialization failure, deadlock (40), insufficient resources
# (53), operator intervention: shutdown, cancel (57), system error (58), lock timeout.
_TRANSIENT_SQLSTATE_CLASSES = ("08", "40", "53", "57", "58")
_TRANSIENT_SQLSTATES = frozenset({"55P03"})


def is_transient(exc: BaseException) -> bool:
    """A failure of the database or the way to it (retry), not of the data."""
    if isinstance(exc, OperationalError | InterfaceError | OSError | TimeoutError):
        return True
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    # asyncpg's errors reach SQLAlchemy as a generic DBAPI error carrying the SQLSTATE.
    state = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
    return isinstance(state, str) and (
        state.startswith(_TRANSIENT_SQLSTATE_CLASSES) or state in _TRANSIENT_SQLSTATES
    )


async def schema_version(conn: AsyncConnection) -> int:
    """0 for an empty database."""
    has_table = await conn.run_sync(lambda c: inspect(c).has_table(ledger_schema.name))
    if not has_table:
        return 0
    version = (await conn.execute(select(func.max(ledger_schema.c.version)))).scalar()
    return int(version or 0)


async def migrate(engine: AsyncEngine) -> tuple[int, int]:
    """Apply the pending migrations; returns (version before, version after)."""
    async with engine.begin() as conn:
        await conn.run_sync(lambda c: ledger_schema.create(c, checkfirst=True))
        before = await schema_version(conn)
    if before > SCHEMA_VERSION:
        raise LedgerNotMigrated(
            f"ledger database is at schema {before}, newer than this code ({SCHEMA_VERSION})"
        )
    for version in range(before + 1, SCHEMA_VERSION + 1):
        async with engine.begin() as conn:
            await conn.run_sync(MIGRATIONS[version - 1])
            await conn.execute(ledger_schema.delete())
            await conn.execute(ledger_schema.insert().values(version=version))
    return before, SCHEMA_VERSION


async def require_migrated(engine: AsyncEngine) -> None:
    """Raise LedgerNotMigrated (one line, for the operator) unless the schema is current."""
    async with engine.connect() as conn:
        version = await schema_version(conn)
    if version != SCHEMA_VERSION:
        raise LedgerNotMigrated(
            f"ledger database is at schema {version}, this code needs {SCHEMA_VERSION}: "
            "run `llm-proxy ledger migrate`"
        )
