"""Async insights report runs against the sandbox over loopback HTTP: the rows equal the
synchronous path's; slow, failed and skipped jobs; faults while polling; the ingestion asset.

The sandbox completes every report run at once. Slow, failed and skipped jobs are scripted by
`ScriptedPolls`, a transport adapter that lets every request reach the sandbox and only rewrites
the `async_status` of poll answers while its script lasts. Waiting runs on a fake clock.
"""

from __future__ import annotations

import datetime as dt
import json
import random
from collections.abc import Iterable
from urllib.parse import urlsplit

import dagster as dg
import polars as pl
import pytest
import requests
from polars.testing import assert_frame_equal
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict

from optimizer_assets.clients import GraphAPIError, GraphClient, RetryPolicy
from optimizer_assets.clients.graph import (
    ReportRunError,
    ReportRunPolicy,
    ReportRunStatus,
    ReportRunTimeoutError,
)
from optimizer_assets.defs.ingestion import INSIGHTS_REPORT_RUN_AFTER_DAYS, ingestion_assets
from optimizer_assets.defs.resources import WarehouseResource
from optimizer_assets.sandbox.server import Faults, SandboxServer
from optimizer_assets.sandbox.world import META_TOKEN
from optimizer_assets.warehouse import Warehouse
from optimizer_tests.fake_clock import FakeClock
from optimizer_tests.fixtures_sandbox import point_optimizer_at, sandbox_world

INSIGHTS = [a for a in ingestion_assets if a.key.path[0] == "meta_ad_insights"]
KEYS = ["date_start", "ad_id"]


class ScriptedPolls(HTTPAdapter):
    """Sends every request to the sandbox; answers to polls of the report runs this client
    started (`GET /vXX/<report_run_id>`) get the next scripted (async_status, percent) while the
    script lasts, and an `x-fb-trace-id` header. Polls numbered in `answer_429` are answered
    429 with `Retry-After: 7` without reaching the sandbox."""

    def __init__(
        self, script: Iterable[tuple[str, int]] = (), *, answer_429: Iterable[int] = ()
    ) -> None:
        super().__init__(max_retries=0)
        self.script = iter(script)
        self.answer_429 = set(answer_429)
        self.runs: list[str] = []
        self.polls = 0

    def send(self, request, **kwargs):  # noqa: ANN001, ANN201 - requests' adapter signature
        segs = urlsplit(request.url).path.strip("/").split("/")
        is_poll = request.method == "GET" and len(segs) == 2 and segs[1] in self.runs
        if is_poll:
            self.polls += 1
            if self.polls in self.answer_429:
                return _answer(request, 429, {"error": {"message": "slow down"}}, retry_after="7")
        response = super().send(request, **kwargs)
        if request.method == "POST" and segs[-1] == "insights" and response.status_code == 200:
            self.runs.append(str(response.json()["report_run_id"]))
        if is_poll and response.status_code == 200:
            step = next(self.script, None)
            if step is not None:
                body = {**response.json(), "async_status": step[0]}
                body["async_percent_completion"] = step[1]
                response._content = json.dumps(body).encode()
            response.headers["x-fb-trace-id"] = f"trace-poll-{self.polls}"
        return response


def _answer(request, status: int, body: dict, *, retry_after: str) -> requests.Response:
    response = requests.Response()
    response.status_code = status
    response._content = json.dumps(body).encode()
    response.headers = CaseInsensitiveDict(
        {"Content-Type": "application/json", "Retry-After": retry_after}
    )
    response.url, response.request, response.reason = request.url, request, "Too Many Requests"
    return response


def graph(
    server: SandboxServer,
    clock: FakeClock,
    polls: ScriptedPolls | None = None,
    report_runs: ReportRunPolicy | None = None,
    **kwargs,
) -> GraphClient:
    client = GraphClient(
        META_TOKEN,
        base_url=server.base_url,
        retry=RetryPolicy(max_attempts=10, max_total_wait_s=7200.0),
        rng=random.Random(5),
        sleep=clock.sleep,
        clock=clock,
        timeout=(2.0, 10.0),
        report_runs=report_runs or ReportRunPolicy(first_poll_s=1.0, factor=2.0, max_poll_s=5.0),
        **kwargs,
    )
    if polls is not None:
        client.session.mount(server.base_url + "/", polls)
    return client


def world_range(server: SandboxServer) -> tuple[list[str], dt.date, dt.date]:
    with server.lock:
        accounts = server.world.accounts()["account_id"].to_list()
        start = server.world.config.start.date()
        last = server.world.now.date() - dt.timedelta(days=1)
    return accounts, start, last


def calls(client: GraphClient) -> list[tuple[str, str, int | None]]:
    return [(r.method, r.path, r.status) for r in client.request_log]


def test_report_run_rows_equal_sync_rows(sandbox) -> None:
    accounts, since, until = world_range(sandbox)
    assert (until - since).days + 1 > 7
    for acct in accounts:
        client = graph(sandbox, FakeClock())
        sync = client.insights(acct, since, until, limit=40)  # default: synchronous
        assert all(path.endswith(f"act_{acct}/insights") for _, path, _ in calls(client))
        client.request_log.clear()
        via_run = client.insights(acct, since, until, limit=40, report_run=True)
        assert sync.height > 100 and sync.schema == via_run.schema
        assert_frame_equal(via_run.sort(KEYS), sync.sort(KEYS))
        log = calls(client)
        run_id = log[1][1].rsplit("/", 1)[1]
        assert log[0] == ("POST", f"/v24.0/act_{acct}/insights", 200)
        assert run_id.isdigit() and log[1] == ("GET", f"/v24.0/{run_id}", 200)  # done at once
        pages = log[2:]
        assert len(pages) == -(-sync.height // 40)  # cursor-paged at the requested limit
        assert all(p == ("GET", f"/v24.0/{run_id}/insights", 200) for p in pages)


def test_auto_threshold_picks_the_path_by_range_length(sandbox) -> None:
    accounts, since, until = world_range(sandbox)
    client = graph(sandbox, FakeClock(), report_run_after_days=7)
    short = client.insights(accounts[0], until - dt.timedelta(days=6), until)  # 7 days
    assert "POST" not in {m for m, _, _ in calls(client)}
    client.request_log.clear()
    long = client.insights(accounts[0], since, until)  # more than 7 days
    assert calls(client)[0][0] == "POST"
    assert_frame_equal(
        long.filter(pl.col("date_start") >= until - dt.timedelta(days=6)).sort(KEYS),
        short.sort(KEYS),
    )


def test_slow_job_is_polled_with_backoff_until_completed(sandbox) -> None:
    accounts, since, until = world_range(sandbox)
    acct = accounts[1]
    script = [("Job Not Started", 0), ("Job Started", 0), ("Job Running", 40)]
    script += [("Job Running", 100)] * 2  # 100 % is not done until the status says so
    polls, clock = ScriptedPolls(script), FakeClock()
    client = graph(sandbox, clock, polls)
    heard: list[ReportRunStatus] = []
    frame = client.insights(acct, since, until, report_run=True, on_progress=heard.append)
    assert polls.polls == len(script) + 1
    assert clock.sleeps == [1.0, 2.0, 4.0, 5.0, 5.0]  # growing delay, capped at max_poll_s
    assert [(s.async_status, s.percent_completion) for s in heard] == [
        ("Job Not Started", 0),
        ("Job Started", 0),
        ("Job Running", 40),
        ("Job Running", 100),
        ("Job Completed", 100),
    ]  # each change once
    log = calls(client)
    last_poll = max(i for i, (_, p, _) in enumerate(log) if p == f"/v24.0/{polls.runs[0]}")
    first_page = min(i for i, (_, p, _) in enumerate(log) if p.endswith("/insights") and i > 0)
    assert first_page > last_poll  # rows were read only after "Job Completed"
    assert_frame_equal(frame.sort(KEYS), client.insights(acct, since, until).sort(KEYS))


@pytest.mark.parametrize("ending", ["Job Failed", "Job Skipped"])
def test_failed_or_skipped_job_raises_a_clear_error(sandbox, ending: str) -> None:
    accounts, since, until = world_range(sandbox)
    polls = ScriptedPolls([("Job Running", 30), (ending, 30)])
    client = graph(sandbox, FakeClock(), polls)
    with pytest.raises(ReportRunError) as info:
        client.insights(accounts[0], since, until, report_run=True)
    err = info.value
    assert isinstance(err, GraphAPIError) and not isinstance(err, ReportRunTimeoutError)
    assert err.async_status == ending and err.percent_completion == 30
    assert err.report_run_id == polls.runs[0]
    assert err.trace_id == err.fbtrace_id == "trace-poll-2"  # the failing poll's trace id
    text = str(err)
    assert ending in text and polls.runs[0] in text and "trace_id=trace-poll-2" in text
    assert f"{since}..{until}" in text
    assert META_TOKEN not in text and META_TOKEN not in repr(err.__dict__)
    assert not any(p.endswith(f"{polls.runs[0]}/insights") for _, p, _ in calls(client))


def test_poll_timeout_raises_and_the_run_can_be_picked_up_again(sandbox) -> None:
    accounts, since, until = world_range(sandbox)
    polls, clock = ScriptedPolls([("Job Running", 50)] * 12), FakeClock()
    policy = ReportRunPolicy(first_poll_s=2.0, factor=2.0, max_poll_s=10.0, timeout_s=60.0)
    client = graph(sandbox, clock, polls, report_runs=policy)
    with pytest.raises(ReportRunTimeoutError) as info:
        client.insights(accounts[0], since, until, report_run=True)
    err = info.value
    assert err.async_status == "Job Running" and err.percent_completion == 50
    assert "not completed within 60 s" in str(err) and err.report_run_id == polls.runs[0]
    assert sum(clock.sleeps) == pytest.approx(60.0) and polls.polls == len(clock.sleeps) + 1
    # the run id is enough to wait on and read the run later
    client.report_runs = ReportRunPolicy(first_poll_s=1.0, max_poll_s=1.0, timeout_s=600.0)
    done = client.wait_report_run(err.report_run_id, account_id=accounts[0])
    assert done.async_status == "Job Completed" and polls.polls == 13
    rows = list(client.report_run_rows(err.report_run_id, account_id=accounts[0]))
    assert len(rows) == client.insights(accounts[0], since, until).height


def test_429_5xx_and_throttles_while_polling_still_give_the_right_rows(sandbox_fresh) -> None:
    server = sandbox_fresh
    accounts, since, until = world_range(server)
    acct = accounts[0]
    truth = graph(server, FakeClock()).insights(acct, since, until)
    server.set_faults(Faults(rate_5xx=0.25, rate_throttle=0.2, seed=11))
    polls, clock = (
        ScriptedPolls([("Job Running", p) for p in (5, 20, 60, 90)], answer_429={2}),
        FakeClock(),
    )
    client = graph(server, clock, polls)
    frame = client.insights(acct, since, until, report_run=True, limit=50)
    assert_frame_equal(frame.sort(KEYS), truth.sort(KEYS))
    poll_path = f"/v24.0/{polls.runs[-1]}"
    log = list(client.request_log)
    statuses = [r.status for r in log if r.path == poll_path]
    # the polls themselves met a 429, 5xx answers and a throttle (400, usage headers at 100 %)
    assert 429 in statuses and 400 in statuses and any(s >= 500 for s in statuses)
    assert statuses[-1] == 200 and statuses.count(200) == 5  # 4 scripted + "Job Completed"
    for i, record in enumerate(log[:-1]):  # every block was waited out before the next call
        if record.status == 429:
            assert log[i + 1].at - record.at >= 7.0
        elif record.status == 400:  # throttle answer with usage headers at 100 %
            assert log[i + 1].at - record.at >= client.usage_pause_s - 1e-6


def _materialize(resources, **kwargs) -> dict:
    result = dg.materialize(
        INSIGHTS, resources=resources, instance=dg.DagsterInstance.ephemeral(), **kwargs
    )
    assert result.success
    events = result.get_asset_materialization_events()  # one per partition, same metadata
    return {k: v.value for k, v in events[0].materialization.metadata.items()}


def test_asset_range_past_threshold_uses_report_runs_and_replaces_only_its_days(
    tmp_path, monkeypatch
) -> None:
    with SandboxServer(world=sandbox_world()) as server:
        resources = point_optimizer_at(server, tmp_path, monkeypatch)
        accounts, start, last = world_range(server)
        days = [start + dt.timedelta(days=i) for i in range((last - start).days + 1)]
        first, end = days[1], days[-1]
        assert len(days) - 1 > INSIGHTS_REPORT_RUN_AFTER_DAYS
        tags = {
            "dagster/asset_partition_range_start": first.isoformat(),
            "dagster/asset_partition_range_end": end.isoformat(),
        }
        stored = {}
        for name, report_run_after_days in (("runs", INSIGHTS_REPORT_RUN_AFTER_DAYS), ("sync", 60)):
            path = tmp_path / f"{name}.duckdb"
            res = {**resources, "warehouse": WarehouseResource(path=str(path))}
            for day in (days[0], days[3]):  # one day outside the range, one inside
                _materialize(res, partition_key=day.isoformat())
            config = {"report_run_after_days": report_run_after_days}
            meta = _materialize(
                res, tags=tags, run_config={"ops": {"meta_ad_insights": {"config": config}}}
            )
            assert meta["days"] == len(days) - 1
            assert meta["report_runs"] == (len(accounts) if name == "runs" else 0)
            with server.lock:  # the sandbox saw one report run per account, over the range
                runs = list(server.state.report_runs.values())
            assert sorted(r["account_id"] for r in runs) == sorted(accounts)
            assert {(r["since"], r["until"]) for r in runs} == {(str(first), str(end))}
            stored[name] = Warehouse(path).read("meta_ad_insights").sort("date", "ad_id")
    runs, sync = stored["runs"], stored["sync"]
    assert runs.height > 0 and runs.equals(sync)
    assert set(runs["date"]) == set(days)  # the day outside the range was kept
    assert runs.select("date", "ad_id").is_unique().all()  # the day inside was replaced once


def test_sandbox_slow_and_failed_report_runs(sandbox) -> None:
    """The sandbox's own report-run faults (no scripted transport): a job that stays running
    for a few polls is waited out and read after it completes; a failed job raises."""
    accounts, since, until = world_range(sandbox)
    expected = graph(sandbox, FakeClock()).insights(accounts[0], since, until)
    try:
        sandbox.set_faults(Faults(report_run_polls=3))
        clock = FakeClock()
        heard: list[ReportRunStatus] = []
        client = graph(sandbox, clock)
        frame = client.insights(
            accounts[0], since, until, report_run=True, on_progress=heard.append
        )
        assert_frame_equal(frame.sort(KEYS), expected.sort(KEYS))
        assert [s.async_status for s in heard] == ["Job Running"] * 3 + ["Job Completed"]
        assert [s.percent_completion for s in heard][:3] == [33, 67, 100]
        assert clock.sleeps == [1.0, 2.0, 4.0]

        sandbox.set_faults(Faults(rate_report_failed=1.0))
        with pytest.raises(ReportRunError, match="Job Failed") as failed:
            graph(sandbox, FakeClock()).insights(accounts[0], since, until, report_run=True)
        assert META_TOKEN not in str(failed.value)
    finally:
        sandbox.set_faults(Faults())


def test_sandbox_refuses_results_of_an_unfinished_report_run(sandbox, sandbox_session) -> None:
    accounts, since, until = world_range(sandbox)
    base = f"{sandbox.base_url}/v24.0"
    params = {"level": "ad", "time_increment": 1, "fields": "ad_id,spend"}
    params["time_range"] = json.dumps({"since": since.isoformat(), "until": until.isoformat()})
    try:
        sandbox.set_faults(Faults(report_run_polls=1))
        run = sandbox_session.post(f"{base}/act_{accounts[0]}/insights", data=params).json()
        early = sandbox_session.get(f"{base}/{run['report_run_id']}/insights")
        assert early.status_code == 400 and "not completed" in early.json()["error"]["message"]
        assert sandbox_session.get(f"{base}/{run['report_run_id']}").json()["async_status"] == (
            "Job Running"
        )
        assert sandbox_session.get(f"{base}/{run['report_run_id']}/insights").status_code == 200
    finally:
        sandbox.set_faults(Faults())
