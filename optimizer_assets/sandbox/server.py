"""The sandbox's loopback HTTP server: Graph API, CAPI and HubSpot over one port (Starlette).

Routes (contracts in ../shared/CONTRACTS.md):
- Graph ``/v{N}.0/...``: ``me/adaccounts``, ``act_{id}`` and its ``campaigns|adsets|ads``,
  ``insights`` (GET, and POST for an async report run read back via ``/{run_id}/insights``),
  ``minimum_budgets``; object reads ``/{id}``; ``/{form_id|ad_id}/leads``; ``POST /{adset_id}``
  (daily_budget, status), ``POST /{ad_id}`` (status); the batch ``POST /v{N}.0/`` (``batch=``);
  CAPI ``POST /{pixel_id}/events``. Token: ``access_token`` (query, form or JSON) or
  ``Authorization: Bearer``; a wrong one answers Graph error 190.
- HubSpot ``/crm/...``: deal/contact search, pipelines, v4 deal->contact associations (single
  and batch), contact/deal batch read and single reads. Bearer token; a wrong one answers 401.
- Control ``/_sandbox/...`` (Meta token): ``GET state``, ``POST advance {"hours"}``,
  ``GET|POST faults``, ``GET|POST limits``, ``POST speed {"speed"}``, ``GET accounts``,
  ``GET truth/{contacts,deals,ads,drifts,capi}`` (``{"data": [...]}``; ``ads`` takes
  ``account_id``, ``ad_id``, ``since``, ``until`` filters).

All world access is serialized by one lock (``state.lock``), held only by synchronous code, so
concurrent requests, the real-time clock and test threads never interleave inside the world.
Derived frames are cached per world version (simulated time + mutations made through the
server); code that mutates ``world`` directly should hold the lock and call ``state.bump()``.

Choices where the contracts leave room (details in the route modules' docstrings):
- Graph cursors are keyset cursors (base64 of the last row's sort key); ``limit`` defaults to 25
  and is clamped to 5,000. ``next`` links repeat the request's query, ``access_token`` included
  when it came as a parameter. Edges hide ARCHIVED/DELETED objects unless ``effective_status``
  asks for them. Insights rows always carry ``date_start``/``date_stop``.
- Errors: token 190 and validation 100 answer HTTP 400; budget 613/1487632 comes from
  ``World.update_adset``; spent rolling Graph budgets (``Limits``) answer 4 (app) or the BUC
  codes 80004 / 80000 (insights) with subcode 2446079 (the fault knob also draws
  17/2446079), and throttled calls still count, so calling on keeps the block. A batch
  counts each item as one call; ``null`` items were not executed.
- ``request_counts`` keys: ``http_total``, one per route family (``graph_read``,
  ``graph_write``, ``graph_insights``, ``graph_leads``, ``graph_batch``, ``graph_batch_item``,
  ``capi``, ``hubspot_search``, ``hubspot_pipelines``, ``hubspot_associations``,
  ``hubspot_objects``, ``sandbox_control``), outcomes (``auth_error``, ``hubspot_search_429``,
  ``graph_throttled``, ``fault_5xx``, ``fault_429``, ``fault_throttle``,
  ``fault_null_batch_item``, ``fault_slow``) and ``hubspot_search_max_per_second`` (most search
  requests seen in any sliding second, rejected ones included).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import socket
import threading
import time
from collections import Counter
from datetime import date
from typing import Any
from urllib.parse import parse_qsl

import polars as pl
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from optimizer_assets.sandbox import world as world_module
from optimizer_assets.sandbox.faults import GRAPH_THROTTLES, INSIGHTS_THROTTLE, Faults, Limits
from optimizer_assets.sandbox.graph_paging import GraphError
from optimizer_assets.sandbox.graph_routes import (
    GraphCall,
    _route,
    execute,
    split_relative_url,
    usage_scope,
)
from optimizer_assets.sandbox.hubspot_routes import HubSpotError, rate_limit_error, route
from optimizer_assets.sandbox.server_state import SandboxState, rows_json

__all__ = ["Faults", "Limits", "SandboxServer", "create_app", "serve"]

log = logging.getLogger(__name__)

World = world_module.World
WorldConfig = world_module.WorldConfig
META_TOKEN: str = getattr(world_module, "META_TOKEN", "sandbox-meta-token")
HUBSPOT_TOKEN: str = getattr(world_module, "HUBSPOT_TOKEN", "sandbox-hubspot-token")
CLOCK_TICK_SECONDS = 0.1  # real seconds between two clock steps in real-time (--speed) mode
JSON_TYPE = "application/json; charset=UTF-8"


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    payload = json.dumps(body, separators=(",", ":"), default=str).encode()
    return Response(payload, status_code=status, headers=headers, media_type=JSON_TYPE)


def _bearer(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() in ("bearer", "oauth") and token:
        return token.strip()
    return None


async def _body_params(request: Request) -> dict[str, Any]:
    """Form (urlencoded) or JSON body parameters; other bodies are ignored."""
    raw = await request.body()
    if not raw:
        return {}
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json" or (not ctype and raw[:1] in (b"{", b"[")):
        try:
            decoded = json.loads(raw)
        except ValueError as exc:
            raise GraphError("(#100) The request body is not valid JSON") from exc
        if not isinstance(decoded, dict):
            raise GraphError("(#100) The JSON request body must be an object")
        return decoded
    if ctype.startswith("multipart/"):
        form = await request.form()
        return {k: v for k, v in form.items() if isinstance(v, str)}
    return dict(parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True))


def _graph_family(method: str, rest: str) -> str:
    segs = [s for s in rest.strip("/").split("/") if s]
    if not segs:
        return "graph_batch"
    if segs[-1] == "events" and method == "POST":
        return "capi"
    if "insights" in segs:
        return "graph_insights"
    if segs[-1] == "leads":
        return "graph_leads"
    return "graph_write" if method == "POST" else "graph_read"


def _hubspot_family(rest: str) -> str:
    if rest.endswith("/search"):
        return "hubspot_search"
    if "pipelines" in rest:
        return "hubspot_pipelines"
    if "associations" in rest:
        return "hubspot_associations"
    return "hubspot_objects"


def _graph_5xx(variant: float) -> Response:
    if variant < 1 / 3:
        body = {"error": {"message": "An unknown error occurred", "type": "OAuthException",
                          "code": 1, "is_transient": True}}  # fmt: skip
        return _json(body, 500)
    if variant < 2 / 3:
        body = {"error": {"message": "Service temporarily unavailable", "type": "OAuthException",
                          "code": 2, "is_transient": True}}  # fmt: skip
        return _json(body, 503)
    return Response("<html><body>502 Bad Gateway</body></html>", 502, media_type="text/html")


def create_app(
    world: Any,
    *,
    meta_token: str = META_TOKEN,
    hubspot_token: str = HUBSPOT_TOKEN,
    faults: Faults | None = None,
    speed: float | None = None,
    limits: Limits | None = None,
    request_counts: Counter | None = None,
) -> Starlette:
    """The sandbox as a Starlette app; ``app.state.sandbox`` is its :class:`SandboxState`.

    ``speed`` (simulated seconds per real second) starts a clock that advances the world in
    small steps while the app runs; ``limits`` relaxes or tightens the enforced service limits.
    """
    state = SandboxState(
        world,
        meta_token=meta_token,
        hubspot_token=hubspot_token,
        faults=faults,
        limits=limits,
        speed=speed,
        request_counts=request_counts,
    )

    async def graph_endpoint(request: Request) -> Response:
        version = f"v{request.path_params['version']}.0"
        rest = request.path_params.get("rest", "")
        family = _graph_family(request.method, rest)
        state.count("http_total", family)
        with state.lock:
            drawn = state.injector.draw_request_faults("capi" if family == "capi" else "graph")
        if drawn["slow"]:
            state.count("fault_slow")
            await asyncio.sleep(drawn["slow"])
        try:
            params = dict(request.query_params)
            params.update(await _body_params(request))
        except GraphError as err:
            return _json(err.envelope(state.fbtrace_id()), err.http_status)
        token = params.get("access_token") or _bearer(request)
        if token != state.meta_token:
            state.count("auth_error")
            err = GraphError("Invalid OAuth access token - Cannot parse access token", code=190)
            return _json(err.envelope(state.fbtrace_id()), err.http_status)
        if drawn["error_5xx"]:
            state.count("fault_5xx")
            return _graph_5xx(drawn["variant"])
        base_url = str(request.base_url)
        call = GraphCall(request.method, rest, params, base_url, version)
        with state.lock:
            if drawn["throttle"]:
                state.count("fault_throttle")
                return _graph_throttle(state, call, family, drawn["variant"])
            if family == "graph_batch":
                # the batch is not a call of its own: its items are charged one by one
                try:
                    result = _route(state, call)
                except GraphError as err:
                    return _json(err.envelope(state.fbtrace_id()), err.http_status)
                account = _batch_account(state, params)
                result.headers.update(state.usage_headers(account, "ads_management"))
            else:
                result = execute(state, call)
        return _json(result.body, result.status, result.headers)

    async def hubspot_endpoint(request: Request) -> Response:
        rest = request.path_params.get("rest", "")
        family = _hubspot_family(rest)
        state.count("http_total", family)
        with state.lock:
            drawn = state.injector.draw_request_faults("hubspot")
        if drawn["slow"]:
            state.count("fault_slow")
            await asyncio.sleep(drawn["slow"])
        try:
            if _bearer(request) != state.hubspot_token:
                state.count("auth_error")
                raise HubSpotError(
                    401,
                    "Authentication credentials not found. This API supports OAuth 2.0 "
                    "authentication and you can find more details at "
                    "https://developers.hubspot.com/docs/methods/auth/oauth-overview",
                    "INVALID_AUTHENTICATION",
                )
            if family == "hubspot_search":
                wait = state.hubspot_search_admit()
                if wait is not None:
                    state.count("hubspot_search_429")
                    raise rate_limit_error(wait)
            if drawn["error_5xx"]:
                state.count("fault_5xx")
                if drawn["variant"] >= 2 / 3:
                    return Response("<html>502 Bad Gateway</html>", 502, media_type="text/html")
                status = 500 if drawn["variant"] < 1 / 3 else 503
                raise HubSpotError(status, "Internal error, please retry", "INTERNAL_ERROR")
            if drawn["throttle"]:
                state.count("fault_429")
                raise rate_limit_error(1.0)
            body: dict[str, Any] = {}
            if request.method == "POST":
                raw = await request.body()
                try:
                    body = json.loads(raw) if raw else {}
                except ValueError as exc:
                    raise HubSpotError(400, "Invalid input JSON", "VALIDATION_ERROR") from exc
                if not isinstance(body, dict):
                    raise HubSpotError(400, "The body must be a JSON object", "VALIDATION_ERROR")
            with state.lock:
                status, out, headers = route(
                    state, request.method, rest, body, dict(request.query_params)
                )
            return _json(out, status, headers)
        except HubSpotError as err:
            return _json(err.body(state.correlation_id()), err.status, err.headers)
        except Exception:  # a sandbox bug: answer like HubSpot's 500, keep the traceback in logs
            log.exception("sandbox HubSpot route failed: %s %s", request.method, rest)
            err = HubSpotError(500, "Internal error", "INTERNAL_ERROR")
            return _json(err.body(state.correlation_id()), 500)

    async def control_endpoint(request: Request) -> Response:
        rest = request.path_params.get("rest", "").strip("/")
        state.count("http_total", "sandbox_control")
        token = request.query_params.get("access_token") or _bearer(request)
        if token != state.meta_token:
            state.count("auth_error")
            err = GraphError("Invalid OAuth access token - Cannot parse access token", code=190)
            return _json(err.envelope(state.fbtrace_id()), err.http_status)
        body: dict[str, Any] = {}
        if request.method == "POST":
            raw = await request.body()
            try:
                body = json.loads(raw) if raw else {}
            except ValueError:
                return _json({"error": "body must be JSON"}, 400)
            if not isinstance(body, dict):
                return _json({"error": "body must be a JSON object"}, 400)
        try:
            with state.lock:
                return _control(state, request, rest, body)
        except (ValueError, TypeError, KeyError) as exc:
            return _json({"error": str(exc)}, 400)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        task = asyncio.create_task(_clock(state))
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    methods = ["GET", "POST", "DELETE"]
    app = Starlette(
        routes=[
            Route("/v{version:int}.0", graph_endpoint, methods=methods),
            Route("/v{version:int}.0/{rest:path}", graph_endpoint, methods=methods),
            Route("/crm/{rest:path}", hubspot_endpoint, methods=["GET", "POST"]),
            Route("/_sandbox/{rest:path}", control_endpoint, methods=["GET", "POST"]),
        ],
        lifespan=lifespan,
    )
    app.state.sandbox = state
    return app


def _batch_items(params: dict[str, Any]) -> list[Any]:
    items = params.get("batch")
    if isinstance(items, str):
        try:
            items = json.loads(items)
        except ValueError:
            return []
    return items if isinstance(items, list) else []


def _batch_account(state: SandboxState, params: dict[str, Any]) -> str | None:
    """The account a batch's usage headers describe: the one of its first item."""
    for item in _batch_items(params):
        if isinstance(item, dict):
            return usage_scope(state, split_relative_url(str(item.get("relative_url", "")))[0])[0]
    return None


def _graph_throttle(state: SandboxState, call: GraphCall, family: str, variant: float) -> Response:
    """An injected throttle: one of codes 4/17/80004 (80000 on insights) with usage at 100%."""
    code, subcode, message = GRAPH_THROTTLES[min(2, int(variant * 3))]
    if family == "graph_insights" and code == 80004:
        code, subcode, message = INSIGHTS_THROTTLE
    account, use_case = usage_scope(state, call.path)
    state.graph_record(account, use_case)
    scope = "app" if code == 4 else "account"
    err = GraphError(message, code=code, subcode=subcode, transient=True)
    headers = state.usage_headers(account, use_case, saturate=scope)
    return _json(err.envelope(state.fbtrace_id()), err.http_status, headers)


async def _clock(state: SandboxState) -> None:
    """Real-time mode: advance the world by ``speed`` simulated seconds per real second."""
    last = time.monotonic()
    while True:
        await asyncio.sleep(CLOCK_TICK_SECONDS)
        now = time.monotonic()
        elapsed, last = now - last, now
        speed = state.speed
        if not speed:
            continue
        try:
            with state.lock:
                state.world.advance(speed * elapsed / 3600.0)
                state.bump()
        except Exception:  # keep serving even if one simulation step fails
            log.exception("sandbox clock step failed")


# ---- control ------------------------------------------------------------------------------------
def _world_counts(state: SandboxState) -> dict[str, Any]:
    def build() -> dict[str, Any]:
        w = state.world
        if hasattr(w, "counts"):
            return {k: v for k, v in w.counts().items() if k != "now"}
        return {
            "accounts": w.accounts().height,
            "campaigns": w.campaigns().height,
            "adsets": w.adsets().height,
            "ads": w.ads().height,
            "leads": w.leads().height,
            "contacts": w.contacts().height,
            "deals": w.deals().height,
        }

    return state.memo("world_counts", build)


def _state_body(state: SandboxState) -> dict[str, Any]:
    return {
        "now": state.world.now.isoformat().replace("+00:00", "Z"),
        "speed": state.speed,
        "counts": _world_counts(state),
        "requests": dict(state.request_counts),
        "faults": state.injector.faults.to_dict(),
        "limits": state.limits.to_dict(),
    }


def _frame_response(frame: pl.DataFrame, extra: dict[str, Any] | None = None) -> Response:
    body = {"data": rows_json(frame), **(extra or {})}
    return _json(body)


def _truth(state: SandboxState, name: str, query: dict[str, str]) -> Response:
    w = state.world
    if name == "contacts":
        return _frame_response(w.truth_contacts())
    if name == "deals":
        return _frame_response(w.truth_deals())
    if name == "ads":
        frame = w.truth_ads_daily()
        for column in ("account_id", "ad_id"):
            if query.get(column):
                frame = frame.filter(pl.col(column) == query[column])
        if query.get("since"):
            frame = frame.filter(pl.col("date") >= date.fromisoformat(query["since"]))
        if query.get("until"):
            frame = frame.filter(pl.col("date") <= date.fromisoformat(query["until"]))
        return _frame_response(frame)
    if name == "drifts":
        return _json({"data": w.truth_drifts()})
    if name == "capi":
        match = w.capi_match()
        extra = {"test_events": dict(state.capi_test_events)}
        if isinstance(match, dict) and isinstance(match.get("pixels"), list):
            summary = {k: v for k, v in match.items() if k != "pixels"}
            return _json({"data": match["pixels"], "summary": summary, **extra})
        return _json({"data": match, **extra})
    return _json({"error": f"unknown truth table {name!r}"}, 404)


def _control(state: SandboxState, request: Request, rest: str, body: dict[str, Any]) -> Response:
    method = request.method
    if rest == "state" and method == "GET":
        return _json(_state_body(state))
    if rest == "advance" and method == "POST":
        hours = float(body.get("hours", request.query_params.get("hours", "nan")))
        if not math.isfinite(hours) or hours < 0:
            raise ValueError("hours must be a non-negative number")
        state.world.advance(hours)
        state.bump()
        return _json(_state_body(state))
    if rest == "speed" and method == "POST":
        speed = body.get("speed")
        state.speed = None if speed in (None, 0) else float(speed)
        return _json(_state_body(state))
    if rest == "faults":
        if method == "POST":
            state.injector.set(Faults.from_dict(body))
        return _json(state.injector.faults.to_dict())
    if rest == "limits":
        if method == "POST":
            state.limits = Limits.from_dict(body)
        return _json(state.limits.to_dict())
    if rest == "accounts" and method == "GET":
        return _frame_response(state.world.accounts())
    if rest.startswith("truth/") and method == "GET":
        return _truth(state, rest.removeprefix("truth/"), dict(request.query_params))
    return _json({"error": f"no route {method} /_sandbox/{rest}"}, 404)


# ---- running it --------------------------------------------------------------------------------
class SandboxServer:
    """The sandbox on ``127.0.0.1:<port>`` (port 0 = a free one) in a background thread.

    >>> with SandboxServer(WorldConfig(accounts=1)) as sandbox:
    ...     requests.get(f"{sandbox.base_url}/v24.0/me/adaccounts", params={...})

    With ``webhook_url`` (and ``webhook_secret``, the receiver's client secret) the server also
    plays HubSpot's webhook sender while it runs (``webhook_sender``: a ``WebhookSender`` reading
    the world under ``lock``; ``webhook_config`` is its ``SenderConfig``).
    """

    def __init__(
        self,
        config: Any | None = None,
        *,
        world: Any | None = None,
        faults: Faults | None = None,
        speed: float | None = None,
        limits: Limits | None = None,
        meta_token: str = META_TOKEN,
        hubspot_token: str = HUBSPOT_TOKEN,
        port: int = 0,
        host: str = "127.0.0.1",
        webhook_url: str | None = None,
        webhook_secret: str | None = None,
        webhook_config: Any | None = None,
    ) -> None:
        self.world = world if world is not None else World(config or WorldConfig())
        if webhook_url and not webhook_secret:
            raise ValueError("webhook_url needs webhook_secret (the receiver's client secret)")
        # HubSpot's webhook deliveries of the world's deal changes, started with the server
        self._webhook = (webhook_url, webhook_secret, webhook_config) if webhook_url else None
        self.webhook_sender: Any | None = None
        self.request_counts: Counter = Counter()
        self.app = create_app(
            self.world,
            meta_token=meta_token,
            hubspot_token=hubspot_token,
            faults=faults,
            speed=speed,
            limits=limits,
            request_counts=self.request_counts,
        )
        self.state: SandboxState = self.app.state.sandbox
        self.host = host
        self.port = port
        self.base_url = f"http://{host}:{port}"
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    @property
    def lock(self) -> threading.RLock:
        """Hold it to read or change ``world`` from another thread while the server runs."""
        return self.state.lock

    def __enter__(self) -> SandboxServer:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # accepted connections inherit it: no 40 ms delayed-ACK stalls on any event loop
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((self.host, self.port))
        self._socket = sock
        self.port = sock.getsockname()[1]
        self.base_url = f"http://{self.host}:{self.port}"
        config = uvicorn.Config(
            self.app, log_level="warning", access_log=False, lifespan="on", timeout_keep_alive=30
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, daemon=True, name="sandbox"
        )
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise RuntimeError("the sandbox server did not start")
            time.sleep(0.01)
        if self._webhook is not None:
            url, secret, sender_config = self._webhook
            self.webhook_sender = _start_sender(self.world, url, secret, sender_config, self.lock)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self.webhook_sender is not None:
            self.webhook_sender.stop(flush=False)
            self.webhook_sender = None
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=15)
        if self._socket is not None:
            self._socket.close()
        self._server = self._thread = self._socket = None

    def set_faults(self, faults: Faults) -> None:
        """Replace the fault knobs (and reseed their generator)."""
        with self.lock:
            self.state.injector.set(faults)

    def set_limits(self, limits: Limits) -> None:
        with self.lock:
            self.state.limits = limits

    def advance(self, hours: float) -> None:
        """Move the simulated clock, exactly like ``POST /_sandbox/advance``."""
        with self.lock:
            self.world.advance(hours)
            self.state.bump()


def _start_sender(world: Any, url: str, secret: str, config: Any | None, lock: Any) -> Any:
    """A running ``WebhookSender`` of ``world``'s deal changes to ``url`` (reads under ``lock``)."""
    from optimizer_assets.sandbox.webhook_sender import WebhookSender

    return WebhookSender(world, url, secret, config=config, lock=lock).start()


def serve(
    host: str = "127.0.0.1",
    port: int = 8765,
    config: Any | None = None,
    speed: float | None = None,
    faults: Faults | None = None,
    webhook_url: str | None = None,
    webhook_secret: str | None = None,
) -> None:
    """Build the world and serve it until Ctrl-C (``optimizer sandbox serve``); with
    ``webhook_url`` it also posts HubSpot webhooks of the deal changes there, signed with
    ``webhook_secret``."""
    world = World(config or WorldConfig())
    app = create_app(world, faults=faults, speed=speed)
    pace = f"speed {speed:g}x" if speed else "time moves on POST /_sandbox/advance"
    hooks = f", webhooks to {webhook_url}" if webhook_url else ""
    print(f"sandbox serving on http://{host}:{port} ({pace}{hooks}); Ctrl-C stops it", flush=True)
    if webhook_url and not webhook_secret:
        raise ValueError("webhook_url needs webhook_secret (the receiver's client secret)")
    sender = (
        _start_sender(world, webhook_url, webhook_secret, None, app.state.sandbox.lock)
        if webhook_url
        else None
    )
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
    finally:
        if sender is not None:
            sender.stop(flush=False)
