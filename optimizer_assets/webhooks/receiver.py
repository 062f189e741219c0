"""HubSpot webhook receiver: verify, validate, store durably, then answer (Starlette + uvicorn).

``POST /webhooks/hubspot`` answers
- 413 when the body exceeds ``max_body_bytes`` (checked on Content-Length and while reading),
- 401 when ``X-HubSpot-Signature-v3`` or ``X-HubSpot-Request-Timestamp`` does not verify,
- 400 when the (authentic) body is not a JSON array of HubSpot events,
- 503 when the warehouse stays locked for ``store_timeout_seconds`` (HubSpot retries later),
- 200 ``{"received": n, "stored": new}`` only after the batch is committed to the landing table.
Nothing is stored unless the answer is 200. ``GET /healthz`` answers ``{"status": "ok"}``.

The landing table (``domain.webhooks.LANDING_TABLE``, columns ``LANDING_SCHEMA``) is append-only
and keyed on ``event_key``, so retries and duplicates add nothing. ``received_at`` is assigned
under the write lock and strictly increases within one receiver process: a sensor can keep a
``received_at`` watermark (with a little overlap, deduplicating on ``event_key``).

DuckDB allows one writing process per file (and no reader in another process while it writes).
Writes are serialized by a lock in the receiver and kept short (one ``append_new`` transaction
per delivery); when another process holds the file (a Dagster run, a sensor's read), the write is
retried with backoff within ``store_timeout_seconds``, then answered 503 (HubSpot retries).
That is why the receiver should get a DuckDB file of its own (``--warehouse`` /
``OPTIMIZER_WEBHOOK_WAREHOUSE``, the same variable Dagster's sensor and
``hubspot_webhook_deal_states`` read): then only their short reads ever touch it, and Dagster
steps never wait for a delivery nor a delivery for a step. Default: the warehouse itself.

The client secret comes from ``HUBSPOT_CLIENT_SECRET`` only; it is never logged, echoed or put in
an exception. Behind a proxy, set ``OPTIMIZER_WEBHOOK_PUBLIC_URL`` to the public origin (plus any
path prefix the proxy strips), e.g. ``https://hooks.example.com``: the URI HubSpot signed is
rebuilt as that base + the request path + the raw query string.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import duckdb
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from optimizer_assets.domain import webhooks as wh
from optimizer_assets.instance import REPO_ROOT
from optimizer_assets.warehouse import Warehouse

__all__ = [
    "WEBHOOK_PATH",
    "ConfigError",
    "ReceiverServer",
    "ReceiverSettings",
    "StorageUnavailable",
    "create_app",
    "serve",
]

log = logging.getLogger(__name__)

WEBHOOK_PATH = "/webhooks/hubspot"
DEFAULT_WAREHOUSE = REPO_ROOT / "data" / "warehouse.duckdb"  # as defs/resources.py
MAX_BODY_BYTES = 1 << 20  # 1 MiB: 100 events are ~40 KB
# DuckDB errors that mean "someone else has the file right now": retry, then 503
_TRANSIENT = (duckdb.IOException, duckdb.ConnectionException, duckdb.TransactionException)


class ConfigError(ValueError):
    """The receiver cannot run with this configuration (e.g. no client secret)."""


class StorageUnavailable(RuntimeError):
    """The landing table could not be written in time; the delivery must be answered non-2xx."""


class _TooLarge(Exception):
    pass


@dataclass(frozen=True)
class ReceiverSettings:
    """Receiver configuration; ``client_secret`` is kept out of ``repr``."""

    client_secret: str = field(repr=False)
    warehouse_path: str = str(DEFAULT_WAREHOUSE)
    public_base_url: str | None = None
    max_body_bytes: int = MAX_BODY_BYTES
    max_events: int = wh.MAX_EVENTS
    max_skew_ms: int = wh.MAX_SKEW_MS
    store_timeout_seconds: float = 2.5  # well inside HubSpot's 5 s, even with a slow write
    table: str = wh.LANDING_TABLE

    def __post_init__(self) -> None:
        if not self.client_secret:
            raise ConfigError("HUBSPOT_CLIENT_SECRET is not set: the receiver cannot verify")

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, **overrides: Any
    ) -> ReceiverSettings:
        """``HUBSPOT_CLIENT_SECRET``, ``OPTIMIZER_WEBHOOK_WAREHOUSE`` (else
        ``OPTIMIZER_WAREHOUSE``), ``OPTIMIZER_WEBHOOK_PUBLIC_URL``; keyword overrides (not None)
        win. The landing file is the one Dagster reads (``OPTIMIZER_WEBHOOK_WAREHOUSE``, else
        the warehouse), so one environment configures both."""
        env = os.environ if environ is None else environ
        warehouse = env.get("OPTIMIZER_WEBHOOK_WAREHOUSE") or env.get("OPTIMIZER_WAREHOUSE")
        values: dict[str, Any] = {
            "client_secret": env.get("HUBSPOT_CLIENT_SECRET", ""),
            "warehouse_path": warehouse or str(DEFAULT_WAREHOUSE),
            "public_base_url": env.get("OPTIMIZER_WEBHOOK_PUBLIC_URL") or None,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def signed_uri(request: Request, public_base_url: str | None) -> str:
    """The URI HubSpot signed: public base (or scheme://Host) + raw path + raw query string."""
    path = (request.scope.get("raw_path") or request.url.path.encode()).decode("latin-1")
    path = path.split("?", 1)[0]
    query = request.scope.get("query_string", b"").decode("latin-1")
    if public_base_url:
        base = public_base_url.rstrip("/")
    else:
        base = f"{request.url.scheme}://{request.headers.get('host', request.url.netloc)}"
    return base + path + (f"?{query}" if query else "")


async def _read_bounded(request: Request, limit: int) -> bytes:
    """The body, refusing (without reading on) as soon as it passes ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise _TooLarge
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


class Receiver:
    """The state behind the app: settings, warehouse, write lock, clock and counters."""

    def __init__(
        self,
        settings: ReceiverSettings,
        *,
        clock: Callable[[], float] = time.time,
        warehouse: Warehouse | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        # no lock wait inside connect(): store() retries against its own deadline
        self.warehouse = warehouse or Warehouse(settings.warehouse_path, lock_wait_seconds=0)
        self.counts: Counter = Counter()
        self._lock = threading.Lock()
        self._last_received: datetime | None = None

    def _received_at(self) -> datetime:
        now = datetime.fromtimestamp(self.clock(), UTC)
        if self._last_received is not None and now <= self._last_received:
            now = self._last_received + timedelta(microseconds=1)
        self._last_received = now
        return now

    def store(self, events: list[dict[str, Any]]) -> int:
        """Append the batch's new events in one transaction; the number of rows added.

        Raises ``StorageUnavailable`` when the file stays locked past ``store_timeout_seconds``.
        """
        deadline = time.monotonic() + self.settings.store_timeout_seconds
        # one writer per process (DuckDB allows one per file); waiting counts against the budget
        if not self._lock.acquire(timeout=self.settings.store_timeout_seconds):
            self.counts["store_unavailable"] += 1
            raise StorageUnavailable("receiver busy")
        try:
            rows = wh.events_frame(events, self._received_at(), uuid.uuid4().hex)
            delay = 0.01
            while True:
                try:
                    new = self.warehouse.append_new(self.settings.table, rows, ["event_key"])
                    return new.height
                except _TRANSIENT as exc:
                    if time.monotonic() + delay > deadline:
                        self.counts["store_unavailable"] += 1
                        raise StorageUnavailable(type(exc).__name__) from None
                    self.counts["store_retries"] += 1
                    time.sleep(delay)
                    delay = min(delay * 2, 0.25)
        finally:
            self._lock.release()


def _warm_up() -> None:
    """Pay the one-off costs of the first write (pyarrow import, ICU load: ~2 s) before serving,
    so the first delivery is answered as fast as the others."""
    with contextlib.closing(duckdb.connect(":memory:")) as con:
        con.execute("SET TimeZone = 'UTC'")  # loads ICU, as Warehouse.connect does
        con.register("_incoming", wh.events_frame([], datetime.now(UTC)))
        con.execute("CREATE TABLE t AS SELECT * FROM _incoming")
        con.execute("SELECT * FROM t").pl()


def _answer(status: int, message: str, **extra: Any) -> JSONResponse:
    state = "ok" if status < 300 else "error"
    return JSONResponse({"status": state, "message": message, **extra}, status_code=status)


def create_app(
    settings: ReceiverSettings,
    *,
    clock: Callable[[], float] = time.time,
    warehouse: Warehouse | None = None,
) -> Starlette:
    """The receiver as a Starlette app (``app.state.receiver`` is its :class:`Receiver`).

    ``clock`` returns epoch seconds (the timestamp check and ``received_at``); tests pin it.
    """
    receiver = Receiver(settings, clock=clock, warehouse=warehouse)

    async def hubspot_webhook(request: Request) -> JSONResponse:
        counts = receiver.counts
        counts["requests"] += 1
        try:
            body = await _read_bounded(request, settings.max_body_bytes)
        except _TooLarge:
            counts["rejected_too_large"] += 1
            log.warning("webhook rejected: body over %d bytes", settings.max_body_bytes)
            return _answer(413, f"body over {settings.max_body_bytes} bytes")
        try:
            wh.verify_signature_v3(
                client_secret=settings.client_secret,
                method=request.method,
                uri=signed_uri(request, settings.public_base_url),
                body=body,
                timestamp_ms=request.headers.get(wh.TIMESTAMP_HEADER),
                signature=request.headers.get(wh.SIGNATURE_HEADER),
                now_ms=int(receiver.clock() * 1000),
                max_skew_ms=settings.max_skew_ms,
            )
        except wh.WebhookRejected as err:
            counts["rejected_unauthorized"] += 1
            log.warning("webhook rejected (401): %s", err.reason)
            return _answer(401, err.reason)
        try:
            events = wh.parse_batch(body, settings.max_events)
        except wh.MalformedBatch as err:
            counts["rejected_malformed"] += 1
            log.warning("webhook rejected (400): %s", err.reason)
            return _answer(400, err.reason)
        if not events:
            return _answer(200, "empty batch", received=0, stored=0)
        try:
            stored = await run_in_threadpool(receiver.store, events)
        except StorageUnavailable as err:
            log.warning("webhook not stored (503): warehouse busy (%s)", err)
            return JSONResponse(
                {"status": "error", "message": "storage busy, retry later"},
                status_code=503,
                headers={"Retry-After": "1"},
            )
        except Exception:  # never 2xx without storing; HubSpot retries any non-2xx
            counts["store_failed"] += 1
            log.exception("webhook not stored (500)")
            return _answer(500, "storage failed")
        counts["accepted"] += 1
        counts["events_received"] += len(events)
        counts["events_stored"] += stored
        log.info("webhook stored %d new of %d events", stored, len(events))
        return _answer(200, "stored", received=len(events), stored=stored)

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "accepted": receiver.counts["accepted"]})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        await run_in_threadpool(_warm_up)
        yield

    app = Starlette(
        routes=[
            Route(WEBHOOK_PATH, hubspot_webhook, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    app.state.receiver = receiver
    return app


class ReceiverServer:
    """The receiver on ``host:port`` (port 0 = a free one) in a background thread.

    >>> with ReceiverServer(ReceiverSettings(client_secret=..., warehouse_path=...)) as rx:
    ...     requests.post(rx.url, data=body, headers=signed_headers)
    """

    def __init__(
        self,
        settings: ReceiverSettings,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.app = create_app(settings, clock=clock)
        self.receiver: Receiver = self.app.state.receiver
        self.host, self.port = host, port
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """Where HubSpot (or the sandbox sender) posts: ``{base_url}/webhooks/hubspot``."""
        return self.base_url + WEBHOOK_PATH

    def __enter__(self) -> ReceiverServer:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((self.host, self.port))
        self._socket, self.port = sock, sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, daemon=True, name="webhooks"
        )
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise RuntimeError("the webhook receiver did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=15)
        if self._socket is not None:
            self._socket.close()
        self._server = self._thread = self._socket = None


def serve(
    host: str = "127.0.0.1", port: int = 8766, settings: ReceiverSettings | None = None
) -> None:
    """Serve the receiver until Ctrl-C (``optimizer webhook serve``)."""
    settings = settings or ReceiverSettings.from_env()
    public = settings.public_base_url or f"http://{host}:{port}"
    print(
        f"HubSpot webhook receiver on http://{host}:{port}{WEBHOOK_PATH} "
        f"(signed URI base {public}), landing table {settings.table} in "
        f"{settings.warehouse_path}; Ctrl-C stops it",
        flush=True,
    )
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    uvicorn.run(create_app(settings), host=host, port=port, log_level="info")
