"""Getting charge events out: the durable outbox, its publisher loop and the sinks
(Kafka, or a JSON-lines file). Knows nothing of HTTP or prices."""
