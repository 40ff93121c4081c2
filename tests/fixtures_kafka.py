"""Real Kafka-protocol broker fixture (being written)."""
