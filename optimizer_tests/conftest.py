"""Shared fixtures. PostgreSQL tests skip with a reason unless OPTIMIZER_REQUIRE_POSTGRES=1."""

from __future__ import annotations

import os
import uuid

import pytest
from hypothesis import settings

from optimizer_tests.fixtures_sandbox import (  # noqa: F401  (fixtures for every module)
    sandbox,
    sandbox_accounts,
    sandbox_fresh,
    sandbox_session,
)

# CI runs the same examples every time (a failure found there reproduces); locally they vary
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

PG_HOST = os.environ.get("OPTIMIZER_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("OPTIMIZER_TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("OPTIMIZER_TEST_PG_USER", "postgres")


def _postgres_error() -> str | None:
    import psycopg2

    try:
        psycopg2.connect(
            host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres", connect_timeout=3
        ).close()
    except psycopg2.Error as exc:
        return str(exc).strip()
    return None


@pytest.fixture
def postgres_database():
    """A fresh, empty PostgreSQL database for one test (dropped afterwards)."""
    import psycopg2

    error = _postgres_error()
    if error:
        message = f"PostgreSQL at {PG_HOST}:{PG_PORT} is not reachable: {error}"
        if os.environ.get("OPTIMIZER_REQUIRE_POSTGRES") == "1":
            pytest.fail(message + " (OPTIMIZER_REQUIRE_POSTGRES=1)")
        pytest.skip(message)
    name = f"optimizer_test_{uuid.uuid4().hex[:12]}"
    admin = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres")
    admin.autocommit = True
    admin.cursor().execute(f'CREATE DATABASE "{name}"')
    try:
        yield {"hostname": PG_HOST, "port": PG_PORT, "username": PG_USER, "db_name": name}
    finally:
        admin.cursor().execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()
