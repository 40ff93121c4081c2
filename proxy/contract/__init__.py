"""What the proxy and any ledger share: the charge event, the Redis key layout and
snapshot codec, payer ids and timestamps. Imports nothing else of the project."""
