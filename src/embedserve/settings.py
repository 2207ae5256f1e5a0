"""One typed Settings object, built once at start-up (flags over EMBEDSERVE_* environment over defaults)
and passed down explicitly; nothing else reads the environment."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, JsonValue, field_validator, model_validator
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


def _flag(group: str, *, metavar: str | None = None, default: str | None = None) -> dict[str, JsonValue]:
    """How a setting shows as a `serve` flag (cli/flags.py reads it): its section of `--help`, the
    placeholder of its value, and what its default means where the value alone does not say."""
    extra: dict[str, JsonValue] = {"group": group}
    if metavar is not None:
        extra["metavar"] = metavar
    if default is not None:
        extra["default_text"] = default
    return extra


class Settings(BaseSettings):
    """Each field is a flag of `embedserve serve` (cli/flags.py: its description is the flag's help) and
    an EMBEDSERVE_<FIELD> variable; list fields take comma-separated values from the environment."""

    model_config = SettingsConfigDict(env_prefix="EMBEDSERVE_", extra="ignore", frozen=True)

    # ---- models
    models: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="a bundled model, a local folder, a Hugging Face repo id, or ID=SOURCE",
        json_schema_extra=_flag("models", metavar="MODEL", default=f"the bundled {DEFAULT_MODEL}"),
    )
    models_file: Path | None = Field(
        None,
        description="a catalog declaring several models ([[models]] tables)",
        json_schema_extra=_flag("models", metavar="TOML"),
    )
    allow_download: bool = Field(
        False,
        description="fetch missing weights from the Hugging Face hub",
        json_schema_extra=_flag("models"),
    )
    aliases: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="another name for a served model, e.g. text-embedding-3-small=all-MiniLM-L6-v2",
        json_schema_extra=_flag("models", metavar="NAME=MODEL"),
    )
    tiktoken_ids: TiktokenName | None = Field(
        None,
        description="read token-id inputs that are not the model's own as this tiktoken encoding's "
        "(LangChain's default), tokenizing their text with the model's own tokenizer (per model: "
        "tiktoken_ids in the models file)",
        json_schema_extra=_flag("models"),
    )
    tiktoken_file: Path | None = Field(
        None,
        description="the encoding's .tiktoken ranks file",
        json_schema_extra=_flag("models", metavar="PATH", default="tiktoken's cache, TIKTOKEN_CACHE_DIR"),
    )
    backend: BackendName = Field(
        "auto", description="auto: ONNX Runtime on CPU, torch on CUDA", json_schema_extra=_flag("models")
    )
    device: DeviceName = Field("auto", description="auto: CUDA if present", json_schema_extra=_flag("models"))
    dtype: DtypeName = Field(
        "auto",
        description="auto: float32 on CPU, bfloat16/float16 on CUDA",
        json_schema_extra=_flag("models"),
    )
    quantize: Quantize = Field(
        "none", description="int8: dynamically quantized ONNX graph (CPU)", json_schema_extra=_flag("models")
    )

    # ---- auth: with no key of any kind (these, or one in the key store) the server runs open.
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        repr=False,
        description="an accepted Bearer key, unlimited; with no key of any kind the server runs open",
        json_schema_extra=_flag("auth", metavar="KEY"),
    )
    admin_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        repr=False,
        description="a key that may also call the management and usage routes",
        json_schema_extra=_flag("auth", metavar="KEY"),
    )
    key_pepper: str | None = Field(
        None,
        repr=False,
        description="HMAC pepper of stored keys; replicas and the CLI sharing a database need the same",
        json_schema_extra=_flag(
            "auth", metavar="SECRET", default="the file <data-dir>/key-pepper, created on first use"
        ),
    )

    # ---- storage: the key store and usage ledger
    data_dir: Path = Field(
        default_factory=default_data_dir,
        description="the server's state: SQLite database, key pepper, ONNX cache under onnx/",
        json_schema_extra=_flag("storage", metavar="PATH", default="./.embedserve"),
    )
    # The URL may hold a password, hence repr=False.
    database_url: str | None = Field(
        None,
        repr=False,
        description="postgresql://... to share keys and usage between replicas, or sqlite:///PATH",
        json_schema_extra=_flag("storage", metavar="URL", default="SQLite <data-dir>/embedserve.db"),
    )
    usage_flush_interval: float = Field(
        1.0,
        gt=0,
        le=60,
        description="how often usage records are written (a crash loses at most this much)",
        json_schema_extra=_flag("storage", metavar="SECONDS"),
    )
    # A setting because the default, in data_dir, may be on the very file system that failed.
    usage_journal: Path | None = Field(
        None,
        description="where usage records the database would not take at shutdown wait for the next start",
        json_schema_extra=_flag("storage", metavar="PATH", default=f"<data-dir>/{USAGE_JOURNAL_FILE}"),
    )

    # ---- request limits
    max_inputs_per_request: int = Field(
        2048, ge=1, description="items in a request's input", json_schema_extra=_flag("limits", metavar="N")
    )
    max_tokens_per_request: int = Field(
        300_000,
        ge=1,
        description="tokens of a request's inputs together",
        json_schema_extra=_flag("limits", metavar="N"),
    )
    max_body_bytes: int = Field(
        16 * 1024 * 1024,
        ge=1024,
        description="largest accepted request body (413 beyond)",
        json_schema_extra=_flag("limits", metavar="BYTES", default="16777216, 16 MiB"),
    )
    truncate: bool = Field(
        False,
        description="cut over-long inputs to the model's limit instead of answering 400",
        json_schema_extra=_flag("limits"),
    )
    request_timeout: float = Field(
        120.0,
        gt=0,
        description="a request not answered by then gets 503 and its queued inputs are dropped",
        json_schema_extra=_flag("limits", metavar="SECONDS"),
    )

    # ---- batching and backpressure; None: the device's default (scheduler.packing.batch_limits,
    # backends.threads, backends.memory).
    max_batch_tokens: int | None = Field(
        None,
        ge=1,
        description="token slots (padding included) per forward pass",
        json_schema_extra=_flag(
            "batching", metavar="N", default="256 per thread of a pass on CPU, 16384 on CUDA"
        ),
    )
    max_batch_items: int = Field(
        256, ge=1, description="inputs per forward pass", json_schema_extra=_flag("batching", metavar="N")
    )
    max_batch_wait_ms: float | None = Field(
        None,
        ge=0,
        le=1000,
        description="under load, how long a batch may wait to fill, never when idle",
        json_schema_extra=_flag("batching", metavar="MS", default="0 on CPU, 2 on CUDA"),
    )
    model_workers: int | None = Field(
        None,
        ge=1,
        description="onnx on CPU: forward passes run at once per model, each on cores/N threads",
        json_schema_extra=_flag("batching", metavar="N", default="2 from 2 cores, then one per 4 cores"),
    )
    cpu_cores: int | None = Field(
        None,
        ge=1,
        description="CPU cores the models' forward passes share (workers x threads), e.g. a replica's share",
        json_schema_extra=_flag("batching", metavar="N", default="the cores this process may run on"),
    )
    tokenizer_threads: int = Field(
        2,
        ge=1,
        description="tokenizer worker threads (each model holds one tokenizer per thread)",
        json_schema_extra=_flag("batching", metavar="N"),
    )
    max_queued_inputs: int = Field(
        8192,
        ge=1,
        description="online inputs that may wait per model (a batch job's are not counted); beyond it "
        "requests get 503 at once",
        json_schema_extra=_flag("batching", metavar="N"),
    )
    # Seconds of online work queued ahead of a request: its tokens over the measured throughput.
    max_queue_wait: float = Field(
        10.0,
        gt=0,
        description="a request that would wait longer than this for the online work queued ahead of it "
        "gets 503 at once",
        json_schema_extra=_flag("batching", metavar="SECONDS"),
    )
    max_batch_memory: Annotated[int, BeforeValidator(parse_size)] | None = Field(
        None,
        ge=1 << 20,
        description="memory the forward passes running at once may hold, e.g. 8GiB",
        json_schema_extra=_flag(
            "batching", metavar="SIZE", default="half the memory left once the models are loaded"
        ),
    )

    # ---- files and batches (the Batch API)
    files_dir: Path | None = Field(
        None,
        description="where uploaded files and batch outputs are kept",
        json_schema_extra=_flag("batch", metavar="PATH", default="<data-dir>/files"),
    )
    max_file_bytes: Annotated[int, BeforeValidator(parse_size)] = Field(
        200 * 1000**2,
        ge=1,
        description="largest uploaded file (413 as soon as an upload passes it), e.g. 200MB",
        json_schema_extra=_flag("batch", metavar="SIZE", default="200000000, 200 MB"),
    )
    files_min_free: Annotated[int, BeforeValidator(parse_size)] = Field(
        256 * 1024**2,
        ge=0,
        description="free space an upload must leave on the files' disk (507 before it would not)",
        json_schema_extra=_flag("batch", metavar="SIZE", default="268435456, 256 MiB"),
    )
    file_expiry: float = Field(
        30 * 86400.0,
        gt=0,
        description="uploaded files and batch outputs are removed this long after they are created",
        json_schema_extra=_flag("batch", metavar="SECONDS", default="2592000, 30 days"),
    )
    batch_max_requests: int = Field(
        50_000,
        ge=1,
        description="lines of a batch's input file",
        json_schema_extra=_flag("batch", metavar="N"),
    )
    batch_max_inputs: int = Field(
        50_000,
        ge=1,
        description="embedding inputs of a batch's lines together",
        json_schema_extra=_flag("batch", metavar="N"),
    )
    batch_window: float = Field(
        86400.0,
        gt=0,
        description='how long a batch\'s "24h" completion window really is; past it the batch expires',
        json_schema_extra=_flag("batch", metavar="SECONDS", default="86400, 24 hours"),
    )
    batch_max_queued_tokens: int = Field(
        50_000_000,
        ge=1,
        description="tokens a key's unfinished batches may hold (a batch beyond fails validation)",
        json_schema_extra=_flag("batch", metavar="N"),
    )
    sweep_interval: float = Field(
        60.0,
        gt=0,
        description="how often expired batches and files are looked for",
        json_schema_extra=_flag("batch", metavar="SECONDS"),
    )

    # ---- scale out: Ray and shared limits (docs/scale-out.md)
    ray: bool = Field(
        False,
        description="serve as a Ray Serve application: replicas behind Ray Serve's proxy (embedserve[ray])",
        json_schema_extra=_flag("scale"),
    )
    ray_address: str | None = Field(
        None,
        description="the Ray cluster to join (HOST:6379 or ray://HOST:10001)",
        json_schema_extra=_flag("scale", metavar="ADDR", default="none: start a local Ray on this machine"),
    )
    replicas: int = Field(
        1,
        ge=1,
        description="with --ray: server replicas; with --batch-executor ray: a batch job's embedding actors",
        json_schema_extra=_flag("scale", metavar="N"),
    )
    autoscale: str | None = Field(
        None,
        pattern=r"^\s*\d+\s*,\s*\d+\s*$",
        description="with --ray: MIN,MAX replicas, scaled on ongoing requests (instead of --replicas)",
        json_schema_extra=_flag("scale", metavar="MIN,MAX", default="none: --replicas, fixed"),
    )
    batch_executor: Literal["local", "ray"] = Field(
        "local",
        description="where batches run: local (in this server's idle capacity) or ray (a Ray Data job)",
        json_schema_extra=_flag("scale"),
    )
    batch_store: str | None = Field(
        None,
        description="with --batch-executor ray: where the cluster reads inputs and writes results",
        json_schema_extra=_flag("scale", metavar="URI", default="the files dir"),
    )
    rate_limit_store: str | None = Field(
        None,
        description="redis://HOST:PORT/DB: rate limits shared by every server using it",
        json_schema_extra=_flag("scale", metavar="URL", default="none: this process's own buckets"),
    )
    rate_limit_fallback: Literal["local", "refuse"] = Field(
        "local",
        description="when the rate-limit store is unreachable: local (count in this process) or refuse (503)",
        json_schema_extra=_flag("scale"),
    )

    # ---- HTTP
    host: str = Field("127.0.0.1", description="listen address", json_schema_extra=_flag("http"))
    port: int = Field(8000, ge=0, le=65535, description="listen port", json_schema_extra=_flag("http"))
    shutdown_grace: float = Field(
        30.0,
        ge=0,
        description="after SIGTERM, how long in-flight requests may take to finish",
        json_schema_extra=_flag("http", metavar="SECONDS"),
    )
    header_timeout: float = Field(
        10.0,
        gt=0,
        description="how long a client may take to send a request's line and headers (then 408)",
        json_schema_extra=_flag("http", metavar="SECONDS"),
    )
    max_header_bytes: int = Field(
        32 * 1024,
        ge=1024,
        description="largest request line + headers (431 beyond)",
        json_schema_extra=_flag("http", metavar="BYTES"),
    )

    # ---- logging
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="the least severe level logged", json_schema_extra=_flag("logging")
    )
    log_format: Literal["text", "json"] = Field(
        "text",
        description="json: one object per line with the request's fields",
        json_schema_extra=_flag("logging"),
    )

    @field_validator("models", "aliases", "api_keys", "admin_keys", mode="before")
    @classmethod
    def _csv(cls, value: object) -> object:
        return _split_csv(value)

    @model_validator(mode="after")
    def _queue_holds_a_request(self) -> Settings:
        if self.max_queued_inputs < self.max_inputs_per_request:
            raise ValueError(
                f"max_queued_inputs ({self.max_queued_inputs}) must be at least "
                f"max_inputs_per_request ({self.max_inputs_per_request}): a request that "
                "fits no queue could never be served"
            )
        return self

    @model_validator(mode="after")
    def _autoscale_is_a_range(self) -> Settings:
        if self.autoscale is not None:
            low, high = self.autoscale_range or (0, 0)
            if not 1 <= low <= high:
                raise ValueError(f"autoscale {self.autoscale!r}: MIN,MAX with 1 <= MIN <= MAX")
        return self

    @property
    def autoscale_range(self) -> tuple[int, int] | None:
        """--autoscale MIN,MAX as numbers (None: a fixed --replicas)."""
        if self.autoscale is None:
            return None
        low, high = (int(part) for part in self.autoscale.split(","))
        return low, high

    @property
    def files_path(self) -> Path:
        return self.files_dir or self.data_dir / "files"

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
