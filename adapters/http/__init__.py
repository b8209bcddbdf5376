"""The HTTP adapter: OpenAI-compatible API, the seed's multipart form, web chat page, health, metrics."""

from adapters.http.server import HttpAdapter

__all__ = ["HttpAdapter"]
