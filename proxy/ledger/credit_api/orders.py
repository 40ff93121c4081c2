"""Orders of credit packages: created `pending` once per (user, Idempotency-Key),
marked `paid` once, and their credits granted exactly once through the ledger's
idempotent grant (`grant:order:<id>`), so a replayed webhook, a retry after a crash
between the two steps, or two payments racing all end in one grant.

The payment webhook signs its body: `X-Signature: sha256=<hex of HMAC-SHA256(secret,
body)>`, the secret being `CREDIT_WEBHOOK_SECRET`.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from proxy.config.store import Package
from proxy.ledger.book import Book, grant
from proxy.ledger.reads import _iso
from proxy.ledger.schema import orders

MAX_KEY_LEN: Final = 128
KEY_RE: Final = re.compile(r"[\x21-\x7e]{1,128}")
ORDER_ID_RE: Final = re.compile(r"ord_[0-9a-f]{24}")
MAX_ORDERS_LISTED: Final = 100


@dataclass(frozen=True, slots=True)
class Order:
    id: str
    user_id: int
    package_id: str
    credits: int
    price: str
    currency: str
    status: str
    payment_reference: str | None
    created_at: str | None
    paid_at: str | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "user_id": self.user_id,
            "package_id": self.package_id,
            "credits": self.credits,
            "price": self.price,
            "currency": self.currency,
            "status": self.status,
            "created_at": self.created_at,
            "paid_at": self.paid_at,
        }


@dataclass(frozen=True, slots=True)
class Payment:
    order: Order
    granted: bool  # False: this order's credits had been granted before
    balance: int


class IdempotencyConflict(ValueError):
    """The key was used before for another package."""


def _order(r: Any) -> Order:
    return Order(
        id=r.id,
        user_id=r.user_id,
        package_id=r.package_id,
        credits=r.credits,
        price=r.price,
        currency=r.currency,
        status=r.status,
        payment_reference=r.payment_reference,
        created_at=_iso(r.created_at),
        paid_at=_iso(r.paid_at),
    )


def valid_key(raw: str | None) -> str | None:
    text = (raw or "").strip()
    return text if KEY_RE.fullmatch(text) else None


class Orders:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._book = Book(engine)
        self._insert: Any = (
            postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert
        )

    async def create(self, user_id: int, package: Package, key: str) -> tuple[Order, bool]:
        """(the order, created now?); the same key returns the same order."""
        row = {
            "id": "ord_" + secrets.token_hex(12),
            "user_id": user_id,
            "idempotency_key": key,
            "package_id": package.id,
            "credits": package.credits,
            "price": package.as_dict()["price"],
            "currency": package.currency,
            "status": "pending",
            "created_at": datetime.now(UTC),
        }
        async with self._engine.begin() as conn:
            inserted = (
                await conn.execute(
                    self._insert(orders)
                    .values(row)
                    .on_conflict_do_nothing(index_elements=["user_id", "idempotency_key"])
                    .returning(orders.c.id)
                )
            ).first()
            found = (
                await conn.execute(
                    select(orders).where(
                        orders.c.user_id == user_id, orders.c.idempotency_key == key
                    )
                )
            ).one()
        order = _order(found)
        if order.package_id != package.id:
            raise IdempotencyConflict(
                f"Idempotency-Key was used for an order of package {order.package_id!r}"
            )
        return order, inserted is not None

    async def get(self, order_id: str) -> Order | None:
        if not ORDER_ID_RE.fullmatch(order_id):
            return None
        async with self._engine.connect() as conn:
            row = (await conn.execute(select(orders).where(orders.c.id == order_id))).first()
        return None if row is None else _order(row)

    async def of_user(self, user_id: int) -> list[Order]:
        """Newest first, at most MAX_ORDERS_LISTED."""
        async with self._engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(orders)
                    .where(orders.c.user_id == user_id)
                    .order_by(orders.c.created_at.desc(), orders.c.id.desc())
                    .limit(MAX_ORDERS_LISTED)
                )
            ).all()
        return [_order(r) for r in rows]

    async def pay(self, order: Order, reference: str | None) -> Payment:
        """Mark paid (once) and grant the credits (once); safe to repeat."""
        async with self._engine.begin() as conn:
            await conn.execute(
                update(orders)
                .where(orders.c.id == order.id, orders.c.status == "pending")
                .values(status="paid", paid_at=datetime.now(UTC), payment_reference=reference)
            )
        change = await grant(
            self._book,
            order.user_id,
            order.credits,
            f"order:{order.id}",
            reason=f"order {order.id} ({order.package_id})",
        )
        paid = await self.get(order.id)
        assert paid is not None
        return Payment(paid, change.applied, change.balance)


def sign(secret: str, body: bytes) -> str:
    """The X-Signature value a payment provider sends for `body`."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def signature_ok(secret: str, body: bytes, header: str) -> bool:
    scheme, _, given = header.strip().partition("=")
    if scheme.lower() != "sha256" or not given:
        return False
    expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected.encode(), given.strip().lower().encode("ascii", "replace"))
