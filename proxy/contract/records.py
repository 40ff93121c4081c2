"""`record`: an immutable value class for the request path, at a mutable one's cost.

A `@dataclass(frozen=True, slots=True)` stores each field through `object.__setattr__`
(frozen classes forbid plain assignment): ~1,300 interpreter instructions a field,
so the ~60 fields of the records one charged request builds (usage, report, charge,
charge event, billing context...) cost ~20 µs. `@record` is that frozen dataclass for
the type checker (mypy refuses any assignment to a field, as for `frozen=True`), and
at run time a slotted dataclass with plain stores and a field hash (`unsafe_hash`:
hashable like the frozen class). Nothing in this code base assigns to a record's
field after construction; mypy keeps it that way. `dataclasses.replace` works as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar, dataclass_transform

T = TypeVar("T")


@dataclass_transform(frozen_default=True)
def record(cls: type[T]) -> type[T]:
    return dataclass(slots=True, unsafe_hash=True)(cls)
