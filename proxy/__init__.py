"""OpenAI-compatible LLM reverse proxy with credit billing."""

__version__ = "0.1.0"
