"""Ad-change ledger: batch composition, outcome classification, transitions, crash recovery."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from optimizer_assets.domain.ad_changes import (
    LEDGER_SCHEMA,
    MAX_BATCH_SIZE,
    RULE_SUPERSEDED,
    append_plan,
    batches,
    classify_outcome,
    current_values_from_objects,
    error_message,
    make_batch_id,
    mark_sending,
    mark_skipped,
    new_ledger,
    reconcile,
    record_responses,
    send_phases,
    to_batch_items,
    to_read_items,
    transition,
)
from optimizer_assets.domain.guardrails import GuardrailConfig, empty_history, plan_changes

NOW = datetime(2026, 11, 1, 10, 5, tzinfo=UTC)
PROPERTY = settings(derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def graph_error(code: int, subcode: int | None = None, *, transient: bool | None = None) -> str:
    err = {"message": f"error {code}", "type": "OAuthException", "code": code, "fbtrace_id": "x"}
    if subcode is not None:
        err["error_subcode"] = subcode
    if transient is not None:
        err["is_transient"] = transient
    return json.dumps({"error": err})


def make_plan(n: int = 4, *, now: datetime = NOW) -> pl.DataFrame:
    """n ad sets at 1000 asking for +/-15%, and one kill."""
    recs = pl.DataFrame(
        {
            "adset_id": [str(100 + i) for i in range(n)],
            "account_id": "a",
            "campaign_id": [f"c{i % 3}" for i in range(n)],
            "current_budget": 1000,
            "recommended_budget": [1150 if i % 2 == 0 else 850 for i in range(n)],
        }
    )
    kills = pl.DataFrame(
        {"ad_id": ["900"], "account_id": "a", "campaign_id": "c0", "action": "kill"}
    )
    current = recs.select("adset_id", "account_id", "campaign_id", daily_budget="current_budget")
    config = GuardrailConfig(max_campaign_actions_per_hour=1000, max_changes_per_run=1000)
    return plan_changes(recs, current, empty_history(), now=now, config=config, ad_actions=kills)


def ids(frame: pl.DataFrame) -> list[str]:
    return frame["change_id"].to_list()


def status_of(ledger: pl.DataFrame) -> dict[str, str]:
    return dict(ledger.select("change_id", "status").rows())


# ----------------------------------------------------------------------------- batches


def test_batch_items_are_graph_batch_posts_with_url_encoded_bodies():
    plan = make_plan(2)
    items = to_batch_items(plan)
    assert [i["relative_url"] for i in items] == plan["object_id"].to_list()  # order kept
    by_url = {i["relative_url"]: i for i in items}
    assert by_url["100"] == {"method": "POST", "relative_url": "100", "body": "daily_budget=1150"}
    assert by_url["101"]["body"] == "daily_budget=850"
    assert by_url["900"]["body"] == "status=PAUSED"
    odd = plan.head(1).with_columns(new_value=pl.lit("a b&c=d"), field=pl.lit("status"))
    body = to_batch_items(odd)[0]["body"]
    assert "&c=" not in body and parse_qs(body) == {"status": ["a b&c=d"]}


def test_batch_items_refuse_rows_that_must_not_be_sent():
    ledger = new_ledger(make_plan(2))
    applied = transition(
        mark_sending(ledger, ids(ledger)[:1], batch_id="b"), ids(ledger)[:1], "applied"
    )
    with pytest.raises(ValueError, match="status"):
        to_batch_items(applied)
    with pytest.raises(ValueError, match="field"):
        to_batch_items(ledger.with_columns(field=pl.lit("name")))


def test_a_plan_of_120_changes_goes_out_as_50_50_20_in_order():
    plan = make_plan(119)
    assert plan.height == 120
    items = to_batch_items(plan)
    chunks = batches(items)
    assert [len(c) for c in chunks] == [50, 50, 20]
    assert [i for c in chunks for i in c] == items
    id_chunks = batches(ids(plan))
    for chunk_ids, chunk in zip(id_chunks, chunks, strict=True):
        objects = plan.filter(pl.col("change_id").is_in(chunk_ids))["object_id"].to_list()
        assert sorted(objects) == sorted(i["relative_url"] for i in chunk)


@settings(PROPERTY, max_examples=100)
@given(st.lists(st.integers(), max_size=260), st.integers(1, MAX_BATCH_SIZE))
def test_batches_keep_order_and_respect_the_size(items, size):
    chunks = batches(items, size)
    assert [x for c in chunks for x in c] == items
    assert all(1 <= len(c) <= size for c in chunks)
    assert all(len(c) == size for c in chunks[:-1])
    assert len(chunks) == -(-len(items) // size)


@pytest.mark.parametrize("size", [0, 51])
def test_batch_size_beyond_graph_limit_is_refused(size):
    with pytest.raises(ValueError):
        batches([1, 2, 3], size)


def test_send_phases_put_decreases_and_kills_before_increases():
    plan = make_plan(6)
    first, second = send_phases(plan)
    assert first.height + second.height == plan.height
    assert (
        second["new_value"].cast(pl.Int64) > second["old_value"].cast(pl.Int64)
    ).all() and second.height == 3
    assert "status" in first["field"].to_list()


def test_read_items_and_current_values():
    plan = make_plan(2)
    items = to_read_items(plan)
    assert {"method": "GET", "relative_url": "100?fields=daily_budget"} in items
    assert {"method": "GET", "relative_url": "900?fields=status"} in items
    cv = current_values_from_objects(
        [
            {"id": "100", "daily_budget": "1150", "status": "ACTIVE"},
            {"id": "900", "status": "PAUSED"},
        ]
    )
    assert sorted(cv.rows()) == [
        ("100", "daily_budget", "1150"),
        ("100", "status", "ACTIVE"),
        ("900", "status", "PAUSED"),
    ]


# ----------------------------------------------------------------------------- outcomes


@pytest.mark.parametrize(
    ("code", "body", "expected"),
    [
        (200, '{"success": true}', "applied"),
        (200, {"success": True}, "applied"),
        (200, "", "applied"),
        (200, '{"success": false}', "failed"),
        (None, None, "retry"),  # null item: unfinished at timeout
        (500, graph_error(2, transient=True), "retry"),
        (500, graph_error(1), "retry"),
        (400, graph_error(100, transient=True), "retry"),
        (400, graph_error(17, 2446079), "retry"),  # ad account throttle
        (400, graph_error(4), "retry"),  # app throttle
        (400, graph_error(32), "retry"),  # page throttle
        (400, graph_error(80004), "retry"),  # ads_management BUC
        (400, graph_error(613), "retry"),  # custom rate limit
        (400, graph_error(613, 1487632), "failed"),  # 4 budget edits/h: not within the hour
        (400, graph_error(100, 1487242), "failed"),  # invalid parameter
        (400, graph_error(190), "failed"),  # token expired
        (403, graph_error(200), "failed"),  # permissions
        (404, "not json", "failed"),
        (429, "", "retry"),
        (503, "not json", "retry"),
    ],
)
def test_classification_table(code, body, expected):
    assert classify_outcome(code, body) == expected


def test_error_messages_carry_metas_words_and_the_rule_note():
    assert error_message(200, '{"success": true}') is None
    note = error_message(400, graph_error(613, 1487632))
    assert note.startswith("613/1487632") and "budget_edits_per_hour" in note
    assert error_message(400, graph_error(100)) == "100: error 100"
    assert error_message(502, "<html>") == "HTTP 502"
    long = json.dumps({"error": {"code": 100, "message": "x" * 5000}})
    assert len(error_message(400, long)) <= 500


# ----------------------------------------------------------------------------- transitions


def test_new_ledger_has_the_ledger_columns():
    ledger = new_ledger(make_plan(2))
    assert ledger.schema == pl.Schema(LEDGER_SCHEMA)
    assert (ledger["attempts"] == 0).all() and ledger["applied_at"].is_null().all()
    assert set(ledger["status"]) == {"planned"}


def test_illegal_transitions_raise():
    ledger = new_ledger(make_plan(2))
    first = ids(ledger)[:1]
    sending = mark_sending(ledger, first, batch_id="b1")
    with pytest.raises(ValueError, match="sending -> sending"):
        mark_sending(sending, first, batch_id="b2")
    applied = transition(sending, first, "applied", applied_at=NOW)
    for to in ("sending", "planned", "failed"):
        with pytest.raises(ValueError, match="illegal"):
            transition(applied, first, to)
    with pytest.raises(ValueError, match="unknown change"):
        transition(ledger, ["nope"], "sending")
    with pytest.raises(ValueError, match="unknown status"):
        transition(ledger, first, "done")


def test_mark_sending_counts_attempts_and_names_the_batch():
    ledger = new_ledger(make_plan(2))
    batch = make_batch_id(ids(ledger), NOW)
    assert (
        batch == make_batch_id(ids(ledger), NOW) != make_batch_id(ids(ledger), NOW + timedelta(1))
    )
    out = mark_sending(ledger, ids(ledger), batch_id=batch)
    assert set(out["status"]) == {"sending"} and (out["attempts"] == 1).all()
    assert set(out["batch_id"]) == {batch}


def test_record_responses_handles_each_item_on_its_own():
    ledger = new_ledger(make_plan(4))  # 5 rows
    cids = ids(ledger)
    ledger = mark_sending(ledger, cids, batch_id="b1")
    responses = [
        {"code": 200, "body": '{"success": true}'},
        None,
        {"code": 400, "body": graph_error(613, 1487632)},
        {"code": 400, "body": graph_error(100)},
        {"code": 400, "body": graph_error(17, 2446079)},
    ]
    out = record_responses(ledger, cids, responses, now=NOW)
    got = {r["change_id"]: r for r in out.to_dicts()}
    assert [got[c]["status"] for c in cids] == ["applied", "sending", "failed", "failed", "planned"]
    assert [got[c]["response_code"] for c in cids] == [200, None, 400, 400, 400]
    assert got[cids[0]]["applied_at"] == NOW and got[cids[0]]["error"] is None
    assert all(got[c]["applied_at"] is None for c in cids[1:])
    assert "reconcile" in got[cids[1]]["error"]
    assert "budget_edits_per_hour" in got[cids[2]]["error"]
    assert got[cids[3]]["error"] == "100: error 100"
    # the throttled row goes out again; after max_attempts it stops
    again = mark_sending(out, cids[4:], batch_id="b2")
    final = record_responses(
        again, cids[4:], [{"code": 400, "body": graph_error(17)}], now=NOW, max_attempts=2
    )
    last = final.filter(pl.col("change_id") == cids[4]).row(0, named=True)
    assert last["status"] == "failed" and last["error"].startswith("gave up after 2 attempts")


def test_record_responses_refuses_rows_not_sending_and_misaligned_answers():
    ledger = new_ledger(make_plan(2))
    with pytest.raises(ValueError, match="sending"):
        record_responses(ledger, ids(ledger)[:1], [{"code": 200, "body": "{}"}], now=NOW)
    with pytest.raises(ValueError, match="one response"):
        record_responses(ledger, ids(ledger), [None], now=NOW)


def test_mark_skipped_names_the_rule():
    ledger = new_ledger(make_plan(2))
    out = mark_skipped(ledger, ids(ledger)[:1], rule="daily_cap")
    row = out.filter(pl.col("change_id") == ids(ledger)[0]).row(0, named=True)
    assert row["status"] == "skipped" and row["rule"].endswith("daily_cap")


def test_append_plan_is_idempotent_and_supersedes_unsent_rows():
    plan = make_plan(2)
    ledger = append_plan(new_ledger(plan.head(0)), plan)
    assert append_plan(ledger, plan).equals(ledger)  # same plan recomputed in the window
    sent = mark_sending(ledger, ids(ledger)[:1], batch_id="b")
    later = make_plan(2, now=NOW + timedelta(hours=2))
    merged = append_plan(sent, later)
    assert merged.height == ledger.height + later.height
    old = merged.filter(pl.col("change_id").is_in(ids(ledger)))
    statuses = status_of(old)
    assert statuses[ids(ledger)[0]] == "sending"  # in flight: left for reconcile
    for cid in ids(ledger)[1:]:
        assert statuses[cid] == "skipped"
    assert old.filter(pl.col("status") == "skipped")["rule"].str.contains(RULE_SUPERSEDED).all()


# ----------------------------------------------------------------------------- reconcile


@pytest.mark.parametrize(
    ("current", "expected", "error"),
    [
        ("1150", "applied", "found applied"),
        (" 1150 ", "applied", "found applied"),
        ("1000", "planned", "not applied"),
        ("777", "failed", "moved externally: current value 777"),
        (None, "sending", None),  # object not read: undecided, nothing re-sent
    ],
)
def test_reconcile_cases(current, expected, error):
    ledger = new_ledger(make_plan(2))
    target = ledger.filter(pl.col("object_id") == "100")["change_id"].to_list()
    rows = mark_sending(ledger, target, batch_id="b")
    values = [] if current is None else [{"id": "100", "daily_budget": current}]
    out = reconcile(rows, current_values_from_objects(values), now=NOW)
    row = out.filter(pl.col("object_id") == "100").row(0, named=True)
    assert row["status"] == expected
    assert (row["error"] is None) if error is None else (error in row["error"])
    assert (row["applied_at"] == NOW) == (expected == "applied")
    # rows that were not sending pass through untouched
    assert out.filter(pl.col("object_id") != "100").equals(
        rows.filter(pl.col("object_id") != "100")
    )


def test_reconcile_status_changes():
    ledger = new_ledger(make_plan(1))
    kill = ledger.filter(pl.col("field") == "status")["change_id"].to_list()
    rows = mark_sending(ledger, kill, batch_id="b")
    out = reconcile(rows, current_values_from_objects([{"id": "900", "status": "PAUSED"}]), now=NOW)
    assert out.filter(pl.col("change_id") == kill[0])["status"].item() == "applied"


class FakeGraph:
    """Objects' current values; counts every write per change so double applies show."""

    def __init__(self, ledger: pl.DataFrame) -> None:
        self.values = {(r["object_id"], r["field"]): r["old_value"] for r in ledger.to_dicts()}
        self.writes: dict[tuple[str, str, str], int] = {}

    def write(self, item: dict) -> None:
        ((field, (value,)),) = parse_qs(item["body"]).items()
        key = (item["relative_url"], field)
        self.values[key] = value
        self.writes[(*key, value)] = self.writes.get((*key, value), 0) + 1

    def read(self, rows: pl.DataFrame) -> pl.DataFrame:
        objs = {}
        for oid, fld in rows.select("object_id", "field").unique().rows():
            objs.setdefault(oid, {"id": oid})[fld] = self.values[(oid, fld)]
        return current_values_from_objects(objs.values())


@settings(PROPERTY, max_examples=40)
@given(st.integers(0, 2**32 - 1), st.integers(1, 130), st.integers(5, 50))
def test_crashes_between_send_and_record_never_apply_a_change_twice(seed, n, size):
    """Send in batches; the process dies at random points (server applied some or all items,
    nothing recorded) and items come back null; restart reconciles first, then re-sends."""
    rng = np.random.default_rng(seed)
    ledger = new_ledger(make_plan(n))
    graph = FakeGraph(ledger)
    moved = set()
    for _ in range(60):  # restarts
        stuck = ledger.filter(pl.col("status") == "sending")
        if stuck.height and rng.random() < 0.3:  # somebody edits an in-flight ad set meanwhile
            r = stuck.row(int(rng.integers(stuck.height)), named=True)
            if r["field"] == "daily_budget":
                graph.values[(r["object_id"], r["field"])] = "4242"
                moved.add(r["change_id"])
        if stuck.height:
            ledger = reconcile(ledger, graph.read(stuck), now=NOW)
        todo = ledger.filter(pl.col("status") == "planned")
        if todo.height == 0:
            break
        for chunk in batches(ids(todo), size):
            rows = todo.filter(pl.col("change_id").is_in(chunk))  # order kept
            ledger = mark_sending(ledger, chunk, batch_id=make_batch_id(chunk, NOW))
            crash = rng.random()
            responses = []
            for item in to_batch_items(rows):
                applied = rng.random() < 0.8
                if applied:
                    graph.write(item)
                # a null item may or may not have been applied before the timeout
                if applied and rng.random() < 0.85:
                    responses.append({"code": 200, "body": '{"success": true}'})
                else:
                    responses.append(None)
            if crash < 0.3:
                break  # died before recording: these rows stay 'sending'
            ledger = record_responses(ledger, chunk, responses, now=NOW)
    statuses = status_of(ledger)
    assert max(graph.writes.values(), default=0) <= 1
    assert set(statuses.values()) <= {"applied", "failed"}  # everything resolved
    for r in ledger.to_dicts():
        if r["change_id"] in moved:
            assert statuses[r["change_id"]] == "failed"
            assert "moved externally" in r["error"]
            assert graph.values[(r["object_id"], r["field"])] == "4242"  # never overwritten
        else:
            assert statuses[r["change_id"]] == "applied"
            assert graph.values[(r["object_id"], r["field"])] == r["new_value"]
