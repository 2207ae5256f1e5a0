"""embedserve: a self-hostable, OpenAI-compatible text-embeddings server, and its engine as a library
(`Engine`, `EngineSync`). Its errors are in `embedserve.errors`."""

__version__ = "0.1.0"  # (first: modules imported below read it)

from embedserve.backends.factory import BackendFactory
from embedserve.engine import Embeddings, Engine
from embedserve.errors import EmbedServeError
from embedserve.settings import Settings
from embedserve.sync import EngineSync

__all__ = [
    "BackendFactory",
    "EmbedServeError",
    "Embeddings",
    "Engine",
    "EngineSync",
    "Settings",
    "__version__",
]
