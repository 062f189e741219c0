"""The Dagster instance configuration: SQLite by default, PostgreSQL when DAGSTER_PG_* are set.

No Dagster import here: this only writes ``$DAGSTER_HOME/dagster.yaml`` from the checked-in
``dagster.yaml`` plus, when ``DAGSTER_PG_HOST`` is set, the dagster-postgres storage block.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
BASE_CONFIG = REPO_ROOT / "dagster.yaml"


def postgres_storage(env: Mapping[str, str] | None = None) -> dict | None:
    """The ``storage:`` block for dagster-postgres from DAGSTER_PG_* variables, or None.

    Values are written as ``{env: NAME}`` references so the password never lands in the file.
    """
    env = os.environ if env is None else env
    if not env.get("DAGSTER_PG_HOST"):
        return None
    db: dict = {
        "scheme": "postgresql+psycopg2",  # needed by dagster-postgres under SQLAlchemy 2.1
        "hostname": {"env": "DAGSTER_PG_HOST"},
        "db_name": {"env": "DAGSTER_PG_DB"} if env.get("DAGSTER_PG_DB") else "postgres",
        "username": {"env": "DAGSTER_PG_USER"} if env.get("DAGSTER_PG_USER") else "postgres",
        "port": {"env": "DAGSTER_PG_PORT"} if env.get("DAGSTER_PG_PORT") else 5432,
    }
    if env.get("DAGSTER_PG_PASSWORD"):
        db["password"] = {"env": "DAGSTER_PG_PASSWORD"}
    return {"postgres": {"postgres_db": db}}


def instance_config(env: Mapping[str, str] | None = None) -> dict:
    """The instance config: the checked-in dagster.yaml plus PostgreSQL storage when configured."""
    config = yaml.safe_load(BASE_CONFIG.read_text()) or {}
    storage = postgres_storage(env)
    if storage:
        config["storage"] = storage
    return config


def prepare_dagster_home(home: str | os.PathLike | None = None) -> Path:
    """Create DAGSTER_HOME (default ``.dagster_home``) and write its dagster.yaml."""
    path = Path(home or os.environ.get("DAGSTER_HOME") or REPO_ROOT / ".dagster_home").resolve()
    path.mkdir(parents=True, exist_ok=True)
    (path / "dagster.yaml").write_text(yaml.safe_dump(instance_config(), sort_keys=False))
    return path
