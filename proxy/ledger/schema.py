"""The ledger's tables (SQLAlchemy Core, one definition for PostgreSQL and SQLite) and
the versioned migrations that create them.

- `accounts`: one row per user; `balance` is the authority, the row is the lock that
  serialises every change of one user.
- `entries`: immutable history. `amount` is signed (a charge is negative), so
  `balance_after` of an entry = `balance_after` of the previous one + `amount`, and
  a user's balance = the sum of their amounts. `event_id` is UNIQUE: charges carry
  the charge event's id, grants `grant:<key>`, adjustments `adjust:<key>`.
  `endpoint` (migration 2) is the API a charge was for (chat.completions, responses,
  embeddings, completions); NULL for other kinds and for charges recorded before it.
- `usage_hourly`: consumption per user, UTC hour (of the event), alias and scene;
  updated in the transaction that inserts the entries, read by `credits usage`.
- `dead_letters`: events the embedded ledger could not apply (with Kafka the
  dead-letter topic holds them), once per distinct payload.
- `orders`: credit packages bought through the credit API (migration 2): `pending`
  until paid, then `paid` once; the package is copied in, so a later config change
  does not alter an order. (user_id, idempotency_key) is UNIQUE.
- `reward_grants`: rewards granted (migration 2). UNIQUE (rule, user, reference)
  makes a replay a no-op; UNIQUE (rule, user, slot) enforces the rule's limit (slot
  `once`, or `<day>#<n>` for n up to max_per_day) without a lock.
- `ledger_schema`: the applied migration version.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    Connection,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    UniqueConstraint,
    inspect,
    text,
)

# SQLite only auto-assigns row ids to a column declared exactly INTEGER PRIMARY KEY
# (which is 64-bit there anyway).
_ID = BigInteger().with_variant(Integer(), "sqlite")
_TS = DateTime(timezone=True)

metadata = MetaData()

accounts = Table(
    "accounts",
    metadata,
    Column("user_id", BigInteger, primary_key=True, autoincrement=False),
    Column("balance", BigInteger, nullable=False),
    Column("lifetime_charged", BigInteger, nullable=False),
    Column("lifetime_granted", BigInteger, nullable=False),
    Column("updated_at", _TS, nullable=False),
)

entries = Table(
    "entries",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("user_id", BigInteger, nullable=False),
    Column("kind", Text, nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("balance_after", BigInteger, nullable=False),
    Column("event_id", Text, nullable=False, unique=True),
    Column("request_id", Text),
    Column("alias", Text),
    Column("scene", Text),
    Column("reason", Text),
    Column("prompt_tokens", BigInteger, nullable=False, default=0),
    Column("completion_tokens", BigInteger, nullable=False, default=0),
    Column("cached_tokens", BigInteger, nullable=False, default=0),
    Column("reasoning_tokens", BigInteger, nullable=False, default=0),
    Column("occurred_at", _TS, nullable=False),
    Column("endpoint", Text),  # added by migration 2 (_v2_entries_endpoint)
    Column("applied_at", _TS, nullable=False),
    CheckConstraint(
        "kind IN ('charge', 'grant', 'adjustment', 'refund')", name="entries_kind_check"
    ),
    # `credits ledger` pages a user's history newest first.
    Index("entries_user_id_id", "user_id", "id"),
)

usage_hourly = Table(
    "usage_hourly",
    metadata,
    Column("user_id", BigInteger, nullable=False),
    Column("hour", _TS, nullable=False),
    Column("alias", Text, nullable=False),
    Column("scene", Text, nullable=False),
    Column("credits", BigInteger, nullable=False),
    Column("requests", BigInteger, nullable=False),
    Column("prompt", BigInteger, nullable=False),
    Column("completion", BigInteger, nullable=False),
    Column("cached", BigInteger, nullable=False),
    Column("reasoning", BigInteger, nullable=False),
    PrimaryKeyConstraint("user_id", "hour", "alias", "scene"),
)

dead_letters = Table(
    "dead_letters",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("digest", Text, nullable=False, unique=True),  # sha256 of the payload
    Column("payload", LargeBinary, nullable=False),
    Column("reason", Text, nullable=False),
    Column("source", Text, nullable=False),
    Column("created_at", _TS, nullable=False),
)

orders = Table(
    "orders",
    metadata,
    Column("id", Text, primary_key=True),
    Column("user_id", BigInteger, nullable=False),
    Column("idempotency_key", Text, nullable=False),
    Column("package_id", Text, nullable=False),
    Column("credits", BigInteger, nullable=False),
    Column("price", Text, nullable=False),  # decimal string, as the package said
    Column("currency", Text, nullable=False),
    Column("status", Text, nullable=False),
    Column("payment_reference", Text),
    Column("created_at", _TS, nullable=False),
    Column("paid_at", _TS),
    CheckConstraint("status IN ('pending', 'paid')", name="orders_status_check"),
    UniqueConstraint("user_id", "idempotency_key", name="orders_user_idempotency_key"),
    Index("orders_user_id_created_at", "user_id", "created_at"),
)

reward_grants = Table(
    "reward_grants",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("rule_id", Text, nullable=False),
    Column("user_id", BigInteger, nullable=False),
    Column("reference", Text, nullable=False),
    Column("slot", Text, nullable=False),
    Column("credits", BigInteger, nullable=False),
    Column("granted_at", _TS, nullable=False),
    UniqueConstraint("rule_id", "user_id", "reference", name="reward_grants_reference"),
    UniqueConstraint("rule_id", "user_id", "slot", name="reward_grants_slot"),
)

ledger_schema = Table(
    "ledger_schema",
    metadata,
    Column("version", Integer, nullable=False),
)


def _v1(conn: Connection) -> None:
    metadata.create_all(conn, tables=[accounts, entries, usage_hourly, dead_letters])


def _v2_entries_endpoint(conn: Connection) -> None:
    """entries.endpoint (the charge's API). A database created by _v1 from the
    current table definitions has it already."""
    if "endpoint" not in {c["name"] for c in inspect(conn).get_columns("entries")}:
        conn.execute(text("ALTER TABLE entries ADD COLUMN endpoint TEXT"))


def _v3_credit_store(conn: Connection) -> None:
    metadata.create_all(conn, tables=[orders, reward_grants])


# Append-only: each step runs once, in order, in its own transaction with the
# version bump. Never edit a released step; add the next one.
MIGRATIONS: Final[tuple[Callable[[Connection], None], ...]] = (
    _v1,
    _v2_entries_endpoint,
    _v3_credit_store,
)
SCHEMA_VERSION: Final = len(MIGRATIONS)
