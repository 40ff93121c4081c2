"""Real redis-server fixture (being written)."""
