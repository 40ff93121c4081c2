"""Talking to providers: connection pools, the per-request watchdog, the one
failure classifier, SSE framing and the relays (JSON, stream) that meter as they
go. Never prices or charges."""
