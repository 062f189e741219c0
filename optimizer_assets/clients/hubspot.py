"""HubSpot CRM client: deal search by modification window, pipelines, associations, contacts.

Speaks CONTRACTS.md section 3; whether it talks to HubSpot or to the sandbox depends only on
`base_url` and the token handed to the constructor.

Return shapes: deals and contacts are flat dicts `{"id": <str>, **properties}` whose property
values are HubSpot's strings (or None; empty strings become None) plus `archived`; pipelines are
HubSpot's objects with stage metadata converted (`probability` float, `is_closed` bool);
`pipeline_stages` and `deal_contact_ids` return polars frames (lists of pairs / rows).

Search allows 5 requests/s per account: every search call goes through a sliding-window
limiter, by default shared by all clients of the same portal (base URL + token) and time source
in the process; pass `search_limiter` to share one explicitly. 429s honour `Retry-After`.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

import polars as pl
import requests

from optimizer_assets.clients.errors import HubSpotAPIError, TransportError
from optimizer_assets.clients.http import Failure, HttpClient, SlidingWindowLimiter

HUBSPOT_URL = "https://api.hubapi.com"
DEAL_PROPERTIES = (
    "dealname",
    "amount",
    "dealstage",
    "pipeline",
    "closedate",
    "createdate",
    "hs_lastmodifieddate",
    "hs_object_id",
)
CONTACT_PROPERTIES = (
    "email",
    "phone",
    "firstname",
    "lastname",
    "createdate",
    "lastmodifieddate",
    "hs_analytics_source",
    "hs_analytics_source_data_1",
    "hs_analytics_source_data_2",
    "hs_analytics_first_url",
    "hs_facebook_click_id",
)
SEARCH_PAGE_LIMIT = 200
SEARCH_PAGING_CAP = 10_000
BATCH_READ_LIMIT = 100
SEARCH_RATE = 5  # requests per second per account
SEARCH_WINDOW_S = 1.1  # 1 s plus a margin for network jitter between us and the server's clock


class HubSpotClient(HttpClient):
    """HubSpot CRM v3/v4 reads for one private-app token (sandbox or HubSpot)."""

    service = "HubSpot"
    error_class = HubSpotAPIError

    def __init__(
        self,
        token: str,
        *,
        base_url: str = HUBSPOT_URL,
        search_limiter: SlidingWindowLimiter | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(base_url, token, **kwargs)
        self.search_limiter = search_limiter or _shared_search_limiter(
            self.base_url, token, self.clock, self.sleep
        )

    def _classify(self, resp: requests.Response, method: str, path: str) -> Failure:
        try:
            body: Any = resp.json()
        except ValueError:
            body = {"message": resp.text[:300] or resp.reason}
        if not isinstance(body, dict):
            body = {"message": str(body)[:300]}
        retryable = resp.status_code == 429 or resp.status_code >= 500
        err = HubSpotAPIError(
            self._redact(str(body.get("message") or resp.reason or "HubSpot error")),
            http_status=resp.status_code,
            category=body.get("category"),
            trace_id=body.get("correlationId"),
            errors=body.get("errors"),
            retryable=retryable,
            method=method,
            path=path,
        )
        return Failure(err, retryable, throttled=resp.status_code == 429)

    # ----------------------------------------------------------------- deals
    def search_deals_modified(
        self,
        since_ms: int,
        until_ms: int | None = None,
        properties: Sequence[str] = DEAL_PROPERTIES,
        *,
        page_size: int = SEARCH_PAGE_LIMIT,
        paging_cap: int = SEARCH_PAGING_CAP,
    ) -> Iterator[dict[str, Any]]:
        """Yield every deal with `since_ms <= hs_lastmodifieddate < until_ms`, ascending.

        Pages with `after`; before a page would cross the 10,000-result paging cap the search
        restarts with the lower bound moved to the last seen `hs_lastmodifieddate`, skipping the
        ids already yielded at that instant. A deal modified while the scan runs may be yielded
        twice (its newer state last) or, if it moves inside the window, shift the offsets.
        """
        if not 1 <= page_size <= SEARCH_PAGE_LIMIT:
            raise ValueError(f"page_size must be in 1..{SEARCH_PAGE_LIMIT}")
        props = list(dict.fromkeys([*properties, "hs_lastmodifieddate"]))
        lower = int(since_ms)
        after: str | None = None
        fetched = 0  # results of the current query (since the last restart)
        boundary_ms: int | None = None  # newest hs_lastmodifieddate yielded so far
        boundary_ids: set[str] = set()  # ids yielded at exactly boundary_ms
        while True:
            if fetched + page_size > paging_cap:
                if boundary_ms is None or boundary_ms == lower:
                    raise TransportError(
                        f"HubSpot search: more than {paging_cap} deals share "
                        f"hs_lastmodifieddate {lower}; cannot page past the cap"
                    )
                lower, after, fetched = boundary_ms, None, 0
            body = self._search_page("deals", lower, until_ms, props, page_size, after)
            results = body.get("results") or []
            fetched += len(results)
            for obj in results:
                record = _flat(obj)
                modified = parse_hubspot_ms(record.get("hs_lastmodifieddate"))
                if (
                    modified is not None
                    and modified == boundary_ms
                    and record["id"] in boundary_ids
                ):
                    continue  # overlap after a restart
                if modified is not None:
                    if boundary_ms is None or modified > boundary_ms:
                        boundary_ms, boundary_ids = modified, set()
                    if modified == boundary_ms:
                        boundary_ids.add(record["id"])
                yield record
            after = ((body.get("paging") or {}).get("next") or {}).get("after")
            if not after or not results:
                return

    def _search_page(
        self,
        object_type: str,
        lower_ms: int,
        until_ms: int | None,
        properties: list[str],
        limit: int,
        after: str | None,
    ) -> dict[str, Any]:
        filters: list[dict[str, str]] = [
            {"propertyName": "hs_lastmodifieddate", "operator": "GTE", "value": str(lower_ms)}
        ]
        if until_ms is not None:
            filters.append(
                {"propertyName": "hs_lastmodifieddate", "operator": "LT", "value": str(until_ms)}
            )
        payload: dict[str, Any] = {
            "filterGroups": [{"filters": filters}],
            "sorts": [{"propertyName": "hs_lastmodifieddate", "direction": "ASCENDING"}],
            "properties": properties,
            "limit": limit,
        }
        if after is not None:
            payload["after"] = after
        return (
            self.request(
                "POST",
                f"crm/v3/objects/{object_type}/search",
                json=payload,
                limiter=self.search_limiter,
            )
            or {}
        )

    # ----------------------------------------------------------------- pipelines
    def pipelines(self) -> list[dict[str, Any]]:
        """Deal pipelines as HubSpot returns them; each stage also gets `probability` (float or
        None) and `is_closed` (bool) parsed from its string metadata."""
        body = self.request("GET", "crm/v3/pipelines/deals") or {}
        out = []
        for pipeline in body.get("results") or []:
            stages = []
            for stage in pipeline.get("stages") or []:
                meta = stage.get("metadata") or {}
                prob = meta.get("probability")
                stages.append(
                    {
                        **stage,
                        "probability": None if prob in (None, "") else float(prob),
                        "is_closed": str(meta.get("isClosed", "false")).lower() == "true",
                    }
                )
            out.append({**pipeline, "stages": stages})
        return out

    def pipeline_stages(self) -> pl.DataFrame:
        """One row per stage: pipeline_id, pipeline_label, stage_id, stage_label,
        display_order (Int64), probability (Float64), is_closed (Boolean)."""
        rows = [
            {
                "pipeline_id": str(p.get("id")),
                "pipeline_label": p.get("label"),
                "stage_id": str(s.get("id")),
                "stage_label": s.get("label"),
                "display_order": s.get("displayOrder"),
                "probability": s["probability"],
                "is_closed": s["is_closed"],
            }
            for p in self.pipelines()
            for s in p["stages"]
        ]
        schema = {
            "pipeline_id": pl.Utf8,
            "pipeline_label": pl.Utf8,
            "stage_id": pl.Utf8,
            "stage_label": pl.Utf8,
            "display_order": pl.Int64,
            "probability": pl.Float64,
            "is_closed": pl.Boolean,
        }
        return pl.DataFrame(rows, schema=schema, orient="row")

    # ----------------------------------------------------------------- associations
    def deal_contact_ids(
        self, deal_ids: Sequence[str], *, chunk_size: int = BATCH_READ_LIMIT
    ) -> pl.DataFrame:
        """Deal -> contact pairs via the v4 batch associations read: frame (deal_id, contact_id),
        both Utf8, unique pairs; deals without contacts have no row."""
        pairs: list[tuple[str, str]] = []
        ids = list(dict.fromkeys(str(d) for d in deal_ids))
        for start in range(0, len(ids), _check_chunk(chunk_size)):
            inputs = [{"id": d} for d in ids[start : start + chunk_size]]
            while inputs:  # a deal with many contacts pages through its own `after`
                body = self.request(
                    "POST", "crm/v4/associations/deals/contacts/batch/read", json={"inputs": inputs}
                )
                inputs = []
                for result in (body or {}).get("results") or []:
                    deal = str((result.get("from") or {}).get("id"))
                    pairs += [(deal, str(to.get("toObjectId"))) for to in result.get("to") or []]
                    nxt = ((result.get("paging") or {}).get("next") or {}).get("after")
                    if nxt:
                        inputs.append({"id": deal, "after": str(nxt)})
        frame = pl.DataFrame(
            pairs, schema={"deal_id": pl.Utf8, "contact_id": pl.Utf8}, orient="row"
        )
        return frame.unique(maintain_order=True)

    # ----------------------------------------------------------------- contacts
    def read_contacts(
        self,
        ids: Sequence[str],
        properties: Sequence[str] = CONTACT_PROPERTIES,
        *,
        chunk_size: int = BATCH_READ_LIMIT,
    ) -> list[dict[str, Any]]:
        """Contacts by id via batch read (<= 100 per request): flat dicts `{"id", **properties}`
        (RAW PII: hash before storing). Unknown ids are skipped."""
        out: list[dict[str, Any]] = []
        unique = list(dict.fromkeys(str(i) for i in ids))
        for start in range(0, len(unique), _check_chunk(chunk_size)):
            payload = {
                "properties": list(properties),
                "inputs": [{"id": i} for i in unique[start : start + chunk_size]],
            }
            body = self.request("POST", "crm/v3/objects/contacts/batch/read", json=payload)
            out += [_flat(obj) for obj in (body or {}).get("results") or []]
        return out


_SEARCH_LIMITERS: dict[tuple[str, str, Any, Any], SlidingWindowLimiter] = {}
_SEARCH_LIMITERS_LOCK = threading.Lock()


def _shared_search_limiter(
    base_url: str, token: str, clock: Callable[[], float], sleep: Callable[[float], None]
) -> SlidingWindowLimiter:
    """One search limiter per portal (base URL + token) and time source, shared in the process:
    the 5/s quota is per account, not per client object."""
    key = (base_url, hashlib.sha256(token.encode()).hexdigest(), clock, sleep)
    with _SEARCH_LIMITERS_LOCK:
        if key not in _SEARCH_LIMITERS:
            _SEARCH_LIMITERS[key] = SlidingWindowLimiter(
                SEARCH_RATE, SEARCH_WINDOW_S, clock=clock, sleep=sleep
            )
        return _SEARCH_LIMITERS[key]


def parse_hubspot_ms(value: str | None) -> int | None:
    """HubSpot datetime property (epoch ms string or ISO 8601) to epoch milliseconds."""
    if value is None or value == "":
        return None
    text = str(value).strip()
    if text.lstrip("-").isdigit():
        return int(text)
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        raise ValueError(f"naive HubSpot timestamp {value!r}")
    return round(moment.timestamp() * 1000)


def _flat(obj: Mapping[str, Any]) -> dict[str, Any]:
    props = obj.get("properties") or {}
    out: dict[str, Any] = {"id": str(obj.get("id"))}
    out.update({k: (None if v == "" else v) for k, v in props.items()})
    out["archived"] = bool(obj.get("archived", False))
    return out


def _check_chunk(chunk_size: int) -> int:
    if not 1 <= chunk_size <= BATCH_READ_LIMIT:
        raise ValueError(f"chunk_size must be in 1..{BATCH_READ_LIMIT}")
    return chunk_size
