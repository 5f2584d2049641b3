"""Throw-away registry databases for tests and benchmarks.

A PostgreSQL one is created on the server of `server_url` under a fresh name and dropped (with
its connections) afterwards, so concurrent test sessions and benchmarks never see each other.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url


@contextmanager
def throwaway_postgres(server_url: str, prefix: str = "satrl_tmp") -> Iterator[str]:
    """The URL of a new, empty database on `server_url`'s server, dropped on exit."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            yield make_url(server_url).set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as connection:
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


@contextmanager
def throwaway_database(kind: str, server_url: str | None, folder: Path) -> Iterator[str]:
    """A new SQLite file in `folder` (kind "sqlite") or a throw-away PostgreSQL database."""
    if kind == "sqlite":
        yield f"sqlite:///{folder / f'{uuid.uuid4().hex}.db'}"
        return
    if not server_url:
        raise ValueError("a PostgreSQL server URL is needed for a postgresql database")
    with throwaway_postgres(server_url, prefix="satrl_bench") as url:
        yield url
