"""The DuckDB warehouse: one file, tables named after assets, polars frames in and out.

No Dagster here; `defs/resources.py` wraps it. Each call opens and closes its own connection so
separate runs never hold the file open between steps (runs that write share one Dagster pool).
Writes are idempotent: a partition or a key set is deleted, then inserted, in one transaction.

DuckDB lets one process at a time open a file for writing (and no reader while it does); a
process that is not a Dagster step (the webhook receiver sharing the file, a person's ``duckdb``
shell, a bench reading results) can hold it for a moment. ``connect`` therefore retries a lock
conflict with backoff for up to ``lock_wait_seconds`` (default ``LOCK_WAIT_SECONDS``) before
raising the ``duckdb.IOException``; pass 0 to fail at once (the receiver, which has its own
deadline).
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import duckdb
import polars as pl

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
LOCK_WAIT_SECONDS = 2.0  # how long connect() waits for another process's lock on the file
_LOCK_MESSAGE = "lock"  # DuckDB: 'Could not set lock on file ...: Conflicting lock is held'


def _ident(name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(f"not a valid table or column name: {name!r}")
    return f'"{name}"'


class Warehouse:
    """A DuckDB file holding the optimizer's tables (only hashed identifiers, never raw PII)."""

    def __init__(self, path: str | Path, lock_wait_seconds: float = LOCK_WAIT_SECONDS) -> None:
        self.path = Path(path)
        self.lock_wait_seconds = lock_wait_seconds

    def _open(self, read_only: bool) -> duckdb.DuckDBPyConnection:
        """``duckdb.connect``, retried while another process holds a conflicting file lock."""
        deadline = time.monotonic() + self.lock_wait_seconds
        delay = 0.02
        while True:
            try:
                return duckdb.connect(str(self.path), read_only=read_only)
            except duckdb.IOException as exc:
                if _LOCK_MESSAGE not in str(exc).lower() or time.monotonic() + delay > deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 0.25)

    @contextlib.contextmanager
    def connect(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if read_only and not self.path.exists():
            read_only = False
        con = self._open(read_only)
        con.execute("SET TimeZone = 'UTC'")  # timestamps come back as Datetime(tz="UTC")
        con.execute("SET enable_progress_bar = false")
        try:
            yield con
        finally:
            con.close()

    def tables(self) -> list[str]:
        with self.connect(read_only=True) as con:
            rows = con.execute("SELECT table_name FROM information_schema.tables").fetchall()
        return sorted(r[0] for r in rows)

    def has_table(self, table: str) -> bool:
        return table in self.tables()

    def read(
        self, table: str, where: str | None = None, params: Sequence | None = None
    ) -> pl.DataFrame:
        """The whole table (or the rows matching ``where``); an empty frame if it does not exist."""
        sql = f"SELECT * FROM {_ident(table)}" + (f" WHERE {where}" if where else "")
        try:  # one connection in the common case; the catalog is only asked on a miss
            return self.query(sql, params)
        except duckdb.CatalogException:
            if self.has_table(table):
                raise
            return pl.DataFrame()

    def query(self, sql: str, params: Sequence | None = None) -> pl.DataFrame:
        with self.connect(read_only=True) as con:
            return con.execute(sql, params or []).pl()

    def _ensure(self, con: duckdb.DuckDBPyConnection, table: str, df: pl.DataFrame) -> None:
        con.register("_incoming", df)
        con.execute(
            f"CREATE TABLE IF NOT EXISTS {_ident(table)} AS SELECT * FROM _incoming LIMIT 0"
        )
        existing = {r[0] for r in con.execute(f"DESCRIBE {_ident(table)}").fetchall()}
        for name, sql_type, *_ in con.execute("DESCRIBE _incoming").fetchall():
            if name not in existing:  # additive schema evolution: older rows get NULL
                con.execute(f"ALTER TABLE {_ident(table)} ADD COLUMN {_ident(name)} {sql_type}")

    def replace(self, table: str, df: pl.DataFrame) -> int:
        """Replace the whole table with ``df``."""
        with self.connect() as con:
            con.register("_incoming", df)
            con.execute(f"CREATE OR REPLACE TABLE {_ident(table)} AS SELECT * FROM _incoming")
        return df.height

    def replace_where(self, table: str, df: pl.DataFrame, column: str, values: Sequence) -> int:
        """Delete the rows whose ``column`` is in ``values`` (a partition), then insert ``df``."""
        with self.connect() as con:
            con.execute("BEGIN")
            self._ensure(con, table, df)
            if values:
                marks = ",".join("?" for _ in values)
                con.execute(
                    f"DELETE FROM {_ident(table)} WHERE {_ident(column)} IN ({marks})", list(values)
                )
            con.execute(f"INSERT INTO {_ident(table)} BY NAME SELECT * FROM _incoming")
            con.execute("COMMIT")
        return df.height

    def upsert(self, table: str, df: pl.DataFrame, keys: Sequence[str]) -> int:
        """Insert ``df``, replacing existing rows with the same key columns."""
        if df.is_empty() and self.has_table(table):
            return 0
        with self.connect() as con:
            con.execute("BEGIN")
            self._ensure(con, table, df)
            on = " AND ".join(f"t.{_ident(k)} = i.{_ident(k)}" for k in keys)
            con.execute(
                f"DELETE FROM {_ident(table)} t WHERE EXISTS (SELECT 1 FROM _incoming i WHERE {on})"
            )
            con.execute(f"INSERT INTO {_ident(table)} BY NAME SELECT * FROM _incoming")
            con.execute("COMMIT")
        return df.height

    def append_new(self, table: str, df: pl.DataFrame, keys: Sequence[str]) -> pl.DataFrame:
        """Insert only the rows whose key is not stored yet; return those rows (append-only log)."""
        df = df.unique(subset=list(keys), keep="first", maintain_order=True)
        with self.connect() as con:
            con.execute("BEGIN")
            self._ensure(con, table, df)
            on = " AND ".join(f"t.{_ident(k)} = i.{_ident(k)}" for k in keys)
            new = con.execute(
                f"SELECT i.* FROM _incoming i WHERE NOT EXISTS "
                f"(SELECT 1 FROM {_ident(table)} t WHERE {on})"
            ).pl()
            con.register("_new", new)
            con.execute(f"INSERT INTO {_ident(table)} BY NAME SELECT * FROM _new")
            con.execute("COMMIT")
        return new
