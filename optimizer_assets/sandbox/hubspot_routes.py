"""HubSpot CRM routes of the sandbox (``/crm/...``), speaking CONTRACTS.md section 3.

Choices where HubSpot leaves room: search ``after`` is an offset (as on HubSpot); ties in a sort
break on the object id; property values are strings, ``amount`` is ``""`` when unset and other
unset properties are ``null``; batch reads answer 207 with ``errors`` for ids they cannot return;
v4 association ``toObjectId`` is a number, as HubSpot sends it.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import polars as pl

from optimizer_assets.sandbox.server_state import SandboxState, as_utc, iso_hubspot

DEAL_PROPS = {
    "dealname": "str", "amount": "num", "dealstage": "str", "pipeline": "str",
    "closedate": "dt", "createdate": "dt", "hs_lastmodifieddate": "dt", "hs_object_id": "id",
}  # fmt: skip
CONTACT_PROPS = {
    "email": "str", "phone": "str", "firstname": "str", "lastname": "str",
    "hs_analytics_source": "str", "hs_analytics_source_data_1": "str",
    "hs_analytics_source_data_2": "str", "hs_analytics_first_url": "str",
    "hs_facebook_click_id": "str", "createdate": "dt", "lastmodifieddate": "dt",
    "hs_lastmodifieddate": "dt", "hs_object_id": "id",
}  # fmt: skip
DEFAULT_PROPS = {
    "deals": ["dealname", "amount", "closedate", "pipeline", "dealstage", "createdate",
              "hs_lastmodifieddate", "hs_object_id"],
    "contacts": ["createdate", "email", "firstname", "lastname", "lastmodifieddate",
                 "hs_object_id"],
}  # fmt: skip
ALWAYS_PROPS = {
    "deals": ["createdate", "hs_lastmodifieddate", "hs_object_id"],
    "contacts": ["createdate", "lastmodifieddate", "hs_object_id"],
}
MODIFIED = {"deals": "hs_lastmodifieddate", "contacts": "lastmodifieddate"}
DEAL_TO_CONTACT_TYPE = {"category": "HUBSPOT_DEFINED", "typeId": 3, "label": None}
MAX_FILTER_GROUPS = 5
MAX_FILTERS_PER_GROUP = 6
MAX_ASSOCIATION_BATCH = 1000


class HubSpotError(Exception):
    """A HubSpot error answered as ``{"status": "error", ...}``."""

    def __init__(
        self,
        status: int,
        message: str,
        category: str,
        *,
        errors: list | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.category = category
        self.errors = errors or []
        self.headers = headers or {}
        self.extra = extra or {}

    def body(self, correlation_id: str) -> dict[str, Any]:
        return {
            "status": "error",
            "message": self.message,
            "errors": self.errors,
            "category": self.category,
            "correlationId": correlation_id,
            **self.extra,
        }


def validation_error(message: str, field: str | None = None) -> HubSpotError:
    errors = [{"message": message, **({"in": field} if field else {})}]
    return HubSpotError(400, message, "VALIDATION_ERROR", errors=errors)


def rate_limit_error(retry_after: float) -> HubSpotError:
    return HubSpotError(
        429,
        "You have reached your secondly limit.",
        "RATE_LIMITS",
        headers={"Retry-After": str(max(1, int(retry_after + 0.999)))},
        extra={"errorType": "RATE_LIMIT", "policyName": "SECONDLY"},
    )


# ---- frames ------------------------------------------------------------------------------------
def _objects(state: SandboxState, kind: str) -> pl.DataFrame:
    """Deals or contacts with typed property columns, ``id`` and ``_id`` (numeric order)."""

    def build() -> pl.DataFrame:
        if kind == "deals":
            frame = as_utc(state.world.deals(), ["closedate", "createdate", "hs_lastmodifieddate"])
            frame = frame.rename({"deal_id": "id"})
            modified = "hs_lastmodifieddate"
        else:
            frame = as_utc(state.world.contacts(), ["createdate", "lastmodifieddate"])
            frame = frame.rename({"contact_id": "id"})
            frame = frame.with_columns(pl.col("lastmodifieddate").alias("hs_lastmodifieddate"))
            modified = "lastmodifieddate"
        frame = frame.with_columns(
            pl.col("id").cast(pl.String),
            pl.col("id").cast(pl.Int64).alias("_id"),
            pl.col("id").cast(pl.Int64).alias("hs_object_id"),
            pl.col("createdate").alias("_created"),
            pl.col(modified).alias("_updated"),
        )
        if "amount" in frame.columns:
            frame = frame.with_columns(pl.col("amount").cast(pl.Float64))
        types = DEAL_PROPS if kind == "deals" else CONTACT_PROPS
        # filters compare datetimes as epoch milliseconds (cheap integer literals)
        frame = frame.with_columns(
            pl.col(p).dt.epoch("ms").alias(f"{p}__ms") for p, t in types.items() if t == "dt"
        )
        return frame.sort("_id")

    return state.memo(("hubspot", kind), build)


def _iso(value: Any) -> str | None:
    if value is None:
        return None
    return (
        value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"
    )


def _amount(column: str) -> pl.Expr:
    """HubSpot prints amounts as typed: ``"1500"``, ``"1499.5"``; unset is ``""``."""
    a = pl.col(column)
    text = (
        pl.when(a == a.floor())
        .then(a.cast(pl.Int64).cast(pl.String))
        .otherwise(a.round(2).cast(pl.String))
    )
    return pl.when(a.is_null()).then(pl.lit("")).otherwise(text)


def _render(frame: pl.DataFrame, kind: str, properties: list[str]) -> list[dict[str, Any]]:
    """HubSpot objects: every property value a string (``amount`` may be ``""``)."""
    types = DEAL_PROPS if kind == "deals" else CONTACT_PROPS
    props = [p for p in dict.fromkeys([*properties, *ALWAYS_PROPS[kind]]) if p in types]
    exprs = []
    for prop in props:
        if prop == "hs_object_id":
            expr = pl.col("id")
        elif types[prop] == "dt":
            expr = iso_hubspot(prop)
        elif prop == "amount":
            expr = _amount(prop)
        else:
            expr = pl.col(prop).cast(pl.String)
        exprs.append(expr.alias(f"p{len(exprs)}"))
    rows = frame.select(
        "id", *exprs, iso_hubspot("_created").alias("_c"), iso_hubspot("_updated").alias("_u")
    ).rows()
    n = len(props)
    return [
        {
            "id": row[0],
            "properties": dict(zip(props, row[1 : n + 1], strict=True)),
            "createdAt": row[n + 1],
            "updatedAt": row[n + 2],
            "archived": False,
        }
        for row in rows
    ]


# ---- search --------------------------------------------------------------------------------------
def _value(kind_of: str, raw: Any, prop: str) -> Any:
    """A filter value in the column's type: datetimes (epoch ms or ISO-8601) as epoch ms."""
    try:
        if kind_of == "dt":
            text = str(raw).strip()
            if text.lstrip("-").isdigit():
                return int(text)
            parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
            parsed = parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
            return int(parsed.timestamp() * 1000)
        if kind_of == "num":
            return float(raw)
        if kind_of == "id":
            return int(raw)
        return str(raw)
    except (TypeError, ValueError) as exc:
        raise validation_error(f"Invalid value {raw!r} for property {prop}", "filters") from exc


def _filter_expr(f: Any, types: dict[str, str]) -> pl.Expr:
    if not isinstance(f, dict):
        raise validation_error("Each filter must be an object", "filters")
    prop, op = f.get("propertyName"), f.get("operator")
    if prop not in types:
        raise validation_error(f"Property {prop!r} does not exist or cannot be searched", "filters")
    kind_of = types[prop]
    col = pl.col(f"{prop}__ms" if kind_of == "dt" else prop)
    if op in ("HAS_PROPERTY", "NOT_HAS_PROPERTY"):
        has = col.is_not_null()
        if kind_of == "str":
            has = has & (col != "")
        return has if op == "HAS_PROPERTY" else ~has
    if op in ("IN", "NOT_IN"):
        values = f.get("values")
        if not isinstance(values, list):
            raise validation_error(f"Operator {op} needs values (a list)", "filters")
        expr = col.is_in([_value(kind_of, v, prop) for v in values])
        return expr if op == "IN" else ~expr
    if "value" not in f:
        raise validation_error(f"Operator {op} needs a value", "filters")
    value = _value(kind_of, f["value"], prop)
    if op == "BETWEEN":
        if "highValue" not in f:
            raise validation_error("Operator BETWEEN needs highValue", "filters")
        high = _value(kind_of, f["highValue"], prop)
        return ((col >= value) & (col <= high)).fill_null(False)
    compare = {
        "EQ": col.__eq__,
        "NEQ": col.__ne__,
        "LT": col.__lt__,
        "LTE": col.__le__,
        "GT": col.__gt__,
        "GTE": col.__ge__,
    }
    if op not in compare:
        raise validation_error(f"Unsupported operator {op!r}", "filters")
    return compare[op](value).fill_null(False)


def _search_rows(state: SandboxState, kind: str, body: dict[str, Any]) -> pl.Series:
    """Row numbers of ``_objects(state, kind)`` matching the search, in result order.

    The frame is not copied: the filters evaluate to a mask over the columns they name, and the
    sort order of each sort property is computed once per world version (memoized), so a page
    costs a pass over the mask instead of filtering and sorting every column of every object.
    """
    frame = _objects(state, kind)
    types = DEAL_PROPS if kind == "deals" else CONTACT_PROPS
    groups = body.get("filterGroups") or []
    if not isinstance(groups, list) or len(groups) > MAX_FILTER_GROUPS:
        raise validation_error(f"filterGroups must be a list of at most {MAX_FILTER_GROUPS}")
    group_exprs = []
    for group in groups:
        filters = group.get("filters") if isinstance(group, dict) else None
        if not isinstance(filters, list) or len(filters) > MAX_FILTERS_PER_GROUP:
            raise validation_error(
                f"Each filter group needs 1 to {MAX_FILTERS_PER_GROUP} filters", "filterGroups"
            )
        exprs = [_filter_expr(f, types) for f in filters]
        group_exprs.append(pl.all_horizontal(exprs) if exprs else pl.lit(True))
    sorts = body.get("sorts") or []
    if not isinstance(sorts, list):
        raise validation_error("sorts must be a list", "sorts")
    if sorts:
        sort = sorts[0]
        if isinstance(sort, str):  # legacy "prop" / "-prop" spelling
            prop, descending = sort.lstrip("-"), sort.startswith("-")
        elif isinstance(sort, dict):
            prop = sort.get("propertyName")
            direction = str(sort.get("direction", "ASCENDING")).upper()
            if direction not in ("ASCENDING", "DESCENDING"):
                raise validation_error("sort direction is ASCENDING or DESCENDING", "sorts")
            descending = direction == "DESCENDING"
        else:
            raise validation_error("Each sort is an object", "sorts")
        if prop not in types:
            raise validation_error(f"Cannot sort on property {prop!r}", "sorts")
        order = state.memo(
            ("hubspot", kind, "order", prop, descending),
            lambda: frame.select(
                pl.arg_sort_by([prop, "_id"], descending=[descending, descending], nulls_last=True)
            ).to_series(),
        )
    else:  # the frame is in id order
        order = pl.int_range(frame.height, dtype=pl.UInt32, eager=True)
    if not group_exprs:
        return order
    mask = frame.select(pl.any_horizontal(group_exprs)).to_series()
    return order.filter(mask.gather(order))


def search(state: SandboxState, kind: str, body: dict[str, Any]) -> dict[str, Any]:
    """``POST /crm/v3/objects/{deals|contacts}/search``."""
    limits = state.limits
    try:
        limit = int(body.get("limit", 10))
        after = int(body.get("after") or 0)
    except (TypeError, ValueError) as exc:
        raise validation_error("limit and after must be integers") from exc
    if not 0 <= limit <= limits.hubspot_search_max_limit:
        raise validation_error(
            f"limit must be between 0 and {limits.hubspot_search_max_limit}, got {limit}", "limit"
        )
    if after < 0:
        raise validation_error("after must be a non-negative offset", "after")
    if after >= limits.hubspot_search_max_results:
        raise validation_error(
            f"The search endpoints are limited to {limits.hubspot_search_max_results} results "
            "for any given query; narrow the hs_lastmodifieddate range instead of paging further",
            "after",
        )
    properties = body.get("properties") or DEFAULT_PROPS[kind]
    if not isinstance(properties, list):
        raise validation_error("properties must be a list", "properties")
    rows = _search_rows(state, kind, body)
    end = min(after + limit, rows.len(), limits.hubspot_search_max_results)
    page = _objects(state, kind).select(pl.all().gather(rows.slice(after, max(0, end - after))))
    result: dict[str, Any] = {
        "total": rows.len(),
        "results": _render(page, kind, [str(p) for p in properties]),
    }
    if end < rows.len() and limit > 0:
        result["paging"] = {"next": {"after": str(end)}}
    return result


# ---- reads ---------------------------------------------------------------------------------------
def _complete(results: list, missing: list[str], kind: str, started: str) -> tuple[int, dict]:
    body: dict[str, Any] = {
        "status": "COMPLETE",
        "results": results,
        "startedAt": started,
        "completedAt": started,
    }
    if missing:
        body["numErrors"] = 1
        body["errors"] = [
            {
                "status": "error",
                "category": "OBJECT_NOT_FOUND",
                "message": f"Could not get some {kind} objects, they may be deleted or not exist.",
                "context": {"ids": missing},
            }
        ]
        return 207, body
    return 200, body


def _input_ids(body: dict[str, Any], cap: int) -> list[str]:
    inputs = body.get("inputs")
    if not isinstance(inputs, list):
        raise validation_error("inputs must be a list of {id}", "inputs")
    if len(inputs) > cap:
        raise validation_error(f"Batch size {len(inputs)} exceeds the limit of {cap}", "inputs")
    ids = []
    for item in inputs:
        if not isinstance(item, dict) or "id" not in item:
            raise validation_error("Each input needs an id", "inputs")
        ids.append(str(item["id"]))
    return ids


def batch_read(state: SandboxState, kind: str, body: dict[str, Any]) -> tuple[int, dict]:
    """``POST /crm/v3/objects/{contacts|deals}/batch/read``."""
    if body.get("idProperty") not in (None, "hs_object_id"):
        raise validation_error("The sandbox reads objects by hs_object_id only", "idProperty")
    ids = _input_ids(body, state.limits.hubspot_batch_read_max)
    properties = body.get("properties") or DEFAULT_PROPS[kind]
    frame = _objects(state, kind).filter(pl.col("id").is_in(ids))
    found = set(frame["id"].to_list())
    missing = [i for i in dict.fromkeys(ids) if i not in found]
    results = _render(frame, kind, [str(p) for p in properties])
    return _complete(results, missing, kind.upper()[:-1], _iso(state.world.now))


def get_object(state: SandboxState, kind: str, object_id: str, query: dict[str, str]) -> dict:
    frame = _objects(state, kind).filter(pl.col("id") == object_id)
    if frame.height == 0:
        raise HubSpotError(404, f"Object {object_id} not found", "OBJECT_NOT_FOUND")
    props = [p for p in query.get("properties", "").split(",") if p] or DEFAULT_PROPS[kind]
    return _render(frame, kind, props)[0]


def _associations(state: SandboxState) -> dict[str, list[int]]:
    def build() -> dict[str, list[int]]:
        links = state.world.deal_contacts().select(
            pl.col("deal_id").cast(pl.String), pl.col("contact_id").cast(pl.Int64)
        )
        grouped = links.unique().sort("contact_id").group_by("deal_id").agg("contact_id")
        return dict(zip(grouped["deal_id"].to_list(), grouped["contact_id"].to_list(), strict=True))

    return state.memo(("hubspot", "deal_contacts"), build)


def _to(contact_ids: list[int]) -> list[dict[str, Any]]:
    return [
        {"toObjectId": c, "associationTypes": [dict(DEAL_TO_CONTACT_TYPE)]} for c in contact_ids
    ]


def deal_contacts(state: SandboxState, deal_id: str, query: dict[str, str]) -> dict[str, Any]:
    """``GET /crm/v4/objects/deals/{id}/associations/contacts`` (offset paging, limit 500)."""
    contacts = _associations(state).get(deal_id, [])
    try:
        limit = int(query.get("limit", 500))
        after = int(query.get("after", 0))
    except ValueError as exc:
        raise validation_error("limit and after must be integers") from exc
    if not 1 <= limit <= 500:
        raise validation_error("limit must be between 1 and 500", "limit")
    body: dict[str, Any] = {"results": _to(contacts[after : after + limit])}
    if after + limit < len(contacts):
        body["paging"] = {"next": {"after": str(after + limit)}}
    return body


def deal_contacts_batch(state: SandboxState, body: dict[str, Any]) -> tuple[int, dict]:
    """``POST /crm/v4/associations/deals/contacts/batch/read``."""
    ids = _input_ids(body, MAX_ASSOCIATION_BATCH)
    links = _associations(state)
    results, missing = [], []
    for deal_id in dict.fromkeys(ids):
        if links.get(deal_id):
            results.append({"from": {"id": deal_id}, "to": _to(links[deal_id])})
        else:
            missing.append(deal_id)
    return _complete(results, missing, "DEAL", _iso(state.world.now))


def pipelines(state: SandboxState) -> list[dict[str, Any]]:
    """The world's pipelines, with the fields the official client requires filled in."""
    created = _iso(state.world.config.start)
    out = []
    for pipeline in state.world.pipelines():
        p = json.loads(json.dumps(pipeline, default=str))
        p.setdefault("archived", False)
        p.setdefault("createdAt", created)
        p.setdefault("updatedAt", created)
        for order, stage in enumerate(p.get("stages", [])):
            stage.setdefault("displayOrder", order)
            stage.setdefault("archived", False)
            stage.setdefault("createdAt", created)
            stage.setdefault("updatedAt", created)
            stage["metadata"] = {k: str(v) for k, v in stage.get("metadata", {}).items()}
        p.setdefault("displayOrder", len(out))
        out.append(p)
    return out


# ---- routing -------------------------------------------------------------------------------------
def route(
    state: SandboxState, method: str, path: str, body: dict[str, Any], query: dict[str, str]
) -> tuple[int, Any, dict[str, str]]:
    """Dispatch one authenticated ``/crm/...`` request (search rate limit already applied)."""
    segs = [s for s in path.strip("/").split("/") if s]
    objects = len(segs) >= 3 and segs[:2] == ["v3", "objects"] and segs[2] in ("deals", "contacts")
    if method == "POST" and objects and segs[3:] == ["search"]:
        return 200, search(state, segs[2], body), {}
    if method == "POST" and objects and segs[3:] == ["batch", "read"]:
        status, out = batch_read(state, segs[2], body)
        return status, out, {}
    if method == "GET" and objects and len(segs) == 4:
        return 200, get_object(state, segs[2], segs[3], query), {}
    if method == "GET" and segs[:3] == ["v3", "pipelines", "deals"] and len(segs) in (3, 4):
        all_pipelines = pipelines(state)
        if len(segs) == 3:
            return 200, {"results": all_pipelines}, {}
        for p in all_pipelines:
            if str(p.get("id")) == segs[3]:
                return 200, p, {}
        raise HubSpotError(404, f"Pipeline {segs[3]} not found", "OBJECT_NOT_FOUND")
    if (
        method == "GET"
        and len(segs) == 6
        and segs[:3] == ["v4", "objects", "deals"]
        and segs[4:] == ["associations", "contacts"]
    ):
        return 200, deal_contacts(state, segs[3], query), {}
    if method == "POST" and segs == ["v4", "associations", "deals", "contacts", "batch", "read"]:
        status, out = deal_contacts_batch(state, body)
        return status, out, {}
    raise HubSpotError(404, f"No route for {method} /crm/{path}", "OBJECT_NOT_FOUND")
