"""Shared fixtures. Real servers (redis-server, the Kafka-protocol broker) and the
proxy-in-front-of-a-fake-upstream harness live in their own plugin modules."""

pytest_plugins = [
    "tests.fixtures_redis",
    "tests.fixtures_redis_cluster",
    "tests.fixtures_kafka",
    "tests.fixtures_postgres",
    "tests.fixtures_proxy",
    "tests.fixtures_credit_api",
]
