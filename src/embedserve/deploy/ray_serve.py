"""The HTTP server as a Ray Serve application (`serve --ray`; `serve run` with a config file through
`app_builder`): the same ASGI app in every replica, each with its own engine on its share of cores, Ray
Serve's proxy in front; keys, usage and rate limits shared through the database and the limit store."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Callable, Mapping
from typing import Any

from ray import serve
from ray.serve.schema import ApplicationStatus

from embedserve.api.app import create_app
from embedserve.api.state import app_state
from embedserve.backends.threads import usable_cores
from embedserve.cluster.connect import connect
from embedserve.engine import catalog_of
from embedserve.errors import ConfigError
from embedserve.logs import configure_logging
from embedserve.preflight import Store, check_store, check_tiktoken
from embedserve.ratelimit import check_store as check_limit_store
from embedserve.settings import Settings

log = logging.getLogger("embedserve.deploy")

APP_NAME = "embedserve"
DEPLOYMENT_NAME = "embedserve"
#: Requests one replica holds at once. High, so that the app's own admission (its queue bounds, the 503
#: with Retry-After in the OpenAI shape) is what pushes back, not Ray's queue in the proxy.
MAX_ONGOING_REQUESTS = 256
#: Autoscaling's aim, in ongoing requests per replica: enough concurrent requests for a replica's
#: batcher to pack several inputs per pass (the benchmark's online load is 16 clients).
TARGET_ONGOING_REQUESTS = 16
#: How often the controller checks a replica (Ray's default is 10 s): a replica killed with its node
#: is replaced within about this.
HEALTH_CHECK_PERIOD_S = 2.0
#: Beyond the drain's grace, for the lifespan's shutdown (the ledger's last flush, the models' close).
SHUTDOWN_MARGIN_S = 10.0
#: How often `serve --ray` asks Ray Serve whether the application still serves (so that a supervisor
#: sees the process exit when Ray is gone).
WATCH_S = 5.0


def replica_cores(settings: Settings) -> int:
    """A replica's share of cores: --cpu-cores, else this machine's cores over the most replicas (a local
    Ray), else one (a cluster: its nodes' sizes are not known here)."""
    if settings.cpu_cores is not None:
        return settings.cpu_cores
    if settings.ray_address is not None:
        return 1
    return max(1, usable_cores() // most_replicas(settings))


def most_replicas(settings: Settings) -> int:
    scale = settings.autoscale_range
    return settings.replicas if scale is None else scale[1]


def deployment_options(settings: Settings, cores: int) -> dict[str, Any]:
    """Ray Serve's options for the server's deployment: replicas (fixed, or autoscaled on ongoing
    requests), each reserving its `cores` (which its engine's threads use: `cpu_cores`), and a stop that
    leaves the app's drain and shutdown their time."""
    scale = settings.autoscale_range
    replicas: dict[str, Any] = (
        {"num_replicas": settings.replicas}
        if scale is None
        else {
            "autoscaling_config": {
                "min_replicas": scale[0],
                "initial_replicas": scale[0],
                "max_replicas": scale[1],
                "target_ongoing_requests": TARGET_ONGOING_REQUESTS,
            }
        }
    )
    return {
        "name": DEPLOYMENT_NAME,
        **replicas,
        "ray_actor_options": {"num_cpus": cores},
        "max_ongoing_requests": MAX_ONGOING_REQUESTS,
        "health_check_period_s": HEALTH_CHECK_PERIOD_S,
        "graceful_shutdown_timeout_s": settings.shutdown_grace + SHUTDOWN_MARGIN_S,
        # The app writes its own access log (request id, key, tokens); Ray's line per request repeats it.
        "logging_config": {"enable_access_log": False},
    }


def replica_settings(settings: Settings) -> tuple[Settings, Store]:
    """What every replica runs with: the checks made here first (schema created or migrated once, the
    pepper created once), then the pepper and the core share written in, so that every replica, on
    whichever node, checks keys with the same pepper and sizes its threads to what Ray reserved."""
    check_limit_store(settings)  # its URL and the Redis client (Redis itself may be down: replicas start)
    check_tiktoken(settings, catalog_of(settings))
    store = check_store(settings)
    resolved = settings.model_copy(
        update={"key_pepper": store.pepper.decode("utf-8"), "cpu_cores": replica_cores(settings)}
    )
    return resolved, store


class ReplicaHeaders:
    """ASGI middleware, outermost in a replica: every response names the replica that made it
    (`x-embedserve-replica`: its Ray actor's name, for the logs and `ray.kill`), and carries one
    X-Request-ID: Ray's proxy appends the request's id (the client's, else its own, which the app
    adopted) to every response, so the app's copy of that same id is dropped."""

    def __init__(self, app: Any, replica: str) -> None:
        self.app = app
        self._replica = replica.encode("latin-1")

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent_id = dict(scope["headers"]).get(b"x-request-id")

        async def send_once(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    (k, v) for k, v in message.get("headers", ()) if (k, v) != (b"x-request-id", sent_id)
                ]
                message = {**message, "headers": [*headers, (b"x-embedserve-replica", self._replica)]}
            await send(message)

        await self.app(scope, receive, send_once)


class _Replica:
    """One replica: the app, whose lifespan Ray Serve runs (database, key ring poller, usage flusher,
    models), healthy once its models are loaded."""

    def __init__(self, settings: Settings) -> None:
        configure_logging(settings.log_level, settings.log_format)
        self._settings = settings
        self.lost: list[int] = []

    def __serve_build_asgi_app__(self) -> Any:
        app = create_app(self._settings, catalog_of(self._settings), on_closed=self.lost.append)
        app.add_middleware(ReplicaHeaders, replica=serve.get_replica_context().replica_id.to_full_id_str())
        return app

    async def check_health(self) -> None:
        """Ray routes to a replica only after its first check passes, so this waits for the models to
        load (the lifespan loads them in the background); a failed load raises, and Ray replaces the
        replica. Later checks return at once."""
        await app_state(self.app).engine.wait_loaded()  # type: ignore[attr-defined]


class EmbedServeReplica(serve.ingress()(_Replica)):  # type: ignore[misc]
    async def __del__(self) -> None:
        """Ray stops routing here and waits for the requests it knows of; then the app's own drain (new
        requests 503, batch lines finished), then its lifespan's shutdown (the ledger's last flush)."""
        try:
            state = app_state(self.app)
        except (AttributeError, LookupError):  # stopped before the app started
            state = None
        if state is not None:
            await state.drain(self._settings.shutdown_grace)
        await super().__del__()
        if self.lost and self.lost != [0]:
            log.error("the replica's shutdown lost %d usage record(s)", sum(self.lost))


def application(settings: Settings) -> Any:
    """The bound Ray Serve application for `settings` (checked and resolved by `replica_settings`)."""
    cores = replica_cores(settings)
    options = deployment_options(settings, cores)
    return serve.deployment(**options)(EmbedServeReplica).bind(settings)


def builder_settings(args: Mapping[str, Any]) -> Settings:
    """A config file's `args`: settings by field name (`database_url`, `replicas`, ...; dashes read as
    underscores), over the EMBEDSERVE_* variables of the process that builds the application."""
    return Settings(**{name.replace("-", "_"): value for name, value in args.items()})


def app_builder(args: Mapping[str, Any]) -> Any:
    """For `serve run` / `serve deploy` with a config file (`import_path:
    embedserve.deploy.ray_serve:app_builder`). Host and port are the config's `http_options`: Ray Serve's
    proxy listens, not the app."""
    return application(replica_settings(builder_settings(args))[0])


def _gone() -> str | None:
    """Why the application no longer serves (Ray stopped, the application failed or was deleted by
    someone else), or None while it does: replicas that die are Ray Serve's to replace."""
    try:
        status = serve.status().applications.get(APP_NAME)
    except Exception as exc:  # (Ray raises many kinds once its cluster is gone)
        return f"Ray Serve does not answer ({type(exc).__name__})"
    if status is None:
        return "deleted"
    if status.status in (ApplicationStatus.DEPLOY_FAILED, ApplicationStatus.DELETING):
        return str(status.status)
    return None


def run(settings: Settings, *, on_ready: Callable[[Store], None] | None = None) -> int:
    """`embedserve serve --ray`: join Ray (a local one unless --ray-address), start Serve's proxy on
    host:port, deploy the replicas and wait until they are healthy, then serve until SIGINT/SIGTERM;
    then delete the application (and shut down Serve and the Ray this started). -> the exit status."""
    resolved, store = replica_settings(settings)
    cores = replica_cores(settings)
    local = settings.ray_address is None
    need = most_replicas(settings) * cores
    if local and need > usable_cores():
        log.warning(
            "%d replica(s) of %d core(s) on %d usable core(s): they will share them",
            most_replicas(settings),
            cores,
            usable_cores(),
        )
    import ray

    started = connect(settings.ray_address, num_cpus=max(need, usable_cores()) if local else None)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which installs handlers of its own
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(
            http_options={"host": settings.host, "port": settings.port, "keep_alive_timeout_s": 30},
        )
        try:
            serve.run(application(resolved), name=APP_NAME, route_prefix="/")
        except RuntimeError as exc:  # the deployment failed: its replicas' errors are in the Ray logs
            raise ConfigError(f"the Ray Serve application did not start: {exc}") from None
        if on_ready is not None:
            on_ready(store)
        while not stop.wait(WATCH_S):
            if (gone := _gone()) is not None:
                log.error("the Ray Serve application is gone: %s", gone)
                return 1
        log.info("stopping: deleting the Ray Serve application (its replicas drain)")
        serve.delete(APP_NAME)
        return 0
    finally:
        if local:
            serve.shutdown()  # type: ignore[no-untyped-call]
        if started:
            ray.shutdown()
        sys.stderr.flush()
