"""The proxy server: app and lifecycle, readiness, request validation, the
handlers (orchestration only) and the multi-process supervisor."""
