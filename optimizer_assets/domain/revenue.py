"""Synthetic revenue: turn CRM deal-stage movement into money signals.

Each HubSpot pipeline stage is mapped (through the pipeline metadata, never by hard-coded ids)
to a preset stage with a value and a confidence. A stage change is worth
``value(to) - value(previous stage)``, so regressions are negative and the deltas of a deal
always add up to the value of the stage it is in now.

Pure polars: no Dagster, no HTTP, no files.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import polars as pl

__all__ = [
    "FALLBACK_CONFIDENCE_FACTOR",
    "PRESETS",
    "PRESET_ALIASES",
    "PROBABILITY_CONFIDENCE",
    "STAGE_ALIASES",
    "STAGE_VALUES_SCHEMA",
    "REVENUE_SCHEMA",
    "UNKNOWN_STAGES_SCHEMA",
    "StageValue",
    "deal_values",
    "map_pipeline_stages",
    "normalize_label",
    "preset_table",
    "synthetic_revenue",
]


@dataclass(frozen=True)
class StageValue:
    """What reaching a stage is worth.

    ``value`` is in account currency units. When ``amount_share`` is set and the deal has an
    amount, the stage is worth ``amount * amount_share`` instead and ``value`` is the fallback
    for deals without an amount. ``confidence`` (0..1) says how much the value can be trusted
    as money: 1 = booked revenue, lower = an estimate of what the stage usually leads to.
    """

    value: float
    confidence: float
    amount_share: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.confidence <= 1.0:
            raise ValueError(f"confidence must be in [0, 1], got {self.confidence}")
        if self.amount_share is not None and self.amount_share < 0:
            raise ValueError(f"amount_share must be >= 0, got {self.amount_share}")


# Confidence of an amount-based stage is multiplied by this when the deal has no amount
# (the preset fallback is a typical deal, not this one).
FALLBACK_CONFIDENCE_FACTOR = 0.5
# Confidence of a stage valued only through HubSpot's own probability (no preset, no mapping).
PROBABILITY_CONFIDENCE = 0.5

# Presets (account currency units), named like the settings file's ``revenue_preset``.
# Intermediate service/SaaS values are fixed expected values of a typical deal; closed_won is
# the deal amount, with the typical deal as fallback.
PRESETS: dict[str, dict[str, StageValue]] = {
    # Service business (clinics, agencies, home services): a booked appointment is worth
    # ~15% of a typical 15,000 deal, a show-up ~60%.
    "service_business": {
        "lead": StageValue(0.0, 1.0),
        "appointment_scheduled": StageValue(2_250.0, 0.3),
        "show_up": StageValue(9_000.0, 0.6),
        "closed_won": StageValue(15_000.0, 1.0, amount_share=1.0),
        "closed_lost": StageValue(0.0, 1.0),
    },
    # E-commerce (HubSpot's ecommerce pipeline: checkout abandoned / pending / completed /
    # processed / shipped / cancelled): values are shares of the order amount; the fallbacks
    # assume a 100-unit average order.
    "ecommerce": {
        "lead": StageValue(0.0, 1.0),
        "cart": StageValue(10.0, 0.2, amount_share=0.1),
        "checkout": StageValue(50.0, 0.5, amount_share=0.5),
        "closed_won": StageValue(100.0, 1.0, amount_share=1.0),
        "closed_lost": StageValue(0.0, 1.0),
    },
    # B2B SaaS: funnel values of a typical 10,000 first-year contract.
    "b2b_saas": {
        "lead": StageValue(0.0, 1.0),
        "mql": StageValue(100.0, 0.1),
        "sql": StageValue(2_000.0, 0.3),
        "demo_scheduled": StageValue(3_500.0, 0.4),
        "proposal_sent": StageValue(6_000.0, 0.6),
        "closed_won": StageValue(10_000.0, 1.0, amount_share=1.0),
        "closed_lost": StageValue(0.0, 1.0),
    },
}

# Short names accepted for the presets (notebooks, older configs).
PRESET_ALIASES: dict[str, str] = {
    "service": "service_business",
    "saas": "b2b_saas",
    "e_commerce": "ecommerce",
}

# Label spellings (compared after normalize_label) that name each preset stage. Includes the
# ids/labels of HubSpot's default sales and ecommerce pipelines.
STAGE_ALIASES: dict[str, tuple[str, ...]] = {
    "lead": ("lead", "new lead", "new", "subscriber", "open", "inquiry", "enquiry"),
    "appointment_scheduled": (
        "appointment scheduled",
        "appointment booked",
        "appointment set",
        "meeting scheduled",
        "meeting booked",
        "consultation booked",
        "consultation scheduled",
        "booked",
    ),
    "show_up": (
        "show up",
        "showed up",
        "shown",
        "showed",
        "attended",
        "appointment attended",
        "consultation done",
        "visited",
    ),
    "cart": ("cart", "added to cart", "add to cart", "abandoned cart", "checkout abandoned"),
    "checkout": (
        "checkout",
        "checkout pending",
        "checkout started",
        "initiated checkout",
        "payment pending",
    ),
    "mql": ("mql", "marketing qualified lead", "marketing qualified"),
    "sql": (
        "sql",
        "sales qualified lead",
        "sales qualified",
        "qualified to buy",
        "qualified",
    ),
    "demo_scheduled": (
        "demo scheduled",
        "demo booked",
        "demo",
        "presentation scheduled",
        "discovery call scheduled",
    ),
    "proposal_sent": (
        "proposal sent",
        "proposal",
        "quote sent",
        "contract sent",
        "negotiation",
        "decision maker bought in",
    ),
    "closed_won": (
        "closed won",
        "won",
        "deal won",
        "customer",
        "checkout completed",
        "purchased",
        "paid",
        "processed",
        "shipped",
        "delivered",
        "completed",
    ),
    "closed_lost": (
        "closed lost",
        "lost",
        "deal lost",
        "cancelled",
        "canceled",
        "refunded",
        "no show",
        "disqualified",
    ),
}

STAGE_VALUES_SCHEMA: dict[str, pl.DataType] = {
    "pipeline": pl.Utf8(),
    "pipeline_label": pl.Utf8(),
    "stage_id": pl.Utf8(),
    "label": pl.Utf8(),
    "display_order": pl.Int64(),
    "probability": pl.Float64(),
    "is_closed": pl.Boolean(),
    "stage": pl.Utf8(),
    "value": pl.Float64(),
    "amount_share": pl.Float64(),
    "confidence": pl.Float64(),
    "source": pl.Utf8(),
}

REVENUE_SCHEMA: dict[str, pl.DataType] = {
    "event_key": pl.Utf8(),
    "deal_id": pl.Utf8(),
    "account_id": pl.Utf8(),
    "pipeline": pl.Utf8(),
    "occurred_at": pl.Datetime("us", "UTC"),
    "from_stage": pl.Utf8(),
    "to_stage": pl.Utf8(),
    "to_stage_name": pl.Utf8(),
    "amount": pl.Float64(),
    "value_delta": pl.Float64(),
    "value_after": pl.Float64(),
    "confidence": pl.Float64(),
    "currency": pl.Utf8(),
}

UNKNOWN_STAGES_SCHEMA: dict[str, pl.DataType] = {
    "pipeline": pl.Utf8(),
    "stage_id": pl.Utf8(),
    "events": pl.Int64(),
    "deals": pl.Int64(),
    "first_seen": pl.Datetime("us", "UTC"),
    "last_seen": pl.Datetime("us", "UTC"),
}

_NON_ALNUM = re.compile(r"[^0-9a-z]+")


def normalize_label(label: str | None) -> str:
    """Compact comparison key of a stage label or id: lowercase ASCII letters and digits only."""
    return _NON_ALNUM.sub("", (label or "").strip().lower())


def _snake(label: str | None) -> str:
    """Readable name for a stage known only by its label (``Decision maker`` -> decision_maker)."""
    return _NON_ALNUM.sub("_", (label or "").strip().lower()).strip("_")


_ALIAS_INDEX: dict[str, str] = {
    normalize_label(alias): stage for stage, aliases in STAGE_ALIASES.items() for alias in aliases
}
for _stage in STAGE_ALIASES:  # the canonical name itself is always an alias
    _ALIAS_INDEX.setdefault(normalize_label(_stage), _stage)


def _parse_probability(raw: object) -> float | None:
    if raw is None or raw == "":
        return None
    try:
        p = float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return p if 0.0 <= p <= 1.0 else None


def _parse_bool(raw: object) -> bool:
    if isinstance(raw, bool):
        return raw
    return str(raw).strip().lower() == "true"


def _resolve_preset(preset: str | Mapping[str, StageValue]) -> Mapping[str, StageValue]:
    if isinstance(preset, str):
        name = PRESET_ALIASES.get(preset, preset)
        if name not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        return PRESETS[name]
    return preset


def preset_table(
    preset: str | Mapping[str, StageValue] = "service_business",
    overrides: Mapping[str, float] | None = None,
) -> dict[str, StageValue]:
    """A preset's stage table with an account's ``stage_values`` overrides applied.

    Override keys are preset stage names or any of their label spellings (``"Show up"`` ->
    ``show_up``); the value replaces the stage's fixed value (for amount-based stages such as
    closed_won, the fallback used when a deal has no amount), keeping its confidence. A key
    naming no stage of the preset raises ValueError (a typo must not silently value nothing).
    """
    table = dict(_resolve_preset(preset))
    for key, value in (overrides or {}).items():
        name = key if key in table else _ALIAS_INDEX.get(normalize_label(key))
        if name not in table:
            raise ValueError(
                f"stage_values names {key!r}, not a stage of the preset; stages: {sorted(table)}"
            )
        if value is None or not float(value) >= 0.0:
            raise ValueError(f"stage_values[{key!r}] must be a number >= 0, got {value!r}")
        stage = table[name]
        table[name] = StageValue(float(value), stage.confidence, stage.amount_share)
    return table


def map_pipeline_stages(
    pipelines: Sequence[Mapping],
    stage_map: Mapping[str, str] | None = None,
    *,
    preset: str | Mapping[str, StageValue] = "service_business",
) -> pl.DataFrame:
    """Map every stage of HubSpot deal pipelines to a preset stage with value and confidence.

    ``pipelines`` are the objects of ``GET /crm/v3/pipelines/deals`` (``id``, ``label``,
    ``stages: [{id, label, displayOrder, metadata: {probability, isClosed}}]``; metadata values
    may be strings). ``stage_map`` optionally pins stages: keys are stage ids or labels
    (compared normalized), values preset stage names. ``preset`` is a name in ``PRESETS`` or a
    custom table ``{stage name: StageValue}`` (e.g. loaded from the account config).

    Resolution order per stage: ``stage_map`` (by id, then label) -> label alias -> stage id
    alias (HubSpot's default pipeline uses ids like ``closedwon``) -> closed metadata
    (isClosed with probability 1 -> closed_won, 0 -> closed_lost) -> HubSpot probability
    (value = amount x probability, fallback = preset closed_won fallback x probability,
    confidence ``PROBABILITY_CONFIDENCE``) -> unknown (value, confidence and stage null).

    Returns one row per (pipeline, stage_id) with ``STAGE_VALUES_SCHEMA`` columns; ``source``
    is one of stage_map, label, stage_id, closed_metadata, probability, unknown.
    """
    table = _resolve_preset(preset)
    pinned: dict[str, str] = {}
    for key, stage in (stage_map or {}).items():
        if stage not in table:
            raise ValueError(f"stage_map sends {key!r} to {stage!r}, not a stage of the preset")
        pinned[normalize_label(key)] = stage
    won = table.get("closed_won")
    won_fallback = won.value if won is not None else None

    rows: list[dict] = []
    # Loops over pipeline metadata (a handful of stages), not over deals or events.
    for pipeline in pipelines:
        for stage in pipeline.get("stages", []):
            meta = stage.get("metadata") or {}
            probability = _parse_probability(meta.get("probability"))
            is_closed = _parse_bool(meta.get("isClosed", False))
            stage_id, label = str(stage["id"]), stage.get("label")
            name, source = None, "unknown"
            for key, src, index in (
                (stage_id, "stage_map", pinned),
                (label, "stage_map", pinned),
                (label, "label", _ALIAS_INDEX),
                (stage_id, "stage_id", _ALIAS_INDEX),
            ):
                found = index.get(normalize_label(key))
                if found is not None and found in table:
                    name, source = found, src
                    break
            if name is None and is_closed and probability is not None:
                closed = "closed_won" if probability >= 1.0 else None
                closed = "closed_lost" if probability == 0.0 else closed
                if closed in table:
                    name, source = closed, "closed_metadata"
            row = {
                "pipeline": str(pipeline.get("id")),
                "pipeline_label": pipeline.get("label"),
                "stage_id": stage_id,
                "label": label,
                "display_order": stage.get("displayOrder"),
                "probability": probability,
                "is_closed": is_closed,
                "stage": name,
                "value": None,
                "amount_share": None,
                "confidence": None,
                "source": source,
            }
            if name is not None:
                sv = table[name]
                row.update(value=sv.value, amount_share=sv.amount_share, confidence=sv.confidence)
            elif probability is not None:
                row.update(
                    stage=_snake(label) or stage_id,
                    value=None if won_fallback is None else won_fallback * probability,
                    amount_share=probability,
                    confidence=PROBABILITY_CONFIDENCE,
                    source="probability",
                )
            rows.append(row)
    return pl.DataFrame(rows, schema=STAGE_VALUES_SCHEMA, orient="row")


def _conform(df: pl.DataFrame, schema: Mapping[str, pl.DataType]) -> pl.DataFrame:
    """Select ``schema`` columns with their types; absent columns become nulls."""
    if not df.columns:  # a table not created yet: no rows (literals alone would make one)
        return pl.DataFrame(schema=dict(schema))
    return df.select(
        [
            pl.col(c).cast(t) if c in df.columns else pl.lit(None, dtype=t).alias(c)
            for c, t in schema.items()
        ]
    )


_EVENTS_IN = {
    "event_key": pl.Utf8(),
    "deal_id": pl.Utf8(),
    "account_id": pl.Utf8(),
    "pipeline": pl.Utf8(),
    "from_stage": pl.Utf8(),
    "to_stage": pl.Utf8(),
    "occurred_at": pl.Datetime("us", "UTC"),
    "amount": pl.Float64(),
}
_DEALS_IN = {
    "deal_id": pl.Utf8(),
    "account_id": pl.Utf8(),
    "pipeline": pl.Utf8(),
    "dealstage": pl.Utf8(),
    "amount": pl.Float64(),
    "updated_at": pl.Datetime("us", "UTC"),
    "currency": pl.Utf8(),
}


def _stage_value_expr(prefix: str) -> tuple[pl.Expr, pl.Expr]:
    """(value, confidence) of the joined stage columns ``{prefix}_*`` for the row's amount."""
    share, fixed, conf = (pl.col(f"{prefix}_{c}") for c in ("amount_share", "value", "confidence"))
    uses_amount = share.is_not_null() & pl.col("amount").is_not_null()
    value = pl.when(uses_amount).then(pl.col("amount") * share).otherwise(fixed)
    confidence = (
        pl.when(share.is_not_null() & pl.col("amount").is_null())
        .then(conf * FALLBACK_CONFIDENCE_FACTOR)
        .otherwise(conf)
    )
    return value, confidence


def synthetic_revenue(
    stage_events: pl.DataFrame,
    stage_values: pl.DataFrame,
    deals: pl.DataFrame,
    *,
    currency: str | Mapping[str, str] | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Value every deal stage change; return ``(revenue, unknown_stages)``.

    Inputs: ``stage_events`` with the ``deal_stage_events`` columns (event_key, deal_id,
    account_id, pipeline, from_stage, to_stage, occurred_at, amount); ``stage_values`` from
    ``map_pipeline_stages``; ``deals`` with the ``hubspot_deals`` columns (its amount fills
    events without one, its account_id/pipeline fill missing ones, an optional ``currency``
    column wins over the ``currency`` argument, which is one ISO code or ``{account_id: code}``).

    ``revenue`` (``REVENUE_SCHEMA``, one row per distinct event_key, ordered by deal and time):
    ``value_after`` is the value of ``to_stage`` at the event's amount; ``value_delta`` is
    ``value_after`` minus the deal's previous known value (the previous event's value_after;
    for a deal's first event in the frame, the value of ``from_stage``, 0 for creation), so
    regressions are negative and the deltas of a deal sum to the value of its current stage.
    Events into an unknown stage get null value_after/value_delta/confidence (never 0) and the
    next known event is measured from the last known value. Pass each deal's full history (or
    at least from its last known stage) so the opening value is right.

    ``unknown_stages`` (``UNKNOWN_STAGES_SCHEMA``): stages seen in events (as from or to) or
    as a deal's current stage that have no value, with sighting counts.
    """
    events = (
        _conform(stage_events, _EVENTS_IN)
        .unique(subset="event_key", keep="first", maintain_order=True)  # webhook duplicates
        .join(
            _conform(deals, _DEALS_IN)
            .unique(subset="deal_id", keep="last", maintain_order=True)
            .select(
                "deal_id",
                pl.col("account_id").alias("_deal_account"),
                pl.col("pipeline").alias("_deal_pipeline"),
                pl.col("amount").alias("_deal_amount"),
                pl.col("currency").alias("_deal_currency"),
            ),
            on="deal_id",
            how="left",
        )
        .with_columns(
            pl.coalesce("account_id", "_deal_account").alias("account_id"),
            pl.coalesce("pipeline", "_deal_pipeline").alias("pipeline"),
            pl.coalesce("amount", "_deal_amount").alias("amount"),
        )
    )
    known = (
        _conform(stage_values, STAGE_VALUES_SCHEMA)
        .filter(pl.col("value").is_not_null())
        .select("pipeline", "stage_id", "stage", "value", "amount_share", "confidence")
        .unique(subset=["pipeline", "stage_id"], keep="first", maintain_order=True)
    )

    def stage_cols(prefix: str) -> pl.DataFrame:
        return known.rename({c: f"_{prefix}_{c}" for c in known.columns if c != "pipeline"})

    to_value, to_conf = _stage_value_expr("_to")
    from_value, _ = _stage_value_expr("_from")
    deal = "deal_id"
    revenue = (
        events.join(
            stage_cols("to"),
            left_on=["pipeline", "to_stage"],
            right_on=["pipeline", "_to_stage_id"],
            how="left",
        )
        .join(
            stage_cols("from"),
            left_on=["pipeline", "from_stage"],
            right_on=["pipeline", "_from_stage_id"],
            how="left",
        )
        .sort(deal, "occurred_at", "event_key")
        .with_columns(
            value_after=to_value,
            confidence=to_conf,
            to_stage_name=pl.col("_to_stage"),
            # value before a deal's first event in the frame: 0 at creation, else from_stage's
            _opening=pl.when(pl.col("from_stage").is_null()).then(0.0).otherwise(from_value),
            _first=pl.int_range(pl.len()).over(deal) == 0,
        )
        .with_columns(
            _prev=pl.when(pl.col("_first"))
            .then(pl.col("_opening").fill_null(0.0))
            .otherwise(pl.col("value_after").shift(1).over(deal))
        )
        # unknown stages have null value: measure from the last known value, skipping them
        .with_columns(
            value_delta=pl.col("value_after")
            - pl.col("_prev").forward_fill().over(deal).fill_null(0.0)
        )
    )
    revenue = revenue.with_columns(currency=_currency_expr(currency)).pipe(_conform, REVENUE_SCHEMA)
    return revenue, _unknown_stages(events, known, deals)


def _currency_expr(currency: str | Mapping[str, str] | None) -> pl.Expr:
    """Deal currency column first, then the argument (one code or per account_id)."""
    if currency is None:
        fallback = pl.lit(None, dtype=pl.Utf8)
    elif isinstance(currency, str):
        fallback = pl.lit(currency)
    else:
        fallback = pl.col("account_id").replace_strict(
            dict(currency), default=None, return_dtype=pl.Utf8
        )
    return pl.coalesce(pl.col("_deal_currency"), fallback)


def _unknown_stages(events: pl.DataFrame, known: pl.DataFrame, deals: pl.DataFrame) -> pl.DataFrame:
    """Stages seen in events or as a deal's current stage that have no value."""
    sightings = pl.concat(
        [
            events.select(
                "pipeline", pl.col(col).alias("stage_id"), "deal_id", "occurred_at", is_event=True
            )
            for col in ("to_stage", "from_stage")
        ]
        + [
            _conform(deals, _DEALS_IN).select(
                "pipeline",
                pl.col("dealstage").alias("stage_id"),
                "deal_id",
                pl.col("updated_at").alias("occurred_at"),
                is_event=False,
            )
        ]
    )
    return (
        sightings.filter(pl.col("stage_id").is_not_null())
        .join(known.select("pipeline", "stage_id"), on=["pipeline", "stage_id"], how="anti")
        .group_by("pipeline", "stage_id")
        .agg(
            events=pl.col("is_event").sum(),
            deals=pl.col("deal_id").n_unique(),
            first_seen=pl.col("occurred_at").min(),
            last_seen=pl.col("occurred_at").max(),
        )
        .sort("pipeline", "stage_id", nulls_last=True)
        .pipe(_conform, UNKNOWN_STAGES_SCHEMA)
    )


def deal_values(revenue: pl.DataFrame) -> pl.DataFrame:
    """Current value of each deal from ``synthetic_revenue`` output.

    Columns: deal_id, account_id, stage (canonical name of the latest event's to_stage, null
    when unknown), stage_id, value (sum of value_delta: what has been reported as money),
    confidence (of the latest known value), currency, updated_at (latest event time).
    """
    return (
        revenue.sort("deal_id", "occurred_at", "event_key")
        .group_by("deal_id", maintain_order=True)
        .agg(
            pl.col("account_id").drop_nulls().last(),
            pl.col("to_stage_name").last().alias("stage"),
            pl.col("to_stage").last().alias("stage_id"),
            pl.col("value_delta").sum().alias("value"),
            pl.col("confidence").drop_nulls().last(),
            pl.col("currency").drop_nulls().last(),
            pl.col("occurred_at").max().alias("updated_at"),
        )
    )
