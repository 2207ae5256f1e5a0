"""EngineSync: the engine for scripts and notebooks, blocking calls on an event loop of its own (in a
background thread), so it works where a loop already runs (Jupyter) and from many threads at once."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Sequence
from types import TracebackType
from typing import Any, TypeVar

from embedserve.backends.factory import BackendFactory, make_backend
from embedserve.engine import Embeddings, Engine, Inputs
from embedserve.errors import ShuttingDown
from embedserve.types import OutputDtype, OutputName, WorkClass

T = TypeVar("T")


class EngineSync:
    """Blocking twin of Engine. Calls from several threads are batched together as concurrent requests.

    with EngineSync.open(["all-MiniLM-L6-v2"]) as engine:
        vectors = engine.embed("all-MiniLM-L6-v2", ["a text", "another"]).vectors
    """

    def __init__(self, engine: Engine) -> None:
        """Loads `engine`'s models before returning (ModelLoadError if one fails)."""
        self.engine = engine
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="embedserve-engine", daemon=True)
        self._thread.start()
        self._closed = False
        self._lock = threading.Lock()
        try:
            self._call(engine.__aenter__())
        except BaseException:
            self._stop()
            raise

    @classmethod
    def open(
        cls,
        models: str | Sequence[str] | None = None,
        *,
        backends: BackendFactory = make_backend,
        **settings: Any,
    ) -> EngineSync:
        """As Engine.open, loaded and ready when it returns."""
        return cls(Engine.open(models, backends=backends, **settings))

    def embed(
        self,
        model: str,
        inputs: Inputs,
        *,
        dimensions: int | None = None,
        input_type: str | None = None,
        instruction: str | None = None,
        outputs: Sequence[OutputName] = ("dense",),
        output_dtype: OutputDtype = "float32",
        work: WorkClass = "online",
    ) -> Embeddings:
        """Engine.embed, blocking until the vectors are ready."""
        if self._closed:
            raise ShuttingDown("The engine is closed; it takes no new work.", retry_after_s=5)
        return self._call(
            self.engine.embed(
                model,
                inputs,
                dimensions=dimensions,
                input_type=input_type,
                instruction=instruction,
                outputs=outputs,
                output_dtype=output_dtype,
                work=work,
            )
        )

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """A coroutine on the engine's loop (one that drives `self.engine`'s async API), blocking until
        it returns."""
        return self._call(coroutine)

    def close(self, grace: float | None = None) -> None:
        """Engine.close (calls in flight in other threads finish first), then stop the loop's thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._call(self.engine.close(grace))
        finally:
            self._stop()

    def __enter__(self) -> EngineSync:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def _stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
