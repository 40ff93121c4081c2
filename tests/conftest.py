"""Shared fixtures. Real servers (redis-server, the Kafka-protocol broker) live in
their own plugin modules so each can be read on its own."""

pytest_plugins = ["tests.fixtures_redis", "tests.fixtures_kafka"]
