"""Graph API (Marketing API) client: catalog, daily ad insights, lead-form leads, updates, batch.

Speaks CONTRACTS.md section 2 and 4 and nothing else; whether it talks to Meta or to the
sandbox depends only on `base_url`, `api_version` and the token handed to the constructor.

Return shapes (numbers converted from Graph's strings, ids kept as digit strings):
- `campaigns`, `adsets`, `ads`, `insights`: `polars.DataFrame` (columns documented per method);
- `leads`, `minimum_budgets`: `list[dict]` (lead field values are raw PII: hash at ingestion);
- `update_adset`, `update_ad`: Graph's answer (`{"success": true}`);
- `batch`, `execute_batched`: one `BatchResult` per item, in input order.

Insights come two ways with the same rows and columns: synchronously (`GET act_<id>/insights`,
cursor-paged), or through an async report run for large ranges (`POST act_<id>/insights` ->
`report_run_id`, poll `GET /<report_run_id>` until `async_status == "Job Completed"` with a
growing delay, then page `GET /<report_run_id>/insights`). `insights(report_run=True)` asks for a
report run; by default one is used only for ranges longer than `report_run_after_days` (off unless
set). `Job Failed` / `Job Skipped` raise `ReportRunError`, a run still unfinished after
`ReportRunPolicy.timeout_s` raises `ReportRunTimeoutError`; both carry the run id, its last status
and the poll answer's `x-fb-trace-id`. `async_percent_completion` can reach 100 while the job is
still `Job Running`, so only the status is trusted.

Throttling: every answer's usage headers (`x-app-usage`, `x-ad-account-usage`,
`x-business-use-case-usage`) are read; at >= `usage_threshold_pct` or with
`estimated_time_to_regain_access` > 0 the client stops calling that ad account (or the whole app)
until the block should be over. Throttle codes 4, 17, 32, 613, 800xx and `is_transient` errors are
retried with backoff; 613/1487632 (budget edited too often) raises `BudgetEditLimitError` at once.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime
from typing import Any, Literal
from urllib.parse import urlencode

import polars as pl
import requests
from requests.structures import CaseInsensitiveDict

from optimizer_assets.clients.errors import (
    BudgetEditLimitError,
    ClientError,
    GraphAPIError,
    TooManyItemsError,
    TransportError,
)
from optimizer_assets.clients.http import APP_SCOPE, Failure, HttpClient

log = logging.getLogger(__name__)

GRAPH_URL = "https://graph.facebook.com"
DEFAULT_API_VERSION = "v24.0"
BATCH_LIMIT = 50
AD_STATUSES = frozenset({"ACTIVE", "PAUSED", "ARCHIVED", "DELETED"})

# Rate-limit codes: app 4, user/ad account 17, page 32, custom 613, business use case 800xx
THROTTLE_CODES = frozenset(
    {4, 17, 32, 613, 80000, 80001, 80002, 80003, 80004, 80005, 80006, 80008, 80009, 80014}
)
BUDGET_EDIT_LIMIT = (613, 1487632)

CAMPAIGN_FIELDS = (
    "id",
    "name",
    "objective",
    "status",
    "effective_status",
    "created_time",
    "account_id",
)
ADSET_FIELDS = (
    "id",
    "name",
    "campaign_id",
    "account_id",
    "daily_budget",
    "status",
    "effective_status",
    "created_time",
)
AD_FIELDS = (
    "id",
    "name",
    "adset_id",
    "campaign_id",
    "account_id",
    "status",
    "effective_status",
    "created_time",
    "creative{id,name,title,body,call_to_action_type}",
)
# The optimizer's creative traits. The sandbox serves them on the creative; a live account must
# provide them through its own tagging (requesting them from Meta answers error 100).
CREATIVE_TRAITS = ("hook_type", "format", "emotion", "lead_gen_form_id")
AD_FIELDS_WITH_TRAITS = (
    *AD_FIELDS[:-1],
    "creative{id,name,title,body,call_to_action_type," + ",".join(CREATIVE_TRAITS) + "}",
)
INSIGHT_FIELDS = (
    "date_start",
    "date_stop",
    "account_id",
    "campaign_id",
    "adset_id",
    "ad_id",
    "spend",
    "impressions",
    "reach",
    "clicks",
    "inline_link_clicks",
    "ctr",
    "actions",
    "account_currency",
)
LEAD_FIELDS = ("id", "created_time", "ad_id", "adset_id", "campaign_id", "form_id", "field_data")

# Async insights report runs (AdReportRun): the status with results, those without, what we poll
REPORT_COMPLETED = "Job Completed"
REPORT_NO_DATA = frozenset({"Job Failed", "Job Skipped"})
REPORT_STATUS_FIELDS = ("id", "async_status", "async_percent_completion", "date_start", "date_stop")

_INT_METRICS = frozenset(
    {
        "impressions",
        "reach",
        "clicks",
        "inline_link_clicks",
        "unique_clicks",
        "unique_inline_link_clicks",
        "daily_budget",
        "lifetime_budget",
    }
)
_FLOAT_METRICS = frozenset(
    {"spend", "ctr", "cpc", "cpm", "cpp", "frequency", "inline_link_click_ctr", "social_spend"}
)
_DATE_FIELDS = frozenset({"date_start", "date_stop"})
_TIME_FIELDS = frozenset({"created_time", "updated_time", "start_time", "stop_time"})
_ACTION_LISTS = frozenset({"actions", "action_values", "unique_actions", "cost_per_action_type"})
_ACTION_DTYPE = pl.List(pl.Struct({"action_type": pl.Utf8, "value": pl.Float64}))


def account_path(account_id: str) -> str:
    """`act_<digits>` from either `123` or `act_123`."""
    return f"act_{str(account_id).removeprefix('act_')}"


def account_scope(account_id: str | None) -> str | None:
    """Gate scope of an ad account (`account:<digits>`)."""
    return None if account_id is None else f"account:{str(account_id).removeprefix('act_')}"


def parse_graph_time(value: str | None) -> datetime | None:
    """Graph timestamps (`2026-11-20T10:15:00+0000`) to aware UTC datetimes."""
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        parsed = datetime.strptime(value, "%Y-%m-%dT%H:%M:%S%z")
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def graph_error(
    body: Any,
    *,
    http_status: int | None,
    method: str | None = None,
    path: str | None = None,
    redact: Any = lambda s: s,
    cls: type[GraphAPIError] = GraphAPIError,
) -> tuple[GraphAPIError, bool, bool]:
    """Parse a Graph error envelope into (typed error, retryable, throttled)."""
    env = body.get("error") if isinstance(body, dict) else None
    if not isinstance(env, dict):
        env = {"message": body if isinstance(body, str) and body else "unexpected answer"}
    code = _int_or_none(env.get("code"))
    subcode = _int_or_none(env.get("error_subcode"))
    budget_locked = (code, subcode) == BUDGET_EDIT_LIMIT
    throttled = http_status == 429 or code in THROTTLE_CODES
    retryable = not budget_locked and (
        throttled or bool(env.get("is_transient")) or (http_status or 0) >= 500
    )
    klass = BudgetEditLimitError if budget_locked else cls
    message = str(env.get("message") or "Graph API error")
    if env.get("error_user_msg"):
        message = f"{message} ({env['error_user_msg']})"
    err = klass(
        redact(message),
        http_status=http_status,
        code=code,
        subcode=subcode,
        category=env.get("type"),
        trace_id=env.get("fbtrace_id"),
        retryable=retryable,
        method=method,
        path=path,
        body={"error": {k: v for k, v in env.items() if k != "message"}},
    )
    return err, retryable, throttled


class ReportRunError(GraphAPIError):
    """An async insights report run ended without results (`Job Failed` or `Job Skipped`).

    `report_run_id`, `async_status` and `percent_completion` are the last poll's; `trace_id` is
    that answer's `x-fb-trace-id` header. Starting a new run (perhaps over a shorter range) is
    Meta's remedy; the client does not do it on its own.
    """

    def __init__(
        self,
        message: str,
        *,
        report_run_id: str,
        async_status: str,
        percent_completion: int,
        **kwargs: Any,
    ) -> None:
        self.report_run_id = report_run_id
        self.async_status = async_status
        self.percent_completion = percent_completion
        super().__init__(message, **kwargs)


class ReportRunTimeoutError(ReportRunError):
    """The report run had not completed when `ReportRunPolicy.timeout_s` ran out; it may still
    finish: `GraphClient.wait_report_run(report_run_id)` picks it up again."""


@dataclass(frozen=True)
class ReportRunPolicy:
    """How an async report run is polled: delays grow from `first_poll_s` by `factor` up to
    `max_poll_s`; polling gives up `timeout_s` after the first poll (retry waits included)."""

    first_poll_s: float = 2.0
    max_poll_s: float = 30.0
    factor: float = 1.5
    timeout_s: float = 1800.0

    def delay(self, polls: int) -> float:
        """Seconds to wait after poll number `polls` (1-based) before the next one."""
        return min(self.max_poll_s, self.first_poll_s * self.factor ** max(0, polls - 1))


@dataclass(frozen=True)
class ReportRunStatus:
    """One poll of a report run: its status and percent, how many polls so far, seconds since
    the first poll (on the client's clock)."""

    report_run_id: str
    async_status: str
    percent_completion: int
    polls: int
    elapsed_s: float
    date_start: str | None = None
    date_stop: str | None = None


class MetaClient(HttpClient):
    """Shared base of the Graph and Conversions API clients: error envelope and usage headers."""

    service = "Graph API"
    error_class: type[GraphAPIError] = GraphAPIError

    def __init__(
        self,
        token: str,
        *,
        base_url: str = GRAPH_URL,
        api_version: str = DEFAULT_API_VERSION,
        usage_threshold_pct: float = 95.0,
        usage_pause_s: float = 60.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(base_url, token, **kwargs)
        self.api_version = api_version
        self.usage_threshold_pct = usage_threshold_pct
        self.usage_pause_s = usage_pause_s

    def _path(self, *parts: str) -> str:
        return "/".join([self.api_version, *(p.strip("/") for p in parts)])

    def _classify(self, resp: requests.Response, method: str, path: str) -> Failure:
        try:
            body: Any = resp.json()
        except ValueError:
            body = resp.text[:300] or resp.reason
        err, retryable, throttled = graph_error(
            body,
            http_status=resp.status_code,
            method=method,
            path=path,
            redact=self._redact,
            cls=self.error_class,
        )
        return Failure(err, retryable, throttled=throttled)

    def _observe(self, resp: requests.Response, scope: str | None) -> None:
        self.observe_usage(resp.headers, scope)

    def observe_usage(self, headers: Mapping[str, str], scope: str | None) -> None:
        """Pause scopes whose usage headers say they are (nearly) blocked."""
        limit = self.usage_threshold_pct
        app = _load_json(headers.get("x-app-usage"))
        if isinstance(app, dict):
            pct = _max_pct(app, ("call_count", "total_time", "total_cputime"))
            if pct >= limit:
                self.gate.block(APP_SCOPE, self.usage_pause_s, f"x-app-usage at {pct:.0f}%")
        acc = _load_json(headers.get("x-ad-account-usage"))
        if isinstance(acc, dict):
            pct = _max_pct(acc, ("acc_id_util_pct",))
            if pct >= limit:
                # reset_time_duration is the time until the score is back to 0, not until calls
                # are allowed again: pause a while (the BUC header names the real regain time)
                reset = _float_or_zero(acc.get("reset_time_duration"))
                pause = min(reset, self.usage_pause_s) if reset > 0 else self.usage_pause_s
                self.gate.block(scope or APP_SCOPE, pause, f"x-ad-account-usage at {pct:.0f}%")
        buc = _load_json(headers.get("x-business-use-case-usage"))
        if isinstance(buc, dict):
            for key, entries in buc.items():
                for entry in entries if isinstance(entries, list) else [entries]:
                    if not isinstance(entry, dict):
                        continue
                    eta_s = 60.0 * _float_or_zero(entry.get("estimated_time_to_regain_access"))
                    pct = _max_pct(entry, ("call_count", "total_time", "total_cputime"))
                    wait = eta_s if eta_s > 0 else (self.usage_pause_s if pct >= limit else 0.0)
                    if wait <= 0:
                        continue
                    reason = f"x-business-use-case-usage {entry.get('type', '?')} at {pct:.0f}%"
                    target = account_scope(str(key)) or APP_SCOPE
                    self.gate.block(target, wait, reason)
                    if scope and scope != target:
                        self.gate.block(scope, wait, reason)


@dataclass(frozen=True)
class BatchItem:
    """One Graph batch operation; `body` is form fields (dict) or an already encoded string."""

    method: str
    relative_url: str
    body: Mapping[str, Any] | str | None = None
    name: str | None = None

    def to_wire(self) -> dict[str, Any]:
        """The item as the batch endpoint expects it."""
        out: dict[str, Any] = {"method": self.method.upper(), "relative_url": self.relative_url}
        if self.body is not None:
            out["body"] = self.body if isinstance(self.body, str) else urlencode(dict(self.body))
        if self.name:
            out["name"] = self.name
        return out

    @classmethod
    def update_adset(
        cls, adset_id: str, *, daily_budget: int | None = None, status: str | None = None
    ) -> BatchItem:
        """POST <adset_id>/ with daily_budget (minor units) and/or status."""
        return cls("POST", f"{adset_id}/", _update_fields(daily_budget, status))

    @classmethod
    def update_ad(cls, ad_id: str, *, status: str) -> BatchItem:
        """POST <ad_id>/ with status."""
        return cls("POST", f"{ad_id}/", _update_fields(None, status))

    @classmethod
    def get(cls, object_id: str, fields: Sequence[str]) -> BatchItem:
        """GET <id>/?fields=..."""
        return cls("GET", f"{object_id}/?{urlencode({'fields': ','.join(fields)})}")


@dataclass(frozen=True)
class BatchResult:
    """Outcome of one batch item: `ok`, `error` (typed `error`) or `unfinished` (came back null).

    `unfinished` and retryable errors are what `execute_batched` retries; `attempts` counts
    the rounds the item was sent in.
    """

    status: Literal["ok", "error", "unfinished"]
    code: int | None = None
    body: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)
    error: ClientError | None = None
    attempts: int = 1

    @property
    def ok(self) -> bool:
        """The item succeeded (2xx)."""
        return self.status == "ok"

    @property
    def retryable(self) -> bool:
        """Worth sending again: unfinished, or failed with a transient/throttle error."""
        if self.status == "unfinished":
            return True
        return self.status == "error" and bool(getattr(self.error, "retryable", False))


class GraphClient(MetaClient):
    """Marketing API reads and writes for one app token (sandbox or Meta).

    `report_run_after_days`: `insights` ranges longer than this many days go through an async
    report run (None, the default: only when asked with `report_run=True`); `report_runs`: how
    report runs are polled.
    """

    def __init__(
        self,
        token: str,
        *,
        report_run_after_days: int | None = None,
        report_runs: ReportRunPolicy | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(token, **kwargs)
        self._owner: dict[str, str] = {}  # object id -> ad account, learned from listings
        self.report_run_after_days = report_run_after_days
        self.report_runs = report_runs or ReportRunPolicy()
        self._answers = threading.local()  # the x-fb-trace-id of this thread's last answer

    def _observe(self, resp: requests.Response, scope: str | None) -> None:
        self._answers.trace_id = resp.headers.get("x-fb-trace-id")
        super()._observe(resp, scope)

    # ----------------------------------------------------------------- paging
    def paged(
        self, path: str, params: Mapping[str, Any], *, scope: str | None = None
    ) -> Iterator[dict[str, Any]]:
        """Yield `data` rows of a cursor-paged edge, following `after` while `next` exists."""
        query = dict(params)
        seen_cursors: set[str] = set()
        while True:
            body = self.request("GET", path, params=query, scope=scope) or {}
            yield from body.get("data") or []
            paging = body.get("paging") or {}
            after = (paging.get("cursors") or {}).get("after")
            if not paging.get("next") or not after:
                return
            if after in seen_cursors:
                raise TransportError(f"Graph API {path}: paging cursor repeated; stopping")
            seen_cursors.add(after)
            query["after"] = after

    def _edge(
        self,
        account_id: str,
        edge: str,
        fields: Sequence[str],
        limit: int,
        effective_status: Sequence[str] | None,
    ) -> list[dict]:
        path = self._path(account_path(account_id), edge)
        params: dict[str, Any] = {"fields": ",".join(fields), "limit": limit}
        if effective_status:  # Graph hides ARCHIVED/DELETED objects unless asked for them
            params["effective_status"] = json.dumps(list(effective_status))
        return list(self.paged(path, params, scope=account_scope(account_id)))

    def _remember(self, frame: pl.DataFrame, account_id: str) -> None:
        acct = str(account_id).removeprefix("act_")
        for column in ("id", "campaign_id", "adset_id"):
            if column in frame.columns:
                self._owner.update(dict.fromkeys(frame[column].drop_nulls().to_list(), acct))

    # ----------------------------------------------------------------- catalog
    def campaigns(
        self,
        account_id: str,
        *,
        fields: Sequence[str] = CAMPAIGN_FIELDS,
        limit: int = 500,
        effective_status: Sequence[str] | None = None,
    ) -> pl.DataFrame:
        """Campaigns: campaign_id, account_id, name, objective, status, effective_status,
        created_time (Datetime UTC) and any other requested field."""
        rows = self._edge(account_id, "campaigns", fields, limit, effective_status)
        frame = _catalog_frame(rows, fields, id_name="campaign_id", account_id=account_id)
        self._remember(frame.rename({"campaign_id": "id"}), account_id)
        return frame

    def adsets(
        self,
        account_id: str,
        *,
        fields: Sequence[str] = ADSET_FIELDS,
        limit: int = 500,
        effective_status: Sequence[str] | None = None,
    ) -> pl.DataFrame:
        """Ad sets: adset_id, campaign_id, account_id, name, daily_budget (Int64 minor units),
        status, effective_status, created_time."""
        rows = self._edge(account_id, "adsets", fields, limit, effective_status)
        frame = _catalog_frame(rows, fields, id_name="adset_id", account_id=account_id)
        self._remember(frame.rename({"adset_id": "id"}), account_id)
        return frame

    def ads(
        self,
        account_id: str,
        *,
        fields: Sequence[str] = AD_FIELDS,
        limit: int = 500,
        effective_status: Sequence[str] | None = None,
    ) -> pl.DataFrame:
        """Ads: ad_id, name, adset_id, campaign_id, account_id, status, effective_status,
        created_time, and the creative flattened as creative_<field> (creative_id, creative_name,
        creative_title, creative_body, creative_call_to_action_type; with
        `AD_FIELDS_WITH_TRAITS` also creative_hook_type, _format, _emotion, _lead_gen_form_id)."""
        rows = self._edge(account_id, "ads", fields, limit, effective_status)
        frame = _catalog_frame(rows, fields, id_name="ad_id", account_id=account_id)
        self._remember(frame.rename({"ad_id": "id"}), account_id)
        return frame

    def ad_accounts(
        self, fields: Sequence[str] = ("id", "name", "currency", "timezone_name")
    ) -> list[dict]:
        """Ad accounts the token can see (`me/adaccounts`): dicts with `account_id` (no `act_`)."""
        rows = self.paged(self._path("me", "adaccounts"), {"fields": ",".join(fields)})
        return [
            {**row, "account_id": str(row.get("account_id") or row["id"]).removeprefix("act_")}
            for row in rows
        ]

    def minimum_budgets(self, account_id: str) -> list[dict[str, Any]]:
        """`act_<id>/minimum_budgets` rows with `min_*` amounts as ints (minor units)."""
        path = self._path(account_path(account_id), "minimum_budgets")
        rows = list(self.paged(path, {}, scope=account_scope(account_id)))
        return [
            {k: (_int_or_none(v) if k.startswith("min_") else v) for k, v in row.items()}
            for row in rows
        ]

    # ----------------------------------------------------------------- insights
    def insights(
        self,
        account_id: str,
        since: date,
        until: date,
        fields: Sequence[str] = INSIGHT_FIELDS,
        *,
        level: str = "ad",
        lead_action_types: Sequence[str] = ("lead",),
        limit: int = 500,
        report_run: bool | None = None,
        on_progress: Callable[[ReportRunStatus], None] | None = None,
    ) -> pl.DataFrame:
        """Daily (`time_increment=1`) insights rows for `[since, until]` (inclusive dates).

        Columns: each requested field, typed: date_start/date_stop Date; spend, ctr, cpc, cpm
        Float64; impressions, reach, clicks, inline_link_clicks Int64; ids and the rest Utf8;
        `actions`-like lists as List(Struct(action_type, value Float64)). When `actions` is
        requested, `leads` (Int64) sums the values of `lead_action_types` (0 when absent).

        `report_run`: True reads through an async report run (`insights_report_run`), False pages
        the synchronous edge; None (default) uses a report run only when the range is longer
        than `report_run_after_days`. Both ways give the same rows and columns.
        """
        if until < since:
            raise ValueError(f"insights: until {until} is before since {since}")
        if report_run is None:
            threshold = self.report_run_after_days
            report_run = threshold is not None and (until - since).days + 1 > threshold
        if report_run:
            return self.insights_report_run(
                account_id,
                since,
                until,
                fields,
                level=level,
                lead_action_types=lead_action_types,
                limit=limit,
                on_progress=on_progress,
            )
        params = {**_insights_query(since, until, fields, level), "limit": limit}
        path = self._path(account_path(account_id), "insights")
        rows = list(self.paged(path, params, scope=account_scope(account_id)))
        return insights_frame(rows, fields, lead_action_types=lead_action_types)

    def insights_report_run(
        self,
        account_id: str,
        since: date,
        until: date,
        fields: Sequence[str] = INSIGHT_FIELDS,
        *,
        level: str = "ad",
        lead_action_types: Sequence[str] = ("lead",),
        limit: int = 500,
        on_progress: Callable[[ReportRunStatus], None] | None = None,
    ) -> pl.DataFrame:
        """`insights` through one async report run: start it, wait for `Job Completed`, page
        its rows. Raises `ReportRunError` / `ReportRunTimeoutError` (see `wait_report_run`)."""
        if until < since:
            raise ValueError(f"insights: until {until} is before since {since}")
        run_id = self.start_report_run(account_id, since, until, fields, level=level)
        self.wait_report_run(run_id, account_id=account_id, on_progress=on_progress)
        rows = list(self.report_run_rows(run_id, account_id=account_id, limit=limit))
        return insights_frame(rows, fields, lead_action_types=lead_action_types)

    def start_report_run(
        self,
        account_id: str,
        since: date,
        until: date,
        fields: Sequence[str] = INSIGHT_FIELDS,
        *,
        level: str = "ad",
    ) -> str:
        """`POST act_<id>/insights` with the synchronous call's parameters; the `report_run_id`.

        A retried POST (5xx, throttle) may leave an extra run on Meta's side; it is never read.
        """
        path = self._path(account_path(account_id), "insights")
        data = _insights_query(since, until, fields, level)
        answer = self.request("POST", path, data=data, scope=account_scope(account_id)) or {}
        run_id = answer.get("report_run_id") or answer.get("id")
        if not run_id:
            raise TransportError(f"Graph API POST /{path}: answer carries no report_run_id")
        log.info("insights report run %s started for %s, %s..%s", run_id, account_id, since, until)
        return str(run_id)

    def wait_report_run(
        self,
        report_run_id: str,
        *,
        account_id: str | None = None,
        on_progress: Callable[[ReportRunStatus], None] | None = None,
    ) -> ReportRunStatus:
        """Poll `GET /<report_run_id>` until `async_status` is `Job Completed`; its last status.

        Each poll is an ordinary call (timeouts, retries, throttle blocks); between polls the
        client sleeps `report_runs.delay(n)`. Any other status (`Job Not Started`, `Job
        Started`, `Job Running`, even at 100 %) keeps polling. `on_progress` and the log hear of
        every change of status or percent. Raises `ReportRunError` on `Job Failed` / `Job
        Skipped`, `ReportRunTimeoutError` once `report_runs.timeout_s` has passed.
        """
        policy = self.report_runs
        scope = account_scope(account_id)
        path = self._path(str(report_run_id))
        params = {"fields": ",".join(REPORT_STATUS_FIELDS)}
        started = self.clock()
        seen: tuple[str, int] | None = None
        polls = 0
        while True:
            body = self.request("GET", path, params=params, scope=scope) or {}
            polls += 1
            status = ReportRunStatus(
                report_run_id=str(report_run_id),
                async_status=str(body.get("async_status") or "unknown"),
                percent_completion=_int_or_none(body.get("async_percent_completion")) or 0,
                polls=polls,
                elapsed_s=self.clock() - started,
                date_start=body.get("date_start"),
                date_stop=body.get("date_stop"),
            )
            if (status.async_status, status.percent_completion) != seen:
                seen = (status.async_status, status.percent_completion)
                log.info(
                    "insights report run %s: %s, %d%% after %.0f s (%d polls)",
                    report_run_id,
                    status.async_status,
                    status.percent_completion,
                    status.elapsed_s,
                    polls,
                )
                if on_progress is not None:
                    on_progress(status)
            if status.async_status == REPORT_COMPLETED:
                return status
            if status.async_status in REPORT_NO_DATA:
                raise self._report_error(ReportRunError, status, "ended")
            left = policy.timeout_s - (self.clock() - started)
            if left <= 0:
                raise self._report_error(
                    ReportRunTimeoutError, status, f"not completed within {policy.timeout_s:.0f} s"
                )
            self.sleep(min(policy.delay(polls), left))

    def report_run_rows(
        self, report_run_id: str, *, account_id: str | None = None, limit: int = 500
    ) -> Iterator[dict[str, Any]]:
        """Raw rows of a completed report run (`GET /<report_run_id>/insights`, cursor-paged)."""
        scope = account_scope(account_id)
        yield from self.paged(
            self._path(str(report_run_id), "insights"), {"limit": limit}, scope=scope
        )

    def _report_error(
        self, cls: type[ReportRunError], status: ReportRunStatus, what: str
    ) -> ReportRunError:
        window = f" for {status.date_start}..{status.date_stop}" if status.date_start else ""
        message = (
            f"Graph API insights report run {status.report_run_id}{window} {what}: "
            f"async_status {status.async_status!r} at {status.percent_completion}% after "
            f"{status.polls} polls ({status.elapsed_s:.0f} s)"
        )
        return cls(
            self._redact(message),
            report_run_id=status.report_run_id,
            async_status=status.async_status,
            percent_completion=status.percent_completion,
            trace_id=getattr(self._answers, "trace_id", None),
            method="GET",
            path="/" + self._path(status.report_run_id),
        )

    # ----------------------------------------------------------------- leads
    def leads(
        self,
        form_id: str | None = None,
        *,
        ad_id: str | None = None,
        since: datetime | None = None,
        account_id: str | None = None,
        fields: Sequence[str] = LEAD_FIELDS,
        limit: int = 500,
    ) -> list[dict[str, Any]]:
        """Leads of one lead form (or one ad), optionally created after `since`.

        Each: lead_id, created_time (aware UTC datetime), ad_id, adset_id, campaign_id, form_id,
        fields ({field name: first value}, RAW PII: hash before storing).
        """
        if (form_id is None) == (ad_id is None):
            raise ValueError("leads: pass exactly one of form_id or ad_id")
        params: dict[str, Any] = {"fields": ",".join(fields), "limit": limit}
        if since is not None:
            filtering = [
                {"field": "time_created", "operator": "GREATER_THAN", "value": _epoch_s(since)}
            ]
            params["filtering"] = json.dumps(filtering)
        object_id = form_id if form_id is not None else ad_id
        scope = account_scope(account_id or (self._owner.get(ad_id) if ad_id else None))
        out = []
        for row in self.paged(self._path(str(object_id), "leads"), params, scope=scope):
            answers = {
                item.get("name"): (item.get("values") or [None])[0]
                for item in row.get("field_data") or []
            }
            out.append(
                {
                    "lead_id": str(row.get("id")),
                    "created_time": parse_graph_time(row.get("created_time")),
                    "ad_id": _str_or_none(row.get("ad_id")),
                    "adset_id": _str_or_none(row.get("adset_id")),
                    "campaign_id": _str_or_none(row.get("campaign_id")),
                    "form_id": _str_or_none(row.get("form_id")) or form_id,
                    "fields": answers,
                }
            )
        return out

    # ----------------------------------------------------------------- writes
    def update_adset(
        self,
        adset_id: str,
        daily_budget: int | None = None,
        status: str | None = None,
        *,
        account_id: str | None = None,
    ) -> dict[str, Any]:
        """Set an ad set's daily budget (int minor units) and/or status; Graph's answer.

        Raises `BudgetEditLimitError` (not retried) past 4 budget edits per ad set per hour.
        """
        data = _update_fields(daily_budget, status)
        scope = account_scope(account_id or self._owner.get(adset_id))
        return self.request("POST", self._path(adset_id), data=data, scope=scope) or {}

    def update_ad(
        self, ad_id: str, status: str, *, account_id: str | None = None
    ) -> dict[str, Any]:
        """Set an ad's status; Graph's answer."""
        data = _update_fields(None, status)
        scope = account_scope(account_id or self._owner.get(ad_id))
        return self.request("POST", self._path(ad_id), data=data, scope=scope) or {}

    # ----------------------------------------------------------------- batch
    def batch(
        self, items: Sequence[BatchItem | Mapping[str, Any]], *, account_id: str | None = None
    ) -> list[BatchResult]:
        """Send at most 50 operations in one request; one `BatchResult` per item, in order.

        The request itself is retried like any call; per-item failures are returned, not raised.
        """
        if len(items) > BATCH_LIMIT:
            raise TooManyItemsError(
                f"Graph batch takes at most {BATCH_LIMIT} items, got {len(items)}; "
                "use execute_batched() to chunk"
            )
        if not items:
            return []
        wire = [i.to_wire() if isinstance(i, BatchItem) else dict(i) for i in items]
        scope = account_scope(account_id)
        answer = self.request("POST", self._path(""), data={"batch": json.dumps(wire)}, scope=scope)
        if not isinstance(answer, list):
            raise TransportError("Graph API batch: answer is not a JSON array")
        answer = list(answer) + [None] * (len(wire) - len(answer))
        return [self._batch_result(raw, wire[i], scope) for i, raw in enumerate(answer)]

    def _batch_result(self, raw: Any, item: Mapping[str, Any], scope: str | None) -> BatchResult:
        if raw is None:
            return BatchResult("unfinished")
        headers = CaseInsensitiveDict(
            {h.get("name", ""): h.get("value", "") for h in raw.get("headers") or []}
        )
        self.observe_usage(headers, scope)
        code = _int_or_none(raw.get("code"))
        try:
            body = json.loads(raw["body"]) if isinstance(raw.get("body"), str) else raw.get("body")
        except ValueError:
            body = raw.get("body")
        if code is not None and 200 <= code < 300:
            return BatchResult("ok", code, body, headers)
        err, _, _ = graph_error(
            body,
            http_status=code,
            method=str(item.get("method")),
            path=str(item.get("relative_url", "")).split("?")[0],
            redact=self._redact,
        )
        return BatchResult("error", code, body, headers, err)

    def execute_batched(
        self,
        items: Sequence[BatchItem | Mapping[str, Any]],
        *,
        account_id: str | None = None,
        max_rounds: int | None = None,
    ) -> list[BatchResult]:
        """Run any number of operations in batches of 50; one outcome per item, input order.

        Items that come back null (unfinished) or with a transient/throttle error are re-sent
        (only those) with backoff, for up to `max_rounds` rounds (default: retry max_attempts)
        and within the policy's max total wait. A chunk whose request fails outright yields an
        `error` result (with that exception) for each of its items; nothing is raised.
        """
        rounds = max_rounds or self.retry.max_attempts
        results: list[BatchResult | None] = [None] * len(items)
        pending = list(range(len(items)))
        waited = 0.0
        for round_no in range(1, rounds + 1):
            for start in range(0, len(pending), BATCH_LIMIT):
                chunk = pending[start : start + BATCH_LIMIT]
                try:
                    outcome = self.batch([items[i] for i in chunk], account_id=account_id)
                except ClientError as exc:
                    outcome = [BatchResult("error", error=exc) for _ in chunk]
                for i, res in zip(chunk, outcome, strict=True):
                    results[i] = replace(res, attempts=round_no)
            pending = [i for i in pending if results[i].retryable]  # type: ignore[union-attr]
            if not pending or round_no == rounds:
                break
            delay = self.retry.backoff(round_no, self.rng)
            if any(_is_throttle(results[i]) for i in pending):
                delay = max(delay, self.retry.throttle_min_delay_s)
            if waited + delay > self.retry.max_total_wait_s:
                break
            self.sleep(delay)
            waited += delay
        return [r for r in results if r is not None]


# --------------------------------------------------------------------- frames
def _columns(fields: Sequence[str], id_name: str) -> list[str]:
    """Column names for a fields spec: `id` -> `id_name`, `creative{a,b}` -> creative_a, ..."""
    columns: list[str] = []
    for spec in fields:
        if "{" in spec:
            key, inner = spec.split("{", 1)
            columns += [f"{key}_{sub.strip()}" for sub in inner.rstrip("}").split(",")]
        else:
            columns.append(id_name if spec == "id" else spec)
    return columns


def _catalog_frame(
    rows: list[dict[str, Any]], fields: Sequence[str], *, id_name: str, account_id: str
) -> pl.DataFrame:
    """Rows of a catalog edge as a typed frame; one level of nesting is flattened."""
    columns = _columns(fields, id_name)
    flat = []
    for row in rows:
        out: dict[str, Any] = {}
        for key, value in row.items():
            if isinstance(value, dict):  # nested object, e.g. creative -> creative_title
                out.update({f"{key}_{sub}": v for sub, v in value.items()})
            else:
                out[id_name if key == "id" else key] = value
        flat.append(out)
    columns += sorted({k for row in flat for k in row} - set(columns))
    frame = pl.DataFrame(
        [[_str_or_none(row.get(c)) for c in columns] for row in flat],
        schema=dict.fromkeys(columns, pl.Utf8),
        orient="row",
    )
    frame = _cast_metrics(frame)
    if "account_id" in frame.columns:
        acct = str(account_id).removeprefix("act_")
        frame = frame.with_columns(
            pl.col("account_id").str.strip_prefix("act_").fill_null(acct).alias("account_id")
        )
    return frame


def insights_frame(
    rows: list[dict[str, Any]],
    fields: Sequence[str] = INSIGHT_FIELDS,
    *,
    lead_action_types: Sequence[str] = ("lead",),
) -> pl.DataFrame:
    """Graph insights rows (all strings) as a typed frame; see `GraphClient.insights`."""
    columns = list(dict.fromkeys(f.split("{")[0] for f in fields))
    schema: dict[str, Any] = {
        c: (_ACTION_DTYPE if c in _ACTION_LISTS else pl.Utf8) for c in columns
    }
    records = []
    for row in rows:
        rec = {}
        for c in columns:
            value = row.get(c)
            if c in _ACTION_LISTS:
                rec[c] = [
                    {"action_type": a.get("action_type"), "value": _float_or_none(a.get("value"))}
                    for a in value or []
                ]
            else:
                rec[c] = _str_or_none(value)
        records.append(rec)
    frame = _cast_metrics(pl.DataFrame(records, schema=schema, orient="row"))
    if "actions" in frame.columns:
        wanted = list(lead_action_types)
        frame = frame.with_columns(
            pl.col("actions")
            .list.eval(
                pl.element()
                .filter(pl.element().struct.field("action_type").is_in(wanted))
                .struct.field("value")
            )
            .list.sum()
            .fill_null(0)
            .round(0)
            .cast(pl.Int64)
            .alias("leads")
        )
    return frame


def _cast_metrics(frame: pl.DataFrame) -> pl.DataFrame:
    """Cast Graph's string metrics to numbers, dates and datetimes (vectorized)."""
    exprs = []
    for c in frame.columns:
        if frame.schema[c] != pl.Utf8:
            continue
        if c in _INT_METRICS:
            exprs.append(pl.col(c).cast(pl.Float64, strict=False).round(0).cast(pl.Int64))
        elif c in _FLOAT_METRICS:
            exprs.append(pl.col(c).cast(pl.Float64, strict=False))
        elif c in _DATE_FIELDS:
            exprs.append(pl.col(c).str.to_date("%Y-%m-%d", strict=False))
        elif c in _TIME_FIELDS:
            exprs.append(
                pl.col(c)
                .str.replace(r"([+-]\d\d):?(\d\d)$", "${1}${2}")
                .str.to_datetime("%Y-%m-%dT%H:%M:%S%z", strict=False, time_unit="us")
                .dt.convert_time_zone("UTC")
            )
    return frame.with_columns(exprs) if exprs else frame


# --------------------------------------------------------------------- small helpers
def _insights_query(since: date, until: date, fields: Sequence[str], level: str) -> dict[str, Any]:
    """Parameters shared by the synchronous insights call and the report run that replaces it."""
    return {
        "level": level,
        "fields": ",".join(fields),
        "time_increment": 1,
        "time_range": json.dumps({"since": since.isoformat(), "until": until.isoformat()}),
    }


def _update_fields(daily_budget: int | None, status: str | None) -> dict[str, str]:
    if daily_budget is None and status is None:
        raise ValueError("nothing to update: pass daily_budget and/or status")
    data: dict[str, str] = {}
    if daily_budget is not None:
        if isinstance(daily_budget, bool) or int(daily_budget) != daily_budget or daily_budget <= 0:
            raise ValueError(
                f"daily_budget must be a positive int (minor units), got {daily_budget!r}"
            )
        data["daily_budget"] = str(int(daily_budget))
    if status is not None:
        if status not in AD_STATUSES:
            raise ValueError(f"status must be one of {sorted(AD_STATUSES)}, got {status!r}")
        data["status"] = status
    return data


def _is_throttle(result: BatchResult | None) -> bool:
    err = result.error if result is not None else None
    return isinstance(err, GraphAPIError) and err.code in THROTTLE_CODES


def _epoch_s(moment: datetime) -> int:
    if moment.tzinfo is None:
        raise ValueError("since must be timezone-aware")
    return int(moment.timestamp())


def _load_json(value: str | None) -> Any:
    if not value:
        return None
    try:
        return json.loads(value)
    except ValueError:
        return None


def _max_pct(obj: Mapping[str, Any], keys: Sequence[str]) -> float:
    return max((_float_or_zero(obj.get(k)) for k in keys), default=0.0)


def _float_or_zero(value: Any) -> float:
    out = _float_or_none(value)
    return 0.0 if out is None or math.isnan(out) else out


def _float_or_none(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _int_or_none(value: Any) -> int | None:
    out = _float_or_none(value)
    return None if out is None or math.isnan(out) else int(out)


def _str_or_none(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)
