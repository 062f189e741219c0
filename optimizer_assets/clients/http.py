"""Shared HTTP machinery: one session per client, timeouts, bounded retries, rate limits, blocks.

Every client (`HubSpotClient`, `GraphClient`, `CapiClient`) subclasses `HttpClient`, which

- keeps one `requests.Session` and sends the token only in the `Authorization: Bearer` header
  (never in a URL), so tokens cannot leak through request URLs, logs or exception text;
- puts a `(connect, read)` timeout on every call;
- retries 429, 5xx, transport failures and whatever `_classify` marks retryable (the Graph
  throttle codes) with exponential backoff and equal jitter from an injected RNG, honouring
  `Retry-After`; attempts and total waiting are bounded by a `RetryPolicy`;
- keeps a `UsageGate`: scopes ("app", "account:<id>") that must not be called until a moment
  derived from Retry-After or usage headers; a block longer than the remaining wait budget
  raises `ThrottledError` without calling (calling during a block lengthens it);
- counts requests (`request_count`) and logs them (`request_log`: time, method, path, status).

Time goes through injectable `clock`/`sleep` callables so tests never really wait.
"""

from __future__ import annotations

import contextlib
import email.utils
import json as jsonlib
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import requests
from requests.adapters import HTTPAdapter

from optimizer_assets.clients.errors import (
    APIError,
    ClientError,
    RetriesExhaustedError,
    ThrottledError,
    TransportError,
    redact,
)

log = logging.getLogger(__name__)

APP_SCOPE = "app"


class UniformSource(Protocol):
    """Anything with `.random() -> float in [0, 1)`: `random.Random` or `numpy.random.Generator`."""

    def random(self) -> float: ...


@dataclass(frozen=True)
class RetryPolicy:
    """Bounds on retrying: attempts per call, backoff curve and total seconds one call may wait."""

    max_attempts: int = 6
    base_delay_s: float = 0.5
    max_delay_s: float = 30.0
    max_total_wait_s: float = 600.0  # Meta BUC blocks often last minutes; waiting beats failing
    throttle_min_delay_s: float = 2.0  # floor for throttle errors that name no wait

    def backoff(self, attempt: int, rng: UniformSource) -> float:
        """Equal-jitter exponential delay before retry number `attempt` (1-based)."""
        cap = min(self.max_delay_s, self.base_delay_s * 2.0 ** (attempt - 1))
        return cap / 2.0 + float(rng.random()) * cap / 2.0


@dataclass(frozen=True)
class RequestRecord:
    """One HTTP attempt: monotonic send time, method, path (no query), status (None = no answer)."""

    at: float
    method: str
    path: str
    status: int | None


class SlidingWindowLimiter:
    """At most `max_calls` calls in any window of `period_s` seconds (client side).

    A token bucket of capacity `max_calls` would let up to 2x through a sliding window; this keeps
    the calls' times and waits until the oldest leaves the window. With `slot()` a call counts
    until its answer arrives (the server admits it somewhere between send and answer, so network
    or server delays cannot bunch admissions). Share one instance between clients that share a
    quota (e.g. HubSpot search, 5/s per account).
    """

    def __init__(
        self,
        max_calls: int,
        period_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if max_calls < 1 or period_s <= 0:
            raise ValueError("max_calls must be >= 1 and period_s > 0")
        self.max_calls = max_calls
        self.period_s = period_s
        self._clock = clock
        self._sleep = sleep
        self._calls: list[list[Any]] = []  # [time, in_flight]
        self._lock = threading.Lock()

    def acquire(self) -> float:
        """Block until a call may start (counted at its start); return the seconds waited."""
        wait, cell = self._take()
        cell[1] = False
        return wait

    @contextlib.contextmanager
    def slot(self) -> Iterator[float]:
        """Block until a call may start; the call counts until the block exits. Yields the wait."""
        wait, cell = self._take()
        try:
            yield wait
        finally:
            with self._lock:
                cell[0], cell[1] = max(cell[0], self._clock()), False

    def _take(self) -> tuple[float, list[Any]]:
        with self._lock:
            now = self._clock()
            self._calls = [c for c in self._calls if c[1] or c[0] > now - self.period_s]
            wait, start = 0.0, now
            if len(self._calls) >= self.max_calls:
                times = sorted(now if c[1] else c[0] for c in self._calls)
                start = times[len(times) - self.max_calls] + self.period_s
                wait = max(0.0, start - now)
            if wait > 0:
                self._sleep(wait)
            # record the planned start, so accounting stays right even with a fake sleep
            cell: list[Any] = [max(start, self._clock()), True]
            self._calls.append(cell)
            return wait, cell


class UsageGate:
    """Scopes that must not be called before a given monotonic time."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._until: dict[str, float] = {}
        self._reason: dict[str, str] = {}
        self._lock = threading.Lock()

    def block(self, scope: str, seconds: float, reason: str) -> None:
        """Forbid calls on `scope` for `seconds` from now (extends, never shortens, a block)."""
        if seconds <= 0:
            return
        with self._lock:
            until = self._clock() + seconds
            if until > self._until.get(scope, float("-inf")):
                self._until[scope] = until
                self._reason[scope] = reason
        log.warning("pausing calls on %s for %.1f s (%s)", scope, seconds, reason)

    def remaining(self, scopes: Iterable[str]) -> tuple[float, str | None, str | None]:
        """Longest remaining block among `scopes`: (seconds, scope, reason)."""
        now = self._clock()
        best: tuple[float, str | None, str | None] = (0.0, None, None)
        with self._lock:
            for scope in scopes:
                left = self._until.get(scope, now) - now
                if left > best[0]:
                    best = (left, scope, self._reason.get(scope))
        return best

    def clear(self) -> None:
        """Forget every block."""
        with self._lock:
            self._until.clear()
            self._reason.clear()


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds from a `Retry-After` header (delta-seconds or HTTP-date); None when absent/bad."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


@dataclass
class Failure:
    """What the retry loop needs to know about one failed attempt."""

    error: ClientError
    retryable: bool
    wait_s: float | None = None  # server-named wait (Retry-After), honoured as a minimum
    throttled: bool = False  # a rate-limit answer: floor the delay at throttle_min_delay_s


class HttpClient:
    """Base of the API clients: session, auth header, timeouts, retries, gate, counters."""

    service = "HTTP"
    error_class: type[APIError] = APIError

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout: tuple[float, float] = (5.0, 60.0),
        retry: RetryPolicy | None = None,
        rng: UniformSource | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        session: requests.Session | None = None,
        user_agent: str = "optimizer-assets/0.1",
    ) -> None:
        if not token:
            raise ValueError(f"{self.service} token is empty; set it in the environment")
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.rng: UniformSource = rng if rng is not None else random.Random()
        self.sleep = sleep
        self.clock = clock
        self.gate = UsageGate(clock)
        self.session = session or requests.Session()
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=16, max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.headers.update(
            {
                "Authorization": f"Bearer {token}",
                "User-Agent": user_agent,
                "Accept": "application/json",
            }
        )
        self._secrets = (token,)
        self._count_lock = threading.Lock()
        self.request_count = 0
        self.request_log: deque[RequestRecord] = deque(maxlen=100_000)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r})"

    def close(self) -> None:
        """Close the session's pooled connections."""
        self.session.close()

    def __enter__(self):  # noqa: ANN204 - returns the concrete subclass
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- subclass hooks
    def _classify(self, resp: requests.Response, method: str, path: str) -> Failure:
        """Turn a non-2xx response into a typed error and decide whether to retry it."""
        body = _json_or_text(resp)
        message = body if isinstance(body, str) else jsonlib.dumps(body)[:500]
        retryable = resp.status_code == 429 or resp.status_code >= 500
        err = self.error_class(
            self._redact(message or resp.reason or "error"),
            http_status=resp.status_code,
            retryable=retryable,
            method=method,
            path=path,
        )
        return Failure(err, retryable, throttled=resp.status_code == 429)

    def _observe(self, resp: requests.Response, scope: str | None) -> None:
        """Look at every answer (e.g. usage headers) before it is judged."""

    # ----------------------------------------------------------------- core loop
    def _redact(self, text: str) -> str:
        return redact(text, self._secrets)

    def _scopes(self, scope: str | None) -> list[str]:
        return [APP_SCOPE] if scope is None else [APP_SCOPE, scope]

    def _count(self, record: RequestRecord) -> None:
        with self._count_lock:
            self.request_count += 1
            self.request_log.append(record)

    def request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        json: Any = None,
        data: dict[str, Any] | None = None,
        scope: str | None = None,
        limiter: SlidingWindowLimiter | None = None,
    ) -> Any:
        """Send one logical call (retrying as the policy allows); return the decoded JSON body.

        `path` is relative to `base_url`; `scope` names the quota the call counts against
        (e.g. "account:123"); `limiter` paces the call client-side.
        """
        url = f"{self.base_url}/{path.lstrip('/')}"
        shown = "/" + path.lstrip("/")
        policy = self.retry
        waited = 0.0
        attempt = 0
        while True:
            attempt += 1
            left, blocked_scope, reason = self.gate.remaining(self._scopes(scope))
            if left > 0:
                if waited + left > policy.max_total_wait_s:
                    raise ThrottledError(
                        f"{self.service}: calls on {blocked_scope} are paused for another "
                        f"{left:.0f} s ({reason}); not calling {method} {shown}",
                        scope=blocked_scope or APP_SCOPE,
                        wait_s=left,
                    )
                self.sleep(left)
                waited += left
            with limiter.slot() if limiter is not None else contextlib.nullcontext(0.0) as paced:
                waited += paced
                failure = self._attempt(method, url, shown, params, json, data, scope)
            if not isinstance(failure, Failure):
                return failure
            if not failure.retryable:
                raise failure.error
            delay = policy.backoff(attempt, self.rng)
            if failure.throttled:
                delay = max(delay, policy.throttle_min_delay_s)
            if failure.wait_s is not None:
                delay = max(delay, failure.wait_s)
                self.gate.block(scope or APP_SCOPE, failure.wait_s, "Retry-After")
            if attempt >= policy.max_attempts or waited + delay > policy.max_total_wait_s:
                why = (
                    f"{attempt} attempts"
                    if attempt >= policy.max_attempts
                    else f"next wait {delay:.1f} s would pass the {policy.max_total_wait_s:.0f} s "
                    f"budget after {attempt} attempts"
                )
                raise RetriesExhaustedError(
                    f"{self.service} {method} {shown}: gave up ({why}, {waited:.1f} s waited); "
                    f"last error: {failure.error}",
                    last_error=failure.error,
                    attempts=attempt,
                    waited_s=waited,
                ) from failure.error
            log.warning(
                "%s %s %s failed (%s); retry %d/%d in %.2f s",
                self.service,
                method,
                shown,
                failure.error,
                attempt + 1,
                policy.max_attempts,
                delay,
            )
            self.sleep(delay)
            waited += delay

    def _attempt(
        self,
        method: str,
        url: str,
        shown: str,
        params: dict[str, Any] | None,
        json: Any,
        data: dict[str, Any] | None,
        scope: str | None,
    ) -> Any:
        """One HTTP attempt: the decoded body on success, else a `Failure`."""
        sent_at = self.clock()
        try:
            resp = self.session.request(
                method, url, params=params, json=json, data=data, timeout=self.timeout
            )
        except (requests.Timeout, requests.ConnectionError) as exc:
            self._count(RequestRecord(sent_at, method, shown, None))
            err = TransportError(
                self._redact(f"{self.service} {method} {shown}: {type(exc).__name__}: {exc}")
            )
            return Failure(err, True)
        except requests.RequestException as exc:
            self._count(RequestRecord(sent_at, method, shown, None))
            raise TransportError(
                self._redact(f"{self.service} {method} {shown}: {type(exc).__name__}: {exc}")
            ) from None
        self._count(RequestRecord(sent_at, method, shown, resp.status_code))
        self._observe(resp, scope)
        if 200 <= resp.status_code < 300:
            if not resp.content:
                return None
            try:
                return resp.json()
            except ValueError:
                err = TransportError(
                    f"{self.service} {method} {shown}: answer {resp.status_code} is not JSON"
                )
                return Failure(err, True)
        failure = self._classify(resp, method, shown)
        if resp.status_code == 429 or failure.retryable:
            server_wait = parse_retry_after(resp.headers.get("Retry-After"))
            if server_wait is not None:
                failure.wait_s = server_wait
        return failure


def _json_or_text(resp: requests.Response) -> Any:
    try:
        return resp.json()
    except ValueError:
        return resp.text[:500]
