"""The reference credit ledger: its own process (`llm-proxy ledger`) and admin CLI.
Imports only the contract, config and the Kafka edge, never the request path."""
