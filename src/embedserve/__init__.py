"""embedserve: a self-hostable, OpenAI-compatible text-embeddings API server."""

__version__ = "0.1.0"
