"""Benchmark: three-layer attribution of 100k deals over 1M contacts and lead-form leads.

Frames are generated with a seeded ``numpy.random.Generator`` in the warehouse shapes of
INTERFACES.md. Baselines measured in the same process: the bare join floor (deals -> contacts
-> leads, the least any attribution must do) and a plain-Python layer-1/2 reference
(``reference_layers12``, also the oracle of the tests).
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl

from optimizer_assets.domain.attribution import attribute

START = datetime(2026, 11, 1, tzinfo=UTC)
_TS = pl.Datetime("us", "UTC")


@dataclass(frozen=True)
class Frames:
    """Warehouse-shaped inputs of ``attribute``."""

    deals: pl.DataFrame
    deal_contacts: pl.DataFrame
    contacts: pl.DataFrame
    leads: pl.DataFrame
    insights: pl.DataFrame
    ads: pl.DataFrame
    campaigns: pl.DataFrame
    truth: pl.DataFrame | None = None  # contact_id, true_ad_id of the landing contacts


def _hash(prefix: str, ids: np.ndarray) -> pl.Series:
    """64-char stand-ins for SHA-256 digests (unique per id; hashing is not what we measure)."""
    return pl.select(
        pl.lit(prefix) + pl.lit(pl.Series(ids)).cast(pl.Utf8).str.zfill(63)
    ).to_series()


def synthetic_frames(
    n_deals: int,
    n_contacts: int,
    n_leads: int,
    rng: np.random.Generator,
    *,
    accounts: int = 20,
    ads_per_account: int = 100,
    ads_per_campaign: int = 10,
    days: int = 60,
) -> Frames:
    """Seeded warehouse-shaped frames: ~30% lead-form contacts, landing contacts with decaying
    signals (utm_content / utm_campaign / campaign name / nothing), 10% cross-path contacts
    sharing a lead's phone, deals over random contacts (10% with a second contact)."""
    n_ads = accounts * ads_per_account
    ad_ids = np.arange(n_ads) + 23_800_000_000_000_000
    account_of_ad = np.arange(n_ads) // ads_per_account
    campaign_of_ad = np.arange(n_ads) // ads_per_campaign
    ads = pl.DataFrame(
        {
            "ad_id": ad_ids.astype(str),
            "campaign_id": (campaign_of_ad + 120_000_000).astype(str),
            "account_id": (account_of_ad + 1_000).astype(str),
            "created_at": [START - timedelta(days=30)] * n_ads,
        }
    ).with_columns(pl.col("created_at").cast(_TS))
    campaigns = (
        ads.select("campaign_id")
        .unique()
        .with_columns(name=pl.format("Campaign {}", "campaign_id"))
    )
    rate = rng.gamma(2.0, 10.0, n_ads)  # mean clicks per ad-day
    day_idx = np.repeat(np.arange(days), n_ads)
    ad_idx = np.tile(np.arange(n_ads), days)
    clicks = rng.poisson(rate[ad_idx])
    insights = (
        pl.DataFrame(
            {
                "date": (np.datetime64(START.date()) + day_idx).astype("datetime64[D]"),
                "account_id": (account_of_ad[ad_idx] + 1_000).astype(str),
                "ad_id": ad_ids[ad_idx].astype(str),
                "clicks": clicks.astype(np.int64),
            }
        )
        .filter(pl.col("clicks") > 0)
        .with_columns(pl.col("date").cast(pl.Date))
    )

    def when(n: int) -> np.ndarray:
        return np.datetime64(START.replace(tzinfo=None), "us") + rng.integers(
            0, days * 86_400_000_000, n
        ).astype("timedelta64[us]")

    # lead-form leads, each a person
    lead_ad = rng.integers(0, n_ads, n_leads)
    lead_time = when(n_leads)
    leads = pl.DataFrame(
        {
            "lead_id": (np.arange(n_leads) + 900_000_000_000_000).astype(str),
            "created_at": lead_time,
            "account_id": (account_of_ad[lead_ad] + 1_000).astype(str),
            "ad_id": ad_ids[lead_ad].astype(str),
            "email_sha256": _hash("e", np.arange(n_leads)),
            "phone_sha256": _hash("p", np.arange(n_leads)),
        }
    ).with_columns(pl.col("created_at").cast(_TS))

    # contacts: lead-form syncs, cross-path re-conversions, landing-page contacts
    n_form = min(int(0.3 * n_contacts), n_leads)
    n_cross = min(int(0.1 * n_contacts), n_leads)
    n_land = n_contacts - n_form - n_cross
    form_lead = rng.choice(n_leads, n_form, replace=False)
    cross_lead = rng.choice(n_leads, n_cross, replace=False)
    land_ad = rng.choice(n_ads, n_land, p=rate / rate.sum())  # busier ads bring more people
    land_time = when(n_land)
    signal = rng.choice(4, n_land, p=[0.6, 0.15, 0.1, 0.15])  # utm ad / utm campaign / name / none
    land_pid = np.arange(n_land) + 10 * n_leads
    cross_delay = rng.integers(60_000_000, 6 * 86_400_000_000, n_cross).astype("timedelta64[us]")
    contacts = pl.concat(
        [
            pl.DataFrame(
                {
                    "created_at": lead_time[form_lead] + np.timedelta64(5, "m"),
                    "email_sha256": _hash("e", form_lead),
                    "phone_sha256": _hash("p", form_lead),
                    "source": "PAID_SOCIAL",
                    "source_data_1": "Facebook Lead Ads",
                    "source_data_2": (form_lead + 900_000_000_000_000).astype(str),
                    "lead_id": (form_lead + 900_000_000_000_000).astype(str),
                }
            ),
            pl.DataFrame(
                {
                    "created_at": lead_time[cross_lead] + cross_delay,
                    "email_sha256": _hash("x", cross_lead),
                    "phone_sha256": _hash("p", cross_lead),
                    "source": "PAID_SOCIAL",
                }
            ),
            pl.DataFrame(
                {
                    "created_at": land_time,
                    "email_sha256": _hash("e", land_pid),
                    "phone_sha256": _hash("p", land_pid),
                    "_ad": ad_ids[land_ad].astype(str),
                    "_campaign": (campaign_of_ad[land_ad] + 120_000_000).astype(str),
                    "_signal": signal,
                    "_pid": land_pid.astype(str),
                }
            ).select(
                "created_at",
                "email_sha256",
                "phone_sha256",
                source=pl.lit("PAID_SOCIAL"),
                utm_content=pl.when(pl.col("_signal") == 0).then("_ad"),
                utm_campaign=pl.when(pl.col("_signal") <= 1).then("_campaign"),
                source_data_2=pl.when(pl.col("_signal") == 2).then(
                    pl.format("Campaign {}", "_campaign")
                ),
                fbclid=pl.when(pl.col("_signal") == 0).then(pl.format("IwAR{}", "_pid")),
            ),
        ],
        how="diagonal_relaxed",
    ).with_columns(
        pl.col("created_at").cast(_TS),
        contact_id=pl.int_range(pl.len()).cast(pl.Utf8),
    )
    deal_contact = rng.choice(n_contacts, n_deals, replace=False).astype(str)
    deal_ids = (np.arange(n_deals) + 5_000_000).astype(str)
    extra = rng.random(n_deals) < 0.1
    deal_contacts = pl.DataFrame(
        {
            "deal_id": np.concatenate([deal_ids, deal_ids[extra]]),
            "contact_id": np.concatenate(
                [deal_contact, rng.integers(0, n_contacts, int(extra.sum())).astype(str)]
            ),
        }
    )
    # deal account: the account of the contact's source ad (landing / lead) when known
    contact_account = pl.concat(
        [
            pl.Series((account_of_ad[lead_ad[form_lead]] + 1_000).astype(str)),
            pl.Series((account_of_ad[lead_ad[cross_lead]] + 1_000).astype(str)),
            pl.Series((account_of_ad[land_ad] + 1_000).astype(str)),
        ]
    )
    deals = pl.DataFrame(
        {
            "deal_id": deal_ids,
            "account_id": contact_account.gather(deal_contact.astype(np.int64)),
            "created_at": contacts["created_at"].gather(deal_contact.astype(np.int64))
            + timedelta(days=2),
            "amount": rng.gamma(2.0, 5_000.0, n_deals),
        }
    )
    # lead actions per ad-day: lead-form leads + the landing contacts the pixel saw (70%)
    seen = rng.random(n_land) < 0.7
    actions = (
        pl.concat(
            [
                pl.DataFrame({"ad_id": ad_ids[lead_ad].astype(str), "date": lead_time}),
                pl.DataFrame({"ad_id": ad_ids[land_ad[seen]].astype(str), "date": land_time[seen]}),
            ]
        )
        .with_columns(pl.col("date").cast(pl.Date))
        .group_by("ad_id", "date")
        .agg(leads=pl.len().cast(pl.Int64))
    )
    insights = insights.join(actions, on=["ad_id", "date"], how="left").with_columns(
        pl.col("leads").fill_null(0)
    )
    n_before = n_form + n_cross
    truth = pl.DataFrame(
        {
            "contact_id": (np.arange(n_land) + n_before).astype(str),
            "true_ad_id": ad_ids[land_ad].astype(str),
        }
    )
    return Frames(deals, deal_contacts, contacts, leads, insights, ads, campaigns, truth)


def reference_layers12(
    deals: pl.DataFrame,
    deal_contacts: pl.DataFrame,
    contacts: pl.DataFrame,
    leads: pl.DataFrame,
    ads: pl.DataFrame,
    *,
    window_days: int = 7,
) -> dict[str, tuple[int, str]]:
    """Plain-Python layers 1-2 (deal_id -> (layer, ad_id)) written straight from the rules.

    Deliberately row-by-row: the oracle of the tests and the baseline of this benchmark.
    Same rules as ``attribute``: lead-form lead before utm_content (known ad); identity in
    the deal's account within ``[t - window, t]``, most recent, then lead before contact,
    email before phone, smallest ad_id; deal uses its best-layer, earliest, smallest contact.
    """
    window = timedelta(days=window_days)
    lead_rows = leads.to_dicts()
    lead_by_id = {r["lead_id"]: r for r in lead_rows}
    ad_account = {r["ad_id"]: r["account_id"] for r in ads.to_dicts()}
    contact_rows = {r["contact_id"]: r for r in contacts.to_dicts()}
    layer1: dict[str, tuple[str, str, str | None]] = {}  # contact -> (ad, account, lead)
    for cid, c in contact_rows.items():
        lead = lead_by_id.get(c.get("lead_id") or c.get("source_data_2"))
        if lead is not None and lead["ad_id"] is not None:
            layer1[cid] = (lead["ad_id"], lead["account_id"], lead["lead_id"])
        elif c.get("utm_content") in ad_account:
            layer1[cid] = (c["utm_content"], ad_account[c["utm_content"]], None)
    identities: dict[tuple, list[tuple]] = defaultdict(list)
    for r in lead_rows:
        for kind in ("email", "phone"):
            if r[f"{kind}_sha256"] is not None:
                key = (r["account_id"], kind, r[f"{kind}_sha256"])
                identities[key].append((r["created_at"], 0, r["ad_id"]))
    for cid, (ad, account, _lead) in layer1.items():
        c = contact_rows[cid]
        for kind in ("email", "phone"):
            if c.get(f"{kind}_sha256") is not None and c["created_at"] is not None:
                key = (account, kind, c[f"{kind}_sha256"])
                identities[key].append((c["created_at"], 1, ad))
    deal_account = {r["deal_id"]: r["account_id"] for r in deals.to_dicts()}
    best: dict[str, tuple] = {}
    for link in deal_contacts.to_dicts():
        deal, cid = link["deal_id"], link["contact_id"]
        if deal not in deal_account or cid not in contact_rows:
            continue
        c = contact_rows[cid]
        if cid in layer1:
            layer, ad = 1, layer1[cid][0]
        else:
            layer, ad, found = 3, None, None
            t = c["created_at"]
            for kind_rank, kind in enumerate(("email", "phone")):
                h = c.get(f"{kind}_sha256")
                if h is None or t is None:
                    continue
                for at, prio, cand in identities.get((deal_account[deal], kind, h), []):
                    if t - window <= at <= t:
                        key = (-at.timestamp(), prio, kind_rank, cand)
                        if found is None or key < found:
                            found = key
            if found is not None:
                layer, ad = 2, found[3]
        created = c["created_at"].timestamp() if c["created_at"] is not None else float("inf")
        rank = (layer, created, cid)
        if deal not in best or rank < best[deal][0]:
            best[deal] = (rank, ad)
    return {d: (r[0], ad) for d, (r, ad) in best.items() if r[0] <= 2}


def _join_floor(f: Frames) -> int:
    """The least any attribution must do: deals -> deal_contacts -> contacts -> leads."""
    out = (
        f.deal_contacts.join(f.deals.select("deal_id", "account_id"), on="deal_id")
        .join(f.contacts, on="contact_id")
        .join(f.leads.select("lead_id", "ad_id"), on="lead_id", how="left")
    )
    return out.height


def _layer3_precision(result: pl.DataFrame, truth: pl.DataFrame | None) -> float:
    """Mean layer-3 credit on the generating ad of landing contacts (NaN without truth)."""
    if truth is None:
        return float("nan")
    per_deal = (
        result.filter(pl.col("layer") == 3)
        .join(truth, on="contact_id")
        .group_by("deal_id")
        .agg(hit=pl.col("credit").filter(pl.col("ad_id") == pl.col("true_ad_id")).sum())
    )
    return float(per_deal["hit"].mean()) if per_deal.height else float("nan")


def _median_seconds(fn: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(quick: bool = False) -> str:
    """Markdown report: attribution seconds (median) next to the join floor and Python reference."""
    n_deals, n_contacts, n_leads = (
        (10_000, 100_000, 100_000)
        if quick
        else (
            100_000,
            1_000_000,
            1_000_000,
        )
    )
    runs = 1 if quick else 3  # quick: one timed run per step (it must finish in < 20 s)
    rng = np.random.default_rng(20261101)
    started = time.perf_counter()
    f = synthetic_frames(n_deals, n_contacts, n_leads, rng)
    gen_s = time.perf_counter() - started

    inputs = (f.deals, f.deal_contacts, f.contacts, f.leads, f.insights, f.ads)
    diagnostics: dict = {}

    def run() -> pl.DataFrame:
        return attribute(*inputs, campaigns=f.campaigns, diagnostics=diagnostics)

    def run_clicks() -> pl.DataFrame:
        return attribute(*inputs, campaigns=f.campaigns, weights="clicks")

    result = run()
    att_s = _median_seconds(run, runs)
    by_clicks = run_clicks()
    clicks_s = _median_seconds(run_clicks, runs)
    floor_s = _median_seconds(lambda: _join_floor(f), runs)
    started = time.perf_counter()
    ref = reference_layers12(f.deals, f.deal_contacts, f.contacts, f.leads, f.ads)
    ref_s = time.perf_counter() - started
    got = {
        r["deal_id"]: (r["layer"], r["ad_id"])
        for r in result.filter(pl.col("layer").is_in([1, 2]))
        .select("deal_id", "layer", "ad_id")
        .to_dicts()
    }
    agree = sum(got.get(d) == v for d, v in ref.items()) / max(len(ref), 1)
    layers = result.group_by("layer").agg(pl.col("deal_id").n_unique().alias("deals")).sort("layer")
    credit_ok = (result.group_by("deal_id").agg(pl.col("credit").sum())["credit"] - 1.0).abs().max()
    hit, hit_clicks = _layer3_precision(result, f.truth), _layer3_precision(by_clicks, f.truth)
    lines = [
        f"Inputs: {n_deals:,} deals, {f.contacts.height:,} contacts, {f.leads.height:,} "
        f"lead-form leads, {f.ads.height:,} ads, {f.insights.height:,} insight rows "
        f"(generated in {gen_s:.1f} s, seed 20261101); median of {runs} runs.",
        "",
        "| step | seconds | ratio to attribute |",
        "|---|---:|---:|",
        f"| `attribute` (layers 1-3, landing-lead layer 3, polars) | {att_s:.2f} | 1.00 |",
        f'| `attribute(weights="clicks")` (decayed-click layer 3) | {clicks_s:.2f} '
        f"| {clicks_s / att_s:.2f} |",
        f"| join floor (deals->contacts->leads) | {floor_s:.2f} | {floor_s / att_s:.2f} |",
        f"| plain-Python layers 1-2 reference (1 run) | {ref_s:.2f} | {ref_s / att_s:.2f} |",
        "",
        f"Output rows: {result.height:,}; deals per layer: "
        + ", ".join(f"L{r['layer']}={r['deals']:,}" for r in layers.to_dicts())
        + f"; max |sum(credit)-1| per deal: {credit_ok:.2e}; "
        f"layer 1-2 agreement with the reference: {agree:.4%} of {len(ref):,} deals.",
        "",
        f"Layer 3 on these synthetic frames (mean credit on the generating ad, landing "
        f"contacts): landing-lead model {hit:.3f} vs decayed clicks {hit_clicks:.3f}; fitted "
        f"smoothing {diagnostics.get('smoothing')}, known share {diagnostics.get('known_share')}, "
        f"propensity power {diagnostics.get('propensity_power')} on "
        f"{diagnostics.get('calibration_contacts', 0):,.0f} layer-1 contacts (their mean "
        f"probability of the true ad: {diagnostics.get('calibration_mean_p', float('nan')):.3f}).",
    ]
    return "\n".join(lines)
