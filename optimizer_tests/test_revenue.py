"""Synthetic revenue: preset mapping from HubSpot pipeline metadata and stage-change values."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from optimizer_assets.domain.revenue import (
    FALLBACK_CONFIDENCE_FACTOR,
    PROBABILITY_CONFIDENCE,
    deal_values,
    map_pipeline_stages,
    synthetic_revenue,
)

T0 = datetime(2026, 11, 1, tzinfo=UTC)


def _stage(sid: str, label: str, order: int, probability: str | None, closed: bool) -> dict:
    meta = {"isClosed": "true" if closed else "false"}
    if probability is not None:
        meta["probability"] = probability
    return {"id": sid, "label": label, "displayOrder": order, "metadata": meta}


# the sandbox pipeline of INTERFACES.md: opaque digit ids, labels and metadata identify stages
SANDBOX_PIPELINE = {
    "id": "7100001",
    "label": "Account 1",
    "stages": [
        _stage("88001", "Lead", 0, "0.1", False),
        _stage("88002", "Appointment scheduled", 1, "0.2", False),
        _stage("88003", "Show up", 2, "0.6", False),
        _stage("88004", "Closed won", 3, "1.0", True),
        _stage("88005", "Closed lost", 4, "0.0", True),
    ],
}

SAAS_PIPELINE = {
    "id": "900",
    "label": "SaaS",
    "stages": [
        _stage("s1", "New lead", 0, "0.05", False),
        _stage("s2", "MQL", 1, "0.1", False),
        _stage("s3", "Sales Qualified Lead", 2, "0.2", False),
        _stage("s4", "Demo Scheduled", 3, "0.35", False),
        _stage("s5", "Proposal sent", 4, "0.6", False),
        _stage("s6", "Legal review", 5, "0.8", False),  # no preset stage: probability
        _stage("s7", "Closed Won", 6, "1.0", True),
        _stage("s8", "Closed Lost", 7, "0.0", True),
        _stage("s9", "Parking lot", 8, None, False),  # nothing known: unknown
    ],
}


def _by_id(stage_values: pl.DataFrame) -> dict[str, dict]:
    return {r["stage_id"]: r for r in stage_values.to_dicts()}


def test_service_preset_maps_sandbox_pipeline_by_labels() -> None:
    sv = _by_id(map_pipeline_stages([SANDBOX_PIPELINE]))
    assert {k: (v["stage"], v["value"]) for k, v in sv.items()} == {
        "88001": ("lead", 0.0),
        "88002": ("appointment_scheduled", 2_250.0),
        "88003": ("show_up", 9_000.0),
        "88004": ("closed_won", 15_000.0),
        "88005": ("closed_lost", 0.0),
    }
    assert sv["88004"]["amount_share"] == 1.0  # won = deal amount, 15,000 fallback
    assert {v["source"] for v in sv.values()} == {"label"}
    assert sv["88002"]["probability"] == pytest.approx(0.2)
    assert sv["88004"]["is_closed"] and not sv["88003"]["is_closed"]
    assert all(0 <= v["confidence"] <= 1 for v in sv.values())


def test_saas_preset_labels_probability_fallback_and_unknown() -> None:
    sv = _by_id(map_pipeline_stages([SAAS_PIPELINE], preset="saas"))
    assert [sv[f"s{i}"]["stage"] for i in range(1, 6)] == [
        "lead",
        "mql",
        "sql",
        "demo_scheduled",
        "proposal_sent",
    ]
    assert [sv[f"s{i}"]["value"] for i in range(2, 6)] == [100.0, 2_000.0, 3_500.0, 6_000.0]
    assert (sv["s7"]["stage"], sv["s7"]["value"]) == ("closed_won", 10_000.0)
    assert sv["s8"]["value"] == 0.0
    legal = sv["s6"]
    assert legal["source"] == "probability"
    assert legal["stage"] == "legal_review"
    assert legal["amount_share"] == pytest.approx(0.8)
    assert legal["value"] == pytest.approx(8_000.0)  # no amount: typical won deal x probability
    assert legal["confidence"] == PROBABILITY_CONFIDENCE
    parked = sv["s9"]
    assert parked["source"] == "unknown"
    assert parked["value"] is None and parked["stage"] is None


def test_default_hubspot_ids_and_closed_metadata_map_unfamiliar_labels() -> None:
    pipeline = {
        "id": "default",
        "label": "Vertrieb",
        "stages": [
            _stage("appointmentscheduled", "Termin vereinbart", 0, "0.2", False),
            _stage("4471", "Gewonnen", 1, "1.0", True),
            _stage("4472", "Verloren", 2, "0.0", True),
        ],
    }
    sv = _by_id(map_pipeline_stages([pipeline]))
    assert (sv["appointmentscheduled"]["stage"], sv["appointmentscheduled"]["source"]) == (
        "appointment_scheduled",
        "stage_id",
    )
    assert (sv["4471"]["stage"], sv["4471"]["source"]) == ("closed_won", "closed_metadata")
    assert (sv["4472"]["stage"], sv["4472"]["source"]) == ("closed_lost", "closed_metadata")


def test_ecommerce_preset_with_hubspot_ecommerce_labels() -> None:
    labels = [
        "Checkout Abandoned",
        "Checkout Pending",
        "Checkout Completed",
        "Processed",
        "Shipped",
        "Cancelled",
    ]
    pipeline = {
        "id": "ecom",
        "stages": [_stage(f"e{i}", lbl, i, None, False) for i, lbl in enumerate(labels)],
    }
    sv = _by_id(map_pipeline_stages([pipeline], preset="ecommerce"))
    assert [sv[f"e{i}"]["stage"] for i in range(6)] == [
        "cart",
        "checkout",
        "closed_won",
        "closed_won",
        "closed_won",
        "closed_lost",
    ]


def test_stage_map_pins_stages_and_rejects_unknown_targets() -> None:
    sv = _by_id(map_pipeline_stages([SANDBOX_PIPELINE], {"88003": "closed_won", "Lead": "lead"}))
    assert (sv["88003"]["stage"], sv["88003"]["source"]) == ("closed_won", "stage_map")
    assert sv["88001"]["source"] == "stage_map"
    with pytest.raises(ValueError, match="demo_scheduled"):
        map_pipeline_stages([SANDBOX_PIPELINE], {"88003": "demo_scheduled"})
    with pytest.raises(ValueError, match="preset"):
        map_pipeline_stages([SANDBOX_PIPELINE], preset="bakery")


def _events(walk: list[str], amounts: list[float | None], deal: str = "d1") -> pl.DataFrame:
    return pl.DataFrame(
        {
            "event_key": [f"{deal}:{i}" for i in range(len(walk))],
            "deal_id": [deal] * len(walk),
            "account_id": ["1"] * len(walk),
            "pipeline": [SANDBOX_PIPELINE["id"]] * len(walk),
            "from_stage": [None, *walk[:-1]],
            "to_stage": walk,
            "occurred_at": [T0 + timedelta(hours=i) for i in range(len(walk))],
            "amount": amounts,
        },
        schema_overrides={"amount": pl.Float64, "occurred_at": pl.Datetime("us", "UTC")},
    )


_NO_DEALS = pl.DataFrame(schema={"deal_id": pl.Utf8, "amount": pl.Float64})
_SANDBOX_VALUES = map_pipeline_stages([SANDBOX_PIPELINE])
_VALUE = {r["stage_id"]: r for r in _SANDBOX_VALUES.to_dicts()}


def _expected_value(stage: str, amount: float | None) -> float:
    row = _VALUE[stage]
    if row["amount_share"] is not None and amount is not None:
        return amount * row["amount_share"]
    return row["value"]


@settings(max_examples=150, deadline=None)
@given(
    walk=st.lists(st.sampled_from([*_VALUE, "unknown-1"]), min_size=1, max_size=12),
    data=st.data(),
)
def test_deltas_sum_to_value_of_current_stage(walk: list[str], data: st.DataObject) -> None:
    amounts = data.draw(
        st.lists(
            st.one_of(st.none(), st.floats(0, 1e6, allow_nan=False)),
            min_size=len(walk),
            max_size=len(walk),
        )
    )
    revenue, unknown = synthetic_revenue(_events(walk, amounts), _SANDBOX_VALUES, _NO_DEALS)
    assert revenue.height == len(walk)
    known = [(s, a) for s, a in zip(walk, amounts, strict=True) if s in _VALUE]
    expected = _expected_value(*known[-1]) if known else 0.0
    # whatever the walk (regressions, unknown stages, changing amounts) the money reported for
    # the deal is the value of its (last known) stage
    assert revenue["value_delta"].sum() == pytest.approx(expected, rel=1e-9, abs=1e-6)
    last = revenue.row(-1, named=True)
    if walk[-1] in _VALUE:
        assert last["value_after"] == pytest.approx(expected)
    else:
        assert last["value_after"] is None and last["value_delta"] is None
    # a regression to a cheaper stage is negative
    afters = revenue["value_after"].to_list()
    prev_known = 0.0
    for after, delta in zip(afters, revenue["value_delta"].to_list(), strict=True):
        if after is not None:
            assert delta == pytest.approx(after - prev_known)
            prev_known = after
    assert ("unknown-1" in walk) == ("unknown-1" in unknown["stage_id"].to_list())


def test_unknown_stage_is_reported_not_valued_zero() -> None:
    walk = ["88001", "77777", "88004"]
    revenue, unknown = synthetic_revenue(
        _events(walk, [None, None, 20_000.0]), _SANDBOX_VALUES, _NO_DEALS
    )
    middle = revenue.row(1, named=True)
    assert middle["value_after"] is None and middle["value_delta"] is None
    assert middle["confidence"] is None and middle["to_stage_name"] is None
    assert revenue["value_delta"].to_list()[2] == 20_000.0
    row = unknown.row(0, named=True)
    assert (row["pipeline"], row["stage_id"], row["events"], row["deals"]) == (
        SANDBOX_PIPELINE["id"],
        "77777",
        2,  # once as to_stage, once as from_stage
        1,
    )
    assert unknown.height == 1


def test_regression_is_negative_and_order_and_duplicates_do_not_matter() -> None:
    walk = ["88001", "88002", "88003", "88002", "88005"]
    events = _events(walk, [None] * 5)
    revenue, _ = synthetic_revenue(events, _SANDBOX_VALUES, _NO_DEALS)
    assert revenue["value_delta"].to_list() == [0.0, 2_250.0, 6_750.0, -6_750.0, -2_250.0]
    shuffled = pl.concat([events, events.head(2)]).sample(fraction=1.0, shuffle=True, seed=3)
    again, _ = synthetic_revenue(shuffled, _SANDBOX_VALUES, _NO_DEALS)
    assert again.equals(revenue)


def test_amounts_fallbacks_currency_and_deal_summary() -> None:
    events = pl.concat(
        [
            _events(["88001", "88004"], [None, None], deal="with_amount"),
            _events(["88001", "88004"], [None, None], deal="no_amount"),
        ]
    ).with_columns(account_id=pl.lit(None, dtype=pl.Utf8))
    deals = pl.DataFrame(
        {
            "deal_id": ["with_amount", "no_amount"],
            "account_id": ["1", "2"],
            "pipeline": [SANDBOX_PIPELINE["id"]] * 2,
            "dealstage": ["88004", "88004"],
            "amount": [32_000.0, None],
        }
    )
    revenue, unknown = synthetic_revenue(
        events, _SANDBOX_VALUES, deals, currency={"1": "USD", "2": "EUR"}
    )
    won = revenue.filter(pl.col("to_stage") == "88004").sort("deal_id")
    assert won["deal_id"].to_list() == ["no_amount", "with_amount"]
    assert won["value_after"].to_list() == [15_000.0, 32_000.0]  # preset fallback vs amount
    assert won["confidence"].to_list() == [FALLBACK_CONFIDENCE_FACTOR, 1.0]
    assert won["account_id"].to_list() == ["2", "1"]  # filled from the deals table
    assert won["currency"].to_list() == ["EUR", "USD"]
    assert unknown.height == 0
    summary = deal_values(revenue).sort("deal_id")
    assert summary["value"].to_list() == [15_000.0, 32_000.0]
    assert summary["stage"].to_list() == ["closed_won", "closed_won"]


def test_probability_stage_is_amount_times_probability() -> None:
    sv = map_pipeline_stages([SAAS_PIPELINE], preset="saas")
    events = pl.DataFrame(
        {
            "event_key": ["a", "b"],
            "deal_id": ["d", "d"],
            "pipeline": ["900", "900"],
            "from_stage": [None, "s5"],
            "to_stage": ["s5", "s6"],
            "occurred_at": [T0, T0 + timedelta(days=1)],
            "amount": [50_000.0, 50_000.0],
        }
    )
    revenue, _ = synthetic_revenue(events, sv, _NO_DEALS)
    assert revenue["value_after"].to_list() == [6_000.0, pytest.approx(40_000.0)]
    assert revenue["value_delta"].to_list()[1] == pytest.approx(34_000.0)


def test_slice_starting_mid_history_measures_from_the_from_stage() -> None:
    events = _events(["88002", "88003"], [None, None]).with_columns(
        from_stage=pl.Series(["88001", "88002"])
    )
    revenue, _ = synthetic_revenue(events.tail(1), _SANDBOX_VALUES, _NO_DEALS)
    assert revenue["value_delta"].to_list() == [6_750.0]


def test_tables_not_created_yet_give_no_rows() -> None:
    empty = pl.DataFrame()  # what Warehouse.read answers for a missing table
    revenue, unknown = synthetic_revenue(empty, empty, empty)
    assert revenue.height == 0 and unknown.height == 0


def test_preset_names_of_the_settings_file_and_overrides() -> None:
    from optimizer_assets.domain.revenue import PRESETS, preset_table

    assert {"service_business", "ecommerce", "b2b_saas"} <= set(PRESETS)
    assert preset_table("service") == PRESETS["service_business"]  # short alias
    table = preset_table("service_business", {"Show up": 8_000, "closed_won": 12_000})
    assert table["show_up"].value == 8_000 and table["show_up"].confidence == 0.6
    assert table["closed_won"].value == 12_000 and table["closed_won"].amount_share == 1.0
    with pytest.raises(ValueError, match="not a stage of the preset"):
        preset_table("service_business", {"demo_scheduled": 1.0})
    with pytest.raises(ValueError, match=">= 0"):
        preset_table("b2b_saas", {"sql": -5})
