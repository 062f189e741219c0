"""A job runs on a PostgreSQL-backed Dagster instance and its run and materializations read back."""

from __future__ import annotations

import dagster as dg
import pytest

from optimizer_assets.instance import instance_config, postgres_storage


def test_postgres_block_only_when_configured():
    assert postgres_storage({}) is None
    block = postgres_storage({"DAGSTER_PG_HOST": "db", "DAGSTER_PG_PASSWORD": "s3cret"})
    db = block["postgres"]["postgres_db"]
    assert db["scheme"] == "postgresql+psycopg2"
    assert db["password"] == {"env": "DAGSTER_PG_PASSWORD"}  # the secret itself is never written
    assert "s3cret" not in str(
        instance_config({"DAGSTER_PG_HOST": "db", "DAGSTER_PG_PASSWORD": "s3cret"})
    )
    assert "storage" not in instance_config({})


@pytest.mark.postgres
def test_job_runs_on_postgres_instance(postgres_database):
    @dg.asset
    def numbers() -> dg.MaterializeResult:
        return dg.MaterializeResult(metadata={"row_count": 3})

    @dg.asset(deps=[numbers])
    def total() -> dg.MaterializeResult:
        return dg.MaterializeResult(metadata={"row_count": 1})

    storage = {"postgres": {"postgres_db": {"scheme": "postgresql+psycopg2", **postgres_database}}}
    with dg.instance_for_test(overrides={"storage": storage}) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        result = dg.materialize([numbers, total], instance=instance)
        assert result.success
        run = instance.get_run_by_id(result.run_id)
        assert run is not None and run.status == dg.DagsterRunStatus.SUCCESS
        event = instance.get_latest_materialization_event(dg.AssetKey("numbers"))
        assert event.asset_materialization.metadata["row_count"].value == 3

    # a second instance on the same database sees the same history
    with dg.instance_for_test(overrides={"storage": storage}) as again:
        assert again.get_run_by_id(result.run_id).status == dg.DagsterRunStatus.SUCCESS
