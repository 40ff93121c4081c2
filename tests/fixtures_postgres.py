"""Real PostgreSQL fixture and the ledger database fixtures (pytest plugin loaded from
tests/conftest.py).

One `postgres` per test session (Debian's postgresql binaries: `initdb` into a
temp dir, then the server on a free 127.0.0.1 port, fsync off). As root, both run
as the `postgres` user (PostgreSQL refuses root). Set `LEDGER_DATABASE_URL` to a
`postgresql://` URL of an existing server (its user needs CREATEDB) to use that one.

`ledger_url` is parametrized over both databases: every test that takes it runs
once against SQLite and once against PostgreSQL, each on a fresh, migrated database.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from proxy.ledger.database import migrate, open_engine
from tests.servers import ChildServer, free_port


def _pg_bin() -> Path:
    """The newest Debian postgresql's binaries (they are not on PATH)."""
    found = sorted(
        (p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/postgres")),
        key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else 0,
    )
    if found:
        return found[-1]
    on_path = shutil.which("postgres")
    return Path(on_path).parent if on_path else Path("/usr/lib/postgresql/15/bin")


PG_BIN = _pg_bin()
PG_USER = "postgres"


def _as_postgres() -> list[str]:
    """Prefix that runs a command as the postgres user when we are root. The
    pdeathsig goes after the user switch (a credential change clears it)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv") or "setpriv"
    return [
        setpriv,
        f"--reuid={PG_USER}",
        f"--regid={PG_USER}",
        "--clear-groups",
        "--",
        setpriv,
        "--pdeathsig",
        "KILL",
        "--",
    ]


class PostgresServer(ChildServer):
    kind = "postgres"
    env_var = "LEDGER_DATABASE_URL"
    ready_timeout = 30.0

    def __init__(self, url: str | None = None) -> None:
        if url is not None:
            parts = make_url(url)
            super().__init__(parts.host or "127.0.0.1", parts.port or 5432, external=True)
            self.url = url
        else:
            super().__init__("127.0.0.1", free_port(), external=False)
            self.url = f"postgresql://{PG_USER}@{self.host}:{self.port}/postgres"

    def command(self, workdir: Path) -> list[str]:
        data = workdir / "pgdata"
        if not data.exists():
            if os.geteuid() == 0:
                shutil.chown(workdir, PG_USER, PG_USER)
            subprocess.run(
                [
                    *_as_postgres(),
                    str(PG_BIN / "initdb"),
                    "-D",
                    str(data),
                    "-U",
                    PG_USER,
                    "--auth=trust",
                    "--no-sync",
                    "-E",
                    "UTF8",
                ],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        options = {
            "listen_addresses": self.host,
            "port": str(self.port),
            "unix_socket_directories": str(workdir),
            "fsync": "off",  # a test server needs no durability
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "200",
        }
        args = [a for k, v in options.items() for a in ("-c", f"{k}={v}")]
        return [*_as_postgres(), str(PG_BIN / "postgres"), "-D", str(data), *args]

    def is_ready(self) -> bool:
        done = subprocess.run(
            [str(PG_BIN / "pg_isready"), "-q", "-h", self.host, "-p", str(self.port)],
            check=False,
        )
        return done.returncode == 0

    def database_url(self, name: str) -> str:
        return make_url(self.url).set(database=name).render_as_string(hide_password=False)

    async def create_database(self, name: str) -> str:
        conn = await asyncpg.connect(self._plain_url())
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        return self.database_url(name)

    async def drop_database(self, name: str) -> None:
        conn = await asyncpg.connect(self._plain_url())
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    def _plain_url(self) -> str:
        return make_url(self.url).set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    external = os.environ.get("LEDGER_DATABASE_URL", "")
    server = PostgresServer(external if external.startswith("postgres") else None)
    if not server.external:
        server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(params=["sqlite", "postgresql"])
async def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh, *unmigrated* ledger database of each kind."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    name = f"ledger_{uuid.uuid4().hex[:12]}"
    url = await server.create_database(name)
    try:
        yield url
    finally:
        await asyncio.sleep(0)  # let engines of the test return their connections
        await server.drop_database(name)


@pytest.fixture
async def ledger_engine(ledger_url: str) -> AsyncIterator[AsyncEngine]:
    """A migrated ledger database of each kind."""
    engine = open_engine(ledger_url)
    await migrate(engine)
    try:
        yield engine
    finally:
        await engine.dispose()
