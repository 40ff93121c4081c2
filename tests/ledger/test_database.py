"""Which database errors are retried (an outage, a deadlock) and which are the data's
fault (dead-lettered), and the URL forms LEDGER_DATABASE_URL accepts."""

from __future__ import annotations

import pytest
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from proxy.errors import ConfigError
from proxy.ledger.database import async_url, is_transient


class PgError(Exception):
    def __init__(self, sqlstate: str) -> None:
        super().__init__(f"sqlstate {sqlstate}")
        self.sqlstate = sqlstate


@pytest.mark.parametrize(
    ("state", "transient"),
    [
        ("40P01", True),  # deadlock detected
        ("40001", True),  # serialization failure
        ("57P01", True),  # admin shutdown
        ("08006", True),  # connection failure
        ("55P03", True),  # lock not available
        ("23505", False),  # unique violation
        ("22021", False),  # bad text encoding
        ("22003", False),  # numeric out of range
    ],
)
def test_sqlstates(state: str, transient: bool) -> None:
    assert is_transient(DBAPIError("stmt", {}, PgError(state))) is transient


def test_error_classes() -> None:
    assert is_transient(OperationalError("stmt", {}, Exception("database is locked")))
    assert is_transient(ConnectionRefusedError())
    assert not is_transient(IntegrityError("stmt", {}, Exception("UNIQUE constraint failed")))
    assert not is_transient(ValueError("x"))


def test_database_urls() -> None:
    pg = async_url("postgresql://u:p@h:5/db")
    assert (pg.drivername, pg.username, pg.password, pg.host, pg.port, pg.database) == (
        "postgresql+asyncpg",
        "u",
        "p",
        "h",
        5,
        "db",
    )
    assert async_url("postgres://u@h/db").drivername == "postgresql+asyncpg"
    memory = async_url("sqlite:///:memory:")
    assert (memory.drivername, memory.database) == ("sqlite+aiosqlite", ":memory:")
    for bad in ("mysql://h/db", "not a url"):
        with pytest.raises(ConfigError, match="LEDGER_DATABASE_URL"):
            async_url(bad)
