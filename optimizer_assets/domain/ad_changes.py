"""The ad-change ledger and Graph batch composition: pure functions, HTTP stays with the caller.

A ledger row (``LEDGER_SCHEMA``) is a plan row (``guardrails.PLAN_SCHEMA``) plus the sending
state: ``batch_id, attempts, response_code, error, applied_at``. Statuses move only along
``TRANSITIONS``::

    planned -> sending -> applied
       |          |-----> failed      (permanent error, moved externally, or out of attempts)
       |          '-----> planned     (retryable error, or reconciled as not applied)
       '--> skipped / failed          (guardrail, superseded, or re-check before sending)

Sending protocol (crash safe, never applies a change twice):

1. ``rows = ledger.filter(status == "planned")``, split by :func:`send_phases` (decreases
   before increases, re-checking the cap in between); for each ``batches(rows)`` chunk build
   ``to_batch_items`` and call :func:`mark_sending` and PERSIST before the request leaves.
2. Send; pass the response array to :func:`record_responses` and persist.
3. A ``null`` item, or a batch whose response never came back, leaves its rows ``sending``:
   their fate is unknown. Before anything is re-sent, read the objects' current values
   (:func:`to_read_items`, :func:`current_values_from_objects`) and :func:`reconcile`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, Literal, TypeVar
from urllib.parse import quote, urlencode

import polars as pl

from optimizer_assets.domain.guardrails import (
    FIELD_BUDGET,
    FIELD_STATUS,
    PLAN_SCHEMA,
    RULE_BUDGET_EDITS,
    UTC_US,
)

PLANNED = "planned"
SENDING = "sending"
APPLIED = "applied"
FAILED = "failed"
SKIPPED = "skipped"
STATUSES = (PLANNED, SENDING, APPLIED, FAILED, SKIPPED)
TRANSITIONS: dict[str, frozenset[str]] = {
    PLANNED: frozenset({SENDING, SKIPPED, FAILED}),
    SENDING: frozenset({APPLIED, FAILED, PLANNED}),
    APPLIED: frozenset(),
    FAILED: frozenset(),
    SKIPPED: frozenset(),
}
RULE_SUPERSEDED = "superseded"

MAX_BATCH_SIZE = 50  # Graph API limit per batch request
MAX_ERROR_CHARS = 500

LEDGER_SCHEMA: dict[str, pl.DataType] = {
    **{k: v for k, v in PLAN_SCHEMA.items() if k != "planned_at"},
    "batch_id": pl.String(),
    "attempts": pl.Int64(),
    "response_code": pl.Int64(),
    "error": pl.String(),
    "planned_at": UTC_US,
    "applied_at": UTC_US,
}

# Graph error codes that mean "slow down / try again later".
THROTTLE_CODES = frozenset({4, 17, 32, 341, 613, *range(80000, 80015)})
TRANSIENT_CODES = frozenset({1, 2})  # unknown error, service temporarily unavailable
BUDGET_EDIT_LIMIT = (613, 1487632)  # 4 budget edits per ad set per hour exceeded

Outcome = Literal["applied", "retry", "failed"]
T = TypeVar("T")


# ----------------------------------------------------------------------------- ledger rows


def empty_ledger() -> pl.DataFrame:
    """An empty ledger with ``LEDGER_SCHEMA``."""
    return pl.DataFrame(schema=LEDGER_SCHEMA)


def new_ledger(plan: pl.DataFrame) -> pl.DataFrame:
    """Ledger rows for a plan: status kept (``planned``/``skipped``), nothing sent yet."""
    return (
        plan.with_columns(
            batch_id=pl.lit(None, dtype=pl.String),
            attempts=pl.lit(0, dtype=pl.Int64),
            response_code=pl.lit(None, dtype=pl.Int64),
            error=pl.lit(None, dtype=pl.String),
            applied_at=pl.lit(None, dtype=UTC_US),
        )
        .select(list(LEDGER_SCHEMA))
        .cast(LEDGER_SCHEMA)
    )


def append_plan(ledger: pl.DataFrame, plan: pl.DataFrame) -> pl.DataFrame:
    """Add a plan to the ledger idempotently.

    Rows whose ``change_id`` is already in the ledger are ignored (the same plan recomputed in
    the same window), and older ``planned`` rows for an object and field the new plan touches
    become ``skipped`` with rule ``superseded`` so two plans never both go out.
    """
    fresh = new_ledger(plan).filter(~pl.col("change_id").is_in(ledger["change_id"].implode()))
    touched = fresh.select("object_id", "field").unique().with_columns(_new=pl.lit(True))
    old = (
        ledger.join(
            touched, on=["object_id", "field"], how="left", nulls_equal=True, maintain_order="left"
        )
        .with_columns(
            _sup=(pl.col("status") == PLANNED) & pl.col("_new").fill_null(False),
        )
        .with_columns(
            status=pl.when("_sup").then(pl.lit(SKIPPED)).otherwise("status"),
            rule=pl.when("_sup")
            .then(
                pl.concat_str(
                    [pl.col("rule"), pl.lit(RULE_SUPERSEDED)], separator=",", ignore_nulls=True
                )
            )
            .otherwise("rule"),
        )
        .select(list(LEDGER_SCHEMA))
    )
    return pl.concat([old.cast(LEDGER_SCHEMA), fresh])


def transition(
    ledger: pl.DataFrame,
    change_ids: Sequence[str],
    to: str,
    **values: Any,
) -> pl.DataFrame:
    """Move the given rows to status ``to``, setting the given column ``values``.

    Raises ``ValueError`` when an id is unknown or its current status may not move to ``to``
    (e.g. ``applied -> sending``), so a caller bug cannot re-send an applied change.
    """
    if to not in STATUSES:
        raise ValueError(f"unknown status {to}")
    unknown = set(values) - set(LEDGER_SCHEMA)
    if unknown:
        raise ValueError(f"unknown ledger columns {sorted(unknown)}")
    ids = pl.Series("change_id", list(change_ids), dtype=pl.String)
    if ids.is_duplicated().any():
        raise ValueError("duplicate change ids")
    rows = ledger.filter(pl.col("change_id").is_in(ids.implode()))
    if rows.height != ids.len():
        missing = set(ids.to_list()) - set(rows["change_id"].to_list())
        raise ValueError(f"unknown change ids: {sorted(missing)[:5]}")
    allowed = [s for s, targets in TRANSITIONS.items() if to in targets]
    illegal = rows.filter(~pl.col("status").is_in(allowed))
    if illegal.height:
        first = illegal.row(0, named=True)
        raise ValueError(
            f"illegal transition {first['status']} -> {to} for change {first['change_id']}"
        )
    hit = pl.col("change_id").is_in(ids.implode())
    updates = [pl.when(hit).then(pl.lit(to)).otherwise("status").alias("status")]
    for column, value in values.items():
        updates.append(
            pl.when(hit)
            .then(pl.lit(value, dtype=LEDGER_SCHEMA[column]))
            .otherwise(pl.col(column))
            .alias(column)
        )
    return ledger.with_columns(updates)


def mark_sending(ledger: pl.DataFrame, change_ids: Sequence[str], *, batch_id: str) -> pl.DataFrame:
    """``planned -> sending`` before a batch leaves: one more attempt, under ``batch_id``."""
    out = transition(ledger, change_ids, SENDING, batch_id=batch_id, response_code=None, error=None)
    hit = pl.col("change_id").is_in(pl.Series(list(change_ids), dtype=pl.String).implode())
    return out.with_columns(
        attempts=pl.when(hit).then(pl.col("attempts").fill_null(0) + 1).otherwise("attempts")
    )


def mark_skipped(ledger: pl.DataFrame, change_ids: Sequence[str], *, rule: str) -> pl.DataFrame:
    """``planned -> skipped`` (e.g. the re-check before sending found a violation)."""
    out = transition(ledger, change_ids, SKIPPED)
    hit = pl.col("change_id").is_in(pl.Series(list(change_ids), dtype=pl.String).implode())
    return out.with_columns(
        rule=pl.when(hit)
        .then(pl.concat_str([pl.col("rule"), pl.lit(rule)], separator=",", ignore_nulls=True))
        .otherwise("rule")
    )


def make_batch_id(change_ids: Sequence[str], sent_at: datetime) -> str:
    """Deterministic id of one send attempt of these changes."""
    key = "|".join(change_ids) + "|" + sent_at.isoformat()
    return hashlib.sha256(key.encode()).hexdigest()[:32]


# ----------------------------------------------------------------------------- Graph batches


def to_batch_items(changes: pl.DataFrame) -> list[dict[str, str]]:
    """Graph batch items, in row order: ``{"method": "POST", "relative_url": "<id>",
    "body": "daily_budget=2500"}`` (body URL-encoded).

    Refuses rows that are not ``planned``/``sending`` (when a ``status`` column is present),
    unknown fields and null values, so an applied or skipped change is never sent.
    """
    if "status" in changes.columns:
        bad = changes.filter(~pl.col("status").is_in([PLANNED, SENDING]))
        if bad.height:
            raise ValueError(f"cannot send changes with status {bad['status'].unique().to_list()}")
    bad_field = changes.filter(~pl.col("field").is_in([FIELD_BUDGET, FIELD_STATUS]))
    if bad_field.height:
        raise ValueError(f"unknown fields {bad_field['field'].unique().to_list()}")
    if changes["object_id"].is_null().any() or changes["new_value"].is_null().any():
        raise ValueError("object_id and new_value must be set")
    # one dict per change is the output format itself; no per-row computation beyond encoding
    return [
        {
            "method": "POST",
            "relative_url": quote(str(object_id), safe=""),
            "body": urlencode({field: str(new_value)}),
        }
        for object_id, field, new_value in zip(
            changes["object_id"].to_list(),
            changes["field"].to_list(),
            changes["new_value"].to_list(),
            strict=True,
        )
    ]


def batches(items: Sequence[T], size: int = MAX_BATCH_SIZE) -> list[list[T]]:
    """Consecutive chunks of at most ``size`` (1..50) items, order kept."""
    if not 1 <= size <= MAX_BATCH_SIZE:
        raise ValueError(f"batch size must be in 1..{MAX_BATCH_SIZE}")
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def send_phases(rows: pl.DataFrame) -> list[pl.DataFrame]:
    """Rows to send in two phases, order kept within each: first everything that cannot raise
    spend (budget decreases, status changes), then budget increases.

    The daily cap counts on the plan's decreases; if one fails, re-run
    ``guardrails.check_plan`` (with fresh ``current``) on the second phase before sending it
    and skip the rows it flags.
    """
    up = (pl.col("field") == FIELD_BUDGET) & (
        pl.col("new_value").cast(pl.Int64, strict=False)
        > pl.col("old_value").cast(pl.Int64, strict=False)
    ).fill_null(False)
    return [rows.filter(~up), rows.filter(up)]


def to_read_items(rows: pl.DataFrame) -> list[dict[str, str]]:
    """Graph batch GET items reading the current value of each distinct object in ``rows``."""
    objs = rows.group_by("object_id", maintain_order=True).agg(pl.col("field").unique().sort())
    return [
        {
            "method": "GET",
            "relative_url": f"{quote(str(oid), safe='')}?fields={quote(','.join(fs), safe='')}",
        }
        for oid, fs in zip(objs["object_id"].to_list(), objs["field"].to_list(), strict=True)
    ]


def current_values_from_objects(objects: Iterable[Mapping[str, Any]]) -> pl.DataFrame:
    """Long frame ``object_id, field, value`` (strings) from Graph object JSON (``id`` + fields)."""
    rows = [
        {"object_id": str(o["id"]), "field": f, "value": None if o[f] is None else str(o[f])}
        for o in objects
        for f in (FIELD_BUDGET, FIELD_STATUS)
        if f in o
    ]
    return pl.DataFrame(
        rows, schema={"object_id": pl.String, "field": pl.String, "value": pl.String}
    )


# ----------------------------------------------------------------------------- outcomes


def _parse_body(body: Any) -> dict[str, Any]:
    if isinstance(body, Mapping):
        return dict(body)
    if isinstance(body, str | bytes):
        try:
            parsed = json.loads(body)
        except ValueError:
            return {}
        return parsed if isinstance(parsed, dict) else {}
    return {}


def _error_fields(body: Any) -> tuple[int | None, int | None, bool, str]:
    err = _parse_body(body).get("error")
    if not isinstance(err, Mapping):
        return None, None, False, ""

    def as_int(v: Any) -> int | None:
        try:
            return int(v)
        except (TypeError, ValueError):
            return None

    return (
        as_int(err.get("code")),
        as_int(err.get("error_subcode")),
        bool(err.get("is_transient", False)),
        str(err.get("message", "")),
    )


def classify_outcome(code: int | None, body: Any) -> Outcome:
    """Outcome of one batch item: ``applied``, ``retry`` or ``failed``.

    ``None`` code (a null item: unfinished at timeout), HTTP 429/5xx, Graph transient errors
    (codes 1, 2 or ``is_transient``) and throttles (4, 17, 32, 341, 613, 80000-80014) retry;
    613/1487632 (budget edit limit of the ad set) fails for now since retrying within the hour
    only lengthens the block; any other 4xx is permanent. 2xx is applied unless its body says
    ``success: false`` or carries an error.
    """
    if code is None:
        return "retry"
    err_code, sub, transient, _ = _error_fields(body)
    if 200 <= code < 300 and err_code is None:
        return "failed" if _parse_body(body).get("success") is False else "applied"
    if (err_code, sub) == BUDGET_EDIT_LIMIT:
        return "failed"
    if transient or err_code in TRANSIENT_CODES or err_code in THROTTLE_CODES:
        return "retry"
    if code == 429 or code >= 500:
        return "retry"
    return "failed"


def error_message(code: int | None, body: Any) -> str | None:
    """Short error text for the ledger: Meta's code/subcode and message (no request data)."""
    if code is None:
        return "no result for this item (timeout); reconcile before re-sending"
    err_code, sub, _, message = _error_fields(body)
    if (err_code, sub) == BUDGET_EDIT_LIMIT:
        text = (
            f"613/1487632 rule {RULE_BUDGET_EDITS}: Meta blocks budget edits on this ad set "
            f"for an hour; not retried: {message}"
        )
    elif err_code is not None:
        text = f"{err_code}/{sub}: {message}" if sub is not None else f"{err_code}: {message}"
    elif 200 <= code < 300:
        if _parse_body(body).get("success") is False:
            text = "success: false"
        else:
            return None
    else:
        text = f"HTTP {code}"
    return text[:MAX_ERROR_CHARS]


def record_responses(
    ledger: pl.DataFrame,
    change_ids: Sequence[str],
    responses: Sequence[Mapping[str, Any] | None],
    *,
    now: datetime,
    max_attempts: int = 5,
) -> pl.DataFrame:
    """Record one batch's per-item results (``responses[i]`` answers ``change_ids[i]``).

    Each item is ``{"code": int, "body": str|dict}`` or ``None``. Applied rows get
    ``applied_at = now``; retryable errors go back to ``planned`` (``failed`` once ``attempts``
    reaches ``max_attempts``); permanent errors are ``failed`` with Meta's message; a ``None``
    item stays ``sending`` (its fate is unknown) until :func:`reconcile` decides. A 613/1487632
    answer (Meta's budget-edit limit) also names ``budget_edits_per_hour`` in ``rule``.
    """
    if len(change_ids) != len(responses):
        raise ValueError("one response per change id, in request order")
    rows = []
    for cid, resp in zip(change_ids, responses, strict=True):  # <= 50 items per batch
        code = None if resp is None else resp.get("code")
        code = None if code is None else int(code)
        body = None if resp is None else resp.get("body")
        rows.append(
            {
                "change_id": cid,
                "_outcome": "unknown" if resp is None else classify_outcome(code, body),
                "_code": code,
                "_error": error_message(code, body),
                "_edit_limit": resp is not None and _error_fields(body)[:2] == BUDGET_EDIT_LIMIT,
            }
        )
    res = pl.DataFrame(
        rows,
        schema={
            "change_id": pl.String,
            "_outcome": pl.String,
            "_code": pl.Int64,
            "_error": pl.String,
            "_edit_limit": pl.Boolean,
        },
    )
    sending = ledger.filter(pl.col("change_id").is_in(res["change_id"].implode()))
    if sending.height != res.height or (sending["status"] != SENDING).any():
        raise ValueError("responses must answer rows that are 'sending'")
    j = ledger.join(res, on="change_id", how="left", maintain_order="left")
    out_of_attempts = pl.col("attempts") >= max_attempts
    status = (
        pl.when(pl.col("_outcome") == "applied")
        .then(pl.lit(APPLIED))
        .when(pl.col("_outcome") == "failed")
        .then(pl.lit(FAILED))
        .when((pl.col("_outcome") == "retry") & out_of_attempts)
        .then(pl.lit(FAILED))
        .when(pl.col("_outcome") == "retry")
        .then(pl.lit(PLANNED))
        .otherwise("status")
    )
    hit = pl.col("_outcome").is_not_null()
    return j.with_columns(
        status=status,
        response_code=pl.when(hit).then("_code").otherwise("response_code"),
        error=pl.when((pl.col("_outcome") == "retry") & out_of_attempts)
        .then(
            pl.format("gave up after {} attempts: {}", "attempts", pl.col("_error").fill_null(""))
        )
        .when(hit)
        .then("_error")
        .otherwise("error"),
        applied_at=pl.when(pl.col("_outcome") == "applied")
        .then(pl.lit(now, dtype=UTC_US))
        .otherwise("applied_at"),
        # Meta's own 4-edits-per-hour limit is the guardrail that stopped this change
        rule=pl.when(pl.col("_edit_limit").fill_null(False))
        .then(
            pl.concat_str(
                [pl.col("rule"), pl.lit(RULE_BUDGET_EDITS)], separator=",", ignore_nulls=True
            )
        )
        .otherwise("rule"),
    ).select(list(LEDGER_SCHEMA))


# ----------------------------------------------------------------------------- crash recovery


def reconcile(rows: pl.DataFrame, current_values: pl.DataFrame, *, now: datetime) -> pl.DataFrame:
    """Decide the fate of ``sending`` rows from the objects' current values after a crash.

    ``current_values`` is long: ``object_id, field, value`` (strings, e.g. from
    :func:`current_values_from_objects`). Current == ``new_value`` -> ``applied``
    (``applied_at = now``, the time it was confirmed); == ``old_value`` -> back to ``planned``
    to be re-sent; anything else -> ``failed`` ("moved externally"). Rows whose object was not
    read stay ``sending``. Other statuses pass through untouched. Budgets compare as integers.
    """
    cv = current_values.select(
        pl.col("object_id").cast(pl.String),
        pl.col("field").cast(pl.String),
        _cur=pl.col("value").cast(pl.String).str.strip_chars(),
    ).unique(["object_id", "field"], keep="last")
    j = rows.join(cv, on=["object_id", "field"], how="left", maintain_order="left")
    is_budget = pl.col("field") == FIELD_BUDGET

    def same(a: str, b: pl.Expr) -> pl.Expr:
        as_int = pl.col(a).cast(pl.Float64, strict=False) == b.cast(pl.Float64, strict=False)
        as_str = pl.col(a).str.to_uppercase() == b.str.to_uppercase()
        return pl.when(is_budget).then(as_int).otherwise(as_str).fill_null(False)

    cur = pl.col("_cur")
    pending = (pl.col("status") == SENDING) & cur.is_not_null()
    to_applied = pending & same("new_value", cur)
    to_planned = pending & ~to_applied & same("old_value", cur)
    to_failed = pending & ~to_applied & ~to_planned
    return j.with_columns(
        status=pl.when(to_applied)
        .then(pl.lit(APPLIED))
        .when(to_planned)
        .then(pl.lit(PLANNED))
        .when(to_failed)
        .then(pl.lit(FAILED))
        .otherwise("status"),
        applied_at=pl.when(to_applied).then(pl.lit(now, dtype=UTC_US)).otherwise("applied_at"),
        error=pl.when(to_applied)
        .then(pl.lit("reconciled: found applied"))
        .when(to_planned)
        .then(pl.lit("reconciled: not applied, to be re-sent"))
        .when(to_failed)
        .then(pl.format("moved externally: current value {}", cur))
        .otherwise("error"),
    ).select(rows.columns)
