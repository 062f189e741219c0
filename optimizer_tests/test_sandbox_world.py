"""The sandbox world simulator: determinism, budgets and limits, attribution signals, truth."""

from __future__ import annotations

import hashlib
import re
from datetime import date, timedelta

import polars as pl
import pytest

from optimizer_assets.sandbox.world import World, WorldConfig, WorldError

FRAMES = (
    "accounts",
    "campaigns",
    "adsets",
    "ads",
    "leads",
    "contacts",
    "deals",
    "deal_contacts",
    "deal_stage_history",
    "truth_contacts",
    "truth_deals",
    "truth_ads_daily",
)
MONTH = 30 * 24


@pytest.fixture(scope="module")
def month() -> World:
    """The default world after 30 simulated days (shared, read-only)."""
    world = World(WorldConfig(seed=11))
    world.advance(MONTH)
    return world


def all_insights(world: World) -> pl.DataFrame:
    start = world.config.start.date()
    until = start + timedelta(days=60)
    return pl.concat(
        [world.insights(a, start, until) for a in world.accounts()["account_id"]], how="vertical"
    )


def norm_phone(raw: str) -> str:
    digits = re.sub(r"\D", "", raw).lstrip("0")
    return digits if len(digits) == 11 else "1" + digits


def assert_same_world(a: World, b: World) -> None:
    for name in FRAMES:
        left, right = getattr(a, name)(), getattr(b, name)()
        assert left.equals(right), name
    assert all_insights(a).equals(all_insights(b))
    assert a.truth_drifts() == b.truth_drifts()
    assert a.pipelines() == b.pipelines()


def test_same_seed_same_world_and_other_seed_differs() -> None:
    a, b, c = World(WorldConfig(seed=3)), World(WorldConfig(seed=3)), World(WorldConfig(seed=4))
    for w in (a, b, c):
        w.advance(96)
    assert_same_world(a, b)
    assert a.leads().height > 0 and a.deals().height > 0
    assert not a.ads().equals(c.ads())
    assert not all_insights(a).equals(all_insights(c))


def test_chunked_advance_equals_one_advance() -> None:
    one, chunks = World(WorldConfig(seed=5)), World(WorldConfig(seed=5))
    one.advance(400)
    for step in (24, 24, 0.5, 23.5, 7.25, 320.75):
        chunks.advance(step)
    assert one.now == chunks.now
    assert_same_world(one, chunks)


def test_spend_never_exceeds_125_percent_of_daily_budget(month: World) -> None:
    budgets = month.adsets().select("adset_id", "daily_budget")
    per_day = (
        all_insights(month)
        .group_by("adset_id", "date_start")
        .agg(pl.col("spend").sum())
        .join(budgets, on="adset_id")
    )
    assert per_day.height > 0
    ratio = per_day["spend"] / (per_day["daily_budget"] / 100)
    assert ratio.max() <= 1.25 + 1e-9
    # and pacing really follows the budget on average
    assert 0.8 < ratio.mean() < 1.1


def test_the_125_percent_cap_binds_under_noisy_delivery() -> None:
    world = World(WorldConfig(seed=12, pacing_noise=1.5))
    world.advance(10 * 24)
    budgets = world.adsets().select("adset_id", "daily_budget")
    per_day = (
        all_insights(world)
        .group_by("adset_id", "date_start")
        .agg(pl.col("spend").sum())
        .join(budgets, on="adset_id")
    )
    ratio = per_day["spend"] / (per_day["daily_budget"] / 100)
    assert ratio.max() <= 1.25 + 1e-9
    assert (ratio > 1.2).mean() > 0.05  # the cap is what holds spend back on those days


def test_paused_adsets_spend_nothing_and_budget_changes_apply_next_hour() -> None:
    world = World(WorldConfig(seed=8))
    world.advance(24)
    adsets = world.adsets()
    paused, raised = adsets["adset_id"][0], adsets["adset_id"][1]
    world.update_adset(paused, status="PAUSED")
    world.update_adset(raised, daily_budget=int(adsets["daily_budget"][1]) * 3)
    world.advance(48)
    day2 = world.config.start.date() + timedelta(days=1)
    ins = all_insights(world).filter(pl.col("date_start") >= day2)
    assert ins.filter(pl.col("adset_id") == paused)["spend"].sum() == 0
    before = (
        all_insights(world)
        .filter((pl.col("adset_id") == raised) & (pl.col("date_start") < day2))["spend"]
        .sum()
    )
    after = ins.filter(pl.col("adset_id") == raised)["spend"].sum() / 2
    assert after > 2 * before
    assert world.adsets().filter(pl.col("adset_id") == paused)["status"][0] == "PAUSED"
    # a budget tripled restarts Meta's learning phase for a while
    stage = world.adsets().filter(pl.col("adset_id") == raised)["learning_stage"]
    assert stage[0] == "LEARNING"
    world.advance(30)
    assert world.adsets().filter(pl.col("adset_id") == raised)["learning_stage"][0] == "SUCCESS"


def test_paused_ads_get_no_impressions() -> None:
    world = World(WorldConfig(seed=9))
    ad = world.ads().filter(pl.col("status") == "ACTIVE")["ad_id"][0]
    world.update_ad(ad, status="PAUSED")
    world.advance(72)
    assert all_insights(world).filter(pl.col("ad_id") == ad).height == 0


def test_budget_edit_limit_and_minimum() -> None:
    world = World()
    adset = world.adsets()["adset_id"][0]
    for budget in (2000, 2100, 2200, 2300):
        world.update_adset(adset, daily_budget=budget)
    with pytest.raises(WorldError) as err:
        world.update_adset(adset, daily_budget=2400)
    assert (err.value.code, err.value.subcode, err.value.http_status) == (613, 1487632, 400)
    assert world.adsets().filter(pl.col("adset_id") == adset)["daily_budget"][0] == 2300
    world.update_adset(adset, status="PAUSED")  # status changes are not budget edits
    other = world.adsets()["adset_id"][1]
    world.update_adset(other, daily_budget=2500)  # the limit is per ad set
    world.advance(0.5)
    with pytest.raises(WorldError):
        world.update_adset(adset, daily_budget=2400)  # still blocked within the hour
    world.advance(1)
    world.update_adset(adset, daily_budget=2400)
    minimum = world.minimum_budgets(world.accounts()["account_id"][0])[0]["min_daily_budget_imp"]
    with pytest.raises(WorldError) as low:
        world.update_adset(other, daily_budget=minimum - 1)
    assert low.value.code == 100
    with pytest.raises(WorldError):
        world.update_adset(other, status="RUNNING")
    with pytest.raises(WorldError):
        world.update_adset("123", daily_budget=5000)


def test_click_id_survival_share_matches_config() -> None:
    world = World(WorldConfig(seed=21, accounts=6, click_id_survival=0.6))
    world.advance(MONTH)
    landing = world.truth_contacts().filter(pl.col("path") == "landing")
    assert landing.height > 2000
    assert abs(landing["kept_click_id"].mean() - 0.6) < 0.04


def test_contact_signals_point_to_the_true_ad(month: World) -> None:
    truth = month.truth_contacts()
    contacts = month.contacts().join(truth, on="contact_id")
    kept = contacts.filter(pl.col("kept_click_id"))
    assert kept.height > 0
    assert (
        kept["hs_analytics_first_url"].str.extract(r"utm_content=(\d+)") == kept["true_ad_id"]
    ).all()
    assert (
        kept["hs_analytics_first_url"].str.extract(r"fbclid=([\w-]+)")
        == kept["hs_facebook_click_id"]
    ).all()
    lost = contacts.filter(pl.col("path") != "lead_form", ~pl.col("kept_click_id"))
    assert lost["hs_facebook_click_id"].null_count() == lost.height
    assert not lost["hs_analytics_first_url"].str.contains("utm_content").any()
    lead_form = contacts.filter(pl.col("path") == "lead_form")
    leads = month.leads().select("lead_id", "ad_id")
    synced = lead_form.join(leads, left_on="hs_analytics_source_data_2", right_on="lead_id")
    assert synced.height == lead_form.height
    assert (synced["ad_id"] == synced["true_ad_id"]).all()
    assert (lead_form["hs_analytics_source_data_1"] == "Facebook Lead Ads").all()


def test_ids_are_digit_strings_of_realistic_length(month: World) -> None:
    assert month.accounts()["account_id"].str.contains(r"^\d{10}$").all()
    assert month.ads()["ad_id"].str.contains(r"^\d{15}$").all()
    assert month.leads()["lead_id"].str.contains(r"^\d{15,16}$").all()
    assert month.deals()["dealstage"].str.contains(r"^\d+$").all()
    phones = month.contacts()["phone"].drop_nulls()
    assert phones.str.contains(r"^\+1 \(").any() and phones.str.contains(r"^\d{3}\.").any()
    assert phones.str.contains(r"^1\d{10}$").any()


def test_every_deal_points_to_a_real_ad_of_its_account(month: World) -> None:
    truth = month.truth_deals()
    assert truth.height > 50
    ads = month.ads().select("ad_id", pl.col("account_id").alias("ad_account"))
    joined = truth.join(ads, left_on="true_ad_id", right_on="ad_id", how="left")
    assert (joined["ad_account"] == joined["account_id"]).all()
    pipelines = month.accounts().select("account_id", "hubspot_pipeline_id")
    deals = month.deals().join(truth, on="deal_id").join(pipelines, on="account_id")
    assert deals.height == truth.height
    assert (deals["pipeline"] == deals["hubspot_pipeline_id"]).all()
    assoc = month.deal_contacts().join(truth, on="deal_id")
    assert (assoc["contact_id"] == assoc["contact_id_right"]).all()


def test_deal_stage_histories_are_monotone_and_consistent(month: World) -> None:
    history = month.deal_stage_history()
    order = history.group_by("deal_id", maintain_order=True).agg(
        pl.col("occurred_at"), pl.col("stage_label").first().alias("first")
    )
    assert (order["first"] == "Lead").all()
    assert (
        order["occurred_at"]
        .map_elements(
            lambda ts: all(x < y for x, y in zip(ts, ts[1:], strict=False)), return_dtype=pl.Boolean
        )
        .all()
    )
    last = history.group_by("deal_id").agg(pl.col("occurred_at").max(), pl.col("dealstage").last())
    deals = month.deals().join(last, on="deal_id")
    assert (deals["hs_lastmodifieddate"] == deals["occurred_at"]).all()
    assert (deals["dealstage"] == deals["dealstage_right"]).all()
    stages = {
        s["id"]: s["label"] for p in month.pipelines() for s in p["stages"]
    }  # amount is set from Show up on
    labels = deals["dealstage"].replace_strict(stages)
    early = deals.filter(labels.is_in(["Lead", "Appointment scheduled"]))
    reached_show = history.filter(pl.col("stage_label") == "Show up")["deal_id"].unique().implode()
    assert early.filter(~pl.col("deal_id").is_in(reached_show))["amount"].null_count() == (
        early.filter(~pl.col("deal_id").is_in(reached_show)).height
    )
    won = deals.filter(labels == "Closed won")
    assert won.height > 0 and won["amount"].null_count() == 0
    assert won["closedate"].null_count() == 0
    assert (
        history.filter(pl.col("stage_label") == "Lead").group_by("deal_id").len()["len"].max() >= 2
    )
    # clicks close in about a week on average
    truth = month.truth_deals().join(month.truth_contacts(), on="contact_id")
    closed = truth.join(deals.filter(pl.col("closedate").is_not_null()), on="deal_id")
    lag = (closed["closedate"] - closed["click_time"]).dt.total_hours().mean() / 24
    assert 4.0 < lag < 9.0


def test_drift_is_recorded_and_ctrs_shift_by_hook_type() -> None:
    world = World(WorldConfig(seed=13, drift_at_hours=120, drift_strength=0.5))
    world.advance(96)
    assert world.truth_drifts() == []
    world.advance(72)
    drifts = world.truth_drifts()
    assert len(drifts) == world.accounts().height
    assert drifts[0]["at"].startswith("2026-11-06T00:00")
    mult = drifts[0]["multipliers"]
    assert min(mult.values()) < 0.8 and max(mult.values()) > 1.25
    truth = world.truth_ads_daily().join(world.ads().select("ad_id", "hook_type"), on="ad_id")
    start = world.config.start.date()
    before = truth.filter(pl.col("date") == start + timedelta(days=4))
    after = truth.filter(pl.col("date") == start + timedelta(days=5))
    ratio = before.join(after, on="ad_id").with_columns(
        r=pl.col("true_ctr_right") / pl.col("true_ctr")
    )
    for hook, m in mult.items():
        observed = ratio.filter(pl.col("hook_type") == hook)["r"].median()
        if observed is not None:
            assert abs(observed / m - 1) < 0.12, hook
    still = World(WorldConfig(seed=13, drift_at_hours=None))
    still.advance(168)
    assert still.truth_drifts() == []


def test_cross_path_contacts_share_phone_or_email_with_a_lead_form_lead(month: World) -> None:
    truth = month.truth_contacts()
    contacts = month.contacts().join(truth, on="contact_id")
    cross = contacts.filter(pl.col("path") == "cross_path")
    assert cross.height > 10
    first = contacts.filter(pl.col("path") == "lead_form").select(
        "person_id", pl.col("email").alias("lf_email"), pl.col("phone").alias("lf_phone")
    )
    pairs = cross.join(first, on="person_id")
    assert pairs.height == cross.height
    for row in pairs.iter_rows(named=True):
        same_email = row["email"].strip().lower() == row["lf_email"].strip().lower()
        same_phone = row["phone"] is not None and norm_phone(row["phone"]) == norm_phone(
            row["lf_phone"]
        )
        assert same_email or same_phone
        if same_phone:
            assert row["phone"] != row["lf_phone"] and not same_email
        else:
            assert row["email"] != row["lf_email"]
        assert row["hs_facebook_click_id"] is None
    # the deal of a cross-path person hangs on the new contact
    deal_contacts = set(month.deal_contacts()["contact_id"])
    persons_with_deal = set(month.truth_deals()["person_id"])
    for row in pairs.iter_rows(named=True):
        if row["person_id"] in persons_with_deal:
            assert row["contact_id"] in deal_contacts


def test_records_are_only_visible_once_their_time_has_come() -> None:
    world = World(WorldConfig(seed=2))
    world.advance(50)
    now = world.now
    for name, col in (("contacts", "createdate"), ("deals", "hs_lastmodifieddate")):
        assert (getattr(world, name)()[col] <= now).all()
    assert (world.leads()["created_time"] <= now).all()
    seen = set(world.contacts()["contact_id"])
    world.advance(30)
    later = world.contacts().filter(~pl.col("contact_id").is_in(pl.Series(list(seen)).implode()))
    assert (later["createdate"] > now).all()  # nothing new appears in the past


def test_empty_world_frames_have_the_same_schemas() -> None:
    empty, busy = World(WorldConfig(seed=6)), World(WorldConfig(seed=6))
    busy.advance(72)
    for name in (*FRAMES, "capi_events"):
        assert getattr(empty, name)().schema == getattr(busy, name)().schema, name
        assert getattr(empty, name)() is getattr(empty, name)()  # cached until a change
    assert empty.leads().height == 0 and empty.deals().height == 0
    account = empty.accounts()["account_id"][0]
    since = empty.config.start.date()
    assert (
        empty.insights(account, since, since).schema == busy.insights(account, since, since).schema
    )
    counts = busy.counts()
    assert counts["contacts"] == busy.contacts().height
    assert counts["deals"] == busy.deals().height and counts["leads"] == busy.leads().height


def test_capi_dedup_and_match() -> None:
    world = World(WorldConfig(seed=17))
    world.advance(10 * 24)
    pixel = world.accounts()["pixel_id"][0]
    account = world.accounts()["account_id"][0]
    deals = world.truth_deals().filter(pl.col("account_id") == account)
    contact = world.contacts().join(deals, on="contact_id").row(0, named=True)
    em = hashlib.sha256(contact["email"].strip().lower().encode()).hexdigest()
    good = {
        "event_name": "Purchase",
        "event_time": 1,
        "event_id": "deal-1",
        "action_source": "system_generated",
        "user_data": {"em": [em]},
    }
    stranger = {**good, "event_id": "deal-2", "user_data": {"em": ["0" * 64]}}
    assert world.receive_capi(pixel, [good, stranger]) == 2
    assert world.receive_capi(pixel, [good]) == 1  # same (event_name, event_id): dropped
    world.advance(49)
    world.receive_capi(pixel, [good])  # outside the 48 h window: counted again
    match = world.capi_match()
    (row,) = match["pixels"]
    assert row["events_received"] == 4 and row["duplicates"] == 1
    assert row["unique_events"] == 3 and row["matched"] == 2
    assert row["match_rate"] == pytest.approx(2 / 3)
    # lead ids and fbc click ids resolve too; identifiers of two people are a conflict
    lead = world.leads().filter(pl.col("account_id") == account).row(0, named=True)
    clicked = world.contacts().filter(pl.col("hs_facebook_click_id").is_not_null())
    clicked = clicked.join(world.truth_contacts(), on="contact_id")
    clicked = clicked.filter(pl.col("account_id") == account).row(0, named=True)
    fbc = f"fb.1.1700000000000.{clicked['hs_facebook_click_id']}"
    world.receive_capi(
        pixel,
        [
            {**good, "event_id": "l", "user_data": {"lead_id": lead["lead_id"]}},
            {**good, "event_id": "f", "user_data": {"fbc": fbc}},
            {**good, "event_id": "x", "user_data": {"em": em, "fbc": fbc}},
        ],
    )
    events = world.capi_events().tail(3)
    assert events["match_key"].to_list() == ["lead_id", "fbc", "em"]
    assert events["conflict"].to_list() == [False, False, True]
    assert events["true_ad_id"][0] == lead["ad_id"]
    assert events["true_ad_id"][1] == clicked["true_ad_id"]


def test_insights_shape_and_magnitudes(month: World) -> None:
    ins = all_insights(month)
    assert ins.schema["date_start"] == pl.Date and ins.schema["spend"] == pl.Float64
    assert (ins["impressions"] > 0).all()
    assert (ins["clicks"] >= ins["inline_link_clicks"]).all()
    assert (ins["reach"] <= ins["impressions"]).all()
    totals = ins.select(pl.col("spend", "impressions", "clicks", "leads").sum()).row(0)
    spend, impressions, clicks, leads = totals
    assert 8 <= spend / impressions * 1000 <= 25  # CPM
    assert 0.005 <= clicks / impressions <= 0.04  # CTR
    assert leads > 0
    won = month.truth_deals().filter(pl.col("final_stage") == "Closed won")
    assert 5000 <= won["value_if_won"].mean() <= 30000
    today = month.insights(
        month.accounts()["account_id"][0], date(2026, 11, 30), date(2026, 11, 30)
    )
    assert today.height > 0
