"""Prometheus collectors on a per-app registry (no process-global registry, so two apps in one process
never share counters). Names follow `embedserve_<thing>_<unit>`; labels are bounded: route templates,
catalog model ids, status codes and key ids, never raw paths or client-supplied names."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from embedserve.health import Health
from embedserve.types import WorkClass

#: Latency buckets in seconds: 1 ms to 2 min (an 8192-token input on 2 CPU cores takes seconds).
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)
#: Inputs per forward pass (the batcher's item limit defaults to 256).
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
#: Real tokens per forward pass (the token budget defaults to 16384).
BATCH_TOKEN_BUCKETS = (16, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: The route whose requests name a model (api.routes.EMBEDDINGS_PATH; a test pins that they agree).
EMBEDDINGS_ROUTE = "/v1/embeddings"
#: Why the batcher refuses or drops inputs (`embedserve_rejected_inputs_total{reason}`).
REJECT_REASONS = ("queue_full", "queue_wait", "cancelled")


class Metrics:
    """Everything the server reports. The batcher and service call the `observe_*` methods; the
    `/metrics` route renders `exposition()`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "embedserve_requests",
            "HTTP requests answered, by route template, model and status",
            ("route", "model", "status"),
            registry=r,
        )
        self.request_seconds = Histogram(
            "embedserve_request_duration_seconds",
            "Time from the request's first byte to its response, by route",
            ("route",),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokenize_seconds = Histogram(
            "embedserve_tokenize_duration_seconds",
            "Tokenization time of one request",
            ("model",),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokenized = Counter(
            "embedserve_tokenized_tokens",
            "Tokens the tokenizer made, for requests served or refused (its work, which limits bound)",
            ("model",),
            registry=r,
        )
        self.queue_seconds = Histogram(
            "embedserve_queue_wait_seconds",
            "Time an online input waited in the batcher before its forward pass started",
            ("model",),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_queue_seconds = Histogram(
            "embedserve_batch_queue_wait_seconds",
            "Time a batch job's input waited in the batcher before its forward pass started (it goes "
            "only when no online input waits)",
            ("model",),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_seconds = Histogram(
            "embedserve_inference_duration_seconds",
            "Time of one forward pass (a batch)",
            ("model",),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_inputs = Histogram(
            "embedserve_batch_size_inputs",
            "Inputs per forward pass",
            ("model",),
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.batch_tokens = Histogram(
            "embedserve_batch_tokens",
            "Real (unpadded) tokens per forward pass",
            ("model",),
            buckets=BATCH_TOKEN_BUCKETS,
            registry=r,
        )
        self.batch_padding = Counter(
            "embedserve_batch_padding_tokens",
            "Padding slots computed and thrown away",
            ("model",),
            registry=r,
        )
        self.tokens = Counter(
            "embedserve_embedded_tokens",
            "Input tokens embedded for successful requests (what usage bills), by model and key id",
            ("model", "key_id"),
            registry=r,
        )
        self.inputs = Counter(
            "embedserve_embedded_inputs",
            "Inputs embedded for successful requests",
            ("model", "key_id"),
            registry=r,
        )
        self.rejected = Counter(
            "embedserve_rejected_inputs",
            "Inputs refused at admission (queue "
            "full) or dropped before reaching the model (client gone, deadline)",
            ("model", "reason"),
            registry=r,
        )
        self.queue_depth = Gauge(
            "embedserve_queue_depth_inputs",
            "Online inputs admitted and not yet in a forward pass (being tokenized or waiting in the "
            "batcher)",
            ("model",),
            registry=r,
        )
        self.batch_queue_depth = Gauge(
            "embedserve_batch_queue_depth_inputs",
            "Batch jobs' inputs admitted and not yet in a forward pass",
            ("model",),
            registry=r,
        )
        self.rate_limit_store_errors = Counter(
            "embedserve_rate_limit_store_errors",
            "Failed calls to the shared rate-limit store (requests' and the recovery probe's, which "
            "backs off to one every 2 s): rising while Redis is unreachable",
            registry=r,
        )
        self.in_flight = Gauge("embedserve_requests_in_flight", "HTTP requests being served", registry=r)
        self.model_load_seconds = Gauge(
            "embedserve_model_load_seconds", "Time to load and warm up a model", ("model",), registry=r
        )
        self.model_ready = Gauge(
            "embedserve_model_ready",
            "1 when the model serves, 0 while loading or after a failed load",
            ("model",),
            registry=r,
        )
        # process_resident_memory_bytes and friends, under our prefix.
        ProcessCollector(namespace="embedserve", registry=r)

    def declare_model(self, model: str) -> None:
        """Create every series labelled with `model` at zero, before its first request: a scrape right
        after start lists them, and rate() over a counter's first increase is not lost (Prometheus
        practice). The load time and per-key counters appear when there is something to report."""
        for histogram in (
            self.tokenize_seconds,
            self.queue_seconds,
            self.batch_queue_seconds,
            self.inference_seconds,
            self.batch_inputs,
            self.batch_tokens,
        ):
            histogram.labels(model)
        self.batch_padding.labels(model)
        self.tokenized.labels(model)
        for reason in REJECT_REASONS:
            self.rejected.labels(model, reason)
        self.queue_depth.labels(model).set(0)
        self.batch_queue_depth.labels(model).set(0)
        self.model_ready.labels(model).set(0)
        self.requests.labels(EMBEDDINGS_ROUTE, model, "200")
        self.request_seconds.labels(EMBEDDINGS_ROUTE)

    # ---- observations --------------------------------------------------------------------------

    def observe_request(self, route: str, model: str, status: int, seconds: float) -> None:
        self.requests.labels(route, model, str(status)).inc()
        self.request_seconds.labels(route).observe(seconds)

    def observe_tokenize(self, model: str, seconds: float, tokens: int = 0) -> None:
        self.tokenize_seconds.labels(model).observe(seconds)
        self.tokenized.labels(model).inc(tokens)

    def observe_batch(
        self,
        model: str,
        *,
        waits: Sequence[float],
        seconds: float,
        real_tokens: int,
        slots: int,
        batch_waits: Sequence[float] = (),
    ) -> None:
        """One forward pass: `waits` are its online inputs' queue waits, `batch_waits` its batch-class
        inputs'."""
        for histogram, observed in ((self.queue_seconds, waits), (self.batch_queue_seconds, batch_waits)):
            queue = histogram.labels(model)
            for wait in observed:
                queue.observe(wait)
        self.inference_seconds.labels(model).observe(seconds)
        self.batch_inputs.labels(model).observe(len(waits) + len(batch_waits))
        self.batch_tokens.labels(model).observe(real_tokens)
        self.batch_padding.labels(model).inc(slots - real_tokens)

    def observe_embedded(self, model: str, key_id: str, inputs: int, tokens: int) -> None:
        self.inputs.labels(model, key_id).inc(inputs)
        self.tokens.labels(model, key_id).inc(tokens)

    def observe_rejected(self, model: str, reason: str, inputs: int) -> None:
        self.rejected.labels(model, reason).inc(inputs)

    def track_queue(self, model: str, depth: Callable[[WorkClass], int]) -> None:
        """`depth(work)`: the inputs of that class queued (read at each scrape)."""
        self.queue_depth.labels(model).set_function(lambda: depth("online"))
        self.batch_queue_depth.labels(model).set_function(lambda: depth("batch"))

    def model_loaded(self, model: str, seconds: float) -> None:
        self.model_load_seconds.labels(model).set(seconds)
        self.model_ready.labels(model).set(1)

    def model_failed(self, model: str) -> None:
        self.model_ready.labels(model).set(0)

    def track_health(self, pending: Callable[[], int], *, ledger: Health, keys: Health) -> None:
        self.registry.register(_HealthCollector(pending, ledger, keys))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _HealthCollector(Collector):
    """The usage ledger's and the key ring's health, read at each scrape from the objects that /health
    reads too (their owners count; nothing here is updated twice)."""

    def __init__(self, pending: Callable[[], int], ledger: Health, keys: Health) -> None:
        self._pending, self._ledger, self._keys = pending, ledger, keys

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "embedserve_usage_pending_records",
            "Usage records not written to the database yet",
            value=self._pending(),
        )
        yield CounterMetricFamily(
            "embedserve_usage_write_failures",
            "Failed writes of usage records (each retry counts)",
            value=self._ledger.failures,
        )
        yield CounterMetricFamily(
            "embedserve_keys_refresh_failures", "Failed polls of the key store", value=self._keys.failures
        )
        for name, help_text, health in (
            (
                "embedserve_usage_last_write_timestamp_seconds",
                "Unix time the usage ledger last had "
                "nothing left to write (a write succeeded, or there was none to do)",
                self._ledger,
            ),
            (
                "embedserve_keys_last_refresh_timestamp_seconds",
                "Unix time of the last poll that reached the key store",
                self._keys,
            ),
        ):
            family = GaugeMetricFamily(name, help_text)
            if health.last_success is not None:
                family.add_metric([], health.last_success)
            yield family
