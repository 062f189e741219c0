"""HubSpot records -> warehouse frames, and deal stage transitions from successive deal states.

Input records are HubSpot's wire shapes (CONTRACTS.md section 3): every property a string,
timestamps ISO-8601 or epoch milliseconds, ``amount`` possibly empty.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import polars as pl

from optimizer_assets.domain.capi import event_id_expr_frame, fbc_expr, hash_identity_columns

UTC_US = pl.Datetime("us", "UTC")

DEAL_SCHEMA = {
    "deal_id": pl.Utf8,
    "pipeline": pl.Utf8,
    "dealstage": pl.Utf8,
    "amount": pl.Float64,
    "created_at": UTC_US,
    "closed_at": UTC_US,
    "updated_at": UTC_US,
    "account_id": pl.Utf8,
}

STAGE_EVENT_SCHEMA = {
    "event_key": pl.Utf8,
    "deal_id": pl.Utf8,
    "account_id": pl.Utf8,
    "pipeline": pl.Utf8,
    "from_stage": pl.Utf8,
    "to_stage": pl.Utf8,
    "occurred_at": UTC_US,
    "amount": pl.Float64,
}

UTM_KEYS = ("utm_source", "utm_medium", "utm_campaign", "utm_content", "utm_term")


def _timestamp(column: str) -> pl.Expr:
    """Parse HubSpot timestamps given as epoch milliseconds or ISO-8601 strings."""
    text = pl.col(column).cast(pl.Utf8).str.strip_chars()
    as_ms = text.cast(pl.Int64, strict=False)
    iso = text.str.replace(r"Z$", "+00:00").str.to_datetime(
        time_zone="UTC", time_unit="us", strict=False
    )
    from_ms = (
        pl.from_epoch(as_ms, time_unit="ms").dt.replace_time_zone("UTC").dt.cast_time_unit("us")
    )
    return pl.when(as_ms.is_not_null()).then(from_ms).otherwise(iso)


def deals_frame(records: Iterable[Mapping], pipeline_accounts: Mapping[str, str]) -> pl.DataFrame:
    """Deal search results (wire or flat records) -> ``hubspot_deals`` rows (current state)."""
    rows = []
    for record in records:
        props = record.get("properties") or record  # wire shape, or the client's flat record
        rows.append(
            {
                "deal_id": str(record["id"]),
                "pipeline": props.get("pipeline"),
                "dealstage": props.get("dealstage"),
                "amount": props.get("amount"),
                "createdate": props.get("createdate") or record.get("createdAt"),
                "closedate": props.get("closedate"),
                "modified": props.get("hs_lastmodifieddate") or record.get("updatedAt"),
            }
        )
    if not rows:
        return pl.DataFrame(schema=DEAL_SCHEMA)
    raw = pl.DataFrame(rows, schema={k: pl.Utf8 for k in rows[0]})
    mapping = pl.DataFrame(
        {"pipeline": list(pipeline_accounts), "account_id": list(pipeline_accounts.values())},
        schema={"pipeline": pl.Utf8, "account_id": pl.Utf8},
    )
    return (
        raw.select(
            "deal_id",
            "pipeline",
            "dealstage",
            pl.col("amount").str.strip_chars().cast(pl.Float64, strict=False).alias("amount"),
            _timestamp("createdate").alias("created_at"),
            _timestamp("closedate").alias("closed_at"),
            _timestamp("modified").alias("updated_at"),
        )
        .join(mapping, on="pipeline", how="left")
        .unique("deal_id", keep="last", maintain_order=True)
        .select(list(DEAL_SCHEMA))
    )


def stage_events(snapshots: pl.DataFrame) -> pl.DataFrame:
    """Stage transitions from successive observed states of each deal (``hubspot_deal_snapshots``).

    A stage event is the deal ENTERING a stage at a moment: its identity is (deal_id, to_stage,
    occurred_at) and ``event_key`` equals the CAPI ``event_id`` of that entry
    (``domain.capi.event_id``, which does not hash ``from_stage``). ``occurred_at`` is the
    state's ``updated_at`` (HubSpot keeps ``hs_lastmodifieddate`` / webhook ``occurredAt`` at the
    change), ``created_at`` only when ``updated_at`` is missing. The first observed state of a
    deal has ``from_stage`` null (its creation when seen from the start); every later state whose
    stage differs from the one before is a transition. States observed more than once
    (overlapping windows, webhook retries, both sources) count once, so re-runs add nothing, and
    a state that arrives late (an earlier or a middle one) only changes the ``from_stage`` of the
    entry after it, never its key: each entry into a stage is one event whatever the order of
    delivery.
    """
    if snapshots.is_empty():
        return pl.DataFrame(schema=STAGE_EVENT_SCHEMA)
    ordered = (
        snapshots.with_columns(occurred_at=pl.coalesce("updated_at", "created_at"))
        .unique(["deal_id", "occurred_at", "dealstage"], keep="first", maintain_order=True)
        .sort("deal_id", "occurred_at", "dealstage")
        .with_columns(
            from_stage=pl.col("dealstage").shift(1).over("deal_id"),
            first=pl.int_range(pl.len()).over("deal_id") == 0,
        )
    )
    changes = ordered.filter(
        pl.col("first") | (pl.col("dealstage") != pl.col("from_stage"))
    ).with_columns(to_stage=pl.col("dealstage"))
    return changes.select(
        event_id_expr_frame(changes).alias("event_key"),
        "deal_id",
        "account_id",
        "pipeline",
        "from_stage",
        "to_stage",
        "occurred_at",
        "amount",
    )


def parse_first_url(urls: pl.Expr) -> list[pl.Expr]:
    """Expressions over ``hs_analytics_first_url``: host+path without query, fbclid, utm_*."""
    url = urls.str.strip_chars()
    params = {name: url.str.extract(rf"[?&]{name}=([^&#]*)", 1) for name in ("fbclid", *UTM_KEYS)}
    return [
        url.str.extract(r"^(?:[a-zA-Z][a-zA-Z0-9+.-]*://)?([^?#]*)", 1).alias("first_url_host"),
        *(expr.replace("", None).alias(name) for name, expr in params.items()),
    ]


CONTACT_SCHEMA = {
    "contact_id": pl.Utf8,
    "created_at": UTC_US,
    "updated_at": UTC_US,
    "email_sha256": pl.Utf8,
    "phone_sha256": pl.Utf8,
    "fn_sha256": pl.Utf8,
    "ln_sha256": pl.Utf8,
    "source": pl.Utf8,
    "source_data_1": pl.Utf8,
    "source_data_2": pl.Utf8,
    "first_url_host": pl.Utf8,
    "fbclid": pl.Utf8,
    "fbc": pl.Utf8,
    **dict.fromkeys(UTM_KEYS, pl.Utf8),
    "lead_id": pl.Utf8,
}

_RAW_CONTACT_FIELDS = (
    "id",
    "email",
    "phone",
    "firstname",
    "lastname",
    "hs_analytics_source",
    "hs_analytics_source_data_1",
    "hs_analytics_source_data_2",
    "hs_analytics_first_url",
    "hs_facebook_click_id",
    "createdate",
    "lastmodifieddate",
)
LEAD_ADS_SOURCE = "facebook lead ads"


def contacts_frame(
    records: Iterable[Mapping], default_country: Mapping[str, str] | str = "us"
) -> pl.DataFrame:
    """Contact batch-read records -> ``hubspot_contacts`` rows, identities hashed here.

    Raw email, phone and names exist only inside this function. ``default_country`` is one ISO
    code or a mapping contact id -> code (the account's calling code for phones without one).
    The click id comes from the first URL's ``fbclid`` or ``hs_facebook_click_id``; contacts synced
    from Meta lead forms (source data "Facebook Lead Ads") carry their ``lead_id``.
    """
    rows = [
        {k: (None if r.get(k) in (None, "") else str(r.get(k))) for k in _RAW_CONTACT_FIELDS}
        for r in records
    ]
    if not rows:
        return pl.DataFrame(schema=CONTACT_SCHEMA)
    raw = pl.DataFrame(rows, schema=dict.fromkeys(_RAW_CONTACT_FIELDS, pl.Utf8))
    if isinstance(default_country, str):
        raw = raw.with_columns(country=pl.lit(default_country))
    else:
        raw = raw.with_columns(
            country=pl.col("id").replace_strict(dict(default_country), default="us")
        )
    identity = {"email": "em", "phone": "ph", "firstname": "fn", "lastname": "ln"}
    hashed = pl.concat(
        [
            hash_identity_columns(group, identity, default_country=country)
            for (country,), group in raw.group_by("country", maintain_order=True)
        ]
    )
    source_1 = pl.col("hs_analytics_source_data_1")
    out = hashed.with_columns(parse_first_url(pl.col("hs_analytics_first_url"))).with_columns(
        contact_id=pl.col("id"),
        created_at=_timestamp("createdate"),
        updated_at=_timestamp("lastmodifieddate"),
        source=pl.col("hs_analytics_source"),
        source_data_1=source_1,
        source_data_2=pl.col("hs_analytics_source_data_2"),
        fbclid=pl.coalesce("fbclid", "hs_facebook_click_id"),
        lead_id=pl.when(source_1.str.to_lowercase() == LEAD_ADS_SOURCE).then(
            pl.col("hs_analytics_source_data_2")
        ),
    )
    return out.with_columns(fbc=fbc_expr("fbclid", "created_at")).select(list(CONTACT_SCHEMA))
