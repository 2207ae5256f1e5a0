"""One typed Settings object, built once at start-up (flags over EMBEDSERVE_* environment over defaults)
and passed down explicitly; nothing else reads the environment."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from embedserve.types import BackendName, DeviceName, DtypeName, Quantize, TiktokenName

DEFAULT_MODEL = "all-MiniLM-L6-v2"
USAGE_JOURNAL_FILE = "usage-journal.jsonl"  # under data_dir unless usage_journal says otherwise


def default_data_dir() -> Path:
    """Where the server keeps its state (the SQLite database, the key pepper, exported ONNX graphs):
    `.embedserve` in the working directory, next to the project that runs it."""
    return Path(".embedserve")


_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1024**4,
}


def parse_size(value: object) -> object:
    """`8GiB`, `512MB`, `1.5G` or a plain number of bytes -> bytes (other values pass through for
    pydantic to refuse)."""
    if isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        number = text.rstrip("kmgtib")
        unit = text[len(number) :]
        try:
            if unit in _SIZE_UNITS:
                return int(float(number) * _SIZE_UNITS[unit])
        except ValueError:
            pass
    return value


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EMBEDSERVE_", extra="ignore", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)

    # Models: `--model` specs (id, alias, folder, hub repo id, or NAME=SOURCE) and/or a catalog file.
    models: Annotated[list[str], NoDecode] = Field(default_factory=list)
    models_file: Path | None = None
    allow_download: bool = False
    # `--alias NAME=MODEL`: more names for a served model (clients' defaults, text-embedding-3-small).
    aliases: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Token-id inputs that are not the model's own are read as this tiktoken encoding's (LangChain's
    # default); its ranks come from tiktoken's cache or `tiktoken_file`.
    tiktoken_ids: TiktokenName | None = None
    tiktoken_file: Path | None = None
    backend: BackendName = "auto"
    device: DeviceName = "auto"
    dtype: DtypeName = "auto"
    quantize: Quantize = "none"
    data_dir: Path = Field(default_factory=default_data_dir)

    # Auth: comma-separated in EMBEDSERVE_API_KEYS / EMBEDSERVE_ADMIN_KEYS. With none of these and no
    # key in the key store, the server runs open.
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list, repr=False)
    admin_keys: Annotated[list[str], NoDecode] = Field(default_factory=list, repr=False)
    # HMAC pepper of stored keys; default: `<data_dir>/key-pepper`, created on first use.
    key_pepper: str | None = Field(None, repr=False)

    # Key store and usage ledger: SQLite under data_dir, or postgresql://... (the URL may hold a
    # password, hence repr=False).
    database_url: str | None = Field(None, repr=False)
    usage_flush_interval: float = Field(1.0, gt=0, le=60)  # seconds; the crash-loss bound
    # Where records the database would not take at shutdown wait for the next start (default: in
    # data_dir, which may be the very file system that failed: hence a setting).
    usage_journal: Path | None = None

    # Request limits.
    max_inputs_per_request: int = Field(2048, ge=1)
    max_tokens_per_request: int = Field(300_000, ge=1)
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    truncate: bool = False

    # Batching.
    # None: the device's default (scheduler.packing.batch_limits; backends.threads).
    max_batch_tokens: int | None = Field(None, ge=1)
    max_batch_items: int = Field(256, ge=1)
    max_batch_wait_ms: float | None = Field(None, ge=0, le=1000)
    model_workers: int | None = Field(None, ge=1)
    tokenizer_threads: int = Field(2, ge=1)

    # Backpressure and HTTP limits.
    max_queued_inputs: int = Field(8192, ge=1)  # per model; beyond it 503 at once
    # Seconds of work that may be queued ahead of a request (tokens over the measured throughput).
    max_queue_wait: float = Field(10.0, gt=0)
    # Bytes the forward passes running at once may hold; None: half the memory left once loaded.
    max_batch_memory: int | None = Field(None, ge=1 << 20)
    request_timeout: float = Field(120.0, gt=0)  # seconds from the request's arrival to its answer
    shutdown_grace: float = Field(30.0, ge=0)  # seconds in-flight requests get after SIGTERM
    header_timeout: float = Field(10.0, gt=0)  # seconds a client gets to send a request's head
    max_header_bytes: int = Field(32 * 1024, ge=1024)

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"

    @field_validator("models", "aliases", "api_keys", "admin_keys", mode="before")
    @classmethod
    def _csv(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("max_batch_memory", mode="before")
    @classmethod
    def _size(cls, value: object) -> object:
        return parse_size(value)

    @model_validator(mode="after")
    def _queue_holds_a_request(self) -> Settings:
        if self.max_queued_inputs < self.max_inputs_per_request:
            raise ValueError(
                f"max_queued_inputs ({self.max_queued_inputs}) must be at least "
                f"max_inputs_per_request ({self.max_inputs_per_request}): a request that "
                "fits no queue could never be served"
            )
        return self

    @property
    def usage_journal_path(self) -> Path:
        return self.usage_journal or self.data_dir / USAGE_JOURNAL_FILE

    def tiktoken_for(self, model: TiktokenName | None) -> TiktokenName | None:
        """The tiktoken encoding whose ids a model reads: its own setting, else the server's."""
        return model or self.tiktoken_ids

    @property
    def model_args(self) -> list[str]:
        """The `--model` list, or the bundled default when neither models nor a models file is given."""
        if not self.models and self.models_file is None:
            return [DEFAULT_MODEL]
        return list(self.models)
