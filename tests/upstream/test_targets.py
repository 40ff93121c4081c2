from __future__ import annotations

import random
from collections import Counter

from proxy.config.model import Provider, RoutingPolicy, Target
from proxy.upstream.router import backoff_s, retry_after_s
from proxy.upstream.targets import weighted_order


def target(name: str, weight: float = 1.0, priority: int = 0) -> Target:
    p = Provider(name=name, base_url="http://x/v1", api_key_env=None, api_key=None)
    return Target(p, f"m-{name}", None, weight=weight, priority=priority)


def test_weights_spread_the_first_choice_within_ten_percent() -> None:
    targets = [target("a", 1), target("b", 3), target("c", 6)]
    rng = random.Random(20)
    n = 10_000
    firsts = Counter(weighted_order(targets, rng)[0].provider.name for _ in range(n))
    for name, weight in (("a", 1), ("b", 3), ("c", 6)):
        expected = n * weight / 10
        assert abs(firsts[name] - expected) <= expected * 0.10, (name, firsts)


def test_lower_priority_groups_come_first_and_every_target_once() -> None:
    targets = [target("late", 100, priority=2), target("x", 1), target("y", 1), target("z", 1, 1)]
    rng = random.Random(1)
    for _ in range(200):
        order = [t.provider.name for t in weighted_order(targets, rng)]
        assert sorted(order[:2]) == ["x", "y"] and order[2:] == ["z", "late"]


def test_retry_after_hints() -> None:
    assert retry_after_s({"retry-after-ms": "250"}) == 0.25
    assert retry_after_s({"retry-after": "2"}) == 2.0
    assert retry_after_s({"retry-after-ms": "junk", "retry-after": "3"}) == 3.0
    assert retry_after_s({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0
    assert retry_after_s({"retry-after": "nan"}) == 0.0
    assert retry_after_s({}) == 0.0


def test_backoff_is_exponential_jittered_capped_and_honours_the_hint() -> None:
    policy = RoutingPolicy(backoff_base_ms=100, backoff_max_ms=400)
    rng = random.Random(3)
    for tries, (low, high) in {1: (0.05, 0.1), 2: (0.1, 0.2), 3: (0.2, 0.4), 9: (0.2, 0.4)}.items():
        for _ in range(50):
            assert low <= backoff_s(policy, tries, rng, 0.0) <= high
    assert backoff_s(policy, 1, rng, 1.5) == 1.5
    assert backoff_s(RoutingPolicy(backoff_base_ms=0), 4, rng, 0.0) == 0.0
