"""Graph API routes of the sandbox: catalog reads, insights, Lead Ads, updates and batches.

Everything goes through :func:`execute` (one Graph call: usage accounting, throttles, routing),
which the HTTP endpoint and every batch item share. Callers hold ``state.lock``.

Shapes the sandbox chose where the real API leaves room (see also the server module docstring):
- an ad's ``creative`` is a flat object ``{id, name, title, body, call_to_action_type, hook_type,
  format, emotion, lead_gen_form_id}`` (``fields=creative`` returns all of it, ``creative{title}``
  a subset); the sandbox's creative traits live there instead of an ``asset_feed_spec``.
- edges (``/act_{id}/ads`` ...) skip ARCHIVED and DELETED objects unless ``effective_status``
  asks for them, like the real edges do.
- insights ``actions`` hold ``lead`` and ``link_click`` only, omitting zero counts (and the key
  when empty), as the Graph API omits action types that did not happen.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import polars as pl

from optimizer_assets.sandbox.capi_routes import handle_events
from optimizer_assets.sandbox.graph_paging import (
    GraphError,
    GraphResult,
    check_fields,
    int_param,
    json_param,
    make_link,
    not_found,
    pad_id,
    page_frame,
    parse_fields,
    select_nested,
)
from optimizer_assets.sandbox.server_state import SandboxState, as_utc, iso_graph

CAMPAIGN_FIELDS = {
    "id", "account_id", "name", "objective", "status", "configured_status", "effective_status",
    "created_time",
}  # fmt: skip
ADSET_FIELDS = {
    "id", "account_id", "campaign_id", "name", "daily_budget", "status", "configured_status",
    "effective_status", "created_time",
}  # fmt: skip
AD_FIELDS = {
    "id", "account_id", "campaign_id", "adset_id", "name", "status", "configured_status",
    "effective_status", "created_time", "creative",
}  # fmt: skip
ACCOUNT_FIELDS = {
    "id", "account_id", "name", "currency", "timezone_name", "account_status", "min_daily_budget",
}  # fmt: skip
LEAD_FIELDS = {
    "id", "created_time", "ad_id", "adset_id", "campaign_id", "form_id", "field_data",
    "is_organic", "platform",
}  # fmt: skip
INSIGHT_FIELDS = {
    "account_id", "account_name", "account_currency", "campaign_id", "campaign_name", "adset_id",
    "adset_name", "ad_id", "ad_name", "date_start", "date_stop", "spend", "impressions", "reach",
    "clicks", "inline_link_clicks", "ctr", "cpc", "cpm", "frequency", "actions",
}  # fmt: skip
DEFAULT_INSIGHT_FIELDS = ["account_id", "date_start", "date_stop", "impressions", "spend"]
LEVEL_KEYS = {
    "account": ["account_id"],
    "campaign": ["account_id", "campaign_id"],
    "adset": ["account_id", "campaign_id", "adset_id"],
    "ad": ["account_id", "campaign_id", "adset_id", "ad_id"],
}
HIDDEN_BY_DEFAULT = {"ARCHIVED", "DELETED"}
log = logging.getLogger(__name__)
STATUSES = {"ACTIVE", "PAUSED", "ARCHIVED", "DELETED"}
NODE_NAMES = {"campaign": "Campaign", "adset": "AdSet", "ad": "Ad", "account": "AdAccount"}
# parameters every Graph call may carry that are not object fields
TRANSPORT_PARAMS = {
    "access_token", "appsecret_proof", "fields", "format", "method", "pretty",
    "suppress_http_code", "locale", "include_headers",
}  # fmt: skip


@dataclass
class GraphCall:
    """One Graph call: ``path`` has no version prefix and no leading slash."""

    method: str
    path: str
    params: dict[str, Any]
    base_url: str  # "http://127.0.0.1:PORT/"
    version: str  # "v24.0"
    in_batch: bool = False


# ---- catalog -------------------------------------------------------------------------------------
def _effective(status: str, *parents: tuple[str, str]) -> pl.Expr:
    """Graph ``effective_status``: own status, else the first paused/archived parent's."""
    expr = pl.when(pl.col(status) != "ACTIVE").then(pl.col(status))
    for column, paused_label in parents:
        expr = expr.when(pl.col(column) == "PAUSED").then(pl.lit(paused_label))
        expr = expr.when(pl.col(column) != "ACTIVE").then(pl.col(column))
    return expr.otherwise(pl.lit("ACTIVE"))


def _or_world_effective(frame: pl.DataFrame, computed: pl.Expr) -> pl.Expr:
    """The world's own ``effective_status`` when it provides one, else the computed one."""
    return pl.col("effective_status") if "effective_status" in frame.columns else computed


class _Catalog:
    """Graph-shaped frames of ``accounts``, ``campaign``, ``adset`` and ``ad``, each built on
    first use per world version (a budget edit rebuilds only what is read afterwards)."""

    def __init__(self, state: SandboxState) -> None:
        self.state = state

    def __getitem__(self, kind: str) -> pl.DataFrame:
        return self.state.memo(("graph_catalog", kind), getattr(self, f"_{kind}"))

    def _accounts(self) -> pl.DataFrame:
        return self.state.world.accounts().with_columns(pl.col("account_id").cast(pl.String))

    def _campaign(self) -> pl.DataFrame:
        campaigns = as_utc(self.state.world.campaigns(), ["created_time"])
        return campaigns.select(
            pl.col("campaign_id").alias("id"),
            "account_id",
            "name",
            "objective",
            "status",
            pl.col("status").alias("configured_status"),
            pl.col("status").alias("effective_status"),
            iso_graph("created_time").alias("created_time"),
            pad_id("campaign_id").alias("_key"),
        ).sort("_key")

    def _campaign_status(self) -> pl.DataFrame:
        return self.state.world.campaigns().select(
            "campaign_id", pl.col("status").alias("_cstatus")
        )

    def _adset(self) -> pl.DataFrame:
        adsets = as_utc(self.state.world.adsets(), ["created_time"])
        return (
            adsets.join(self._campaign_status(), on="campaign_id", how="left")
            .select(
                pl.col("adset_id").alias("id"),
                "account_id",
                "campaign_id",
                "name",
                pl.col("daily_budget").cast(pl.Int64).cast(pl.String).alias("daily_budget"),
                "status",
                pl.col("status").alias("configured_status"),
                _or_world_effective(
                    adsets, _effective("status", ("_cstatus", "CAMPAIGN_PAUSED"))
                ).alias("effective_status"),
                iso_graph("created_time").alias("created_time"),
                pad_id("adset_id").alias("_key"),
            )
            .sort("_key")
        )

    def _ad(self) -> pl.DataFrame:
        w = self.state.world
        ads = as_utc(w.ads(), ["created_time"])
        adset_status = w.adsets().select("adset_id", pl.col("status").alias("_astatus"))
        form_id = pl.col("form_id") if "form_id" in ads.columns else pl.lit(None, pl.String)
        return (
            ads.join(adset_status, on="adset_id", how="left")
            .join(self._campaign_status(), on="campaign_id", how="left")
            .select(
                pl.col("ad_id").alias("id"),
                "account_id",
                "campaign_id",
                "adset_id",
                "name",
                "status",
                pl.col("status").alias("configured_status"),
                _or_world_effective(
                    ads,
                    _effective(
                        "status", ("_astatus", "ADSET_PAUSED"), ("_cstatus", "CAMPAIGN_PAUSED")
                    ),
                ).alias("effective_status"),
                iso_graph("created_time").alias("created_time"),
                pl.struct(
                    (pl.lit("9") + pl.col("ad_id")).alias("id"),
                    (pl.col("name") + pl.lit(" creative")).alias("name"),
                    pl.col("title"),
                    pl.col("body"),
                    pl.col("cta").alias("call_to_action_type"),
                    pl.col("hook_type"),
                    pl.col("format"),
                    pl.col("emotion"),
                    form_id.cast(pl.String).alias("lead_gen_form_id"),
                ).alias("creative"),
                pad_id("ad_id").alias("_key"),
            )
            .sort("_key")
        )


def catalog(state: SandboxState) -> _Catalog:
    """The Graph-shaped catalog frames (see :class:`_Catalog`)."""
    return _Catalog(state)


def id_index(state: SandboxState) -> dict[str, tuple[str, str]]:
    """Graph id -> (kind, account id); built once, since object ids never change."""

    def build() -> dict[str, tuple[str, str]]:
        w = state.world
        index: dict[str, tuple[str, str]] = {}
        frames = (
            ("campaign", w.campaigns(), "campaign_id"),
            ("adset", w.adsets(), "adset_id"),
            ("ad", w.ads(), "ad_id"),
        )
        for kind, frame, column in frames:
            accounts = frame["account_id"].cast(pl.String).to_list()
            ids = frame[column].cast(pl.String).to_list()
            index.update(zip(ids, ((kind, a) for a in accounts), strict=True))
        accounts = w.accounts()
        acc_ids = accounts["account_id"].cast(pl.String).to_list()
        for acc in acc_ids:
            index[f"act_{acc}"] = ("account", acc)
        if "pixel_id" in accounts.columns:
            pixels = accounts["pixel_id"].cast(pl.String).to_list()
            index.update(zip(pixels, (("pixel", a) for a in acc_ids), strict=True))
        ads = w.ads()
        if "form_id" in ads.columns:
            forms = ads.select("form_id", "account_id").unique("form_id")
            for form, acc in forms.iter_rows():
                index.setdefault(str(form), ("form", str(acc)))
        return index

    return state.memo_static("graph_ids", build)


def _lookup(state: SandboxState, object_id: str) -> tuple[str, str | None]:
    """(kind, account_id) of any id the sandbox knows; leads and report runs included."""
    if object_id in state.report_runs:
        return "report_run", state.report_runs[object_id]["account_id"]
    found = id_index(state).get(object_id)
    if found is not None:
        return found
    if object_id.isdigit() and len(object_id) in (15, 16):
        leads = leads_frame(state)
        row = leads.filter(pl.col("id") == object_id)
        if row.height:
            return "lead", row["account_id"][0]
    return "unknown", None


def usage_scope(state: SandboxState, path: str) -> tuple[str | None, str]:
    """(account id, business use case) a call is charged to."""
    segs = [s for s in path.strip("/").split("/") if s]
    use_case = "ads_insights" if "insights" in segs else "ads_management"
    if not segs:
        return None, use_case
    if segs[0].startswith("act_"):
        return segs[0][4:], use_case
    try:
        _, account = _lookup(state, segs[0])
    except Exception:  # a broken world read must not break accounting
        account = None
    return account, use_case


# ---- execution ---------------------------------------------------------------------------------
def execute(state: SandboxState, call: GraphCall) -> GraphResult:
    """Run one Graph call: rolling usage limits, routing, error envelope, usage headers."""
    account_id, use_case = usage_scope(state, call.path)
    over = state.graph_over_limit(account_id, use_case)
    state.graph_record(account_id, use_case)
    saturate = None
    if over is not None:
        code, subcode, message, saturate = over
        state.count("graph_throttled")
        err = GraphError(message, code=code, subcode=subcode, transient=True)
        result = GraphResult(err.http_status, err.envelope(state.fbtrace_id()))
    else:
        try:
            result = _route(state, call)
        except GraphError as err:
            result = GraphResult(err.http_status, err.envelope(state.fbtrace_id()))
        except Exception:  # a sandbox bug: answer Graph's unknown error, keep the traceback
            log.exception("sandbox Graph route failed: %s %s", call.method, call.path)
            err = GraphError("An unknown error occurred", code=1, http_status=500)
            result = GraphResult(500, err.envelope(state.fbtrace_id()))
    result.headers.update(state.usage_headers(account_id, use_case, saturate=saturate))
    return result


def _route(state: SandboxState, call: GraphCall) -> GraphResult:
    segs = [s for s in call.path.strip("/").split("/") if s]
    method = call.method.upper()
    params = call.params
    if not segs:
        if method == "POST" and not call.in_batch:
            return _batch(state, call)
        raise GraphError("(#100) Missing object id in the request path", code=100)
    head, rest = segs[0], segs[1:]
    if head == "me":
        if rest == ["adaccounts"] and method == "GET":
            return _list_accounts(state, call)
        raise GraphError(f"Unknown path components: /{'/'.join(rest)}", code=2500)
    kind, account_id = _lookup(state, head)
    if kind == "unknown":
        raise not_found(head, method.lower())
    if not rest:
        if method == "GET":
            return GraphResult(200, _read_object(state, kind, head, params))
        if method == "POST":
            return GraphResult(200, _update_object(state, kind, head, params))
        raise not_found(head, method.lower())
    if len(rest) > 1:
        raise GraphError(f"Unknown path components: /{'/'.join(rest)}", code=2500)
    edge = rest[0]
    if kind == "account":
        if method == "GET" and edge in ("campaigns", "adsets", "ads"):
            return GraphResult(200, _list_edge(state, call, edge[:-1], account_id))
        if edge == "insights" and method == "GET":
            return GraphResult(200, _insights(state, call, account_id, None))
        if edge == "insights" and method == "POST":
            return GraphResult(200, _start_report(state, call, account_id))
        if edge == "minimum_budgets" and method == "GET":
            return GraphResult(200, {"data": state.world.minimum_budgets(account_id)})
    elif method == "GET" and (kind, edge) in (
        ("campaign", "adsets"),
        ("campaign", "ads"),
        ("adset", "ads"),
    ):
        return GraphResult(
            200, _list_edge(state, call, edge[:-1], account_id, parent=(f"{kind}_id", head))
        )
    elif edge == "insights" and method == "GET" and kind in ("campaign", "adset", "ad"):
        return GraphResult(200, _insights(state, call, account_id, (kind, head)))
    elif edge == "insights" and method == "GET" and kind == "report_run":
        return GraphResult(200, _report_insights(state, call, head))
    elif edge == "leads" and method == "GET" and kind in ("form", "ad"):
        return GraphResult(200, _leads(state, call, kind, head))
    elif edge == "events" and method == "POST" and kind == "pixel":
        return GraphResult(200, handle_events(state, head, params))
    if method != "GET" and edge in ("campaigns", "adsets", "ads", "insights", "leads", "events"):
        raise not_found(head, method.lower())
    raise GraphError(f"(#100) Tried accessing nonexisting field ({edge})", code=100)


# ---- reads ---------------------------------------------------------------------------------------
def _render(frame: pl.DataFrame, fields: list[tuple[str, list | None]]) -> list[dict[str, Any]]:
    """Rows with the requested fields; nulls omitted like the Graph API does."""
    names = [name for name, _ in fields]
    subs = dict(fields)
    out = []
    for row in frame.select(names).to_dicts():
        item = {}
        for name, value in row.items():
            if value is None:
                continue
            if isinstance(value, dict):
                value = {k: v for k, v in value.items() if v is not None}
                value = select_nested(value, subs.get(name))
            item[name] = value
        out.append(item)
    return out


def _requested(params: dict[str, Any], allowed: set[str], node: str, default: list[str]):
    fields = parse_fields(params.get("fields")) or [(name, None) for name in default]
    check_fields(fields, allowed, node)
    if all(name != "id" for name, _ in fields) and "id" in allowed:
        fields = [("id", None), *fields]
    return fields


def _read_object(
    state: SandboxState, kind: str, object_id: str, params: dict[str, Any]
) -> dict[str, Any]:
    if kind in ("campaign", "adset", "ad"):
        allowed = {"campaign": CAMPAIGN_FIELDS, "adset": ADSET_FIELDS, "ad": AD_FIELDS}[kind]
        fields = _requested(params, allowed, NODE_NAMES[kind], ["id", "name"])
        frame = catalog(state)[kind].filter(pl.col("id") == object_id)
        return _render(frame, fields)[0]
    if kind == "account":
        fields = _requested(params, ACCOUNT_FIELDS, "AdAccount", ["id", "account_id", "name"])
        frame = _accounts_frame(state).filter(pl.col("id") == object_id)
        return _render(frame, fields)[0]
    if kind == "lead":
        fields = _requested(params, LEAD_FIELDS, "Lead", ["id", "created_time", "field_data"])
        frame = leads_frame(state).filter(pl.col("id") == object_id)
        return _render_leads(frame, fields)[0]
    if kind == "report_run":
        return _report_status(state.report_runs[object_id], object_id)
    if kind == "form":
        return {"id": object_id, "name": f"Lead form {object_id}", "status": "ACTIVE"}
    if kind == "pixel":
        return {"id": object_id, "name": f"Sandbox pixel {object_id}"}
    raise not_found(object_id)


def _accounts_frame(state: SandboxState) -> pl.DataFrame:
    def build() -> pl.DataFrame:
        acc = catalog(state)["accounts"]
        return acc.select(
            (pl.lit("act_") + pl.col("account_id")).alias("id"),
            "account_id",
            "name",
            "currency",
            pl.col("timezone").alias("timezone_name"),
            pl.lit(1).alias("account_status"),
            pl.col("min_daily_budget").cast(pl.Int64).cast(pl.String).alias("min_daily_budget"),
            pad_id("account_id").alias("_key"),
        ).sort("_key")

    return state.memo("graph_accounts", build)


def _list_accounts(state: SandboxState, call: GraphCall) -> GraphResult:
    fields = _requested(call.params, ACCOUNT_FIELDS, "AdAccount", ["id", "account_id"])
    frame = _accounts_frame(state)
    link = make_link(call.base_url, call.version, call.path, call.params)
    page, paging = page_frame(frame, call.params, link)
    body: dict[str, Any] = {"data": _render(page, fields)}
    if paging:
        body["paging"] = paging
    return GraphResult(200, body)


def _list_edge(
    state: SandboxState,
    call: GraphCall,
    kind: str,
    account_id: str,
    parent: tuple[str, str] | None = None,
) -> dict:
    allowed = {"campaign": CAMPAIGN_FIELDS, "adset": ADSET_FIELDS, "ad": AD_FIELDS}[kind]
    fields = _requested(call.params, allowed, NODE_NAMES[kind], ["id"])
    frame = catalog(state)[kind].filter(pl.col("account_id") == account_id)
    if parent is not None:
        frame = frame.filter(pl.col(parent[0]) == parent[1])
    statuses = call.params.get("effective_status")
    if isinstance(statuses, str):
        # a JSON array as the SDK sends it, or a bare comma-separated list
        try:
            statuses = json.loads(statuses)
        except ValueError:
            statuses = [s.strip() for s in statuses.split(",") if s.strip()]
    if statuses:
        if isinstance(statuses, str):
            statuses = [statuses]
        frame = frame.filter(pl.col("effective_status").is_in([str(s) for s in statuses]))
    else:
        frame = frame.filter(~pl.col("effective_status").is_in(list(HIDDEN_BY_DEFAULT)))
    link = make_link(call.base_url, call.version, call.path, call.params)
    page, paging = page_frame(frame, call.params, link)
    body: dict[str, Any] = {"data": _render(page, fields)}
    if paging:
        body["paging"] = paging
    return body


# ---- insights ----------------------------------------------------------------------------------
def _parse_date(value: Any, name: str) -> date:
    try:
        return date.fromisoformat(str(value))
    except ValueError as exc:
        raise GraphError(f"(#100) {name} must be a date in the format YYYY-MM-DD") from exc


def _time_window(state: SandboxState, params: dict[str, Any]) -> tuple[date, date]:
    today = state.world.now.date()
    time_range = json_param(params, "time_range")
    if time_range:
        if not isinstance(time_range, dict) or not {"since", "until"} <= set(time_range):
            raise GraphError("(#100) time_range must be an object with since and until")
        since = _parse_date(time_range["since"], "time_range.since")
        until = _parse_date(time_range["until"], "time_range.until")
        if since > until:
            raise GraphError("(#100) time_range.since must not be after time_range.until")
        return since, until
    preset = params.get("date_preset", "last_30d")
    start = state.world.config.start.date()
    presets = {
        "today": (today, today),
        "yesterday": (today - timedelta(days=1), today - timedelta(days=1)),
        "maximum": (start, today),
        "this_month": (today.replace(day=1), today),
    }
    if preset in presets:
        return presets[preset]
    if preset.startswith("last_") and preset.endswith("d") and preset[5:-1].isdigit():
        days = int(preset[5:-1])
        return today - timedelta(days=days), today - timedelta(days=1)
    raise GraphError(f"(#100) date_preset {preset!r} is not supported by the sandbox")


def _fixed(expr: pl.Expr, decimals: int) -> pl.Expr:
    """A non-negative float as a fixed-decimals string, vectorized (``12.5`` -> ``"12.50"``)."""
    scaled = (expr * 10**decimals).round(0).cast(pl.Int64)
    whole = (scaled // 10**decimals).cast(pl.String)
    frac = (scaled % 10**decimals).cast(pl.String).str.zfill(decimals)
    return whole + pl.lit(".") + frac


def insights_table(
    state: SandboxState,
    account_id: str,
    since: date,
    until: date,
    level: str,
    increment: str,
    target: tuple[str, str] | None,
) -> pl.DataFrame:
    """All insight rows of one query, Graph-formatted and sorted by the cursor key."""

    def build() -> pl.DataFrame:
        raw = state.memo(
            ("insights_raw", account_id, since, until),
            lambda: state.world.insights(account_id, since, until),
        )
        if target is not None:
            raw = raw.filter(pl.col(f"{target[0]}_id") == target[1])
        keys = LEVEL_KEYS[level]
        if increment == "all_days":
            raw = raw.with_columns(
                pl.lit(since).alias("date_start"), pl.lit(until).alias("date_stop")
            )
        else:
            step = int(increment)
            offset = (pl.col("date_start") - pl.lit(since)).dt.total_days() // step * step
            raw = raw.with_columns(
                (pl.lit(since) + pl.duration(days=offset)).alias("date_start"),
            ).with_columns(
                pl.min_horizontal(
                    pl.col("date_start") + pl.duration(days=step - 1), pl.lit(until)
                ).alias("date_stop")
            )
        metrics = ["spend", "impressions", "reach", "clicks", "inline_link_clicks", "leads"]
        agg = raw.group_by(["date_start", "date_stop", *keys]).agg(
            [pl.col(m).sum() for m in metrics]
        )
        cat = catalog(state)
        names = {
            "account": cat["accounts"].select("account_id", pl.col("name").alias("account_name")),
            "campaign": cat["campaign"].select(
                pl.col("id").alias("campaign_id"), pl.col("name").alias("campaign_name")
            ),
            "adset": cat["adset"].select(
                pl.col("id").alias("adset_id"), pl.col("name").alias("adset_name")
            ),
            "ad": cat["ad"].select(pl.col("id").alias("ad_id"), pl.col("name").alias("ad_name")),
        }
        for lvl, frame in names.items():
            if f"{lvl}_id" in keys:
                agg = agg.join(frame, on=f"{lvl}_id", how="left")
        currency = cat["accounts"].select("account_id", pl.col("currency").alias("cur"))
        agg = agg.join(currency, on="account_id", how="left")
        imp, clicks = pl.col("impressions"), pl.col("clicks")
        id_col = keys[-1]
        out = agg.select(
            *keys,
            *[f"{lvl}_name" for lvl in names if f"{lvl}_id" in keys],
            pl.col("cur").alias("account_currency"),
            pl.col("date_start").dt.strftime("%Y-%m-%d").alias("date_start"),
            pl.col("date_stop").dt.strftime("%Y-%m-%d").alias("date_stop"),
            _fixed(pl.col("spend"), 2).alias("spend"),
            *[pl.col(m).cast(pl.Int64).cast(pl.String).alias(m) for m in metrics[1:5]],
            pl.when(imp > 0).then(_fixed(clicks / imp * 100, 6)).alias("ctr"),
            pl.when(clicks > 0).then(_fixed(pl.col("spend") / clicks, 6)).alias("cpc"),
            pl.when(imp > 0).then(_fixed(pl.col("spend") / imp * 1000, 6)).alias("cpm"),
            pl.when(pl.col("reach") > 0).then(_fixed(imp / pl.col("reach"), 6)).alias("frequency"),
            pl.col("leads").cast(pl.Int64).alias("_leads"),
            pl.col("inline_link_clicks").cast(pl.Int64).alias("_link_clicks"),
            (pl.col("date_start").dt.strftime("%Y-%m-%d") + pl.lit("|") + pad_id(id_col)).alias(
                "_key"
            ),
        )
        return out.sort("_key")

    return state.memo(("insights", account_id, since, until, level, increment, target), build)


def _insight_query(state: SandboxState, params: dict[str, Any], default_level: str):
    since, until = _time_window(state, params)
    level = params.get("level") or default_level
    if level not in LEVEL_KEYS:
        raise GraphError(f"(#100) level must be one of {', '.join(LEVEL_KEYS)}")
    increment = str(params.get("time_increment") or "all_days")
    if increment not in ("all_days", "monthly") and not (
        increment.isdigit() and 1 <= int(increment) <= 90
    ):
        raise GraphError("(#100) time_increment must be all_days or an integer from 1 to 90")
    if increment == "monthly":
        raise GraphError("(#100) time_increment=monthly is not supported by the sandbox")
    fields = parse_fields(params.get("fields")) or [(f, None) for f in DEFAULT_INSIGHT_FIELDS]
    check_fields(fields, INSIGHT_FIELDS, "AdsInsights")
    return since, until, level, increment, fields


def _render_insights(page: pl.DataFrame, fields: list[tuple[str, list | None]]) -> list[dict]:
    # like the Graph API, every row carries its date range whatever the fields asked
    names = [n for n, _ in fields if n != "actions" and n in page.columns]
    names += [n for n in ("date_start", "date_stop") if n not in names]
    want_actions = any(n == "actions" for n, _ in fields)
    rows = page.select(*names, "_leads", "_link_clicks").to_dicts()
    out = []
    for row in rows:
        leads, link_clicks = row.pop("_leads"), row.pop("_link_clicks")
        item = {k: v for k, v in row.items() if v is not None}
        if want_actions:
            actions = []
            if link_clicks:
                actions.append({"action_type": "link_click", "value": str(link_clicks)})
            if leads:
                actions.append({"action_type": "lead", "value": str(leads)})
            if actions:
                item["actions"] = actions
        out.append(item)
    return out


def _insights(
    state: SandboxState, call: GraphCall, account_id: str, target: tuple[str, str] | None
) -> dict[str, Any]:
    default_level = "account" if target is None else target[0]
    since, until, level, increment, fields = _insight_query(state, call.params, default_level)
    table = insights_table(state, account_id, since, until, level, increment, target)
    link = make_link(call.base_url, call.version, call.path, call.params)
    page, paging = page_frame(table, call.params, link)
    body: dict[str, Any] = {"data": _render_insights(page, fields)}
    if paging:
        body["paging"] = paging
    return body


def _start_report(state: SandboxState, call: GraphCall, account_id: str) -> dict[str, Any]:
    """Async insights job: computed at once (a snapshot), then read via ``/{id}/insights``.

    With the ``report_run_polls`` / ``rate_report_failed`` faults a run answers ``Job Running``
    for that many status polls, then ``Job Completed`` (or ``Job Failed``); its results can be
    read only once it completed.
    """
    since, until, level, increment, fields = _insight_query(state, call.params, "account")
    table = insights_table(state, account_id, since, until, level, increment, None)
    run_id = str(900_000_000_000_000 + state.next_id())
    state.report_runs[run_id] = {
        "account_id": account_id,
        "since": since.isoformat(),
        "until": until.isoformat(),
        "table": table,
        "fields": fields,
        "time_ref": int(state.world.now.timestamp()),
        "polls": 0,
        **state.injector.draw_report_run(),
    }
    return {"report_run_id": run_id}


def _report_status(run: dict[str, Any], run_id: str) -> dict[str, Any]:
    """One status poll of a report run (each poll moves a running job on)."""
    run["polls"] += 1
    running = run["polls"] <= run["running_polls"]
    if running:
        status, percent = "Job Running", round(100 * run["polls"] / run["running_polls"])
    else:
        status, percent = ("Job Failed", 0) if run["failed"] else ("Job Completed", 100)
    body = {
        "id": run_id,
        "account_id": run["account_id"],
        "async_status": status,
        "async_percent_completion": percent,
        "date_start": run["since"],
        "date_stop": run["until"],
        "time_ref": run["time_ref"],
    }
    if status == "Job Completed":
        body["time_completed"] = run["time_ref"]
    return body


def _report_insights(state: SandboxState, call: GraphCall, run_id: str) -> dict[str, Any]:
    run = state.report_runs[run_id]
    if run["failed"] or run["polls"] < run["running_polls"]:
        raise GraphError(
            f"(#100) Report run {run_id} has not completed; poll it until async_status is "
            "Job Completed",
            code=100,
        )
    fields = parse_fields(call.params.get("fields")) or run["fields"]
    check_fields(fields, INSIGHT_FIELDS, "AdsInsights")
    link = make_link(call.base_url, call.version, call.path, call.params)
    page, paging = page_frame(run["table"], call.params, link)
    body: dict[str, Any] = {"data": _render_insights(page, fields)}
    if paging:
        body["paging"] = paging
    return body


# ---- Lead Ads ----------------------------------------------------------------------------------
def leads_frame(state: SandboxState) -> pl.DataFrame:
    """Lead-form leads, newest first (cursor key), with Graph ``created_time`` strings."""

    def build() -> pl.DataFrame:
        leads = as_utc(state.world.leads(), ["created_time"])
        epoch = pl.col("created_time").dt.epoch("s")
        return leads.select(
            pl.col("lead_id").cast(pl.String).alias("id"),
            iso_graph("created_time").alias("created_time"),
            epoch.alias("_epoch"),
            "ad_id",
            "adset_id",
            "campaign_id",
            "form_id",
            "account_id",
            "email",
            "phone",
            "full_name",
            pl.lit(False).alias("is_organic"),
            pl.lit("fb").alias("platform"),
            (
                (pl.lit(10**11) - epoch).cast(pl.String).str.zfill(12) + "|" + pad_id("lead_id")
            ).alias("_key"),
        ).sort("_key")

    return state.memo("graph_leads", build)


LEAD_FILTER_OPS = {
    "GREATER_THAN": lambda c, v: c > v,
    "GREATER_THAN_OR_EQUAL": lambda c, v: c >= v,
    "LESS_THAN": lambda c, v: c < v,
    "LESS_THAN_OR_EQUAL": lambda c, v: c <= v,
}


def _lead_filters(params: dict[str, Any]) -> pl.Expr:
    filtering = json_param(params, "filtering") or []
    if not isinstance(filtering, list):
        raise GraphError("(#100) filtering must be a JSON array")
    expr = pl.lit(True)
    for item in filtering:
        if not isinstance(item, dict) or item.get("field") not in ("time_created", "created_time"):
            raise GraphError("(#100) leads can be filtered on time_created only")
        op, value = item.get("operator"), item.get("value")
        try:
            if op in LEAD_FILTER_OPS:
                expr = expr & LEAD_FILTER_OPS[op](pl.col("_epoch"), int(value))
            elif op == "IN_RANGE":
                low, high = (int(v) for v in value)
                expr = expr & pl.col("_epoch").is_between(low, high)
            else:
                raise GraphError(f"(#100) filtering operator {op!r} is not supported")
        except (TypeError, ValueError) as exc:
            raise GraphError("(#100) time_created filter values are Unix seconds") from exc
    return expr


def _render_leads(frame: pl.DataFrame, fields: list[tuple[str, list | None]]) -> list[dict]:
    names = [n for n, _ in fields if n != "field_data"]
    want_data = any(n == "field_data" for n, _ in fields)
    rows = frame.select(*names, "email", "phone", "full_name").to_dicts()
    out = []
    for row in rows:
        raw = {"email": row.pop("email"), "phone_number": row.pop("phone")}
        raw["full_name"] = row.pop("full_name")
        item = {k: v for k, v in row.items() if v is not None}
        if want_data:
            item["field_data"] = [
                {"name": name, "values": [value]} for name, value in raw.items() if value
            ]
        out.append(item)
    return out


def _leads(state: SandboxState, call: GraphCall, kind: str, object_id: str) -> dict[str, Any]:
    fields = _requested(call.params, LEAD_FIELDS, "Lead", ["id", "created_time", "field_data"])
    column = "form_id" if kind == "form" else "ad_id"
    frame = leads_frame(state).filter((pl.col(column) == object_id) & _lead_filters(call.params))
    link = make_link(call.base_url, call.version, call.path, call.params)
    page, paging = page_frame(frame, call.params, link)
    body: dict[str, Any] = {"data": _render_leads(page, fields)}
    if paging:
        body["paging"] = paging
    return body


# ---- writes --------------------------------------------------------------------------------------
def _world_error(exc: Exception) -> GraphError:
    return GraphError(
        str(getattr(exc, "message", None) or exc),
        code=int(getattr(exc, "code", 100) or 100),
        subcode=getattr(exc, "subcode", None),
        http_status=int(getattr(exc, "http_status", 400) or 400),
        error_type=str(getattr(exc, "error_type", "OAuthException")),
        transient=bool(
            getattr(exc, "is_transient", False) or getattr(exc, "code", None) in (4, 17, 613)
        ),
    )


def _update_object(
    state: SandboxState, kind: str, object_id: str, params: dict[str, Any]
) -> dict[str, Any]:
    from optimizer_assets.sandbox.world import WorldError

    status = params.get("status")
    if status is not None and str(status) not in STATUSES:
        raise GraphError(
            f"(#100) Param status must be one of {{{', '.join(sorted(STATUSES))}}}",
            user_title="Invalid status",
        )
    try:
        if kind == "adset":
            budget = int_param(params, "daily_budget")
            if budget is None and status is None:
                raise GraphError("(#100) No fields to update: pass daily_budget and/or status")
            if budget is not None and budget <= 0:
                raise GraphError("(#100) param daily_budget must be a positive integer")
            state.world.update_adset(object_id, daily_budget=budget, status=status)
        elif kind == "ad":
            if status is None:
                raise GraphError("(#100) No fields to update: pass status")
            state.world.update_ad(object_id, status=str(status))
        elif kind == "campaign" and hasattr(state.world, "update_campaign"):
            if status is None:
                raise GraphError("(#100) No fields to update: pass status")
            state.world.update_campaign(object_id, status=str(status))
        else:
            raise not_found(object_id, "post")
    except WorldError as exc:
        raise _world_error(exc) from exc
    finally:
        state.bump()
    return {"success": True}


# ---- batch -------------------------------------------------------------------------------------
def split_relative_url(relative_url: str) -> tuple[str, dict[str, Any]]:
    parts = urlsplit(relative_url)
    path = parts.path.lstrip("/")
    first = path.split("/", 1)[0]
    if first.startswith("v") and first.endswith(".0") and first[1:-2].isdigit():
        path = path[len(first) :].lstrip("/")
    return path, dict(parse_qsl(parts.query, keep_blank_values=True))


def _batch(state: SandboxState, call: GraphCall) -> GraphResult:
    """``POST /`` with ``batch=[...]``: each item runs through :func:`execute`, in order."""
    items = json_param(call.params, "batch")
    if not isinstance(items, list) or not items:
        raise GraphError("(#100) The parameter batch is required and must be a non-empty array")
    cap = state.limits.graph_batch_max
    if len(items) > cap:
        raise GraphError(f"(#100) Too many requests in batch message. Maximum batch size is {cap}")
    include_headers = str(call.params.get("include_headers", "true")).lower() != "false"
    out: list[dict[str, Any] | None] = []
    for item in items:
        state.count("graph_batch_item")
        if state.injector.draw_null_item():
            state.count("fault_null_batch_item")
            out.append(None)
            continue
        out.append(_batch_item(state, call, item, include_headers))
    return GraphResult(200, out)


def _batch_item(
    state: SandboxState, call: GraphCall, item: Any, include_headers: bool
) -> dict[str, Any]:
    try:
        if not isinstance(item, dict) or "relative_url" not in item or "method" not in item:
            raise GraphError("(#100) Each batch item needs method and relative_url")
        path, params = split_relative_url(str(item["relative_url"]))
        body = item.get("body")
        if isinstance(body, str):
            params.update(parse_qsl(body, keep_blank_values=True))
        elif isinstance(body, dict):
            params.update(body)
        token = params.get("access_token")
        if token is not None and token != state.meta_token:
            raise GraphError("Invalid OAuth access token - Cannot parse access token", code=190)
        if "access_token" in call.params and "access_token" not in params:
            params["access_token"] = call.params["access_token"]
        sub = GraphCall(
            method=str(item["method"]).upper(),
            path=path,
            params=params,
            base_url=call.base_url,
            version=call.version,
            in_batch=True,
        )
        result = execute(state, sub)
    except GraphError as err:
        result = GraphResult(err.http_status, err.envelope(state.fbtrace_id()))
    headers = {"Content-Type": "text/javascript; charset=UTF-8", **result.headers}
    entry: dict[str, Any] = {
        "code": result.status,
        "body": json.dumps(result.body, separators=(",", ":")),
    }
    if include_headers:
        entry["headers"] = [{"name": k, "value": v} for k, v in headers.items()]
    return entry
