"""Safe execution of ad changes (group `execution`): guarded plan, blocking check, batched apply.

``ad_change_plan`` turns ``budget_recommendations`` (per ad set) and the kills of ``ad_scores``
(per ad) into a guarded plan (``domain.guardrails.plan_changes``) against the ad sets' budgets
and the ads' statuses read fresh from the Graph API, the ledger's history and each account's
``GuardrailConfig`` (settings file ``guardrails:`` + Meta's ``minimum_budgets``, kept in
``ad_change_minimums`` for the check and the apply step). Plans are budget-neutral by default
(``keep_total``): trimming one side of a reallocation cuts back the other side, so the guardrails
never shrink or grow an account's total. A trimmed request stays in the plan with the rule that
trimmed it; a held-back one is ``skipped``.

``ad_change_plan_within_guardrails`` (blocking) re-verifies every guardrail and the total-change
limit per run (``OPTIMIZER_MAX_CHANGES_PER_RUN``, default ``MAX_CHANGES_PER_RUN``); a violation
stops the run before ``ad_change_log`` touches Meta.

``ad_change_log`` applies the plan and keeps the ledger (warehouse table ``ad_change_log``, one
row per change, ``domain.ad_changes.LEDGER_SCHEMA``). Each run:

1. reconciles rows left ``sending`` by a crash: batch GETs read each object's current value and
   ``reconcile`` marks them applied / to re-send / moved externally, before anything is sent;
2. appends the plan (idempotent by ``change_id``); unsent rows of older plans are superseded;
3. re-checks the guardrails against a fresh read (state may have moved since planning);
4. sends (in two phases when an account has a ``daily_cap``: decreases and pauses, then
   increases re-checked against the cap) as Graph batch requests of at most
   50 items, ``parallel_batches`` in flight; every row is persisted ``sending`` BEFORE its
   batch leaves and each item's answer is recorded on its own. Null items and unanswered
   requests are reconciled by reading; retryable errors go out again next round with backoff;
   permanent errors are ``failed`` with Meta's message; 613/1487632 is never retried.

The sending client never retries a batch POST by itself (a retried POST whose first answer was
lost could apply a change twice); only this module re-sends, and only after reading.

Approval: in sandbox mode the plan is applied automatically. In live mode it is applied for an
account when the settings file says ``auto_apply: true`` for it, or for every account when the run
config says ``approve: true`` (a person launching ``ad_change_log`` from the UI's launchpad with
``ops: {ad_change_log: {config: {approve: true}}}``; the run config stays on the run as the record
of who approved what). Otherwise the rows wait as ``planned`` (metadata ``awaiting_approval``).

Runs that write to Meta carry the run tag ``optimizer/meta-writes`` (``apply_ad_changes`` job;
``dagster.yaml`` lets one such run go at a time) and the asset sits in the ``duckdb`` pool.
``ad_change_runs`` keeps one row per apply run (counts, batch and read requests).
"""

import concurrent.futures
import os
import queue
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

import dagster as dg
import polars as pl
from pydantic import Field

from optimizer_assets.clients.errors import (
    APIError,
    ClientError,
    RetriesExhaustedError,
    ThrottledError,
)
from optimizer_assets.clients.graph import GraphClient
from optimizer_assets.clients.http import RetryPolicy, UsageGate
from optimizer_assets.defs.resources import MetaResource, OptimizerResource, WarehouseResource
from optimizer_assets.defs.revenue import md_table
from optimizer_assets.domain import ad_changes as ledger_domain
from optimizer_assets.domain import guardrails
from optimizer_assets.domain.guardrails import GuardrailConfig
from optimizer_assets.warehouse import Warehouse

PLAN_TABLE = "ad_change_plan"
LEDGER_TABLE = "ad_change_log"
STATE_TABLE = "ad_change_plan_state"  # the ad set budgets the plan was computed from
RUNS_TABLE = "ad_change_runs"  # one row per apply run: counts and HTTP calls
MINIMUMS_TABLE = "ad_change_minimums"  # Meta's minimum daily budget per account, as planned
MINIMUMS_MAX_AGE = timedelta(hours=24)  # older minimums are read from Meta again
META_WRITES_TAG = "optimizer/meta-writes"
MAX_CHANGES_PER_RUN = 2000  # all accounts together; per account see GuardrailConfig
RULE_TOTAL = "max_total_changes_per_run"
ALL_STATUSES = ("ACTIVE", "PAUSED", "ARCHIVED", "DELETED")
ADSET_READ_FIELDS = ("id", "campaign_id", "account_id", "daily_budget", "status")
AD_READ_FIELDS = ("id", "adset_id", "campaign_id", "account_id", "status")

RECOMMENDATION_SCHEMA = {
    "adset_id": pl.String,
    "campaign_id": pl.String,
    "account_id": pl.String,
    "current_budget": pl.Int64,
    "recommended_budget": pl.Int64,
}
KILL_SCHEMA = {"ad_id": pl.String, "campaign_id": pl.String, "account_id": pl.String}
ADSET_SCHEMA = {
    "adset_id": pl.String,
    "campaign_id": pl.String,
    "account_id": pl.String,
    "daily_budget": pl.Int64,
    "status": pl.String,
}
AD_SCHEMA = {
    "ad_id": pl.String,
    "adset_id": pl.String,
    "campaign_id": pl.String,
    "account_id": pl.String,
    "status": pl.String,
}
VIOLATION_SCHEMA = {
    "rule": pl.String,
    "account_id": pl.String,
    "object_id": pl.String,
    "change_id": pl.String,
    "detail": pl.String,
}
RUN_SCHEMA = {
    "run_id": pl.String,
    "at": pl.Datetime("us", "UTC"),
    "planned": pl.Int64,
    "applied": pl.Int64,
    "failed": pl.Int64,
    "skipped": pl.Int64,
    "awaiting_approval": pl.Int64,
    "reconciled": pl.Int64,
    "batch_requests": pl.Int64,
    "batch_items": pl.Int64,
    "read_requests": pl.Int64,
    "http_requests": pl.Int64,
}


def max_total_changes() -> int:
    """Planned changes allowed in one run across all accounts (env override, else the default)."""
    value = os.environ.get("OPTIMIZER_MAX_CHANGES_PER_RUN", "").strip()
    return int(value) if value else MAX_CHANGES_PER_RUN


# ----------------------------------------------------------------------------- reads


def _typed(frame: pl.DataFrame, schema: Mapping[str, pl.DataType]) -> pl.DataFrame:
    """``frame``'s ``schema`` columns, cast; an empty typed frame when a column is missing."""
    if frame.is_empty() or not set(schema) <= set(frame.columns):
        return pl.DataFrame(schema=dict(schema))
    return frame.select(
        pl.col(c).cast(pl.Float64).round(0).cast(t) if t == pl.Int64 else pl.col(c).cast(t)
        for c, t in schema.items()
    )


def read_requests(wh: Warehouse) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(budget recommendations, ad kills) from the allocator's tables; empty when absent."""
    recs = _typed(wh.read("budget_recommendations"), RECOMMENDATION_SCHEMA)
    scores = wh.read("ad_scores")
    if scores.is_empty() or "action" not in scores.columns:
        return recs, pl.DataFrame(schema=KILL_SCHEMA)
    kills = _typed(scores.filter(pl.col("action") == "kill"), KILL_SCHEMA)
    return recs, kills.unique("ad_id", keep="first", maintain_order=True)


def read_adsets(graph: GraphClient, account_ids: Iterable[str]) -> pl.DataFrame:
    """Current ad sets of the accounts (one paged listing each): ``ADSET_SCHEMA``."""
    frames = [pl.DataFrame(schema=ADSET_SCHEMA)]
    for account_id in sorted(set(account_ids)):  # a listing per account, not per ad set
        rows = graph.adsets(account_id, fields=ADSET_READ_FIELDS, effective_status=ALL_STATUSES)
        frames.append(_typed(rows, ADSET_SCHEMA))
    return pl.concat(frames)


def read_ads(graph: GraphClient, account_ids: Iterable[str]) -> pl.DataFrame:
    """Current ads (id, parents, own status) of the accounts: ``AD_SCHEMA``."""
    frames = [pl.DataFrame(schema=AD_SCHEMA)]
    for account_id in sorted(set(account_ids)):
        rows = graph.ads(account_id, fields=AD_READ_FIELDS, effective_status=ALL_STATUSES)
        frames.append(_typed(rows, AD_SCHEMA))
    return pl.concat(frames)


def meta_minimums(
    graph: GraphClient, account_ids: Iterable[str], settings, known: Mapping[str, int] | None = None
) -> dict[str, int]:
    """Meta's minimum daily budget (minor units) per account; ``known`` ones are not read again."""
    out: dict[str, int] = {}
    for account_id in sorted(set(account_ids)):  # one minimum_budgets call per unknown account
        if known and account_id in known:
            out[account_id] = int(known[account_id])
            continue
        currency = settings.for_account(account_id).currency
        rows = graph.minimum_budgets(account_id)
        out[account_id] = guardrails.min_budget_from_rows(rows, currency)
    return out


def guardrail_configs(settings, minimums: Mapping[str, int]) -> dict[str, GuardrailConfig]:
    """Per account: ``GuardrailConfig`` of its settings ``guardrails:`` with Meta's minimum budget.

    The floor is Meta's minimum, or the configured ``min_budget`` when the settings name a larger
    one. Plans are budget-neutral (``keep_total``) unless the settings say ``keep_total: false``:
    the allocator moves money between ad sets, and trimming one side of a move must not shrink
    or grow the account's total.
    """
    out: dict[str, GuardrailConfig] = {}
    for account_id, meta_min in minimums.items():  # a handful of accounts
        raw = {"keep_total": True, **settings.for_account(account_id).guardrails}
        config = GuardrailConfig.from_dict(raw)
        floor = max(meta_min, config.min_budget) if "min_budget" in raw else meta_min
        out[account_id] = replace(config, min_budget=floor)
    return out


def store_minimums(wh: Warehouse, minimums: Mapping[str, int], now: datetime) -> None:
    """Keep the minimums the plan used, for its check and the apply step."""
    frame = pl.DataFrame(
        {"account_id": list(minimums), "min_budget": list(minimums.values())},
        schema={"account_id": pl.String, "min_budget": pl.Int64},
    ).with_columns(read_at=pl.lit(now, dtype=pl.Datetime("us", "UTC")))
    wh.upsert(MINIMUMS_TABLE, frame, ["account_id"])


def stored_minimums(wh: Warehouse, now: datetime) -> dict[str, int]:
    """Minimums read within ``MINIMUMS_MAX_AGE`` (older ones are read again)."""
    rows = wh.read(MINIMUMS_TABLE)
    if rows.is_empty():
        return {}
    fresh = rows.filter(pl.col("read_at") >= now - MINIMUMS_MAX_AGE)
    return dict(fresh.select("account_id", "min_budget").iter_rows())


def kill_requests(kills: pl.DataFrame, ads: pl.DataFrame) -> pl.DataFrame:
    """``ad_actions`` for the planner: each kill with the ad's current status (fresh read)."""
    return kills.join(
        ads.select("ad_id", current_status="status"), on="ad_id", how="left"
    ).with_columns(action=pl.lit("kill"))


def read_plan(wh: Warehouse) -> pl.DataFrame:
    """The stored plan (``PLAN_SCHEMA``); empty when none was made yet."""
    plan = wh.read(PLAN_TABLE)
    if plan.is_empty():
        return pl.DataFrame(schema=guardrails.PLAN_SCHEMA)
    return plan.select(list(guardrails.PLAN_SCHEMA)).cast(guardrails.PLAN_SCHEMA)


# ----------------------------------------------------------------------------- the ledger


class LedgerStore:
    """The ledger in the warehouse; every write is an upsert of the touched rows by change_id."""

    def __init__(self, wh: Warehouse, table: str = LEDGER_TABLE) -> None:
        self.wh = wh
        self.table = table
        self.writes = 0

    def load(self) -> pl.DataFrame:
        rows = self.wh.read(self.table)
        if rows.is_empty():
            return ledger_domain.empty_ledger()
        schema = ledger_domain.LEDGER_SCHEMA
        return rows.select(list(schema)).cast(schema)

    def save(self, ledger: pl.DataFrame, change_ids: Sequence[str] | pl.Series) -> None:
        ids = pl.Series(list(change_ids), dtype=pl.String)
        if ids.is_empty():
            return
        self.wh.upsert(
            self.table, ledger.filter(pl.col("change_id").is_in(ids.implode())), ["change_id"]
        )
        self.writes += 1


def _ids(frame: pl.DataFrame) -> list[str]:
    return frame["change_id"].to_list()


def _in(ids: Sequence[str]) -> pl.Expr:
    return pl.col("change_id").is_in(pl.Series(list(ids), dtype=pl.String).implode())


def plan_violations(
    plan: pl.DataFrame,
    history: pl.DataFrame,
    now: datetime,
    configs: Mapping[str, GuardrailConfig],
    current: pl.DataFrame | None,
    max_total: int,
) -> pl.DataFrame:
    """Every guardrail the plan's ``planned`` rows break, plus the total-change limit per run."""
    planned = plan.filter(pl.col("status") == guardrails.PLANNED)
    found = (
        guardrails.check_plan(plan, history, now, configs, current=current)
        if planned.height
        else []
    )
    rows = [(v.rule, v.account_id, v.object_id, v.change_id, v.detail) for v in found]
    if planned.height > max_total:
        detail = f"{planned.height} planned changes in one run; the limit is {max_total}"
        rows.append((RULE_TOTAL, None, None, None, detail))
    return pl.DataFrame(rows, schema=VIOLATION_SCHEMA, orient="row")


def approved_accounts(
    mode: str, settings, account_ids: Iterable[str], approve: bool
) -> frozenset[str]:
    """Accounts whose changes may go out now (see the module docstring: Approval)."""
    ids = frozenset(account_ids)
    if mode == "sandbox" or approve:
        return ids
    return frozenset(a for a in ids if settings.for_account(a).auto_apply)


# ----------------------------------------------------------------------------- sending


@dataclass(frozen=True)
class GraphEndpoint:
    """Where and how to reach the Graph API; builds read clients and non-retrying send clients."""

    token: str = field(repr=False)
    base_url: str
    api_version: str = "v24.0"

    @classmethod
    def of(cls, meta: MetaResource) -> "GraphEndpoint":
        return cls(meta.access_token, meta.base_url, meta.api_version)

    def reader(self) -> GraphClient:
        """A client for reads (GETs are safe to retry)."""
        return GraphClient(self.token, base_url=self.base_url, api_version=self.api_version)

    def sender(self, gate: UsageGate | None = None) -> GraphClient:
        """A client whose POSTs are never retried by the client itself (see module doc)."""
        client = GraphClient(
            self.token,
            base_url=self.base_url,
            api_version=self.api_version,
            retry=RetryPolicy(max_attempts=1),
        )
        if gate is not None:
            client.gate = gate  # one view of Meta's usage blocks for every sending thread
        return client


@dataclass(frozen=True)
class SendOptions:
    """How the apply step sends: batch size, parallel batches, rounds and their backoff."""

    batch_size: int = ledger_domain.MAX_BATCH_SIZE
    parallel_batches: int = 3  # batches in flight; Meta's limits are per ad account and app
    max_rounds: int = 5  # send rounds per phase (null items / retryable errors go again)
    max_attempts: int = 5  # sends per change before it is given up
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    throttle_min_delay_s: float = 2.0
    # answers are written to the ledger at least this often (and at each round's end); a crash
    # in between leaves those rows `sending`, which the next run resolves by reading
    flush_interval_s: float = 1.0

    def policy(self) -> RetryPolicy:
        return RetryPolicy(
            base_delay_s=self.backoff_base_s,
            max_delay_s=self.backoff_max_s,
            throttle_min_delay_s=self.throttle_min_delay_s,
        )


@dataclass
class ExecutionStats:
    """What one apply run did (all counts are rows of the ledger or HTTP requests)."""

    reconciled: int = 0  # rows left `sending` by an earlier run, resolved by reading
    superseded: int = 0  # unsent rows of older plans set aside
    awaiting_approval: int = 0  # live mode: rows kept `planned` for a person's approval
    recheck_skipped: int = 0  # rows the re-check before sending held back
    batch_requests: int = 0  # batch POSTs sent
    batch_items: int = 0  # change items inside them (an item re-sent counts again)
    null_items: int = 0  # items answered null (unfinished), resolved by reading
    unanswered_batches: int = 0  # batch POSTs without a usable answer, resolved by reading
    rounds: int = 0
    read_requests: int = 0  # GETs: listings, minimum budgets, reconcile batches
    write_requests: int = 0  # HTTP requests of the sending clients
    ledger_writes: int = 0
    seconds: float = 0.0

    @property
    def http_requests(self) -> int:
        return self.read_requests + self.write_requests


def _request_failure(exc: ClientError) -> tuple[str, Any]:
    """Classify a batch POST that raised: ("rejected", item answer) when Meta answered the
    request with a 4xx (no item ran) or the client refused to call; ("unknown", text) when
    the request may have run (5xx, timeout, reset): those rows are reconciled by reading."""
    err = exc.last_error if isinstance(exc, RetriesExhaustedError) else exc
    if isinstance(err, ThrottledError):
        body = {"error": {"message": str(err)[:300], "is_transient": True}}
        return "rejected", {"code": 429, "body": body}
    if isinstance(err, APIError) and err.http_status is not None and err.http_status < 500:
        body = {
            "error": {
                "message": err.message,
                "code": err.code,
                "error_subcode": err.subcode,
                "is_transient": bool(err.retryable),
            }
        }
        return "rejected", {"code": err.http_status, "body": body}
    return "unknown", str(err)[: ledger_domain.MAX_ERROR_CHARS]


def _wire(result) -> dict[str, Any] | None:
    """A client ``BatchResult`` back as the batch item answer the domain classifies."""
    if result.status == "unfinished":
        return None
    return {"code": result.code, "body": result.body}


def reconcile_sending(
    graph: GraphClient, ledger: pl.DataFrame, now: datetime, only: Sequence[str] | None = None
) -> tuple[pl.DataFrame, list[str]]:
    """Resolve ``sending`` rows (all, or those in ``only``) by reading their objects (batch
    GETs); returns the ledger and the ids it resolved. Objects that cannot be read for a
    permanent reason (e.g. deleted) fail their rows; unreadable for now, they stay ``sending``."""
    rows = ledger.filter(pl.col("status") == ledger_domain.SENDING)
    if only is not None:
        rows = rows.filter(_in(only))
    if rows.is_empty():
        return ledger, []
    items = ledger_domain.to_read_items(rows)
    objects = rows["object_id"].unique(maintain_order=True).to_list()  # same order as items
    results = graph.execute_batched(items)
    found = [r.body for r in results if r.ok and isinstance(r.body, dict) and "id" in r.body]
    gone = [
        oid
        for oid, r in zip(objects, results, strict=True)
        if r.status == "error" and not r.retryable
    ]
    resolved = ledger_domain.reconcile(
        rows, ledger_domain.current_values_from_objects(found), now=now
    )
    if gone:
        hit = pl.col("object_id").is_in(pl.Series(gone, dtype=pl.String).implode())
        resolved = resolved.with_columns(
            status=pl.when(hit).then(pl.lit(ledger_domain.FAILED)).otherwise("status"),
            error=pl.when(hit)
            .then(pl.lit("reconcile: the object cannot be read (deleted or no access)"))
            .otherwise("error"),
        )
    done = resolved.filter(pl.col("status") != ledger_domain.SENDING)
    ledger = ledger.update(done, on="change_id")
    return ledger, _ids(done)


class ChangeExecutor:
    """Applies a plan through the ledger (see the module docstring for the protocol)."""

    def __init__(
        self,
        endpoint: GraphEndpoint,
        store: LedgerStore,
        *,
        options: SendOptions | None = None,
        run_id: str = "run",
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.store = store
        self.options = options or SendOptions()
        self.run_id = run_id
        self.sleep = sleep
        self.rng = rng or random.Random(0)
        self.stats = ExecutionStats()
        self._gate: UsageGate | None = None
        self._minimums: dict[str, int] = {}
        self._senders: list[GraphClient] = []  # every sending client made (closed at the end)
        self._idle: queue.SimpleQueue[GraphClient] = queue.SimpleQueue()  # reused across rounds
        self._senders_lock = threading.Lock()

    # --------------------------------------------------------------- entry point
    def execute(
        self,
        plan: pl.DataFrame,
        *,
        now: datetime,
        settings,
        approved: Iterable[str] | None = None,
        minimums: Mapping[str, int] | None = None,
    ) -> pl.DataFrame:
        """Reconcile, append ``plan``, re-check and send its approved rows; the final ledger.

        ``approved``: accounts whose rows may be sent now (None = all); ``minimums``: Meta's
        minimum budgets already known (the others are read).
        """
        started = time.perf_counter()
        self._minimums = dict(minimums or {})
        with self.endpoint.reader() as graph:
            self._gate = graph.gate
            try:
                ledger = self._prepare(graph, plan, now)
                todo = ledger.filter(_in(_ids(plan)) & (pl.col("status") == ledger_domain.PLANNED))
                if approved is not None:
                    ok = pl.col("account_id").is_in(
                        pl.Series(list(approved), dtype=pl.String).implode()
                    )
                    self.stats.awaiting_approval = todo.filter(~ok).height
                    todo = todo.filter(ok)
                if todo.height:
                    ledger = self._apply(graph, ledger, todo, now, settings)
            finally:
                self.stats.read_requests += graph.request_count
                for client in self._senders:
                    self.stats.write_requests += client.request_count
                    client.close()
                self._senders.clear()
        self.stats.ledger_writes = self.store.writes
        self.stats.seconds = time.perf_counter() - started
        return ledger

    def _prepare(self, graph: GraphClient, plan: pl.DataFrame, now: datetime) -> pl.DataFrame:
        """Crash recovery first, then the plan into the ledger, older unsent rows set aside."""
        ledger = self.store.load()
        ledger, resolved = reconcile_sending(graph, ledger, now)
        self.store.save(ledger, resolved)
        self.stats.reconciled = len(resolved)
        before = ledger.select("change_id", old_status="status")
        ledger = ledger_domain.append_plan(ledger, plan)
        stale = ledger.filter((pl.col("status") == ledger_domain.PLANNED) & ~_in(_ids(plan)))
        ledger = ledger_domain.mark_skipped(ledger, _ids(stale), rule=ledger_domain.RULE_SUPERSEDED)
        changed = ledger.join(before, on="change_id", how="left").filter(
            pl.col("old_status").is_null() | (pl.col("old_status") != pl.col("status"))
        )
        self.store.save(ledger, _ids(changed))
        self.stats.superseded = changed.filter(
            pl.col("old_status").is_not_null() & (pl.col("status") == ledger_domain.SKIPPED)
        ).height
        return ledger

    def _apply(
        self, graph: GraphClient, ledger: pl.DataFrame, todo: pl.DataFrame, now: datetime, settings
    ) -> pl.DataFrame:
        accounts = todo["account_id"].unique().to_list()
        minimums = meta_minimums(graph, accounts, settings, known=self._minimums)
        configs = guardrail_configs(settings, minimums)
        ledger = self._recheck(ledger, _ids(todo), now, configs, read_adsets(graph, accounts))
        rows = ledger.filter(_in(_ids(todo)) & (pl.col("status") == ledger_domain.PLANNED))
        first, second = ledger_domain.send_phases(rows)
        if all(configs[a].daily_cap is None for a in accounts):
            # no cap to protect: one phase (decreases still go first in the batches' order)
            first, second = pl.concat([first, second]), second.clear()
        ledger = self._send(graph, ledger, _ids(first), now)
        if second.height:
            first_done = ledger.filter(_in(_ids(first)))
            if (first_done["status"] != ledger_domain.APPLIED).any():
                # the cap counted on decreases that did not all happen: check again
                current = read_adsets(graph, accounts)
                ledger = self._recheck(ledger, _ids(second), now, configs, current)
            ledger = self._send(graph, ledger, _ids(second), now)
        return ledger

    def _recheck(
        self,
        ledger: pl.DataFrame,
        ids: Sequence[str],
        now: datetime,
        configs: Mapping[str, GuardrailConfig],
        current: pl.DataFrame,
    ) -> pl.DataFrame:
        """Skip (with the rule and its detail) rows that break a guardrail right before sending."""
        rows = ledger.filter(_in(ids) & (pl.col("status") == ledger_domain.PLANNED))
        if rows.is_empty():
            return ledger
        found = guardrails.check_plan(rows, ledger, now, configs, current=current)
        if not found:
            return ledger
        bad = (
            pl.DataFrame(
                [(v.change_id, v.rule, v.detail) for v in found],
                schema={"change_id": pl.String, "rule": pl.String, "detail": pl.String},
                orient="row",
            )
            .filter(pl.col("change_id").is_not_null())
            .group_by("change_id", maintain_order=True)
            .agg(pl.col("rule").unique(maintain_order=True).str.join(","), pl.col("detail").first())
        )
        for (rule,), group in bad.group_by("rule", maintain_order=True):
            ledger = ledger_domain.mark_skipped(ledger, _ids(group), rule=str(rule))
        ledger = ledger.update(bad.select("change_id", error="detail"), on="change_id")
        self.store.save(ledger, _ids(bad))
        self.stats.recheck_skipped += bad.height
        return ledger

    # --------------------------------------------------------------- rounds
    def _post(self, items: list[dict[str, str]]) -> tuple[str, Any]:
        """One batch POST (runs in a worker thread): ("answered", per-item answers) or a failure."""
        try:
            client = self._idle.get_nowait()
        except queue.Empty:
            client = self.endpoint.sender(self._gate)
            with self._senders_lock:
                self._senders.append(client)
        try:
            return "answered", [_wire(r) for r in client.batch(items)]
        except ClientError as exc:
            return _request_failure(exc)
        finally:
            self._idle.put(client)

    def _send(
        self, graph: GraphClient, ledger: pl.DataFrame, ids: Sequence[str], now: datetime
    ) -> pl.DataFrame:
        """Send rounds until every row of ``ids`` is settled or the rounds run out."""
        opts, policy = self.options, self.options.policy()
        throttled = False
        for round_no in range(1, opts.max_rounds + 1):
            pending = ledger.filter(_in(ids) & (pl.col("status") == ledger_domain.PLANNED))
            if pending.is_empty():
                break
            if round_no > 1:
                delay = policy.backoff(round_no - 1, self.rng)
                self.sleep(max(delay, opts.throttle_min_delay_s) if throttled else delay)
            self.stats.rounds += 1
            chunks = ledger_domain.batches(_ids(pending), opts.batch_size)
            for chunk in chunks:  # all of this round's rows are `sending` before any batch leaves
                batch_id = ledger_domain.make_batch_id([*chunk, self.run_id, str(round_no)], now)
                ledger = ledger_domain.mark_sending(ledger, chunk, batch_id=batch_id)
            self.store.save(ledger, _ids(pending))
            ledger, throttled = self._round(ledger, chunks, now)
            if ledger.filter(_in(ids) & (pl.col("status") == ledger_domain.SENDING)).height:
                ledger, resolved = reconcile_sending(graph, ledger, now, only=ids)
                self.store.save(ledger, resolved)
        left = ledger.filter(_in(ids) & (pl.col("status") == ledger_domain.PLANNED))
        if left.height:  # out of rounds: give up on them for this run, with the last error
            ledger = ledger_domain.transition(ledger, _ids(left), ledger_domain.FAILED)
            ledger = ledger.with_columns(
                error=pl.when(_in(_ids(left)))
                .then(
                    pl.format(
                        "not applied after {} rounds: {}",
                        pl.lit(opts.max_rounds),
                        pl.col("error").fill_null(""),
                    )
                )
                .otherwise("error")
            )
            self.store.save(ledger, _ids(left))
        return ledger

    def _round(
        self, ledger: pl.DataFrame, chunks: list[list[str]], now: datetime
    ) -> tuple[pl.DataFrame, bool]:
        """Post every chunk (``parallel_batches`` in flight); record each item's answer on
        arrival and write them to the ledger every ``flush_interval_s`` and at the end."""
        rows = ledger.select("change_id", "object_id", "field", "new_value", "status")
        order = {cid: i for i, cid in enumerate(rows["change_id"].to_list())}
        throttled = False
        dirty: list[str] = []
        flushed = time.perf_counter()
        workers = max(1, min(self.options.parallel_batches, len(chunks)))
        with concurrent.futures.ThreadPoolExecutor(workers, "ad-changes") as pool:
            futures = {}
            for chunk in chunks:
                part = rows.select(pl.all().gather([order[c] for c in chunk]))
                futures[pool.submit(self._post, ledger_domain.to_batch_items(part))] = chunk
            for future in concurrent.futures.as_completed(futures):
                chunk = futures[future]
                kind, answer = future.result()
                self.stats.batch_requests += 1
                self.stats.batch_items += len(chunk)
                if kind == "answered":
                    self.stats.null_items += sum(a is None for a in answer)
                    throttled |= any(_is_throttle(a) for a in answer)
                    ledger = ledger_domain.record_responses(
                        ledger, chunk, answer, now=now, max_attempts=self.options.max_attempts
                    )
                elif kind == "rejected":
                    throttled |= _is_throttle(answer)
                    ledger = ledger_domain.record_responses(
                        ledger,
                        chunk,
                        [answer] * len(chunk),
                        now=now,
                        max_attempts=self.options.max_attempts,
                    )
                else:  # may have run: keep `sending`, note why; reconciled after the round
                    self.stats.unanswered_batches += 1
                    ledger = ledger.with_columns(
                        error=pl.when(_in(chunk))
                        .then(pl.lit(f"no answer to the batch: {answer}"))
                        .otherwise("error")
                    )
                dirty += chunk
                if time.perf_counter() - flushed >= self.options.flush_interval_s:
                    self.store.save(ledger, dirty)
                    dirty, flushed = [], time.perf_counter()
        self.store.save(ledger, dirty)
        return ledger, throttled


def _is_throttle(answer: Mapping[str, Any] | None) -> bool:
    if answer is None:
        return False
    code = answer.get("code")
    body = answer.get("body")
    err = body.get("error") if isinstance(body, dict) else None
    err_code = err.get("code") if isinstance(err, dict) else None
    return code == 429 or err_code in ledger_domain.THROTTLE_CODES


# ----------------------------------------------------------------------------- metadata


def _rule_counts(rows: pl.DataFrame) -> dict[str, int]:
    names = rows["rule"].drop_nulls().str.split(",").explode()
    return {f"rule_{name}": int((names == name).sum()) for name in guardrails.RULES}


def plan_metadata(plan: pl.DataFrame, http_requests: int) -> dict[str, Any]:
    """Counts the UI plots: planned, trimmed (per rule), skipped, budget moved."""
    planned = plan.filter(pl.col("status") == guardrails.PLANNED)
    budgets = planned.filter(pl.col("field") == guardrails.FIELD_BUDGET).with_columns(
        delta=pl.col("new_value").cast(pl.Int64) - pl.col("old_value").cast(pl.Int64)
    )
    return {
        "requested": plan.height,
        "planned": planned.height,
        "trimmed": planned.filter(pl.col("rule").is_not_null()).height,
        "skipped": plan.height - planned.height,
        "budget_changes": budgets.height,
        "pauses": planned.height - budgets.height,
        "budget_up_minor": int(budgets.filter(pl.col("delta") > 0)["delta"].sum() or 0),
        "budget_down_minor": int(-(budgets.filter(pl.col("delta") < 0)["delta"].sum() or 0)),
        **_rule_counts(plan),
        "http_requests": http_requests,
        "plan": md_table(
            plan.select(
                "account_id",
                "object_id",
                "field",
                "old_value",
                "new_value",
                "requested_value",
                "rule",
                "status",
            )
        ),
    }


def log_metadata(
    plan: pl.DataFrame, ledger: pl.DataFrame, stats: ExecutionStats, mode: str
) -> dict[str, Any]:
    """This run's outcome per status, retries, requests and the ledger totals."""
    mine = ledger.filter(_in(_ids(plan)))
    count = {s: mine.filter(pl.col("status") == s).height for s in ledger_domain.STATUSES}
    applied = count[ledger_domain.APPLIED]
    problems = mine.filter(
        pl.col("status").is_in([ledger_domain.FAILED, ledger_domain.SENDING])
        | ((pl.col("status") == ledger_domain.SKIPPED) & pl.col("error").is_not_null())
    )
    return {
        "mode": mode,
        "applied": applied,
        "failed": count[ledger_domain.FAILED],
        "skipped": count[ledger_domain.SKIPPED],
        "still_sending": count[ledger_domain.SENDING],
        "awaiting_approval": stats.awaiting_approval,
        "reconciled": stats.reconciled,
        "superseded": stats.superseded,
        "recheck_skipped": stats.recheck_skipped,
        "retried": mine.filter(pl.col("attempts") > 1).height,
        "null_items": stats.null_items,
        "batch_requests": stats.batch_requests,
        "batch_items": stats.batch_items,
        "read_requests": stats.read_requests,
        "http_requests": stats.http_requests,
        "http_requests_per_applied": round(stats.http_requests / applied, 3) if applied else 0.0,
        "ledger_applied_total": ledger.filter(pl.col("status") == ledger_domain.APPLIED).height,
        "problems": md_table(
            problems.select("object_id", "field", "new_value", "status", "rule", "error")
        ),
    }


def run_row(run_id: str, now: datetime, plan: pl.DataFrame, meta: Mapping, stats) -> pl.DataFrame:
    """One ``ad_change_runs`` row."""
    return pl.DataFrame(
        [
            {
                "run_id": run_id,
                "at": now,
                "planned": plan.filter(pl.col("status") == guardrails.PLANNED).height,
                "applied": meta["applied"],
                "failed": meta["failed"],
                "skipped": meta["skipped"],
                "awaiting_approval": stats.awaiting_approval,
                "reconciled": stats.reconciled,
                "batch_requests": stats.batch_requests,
                "batch_items": stats.batch_items,
                "read_requests": stats.read_requests,
                "http_requests": stats.http_requests,
            }
        ],
        schema=RUN_SCHEMA,
    )


# ----------------------------------------------------------------------------- assets


@dg.asset(
    group_name="execution",
    kinds={"meta", "duckdb", "polars"},
    deps=["budget_recommendations", "ad_scores"],
    pool="duckdb",
)
def ad_change_plan(
    optimizer: OptimizerResource, meta: MetaResource, warehouse: WarehouseResource
) -> dg.MaterializeResult:
    """Guarded ad-set budget changes and ad pauses, one row per request (trimmed rows name the
    rule); computed against budgets and statuses read fresh from the Graph API."""
    wh, now, settings = warehouse.get(), optimizer.now(), optimizer.settings()
    recs, kills = read_requests(wh)
    accounts = set(recs["account_id"].drop_nulls()) | set(kills["account_id"].drop_nulls())
    with meta.graph() as graph:
        adsets = read_adsets(graph, accounts)
        ads = read_ads(graph, kills["account_id"].drop_nulls()) if kills.height else None
        minimums = meta_minimums(graph, accounts, settings)
        http_requests = graph.request_count
    configs = guardrail_configs(settings, minimums)
    plan = (
        guardrails.plan_changes(
            recs,
            adsets,
            LedgerStore(wh).load(),
            now=now,
            config=configs,
            ad_actions=kill_requests(kills, ads) if ads is not None else None,
        )
        if accounts
        else pl.DataFrame(schema=guardrails.PLAN_SCHEMA)
    )
    wh.replace(PLAN_TABLE, plan)
    wh.replace(STATE_TABLE, adsets)
    store_minimums(wh, minimums, now)
    return dg.MaterializeResult(metadata=plan_metadata(plan, http_requests))


@dg.asset_check(
    asset=ad_change_plan,
    blocking=True,
    description="Every guardrail holds and the run stays under the total-change limit "
    "(stops ad_change_log before anything reaches Meta).",
)
def ad_change_plan_within_guardrails(
    optimizer: OptimizerResource, meta: MetaResource, warehouse: WarehouseResource
) -> dg.AssetCheckResult:
    """Blocking: re-verify the stored plan with ``check_plan`` and the per-run total."""
    wh, now = warehouse.get(), optimizer.now()
    plan = read_plan(wh)
    accounts = set(plan.filter(pl.col("status") == guardrails.PLANNED)["account_id"])
    settings, known = optimizer.settings(), stored_minimums(wh, now)
    with meta.graph() as graph:  # reads only minimums the plan did not store
        configs = guardrail_configs(settings, meta_minimums(graph, accounts, settings, known))
    state = wh.read(STATE_TABLE)
    violations = plan_violations(
        plan,
        LedgerStore(wh).load(),
        now,
        configs,
        _typed(state, ADSET_SCHEMA) if not state.is_empty() else None,
        max_total_changes(),
    )
    per_rule = violations.group_by("rule").len().sort("rule")
    return dg.AssetCheckResult(
        passed=violations.is_empty(),
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={
            "violations": violations.height,
            "planned": plan.filter(pl.col("status") == guardrails.PLANNED).height,
            "max_total_changes_per_run": max_total_changes(),
            **{f"violations_{r}": n for r, n in per_rule.iter_rows()},
            "details": md_table(violations),
        },
    )


class ApplyConfig(dg.Config):
    """Run config of ``ad_change_log``: approval (live mode) and sending knobs."""

    approve: bool = Field(
        default=False,
        description="Live mode: apply the plan for every account (a person's approval). "
        "Accounts with auto_apply: true are applied without it; sandbox mode always applies.",
    )
    parallel_batches: int = Field(default=3, ge=1, le=8, description="batches in flight")
    max_rounds: int = Field(default=5, ge=1, le=20, description="send rounds per phase")
    backoff_base_s: float = Field(default=0.5, ge=0.0, description="first retry delay")

    def options(self) -> SendOptions:
        return SendOptions(
            parallel_batches=self.parallel_batches,
            max_rounds=self.max_rounds,
            backoff_base_s=self.backoff_base_s,
        )


@dg.asset(
    group_name="execution",
    kinds={"meta", "duckdb"},
    deps=[ad_change_plan],
    pool="duckdb",
    op_tags={META_WRITES_TAG: "ad_changes"},
)
def ad_change_log(
    context: dg.AssetExecutionContext,
    config: ApplyConfig,
    optimizer: OptimizerResource,
    meta: MetaResource,
    warehouse: WarehouseResource,
) -> dg.MaterializeResult:
    """The ledger of ad changes: the plan applied through Graph batch requests, each change's
    outcome recorded on its own; crash-safe (reconciled by reading before any re-send)."""
    wh, now, settings = warehouse.get(), optimizer.now(), optimizer.settings()
    plan = read_plan(wh)
    planned = plan.filter(pl.col("status") == guardrails.PLANNED)
    if planned.height > max_total_changes():
        raise dg.Failure(
            f"the plan has {planned.height} changes; at most {max_total_changes()} per run "
            "(OPTIMIZER_MAX_CHANGES_PER_RUN); nothing was sent"
        )
    approved = approved_accounts(
        optimizer.mode, settings, planned["account_id"].unique(), config.approve
    )
    executor = ChangeExecutor(
        GraphEndpoint.of(meta), LedgerStore(wh), options=config.options(), run_id=context.run.run_id
    )
    ledger = executor.execute(
        plan, now=now, settings=settings, approved=approved, minimums=stored_minimums(wh, now)
    )
    if executor.stats.awaiting_approval:
        context.log.info(
            f"{executor.stats.awaiting_approval} changes await approval: materialize "
            "ad_change_log with config approve: true, or set auto_apply: true for the account"
        )
    metadata = log_metadata(plan, ledger, executor.stats, optimizer.mode)
    wh.append_new(
        RUNS_TABLE, run_row(context.run.run_id, now, plan, metadata, executor.stats), ["run_id"]
    )
    return dg.MaterializeResult(metadata=metadata)


apply_ad_changes_job = dg.define_asset_job(
    "apply_ad_changes",
    selection=dg.AssetSelection.assets(ad_change_plan, ad_change_log),
    tags={META_WRITES_TAG: "ad_changes"},
    description="Plan and apply ad changes (one Meta-writing run at a time).",
)

assets = [ad_change_plan, ad_change_log]
asset_checks = [ad_change_plan_within_guardrails]
jobs = [apply_ad_changes_job]


# ----------------------------------------------------------------------------- demo report

ORACLE_PAUSE_BELOW = 0.5  # the oracle pauses ads worth < half of their ad set's best ad


def _stage_weights(world) -> pl.DataFrame:
    """(pipeline, dealstage) -> weight: the stage's probability (won 1, lost 0)."""
    return pl.DataFrame(
        [
            {
                "pipeline": p["id"],
                "dealstage": s["id"],
                "weight": float(s["metadata"]["probability"]),
            }
            for p in world.pipelines()
            for s in p["stages"]
        ],
        schema={"pipeline": pl.String, "dealstage": pl.String, "weight": pl.Float64},
    )


def realized_value(world) -> dict[str, float]:
    """The one yardstick of the demo: spend, deals, won value and pipeline value of a world.

    Pipeline value = sum over the deals the world has made so far of the deal's true value
    (``truth_deals.value_if_won``) times its current stage's probability (Lead 0.1,
    Appointment 0.2, Show up 0.6, Closed won 1.0, Closed lost 0), i.e. won deals at full value
    plus open deals at their stage value. ROAS = pipeline value / spend.
    """
    start, end = world.config.start.date(), (world.now - timedelta(seconds=1)).date()
    spend = sum(
        float(world.insights(a, start, end)["spend"].sum() or 0.0)
        for a in world.accounts()["account_id"]
    )
    deals = (
        world.deals()
        .select("deal_id", "pipeline", "dealstage")
        .join(_stage_weights(world), on=["pipeline", "dealstage"], how="left")
        .join(world.truth_deals().select("deal_id", "value_if_won"), on="deal_id", how="left")
    )
    won = deals.filter(pl.col("weight") >= 1.0)
    value = float((deals["value_if_won"] * deals["weight"].fill_null(0.0)).sum() or 0.0)
    return {
        "spend": spend,
        "deals": float(deals.height),
        "won_deals": float(won.height),
        "won_value": float(won["value_if_won"].sum() or 0.0),
        "pipeline_value": value,
        "roas": value / spend if spend else 0.0,
    }


def oracle_budgets(
    adsets: pl.DataFrame, value_per_dollar: pl.DataFrame, config: GuardrailConfig
) -> pl.DataFrame:
    """New budgets (adset_id, daily_budget) that maximize true value per day within each
    account's current total, the velocity band (+-velocity_pct) and the minimum budget.

    With value linear in spend this is a fractional knapsack: every ad set starts at its lower
    bound and the rest of the total goes to the best value per dollar first, up to the upper
    bound. Ad sets without a known value (not serving) keep their budget.
    """
    p = config.velocity_pct
    frame = (
        adsets.filter(pl.col("status") == "ACTIVE")
        .select("adset_id", "account_id", b=pl.col("daily_budget").cast(pl.Int64))
        .join(value_per_dollar, on="adset_id", how="inner")
        .filter(pl.col("vpd").is_not_null() & pl.col("vpd").is_finite())
        .with_columns(
            lo=pl.max_horizontal(pl.lit(config.min_budget), (pl.col("b") * (1 - p)).ceil())
            .cast(pl.Int64)
            .clip(upper_bound=pl.col("b")),
            hi=(pl.col("b") * (1 + p)).floor().cast(pl.Int64),
        )
        .sort(["account_id", "vpd", "adset_id"], descending=[False, True, False])
        .with_columns(
            room=pl.col("b").sum().over("account_id") - pl.col("lo").sum().over("account_id"),
            span=pl.col("hi") - pl.col("lo"),
        )
        .with_columns(before=pl.col("span").cum_sum().over("account_id") - pl.col("span"))
        .with_columns(
            daily_budget=pl.col("lo") + (pl.col("room") - pl.col("before")).clip(0, pl.col("span"))
        )
    )
    return frame.select("adset_id", "daily_budget")


def _ad_values(world, day) -> pl.DataFrame:
    """Per ad on ``day``: true value per impression, impressions and spend (insights)."""
    truth = world.truth_ads_daily().filter(pl.col("date") == day)
    insights = pl.concat(
        [world.insights(a, day, day) for a in world.accounts()["account_id"]], how="vertical"
    )
    return insights.select("ad_id", "adset_id", "impressions", "spend").join(
        truth.select("ad_id", vpi="true_value_per_impression"), on="ad_id", how="inner"
    )


def simulate_oracle(config, days: int, guard: GuardrailConfig | None = None):
    """A world run ``days`` days whose budgets and pauses are set each day from the truth.

    After each simulated day: ad sets get ``oracle_budgets`` from the day's true value per
    dollar (true value per impression x impressions / spend), and active ads worth less than
    ``ORACLE_PAUSE_BELOW`` of their ad set's best serving ad are paused (never the last one).
    Returns (world, changes made).
    """
    from optimizer_assets.sandbox.world import World

    guard = replace(guard or GuardrailConfig(), min_budget=config.min_daily_budget)
    world, changes = World(config), 0
    for _ in range(days):
        world.advance(24)
        day = (world.now - timedelta(hours=1)).date()
        ads = _ad_values(world, day).filter(pl.col("spend") > 0)
        if ads.is_empty():
            continue
        ads = ads.with_columns(vpd=pl.col("vpi") * pl.col("impressions") / pl.col("spend"))
        per_set = ads.group_by("adset_id").agg(
            vpd=(pl.col("vpi") * pl.col("impressions")).sum() / pl.col("spend").sum()
        )
        adsets = world.adsets()
        new = oracle_budgets(adsets, per_set, guard).join(
            adsets.select("adset_id", old="daily_budget"), on="adset_id"
        )
        for adset_id, budget in (
            new.filter(pl.col("daily_budget") != pl.col("old"))
            .select("adset_id", "daily_budget")
            .iter_rows()
        ):  # the oracle's own edits, one per ad set per day
            world.update_adset(adset_id, daily_budget=int(budget))
            changes += 1
        status = world.ads().select("ad_id", "status")
        weak = (
            ads.join(status, on="ad_id")
            .filter(pl.col("status") == "ACTIVE")
            .with_columns(best=pl.col("vpd").max().over("adset_id"), n=pl.len().over("adset_id"))
            .filter((pl.col("vpd") < ORACLE_PAUSE_BELOW * pl.col("best")) & (pl.col("n") > 1))
        )
        for (ad_id,) in weak.select("ad_id").iter_rows():
            world.update_ad(ad_id, status="PAUSED")
            changes += 1
    return world, changes


def demo_report(world, warehouse) -> list[tuple[str, pl.DataFrame]]:
    """Optimizer vs static budgets vs an oracle on the same seed and budget; the ledger."""
    from optimizer_assets.sandbox.world import World

    days = int(world.hours_elapsed // 24)
    static = World(world.config)
    static.advance(24 * days)
    oracle, oracle_changes = simulate_oracle(world.config, days)
    wh = warehouse if isinstance(warehouse, Warehouse) else Warehouse(warehouse)
    runs = wh.read(RUNS_TABLE)
    applied = int(runs["applied"].sum() or 0) if runs.height else 0
    arms = [
        ("static budgets (no changes)", static, 0),
        ("optimizer (this demo)", world, applied),
        ("oracle (true rates)", oracle, oracle_changes),
    ]
    values = {name: realized_value(w) for name, w, _ in arms}
    base = values[arms[0][0]]["pipeline_value"]
    gap = values[arms[2][0]]["pipeline_value"] - base
    rows = [
        {
            "arm": name,
            "spend $": values[name]["spend"],
            "deals": int(values[name]["deals"]),
            "won deals": int(values[name]["won_deals"]),
            "won value $": values[name]["won_value"],
            "pipeline value $": values[name]["pipeline_value"],
            "ROAS": values[name]["roas"],
            "vs static %": 100.0 * (values[name]["pipeline_value"] / base - 1.0) if base else 0.0,
            "share of oracle gain %": 100.0 * (values[name]["pipeline_value"] - base) / gap
            if gap
            else 0.0,
            "changes": changes,
        }
        for name, _, changes in arms
    ]
    sections = [
        (
            f"Optimizer vs static budgets vs oracle: {days} days, seed {world.config.seed}, same "
            "starting budgets (pipeline value = true deal value x current stage probability)",
            pl.DataFrame(rows),
        )
    ]
    if runs.height:
        http = int(runs["http_requests"].sum() or 0)
        ledger = LedgerStore(wh).load()
        by_status = ledger.group_by("field", "status").len().sort("field", "status")
        sections.append(
            (
                "Ad changes sent by the optimizer (ledger ad_change_log)",
                by_status.pivot(on="status", index="field", values="len").fill_null(0),
            )
        )
        sections.append(
            (
                "Graph API calls for the ad changes",
                pl.DataFrame(
                    [
                        {
                            "apply runs": runs.height,
                            "changes applied": applied,
                            "batch requests": int(runs["batch_requests"].sum() or 0),
                            "read requests": int(runs["read_requests"].sum() or 0),
                            "HTTP requests": http,
                            "API calls per applied change": http / applied if applied else 0.0,
                            "one call per change would be": 1.0 if applied else 0.0,
                        }
                    ]
                ),
            )
        )
    return sections
