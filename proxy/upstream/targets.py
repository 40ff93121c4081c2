"""The order in which an alias's targets are tried: lowest `priority` first,
weighted random within a priority (each target first in proportion to its weight)."""

from __future__ import annotations

import random
from collections.abc import Sequence

from proxy.config.model import Target


def weighted_order(targets: Sequence[Target], rng: random.Random) -> list[Target]:
    """Priority groups ascending; within a group a weighted random permutation
    (Efraimidis-Spirakis: key u**(1/w), largest first), so the first target of a
    group is each one with probability weight / sum of the group's weights."""
    if len(targets) == 1:
        return [targets[0]]
    rand = rng.random
    keyed = [(t.priority, -(rand() ** (1.0 / t.weight)), i) for i, t in enumerate(targets)]
    keyed.sort()
    return [targets[i] for _, _, i in keyed]
