"""Three-layer attribution on hand-built cases, random frames and (if present) the sandbox."""

from __future__ import annotations

import ast
import inspect
from datetime import UTC, date, datetime, timedelta

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from optimizer_assets.bench.attribution import reference_layers12, synthetic_frames
from optimizer_assets.domain import attribution
from optimizer_assets.domain.attribution import (
    CONFIDENCE,
    attribute,
    attribute_value,
    layer_summary,
    score_against_truth,
)

T = datetime(2026, 11, 10, 12, tzinfo=UTC)
DAY = date(2026, 11, 10)
_TS = pl.Datetime("us", "UTC")

# account 1: campaign c1 (a1, a2), campaign c2 "Spring promo" (a3); account 2: campaign c9 (a9)
ADS = pl.DataFrame(
    {
        "ad_id": ["a1", "a2", "a3", "a9"],
        "adset_id": ["s1", "s1", "s2", "s9"],
        "campaign_id": ["c1", "c1", "c2", "c9"],
        "account_id": ["1", "1", "1", "2"],
        "created_at": [T - timedelta(days=30)] * 4,
    }
)
CAMPAIGNS = pl.DataFrame({"campaign_id": ["c1", "c2", "c9"], "name": ["Autumn", "Spring", "X"]})
# yesterday: a1 30 clicks, a2 10 clicks; today a3 5 clicks; account 2 a9 busy
INSIGHTS = pl.DataFrame(
    {
        "date": [DAY - timedelta(days=1), DAY - timedelta(days=1), DAY, DAY],
        "account_id": ["1", "1", "1", "2"],
        "ad_id": ["a1", "a2", "a3", "a9"],
        "clicks": [30, 10, 5, 100],
    }
)
_CONTACT_SCHEMA = {
    "contact_id": pl.Utf8,
    "created_at": _TS,
    "email_sha256": pl.Utf8,
    "phone_sha256": pl.Utf8,
    "source": pl.Utf8,
    "source_data_1": pl.Utf8,
    "source_data_2": pl.Utf8,
    "fbclid": pl.Utf8,
    "fbc": pl.Utf8,
    "utm_campaign": pl.Utf8,
    "utm_content": pl.Utf8,
    "lead_id": pl.Utf8,
}
_LEAD_SCHEMA = {
    "lead_id": pl.Utf8,
    "created_at": _TS,
    "account_id": pl.Utf8,
    "campaign_id": pl.Utf8,
    "adset_id": pl.Utf8,
    "ad_id": pl.Utf8,
    "email_sha256": pl.Utf8,
    "phone_sha256": pl.Utf8,
}


def contact(cid: str, created_at: datetime = T, **kw: object) -> dict:
    return {"contact_id": cid, "created_at": created_at, "source": "PAID_SOCIAL", **kw}


def lead(lid: str, ad: str, created_at: datetime, account: str = "1", **kw: object) -> dict:
    return {"lead_id": lid, "ad_id": ad, "created_at": created_at, "account_id": account, **kw}


def run(
    contacts: list[dict],
    leads: list[dict] = (),  # type: ignore[assignment]
    *,
    links: dict[str, list[str]] | None = None,
    account: str = "1",
    **kw: object,
) -> pl.DataFrame:
    """Attribute one deal per contact (deal id = 'd-' + contact id) unless links say otherwise."""
    links = links or {f"d-{c['contact_id']}": [c["contact_id"]] for c in contacts}
    deals = pl.DataFrame(
        {
            "deal_id": list(links),
            "account_id": [account] * len(links),
            "created_at": [T] * len(links),
        }
    )
    deal_contacts = pl.DataFrame(
        [(d, c) for d, cs in links.items() for c in cs],
        schema={"deal_id": pl.Utf8, "contact_id": pl.Utf8},
        orient="row",
    )
    return attribute(
        deals,
        deal_contacts,
        pl.DataFrame(contacts, schema=_CONTACT_SCHEMA),
        pl.DataFrame(list(leads), schema=_LEAD_SCHEMA),
        INSIGHTS,
        ADS,
        campaigns=CAMPAIGNS,
        **kw,
    )


def one(result: pl.DataFrame, deal: str) -> dict:
    rows = result.filter(pl.col("deal_id") == deal)
    assert rows.height == 1, rows
    return rows.row(0, named=True)


def credits(result: pl.DataFrame, deal: str) -> dict[str | None, float]:
    rows = result.filter(pl.col("deal_id") == deal)
    return dict(zip(rows["ad_id"].to_list(), rows["credit"].to_list(), strict=True))


# --- layer 1 -------------------------------------------------------------------------------


def test_layer1_utm_content_and_lead_form() -> None:
    result = run(
        [
            contact("utm", utm_content="a1", fbclid="IwAR1"),
            contact("form", lead_id="L7", source_data_1="Facebook Lead Ads"),
            contact("sd2", source_data_2="L8"),  # lead id only in source_data_2
            contact("junk", utm_content="banner_v2"),  # not an ad id: no layer 1
        ],
        [lead("L7", "a3", T - timedelta(minutes=5)), lead("L8", "a2", T - timedelta(days=20))],
    )
    utm = one(result, "d-utm")
    assert (utm["ad_id"], utm["layer"], utm["method"], utm["credit"]) == (
        "a1",
        1,
        "utm_content",
        1.0,
    )
    assert utm["confidence"] == CONFIDENCE["utm_content"]
    assert utm["fbc"] == f"fb.1.{int(T.timestamp() * 1000)}.IwAR1"  # fbclid forwarded to CAPI
    form = one(result, "d-form")
    assert (form["ad_id"], form["layer"], form["method"], form["lead_id"]) == (
        "a3",
        1,
        "lead_form",
        "L7",
    )
    assert one(result, "d-sd2")["ad_id"] == "a2"  # deterministic: no window on layer 1
    assert result.filter(pl.col("deal_id") == "d-junk")["layer"].to_list()[0] == 3


def test_lead_form_beats_utm_when_both_present() -> None:
    result = run([contact("both", lead_id="L1", utm_content="a2")], [lead("L1", "a1", T)])
    assert one(result, "d-both")["ad_id"] == "a1"


# --- layer 2 -------------------------------------------------------------------------------


def test_layer2_identity_matches_lead_and_layer1_contact() -> None:
    result = run(
        [
            contact("by-email", email_sha256="e1"),
            contact("by-phone", phone_sha256="p2"),
            # a layer-1 contact 2 days earlier sharing the phone of 'via-contact'
            contact("first", T - timedelta(days=2), utm_content="a3", phone_sha256="p3"),
            contact("via-contact", phone_sha256="p3", email_sha256="e-other"),
        ],
        [
            lead("L1", "a2", T - timedelta(days=3), email_sha256="e1"),
            lead("L2", "a1", T - timedelta(hours=1), phone_sha256="p2"),
        ],
        links={"d1": ["by-email"], "d2": ["by-phone"], "d3": ["via-contact"]},
    )
    r1, r2, r3 = one(result, "d1"), one(result, "d2"), one(result, "d3")
    assert (r1["ad_id"], r1["layer"], r1["method"], r1["lead_id"]) == (
        "a2",
        2,
        "identity_lead_email",
        "L1",
    )
    assert (r2["ad_id"], r2["layer"], r2["method"]) == ("a1", 2, "identity_lead_phone")
    assert (r3["ad_id"], r3["layer"], r3["method"]) == ("a3", 2, "identity_contact_phone")
    assert r1["confidence"] == CONFIDENCE["identity_lead_email"]


@pytest.mark.parametrize(
    ("offset", "matched"),
    [
        (timedelta(days=7), True),  # window edge: inclusive
        (timedelta(days=7, microseconds=1), False),
        (timedelta(0), True),  # same instant
        (-timedelta(seconds=1), False),  # lead after the contact
    ],
)
def test_layer2_window_edges(offset: timedelta, matched: bool) -> None:
    result = run([contact("c", email_sha256="e")], [lead("L", "a2", T - offset, email_sha256="e")])
    rows = result.filter(pl.col("deal_id") == "d-c")
    if matched:
        assert (rows["layer"].to_list(), rows["ad_id"].to_list()) == ([2], ["a2"])
    else:
        assert rows["layer"].to_list()[0] == 3


def test_layer2_window_is_a_parameter() -> None:
    leads = [lead("L", "a2", T - timedelta(days=10), email_sha256="e")]
    assert run([contact("c", email_sha256="e")], leads)["layer"].to_list()[0] == 3
    assert run([contact("c", email_sha256="e")], leads, window_days=14)["layer"].to_list() == [2]


def test_layer2_most_recent_wins_and_tie_rule() -> None:
    result = run(
        [contact("recent", email_sha256="e")],
        [
            lead("old", "a1", T - timedelta(days=5), email_sha256="e"),
            lead("new", "a2", T - timedelta(days=1), email_sha256="e"),
        ],
    )
    assert one(result, "d-recent")["ad_id"] == "a2"
    # a layer-1 contact (ad a1) with the same phone at the same instant: the lead wins the tie
    tie = run(
        [
            contact("tie", phone_sha256="p"),
            contact("l1", T - timedelta(days=2), utm_content="a1", phone_sha256="p"),
        ],
        [lead("tie-lead", "a2", T - timedelta(days=2), phone_sha256="p")],
        links={"d2": ["tie"]},
    )
    assert one(tie, "d2")["ad_id"] == "a2"


def test_layer2_needs_same_account() -> None:
    result = run(
        [contact("c", email_sha256="e")],
        [lead("L", "a9", T - timedelta(days=1), account="2", email_sha256="e")],
    )
    assert result["layer"].to_list()[0] == 3


# --- precedence ----------------------------------------------------------------------------


def test_precedence_layer1_beats_layer2_beats_layer3() -> None:
    leads = [
        lead("L", "a2", T - timedelta(days=1), email_sha256="e"),
        lead("P", "a3", T - timedelta(days=1), phone_sha256="p"),
    ]
    result = run(
        [
            contact("l1-and-l2", utm_content="a1", email_sha256="e"),
            contact("only-l3", T - timedelta(days=3), utm_campaign="c1"),
            contact("l2", phone_sha256="p"),
        ],
        leads,
        links={"d-a": ["l1-and-l2"], "d-b": ["only-l3", "l2"]},
    )
    assert (one(result, "d-a")["ad_id"], one(result, "d-a")["layer"]) == ("a1", 1)
    # the deal's older layer-3 contact loses against its layer-2 contact
    b = one(result, "d-b")
    assert (b["contact_id"], b["ad_id"], b["layer"]) == ("l2", "a3", 2)


# --- layer 3 -------------------------------------------------------------------------------


def test_layer3_campaign_candidates_weighted_by_clicks() -> None:
    result = run(
        [
            contact("utm-id", utm_campaign="c1"),
            contact("utm-name", utm_campaign="Autumn"),
            contact("sd2-name", source_data_1="facebook", source_data_2="Spring"),
        ]
    )
    # both a1 and a2 clicked yesterday (same decay): shares 30:10
    assert credits(result, "d-utm-id") == pytest.approx({"a1": 0.75, "a2": 0.25})
    assert credits(result, "d-utm-name") == pytest.approx({"a1": 0.75, "a2": 0.25})
    assert credits(result, "d-sd2-name") == {"a3": 1.0}
    methods = result.group_by("deal_id").agg(pl.col("method").first())
    assert dict(methods.iter_rows()) == {
        "d-utm-id": "utm_campaign",
        "d-utm-name": "utm_campaign",
        "d-sd2-name": "source_data_campaign",
    }
    assert set(result["layer"].to_list()) == {3}
    assert (result["confidence"] == result["credit"]).all()


def test_layer3_account_fallback_time_decay_and_lookback() -> None:
    # a1: 30 clicks 1 day before, a2: 10 clicks 1 day before, a3: 5 clicks same day
    half_life = 1.0
    result = run([contact("plain")], half_life_days=half_life)
    w = {"a1": 30 * 0.5, "a2": 10 * 0.5, "a3": 5.0}
    total = sum(w.values())
    assert credits(result, "d-plain") == pytest.approx({k: v / total for k, v in w.items()})
    assert one_method(result) == "account_activity"
    # nine days later yesterday's clicks are outside the 7-day lookback; a3's are 9 days old
    later = run([contact("late", T + timedelta(days=9))])
    assert later["layer"].to_list() == [0] and later["reason"].to_list() == ["no_candidates"]
    # eight days later: a3's clicks (8 days old) out, a1/a2 (9 days) out, nothing left either;
    # seven days later a3 (7 days) is the only candidate in the window
    edge = run([contact("edge", T + timedelta(days=7))])
    assert credits(edge, "d-edge") == {"a3": 1.0}


def one_method(result: pl.DataFrame) -> str:
    methods = result["method"].unique().to_list()
    assert len(methods) == 1
    return methods[0]


def test_named_campaign_without_clicks_gets_equal_shares() -> None:
    ads = pl.concat(
        [
            ADS,
            pl.DataFrame(
                {
                    "ad_id": ["q1", "q2"],
                    "adset_id": ["s5", "s5"],
                    "campaign_id": ["quiet", "quiet"],
                    "account_id": ["1", "1"],
                    "created_at": [T - timedelta(days=3)] * 2,
                }
            ),
        ]
    )
    deals = pl.DataFrame({"deal_id": ["d"], "account_id": ["1"], "created_at": [T]})
    result = attribute(
        deals,
        pl.DataFrame({"deal_id": ["d"], "contact_id": ["c"]}),
        pl.DataFrame([contact("c", utm_campaign="quiet")], schema=_CONTACT_SCHEMA),
        pl.DataFrame(schema=_LEAD_SCHEMA),
        INSIGHTS,
        ads,
    )
    assert credits(result, "d") == {"q1": 0.5, "q2": 0.5}


def test_max_candidates_keeps_top_ads_and_renormalizes() -> None:
    result = run([contact("plain")], max_candidates=1)
    assert credits(result, "d-plain") == {"a1": 1.0}


# --- unattributed --------------------------------------------------------------------------


def test_unattributed_deals_are_reported_with_reason() -> None:
    result = run(
        [
            contact("organic", source="ORGANIC_SEARCH"),
            contact("organic-fb", source="DIRECT_TRAFFIC", fbclid="IwAR9"),
        ],
        links={"d-organic": ["organic"], "d-none": [], "d-fb": ["organic-fb"]},
    )
    organic = one(result, "d-organic")
    assert (organic["layer"], organic["ad_id"], organic["reason"], organic["credit"]) == (
        0,
        None,
        "not_paid_social",
        1.0,
    )
    none = one(result, "d-none")
    assert (none["layer"], none["reason"], none["contact_id"]) == (0, "no_contact", None)
    assert set(result.filter(pl.col("deal_id") == "d-fb")["layer"].to_list()) == {3}
    everyone = run([contact("organic", source="ORGANIC_SEARCH")], paid_sources_only=False)
    assert set(everyone["layer"].to_list()) == {3}


# --- invariants on random frames -----------------------------------------------------------


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_credits_sum_to_one_and_layers12_match_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    f = synthetic_frames(150, 600, 300, rng, accounts=3, ads_per_account=12, days=20)
    result = attribute(
        f.deals, f.deal_contacts, f.contacts, f.leads, f.insights, f.ads, campaigns=f.campaigns
    )
    per_deal = result.group_by("deal_id").agg(
        pl.col("credit").sum(), pl.col("layer").n_unique().alias("layers"), pl.len()
    )
    assert sorted(per_deal["deal_id"].to_list()) == sorted(f.deals["deal_id"].to_list())
    assert per_deal["credit"].to_numpy() == pytest.approx(1.0)
    assert (per_deal["layers"] == 1).all()
    assert result.filter(pl.col("layer").is_in([1, 2]))["credit"].eq(1.0).all()
    assert result.filter(pl.col("layer") > 0)["ad_id"].null_count() == 0
    assert ((result["credit"] > 0) & (result["credit"] <= 1)).all()
    ref = reference_layers12(f.deals, f.deal_contacts, f.contacts, f.leads, f.ads)
    got = {
        r["deal_id"]: (r["layer"], r["ad_id"])
        for r in result.filter(pl.col("layer") <= 2).filter(pl.col("layer") > 0).to_dicts()
    }
    assert got == ref


def _revenue_for(result: pl.DataFrame, rng: np.random.Generator) -> pl.DataFrame:
    deals = result["deal_id"].unique().sort()
    n = deals.len()
    return pl.DataFrame(
        {
            "event_key": [f"e{i}" for i in range(2 * n)],
            "deal_id": pl.concat([deals, deals]),
            "account_id": ["1"] * (2 * n),
            "occurred_at": [T + timedelta(hours=int(h)) for h in rng.integers(0, 96, 2 * n)],
            "value_delta": rng.normal(1_000, 3_000, 2 * n),
            "currency": ["USD"] * (2 * n),
        }
    )


def test_attribute_value_conserves_value_per_day() -> None:
    rng = np.random.default_rng(5)
    f = synthetic_frames(300, 1_200, 600, rng, accounts=3, ads_per_account=12, days=20)
    result = attribute(f.deals, f.deal_contacts, f.contacts, f.leads, f.insights, f.ads)
    revenue = _revenue_for(result, rng)
    # plus an event of a deal attribution has not seen yet
    stray = revenue.head(1).with_columns(event_key=pl.lit("stray"), deal_id=pl.lit("nope"))
    revenue = pl.concat([revenue, stray])
    by_ad = attribute_value(result, revenue)
    per_day = by_ad.group_by("date").agg(pl.col("value").sum()).sort("date")
    expected = (
        revenue.group_by(pl.col("occurred_at").dt.date().alias("date"))
        .agg(pl.col("value_delta").sum().alias("value"))
        .sort("date")
    )
    assert per_day["date"].to_list() == expected["date"].to_list()
    assert per_day["value"].to_numpy() == pytest.approx(expected["value"].to_numpy())
    layers = by_ad.select(pl.sum_horizontal(f"value_layer{n}" for n in range(4)))
    assert layers.to_series().to_numpy() == pytest.approx(by_ad["value"].to_numpy())
    assert by_ad.filter(pl.col("ad_id").is_null())["value_layer0"].sum() != 0  # stray lands here


def test_layer_summary_and_score_against_truth() -> None:
    result = run(
        [
            contact("l1", utm_content="a1"),
            contact("l2", email_sha256="e"),
            contact("l3", utm_campaign="c1"),
            contact("org", source="ORGANIC_SEARCH"),
        ],
        [lead("L", "a2", T - timedelta(days=1), email_sha256="e")],
    )
    values = pl.DataFrame(
        {"deal_id": ["d-l1", "d-l2", "d-l3", "d-org"], "value": [100.0, 200.0, 400.0, 300.0]}
    )
    summary = {r["layer"]: r for r in layer_summary(result, values).to_dicts()}
    assert [summary[n]["deals"] for n in range(4)] == [1, 1, 1, 1]
    assert summary[3]["value_share"] == pytest.approx(0.4)
    assert sum(r["deal_share"] for r in summary.values()) == pytest.approx(1.0)
    truth = pl.DataFrame(
        {
            "deal_id": ["d-l1", "d-l2", "d-l3", "d-org", "d-missing"],
            "true_ad_id": ["a1", "a9", "a1", "a3", "a1"],  # layer 2 is wrong
        }
    )
    values = pl.concat([values, pl.DataFrame({"deal_id": ["d-missing"], "value": [0.0]})])
    score = score_against_truth(result, truth, values)
    assert score["recovery"] == pytest.approx((100 + 0 + 400 * 0.75 + 0) / 1_000)
    assert score["precision_l12"] == pytest.approx(0.5)
    assert score["layer1_precision"] == 1.0 and score["layer2_precision"] == 0.0
    assert score["layer3_precision"] == pytest.approx(0.75)
    assert score["layer0_deals"] == 2  # organic-source deal + deal missing from attribution
    assert score["deals"] == 5
    # without values: truth's value_if_won, else one per deal
    assert score_against_truth(result, truth)["recovery"] == pytest.approx((1 + 0.75) / 5)


# --- vectorization -------------------------------------------------------------------------

_ROW_APIS = {"iter_rows", "rows", "to_dicts", "row", "map_elements", "apply", "to_list", "iterrows"}


def test_attribution_module_never_iterates_over_rows() -> None:
    tree = ast.parse(inspect.getsource(attribution))
    offenders = [
        f"line {node.lineno}: .{node.func.attr}()"
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in _ROW_APIS
    ]
    assert offenders == []
    # the only Python loops are over a handful of layers / expressions / hash kinds
    for node in ast.walk(tree):
        if isinstance(node, ast.For | ast.comprehension):
            source = ast.unparse(node.iter)
            assert source in {
                "range(4)",
                "reversed(keys)",
                "('email', 'phone')",
                "schema.items()",
                "(known, l3_rows, unattributed)",
                # the layer-3 calibration grid: a few hyper-parameter values
                "SMOOTHING_GRID",
                "PROPENSITY_GRID",
                "KNOWN_GRID",
            }, source


def test_tables_not_created_yet_give_no_rows() -> None:
    empty = pl.DataFrame()  # what Warehouse.read answers for a missing table
    assert attribute(empty, empty, empty, empty, empty, empty).height == 0
    assert attribute_value(empty, empty).height == 0
