"""`satrl sql`: plain SQL over the registry, in a transaction the database keeps read-only.

PostgreSQL runs the statement inside `SET TRANSACTION READ ONLY`, which refuses every write,
a data-modifying CTE included; SQLite runs it with `PRAGMA query_only=ON`. Either way the
transaction is rolled back afterwards, so nothing a statement does can persist.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import DBAPIError, StatementError

from orchestrator.errors import UsageError
from orchestrator.registry.db import Registry


@dataclass(frozen=True)
class QueryResult:
    columns: list[str]
    rows: list[tuple[Any, ...]]


def run_readonly_sql(registry: Registry, sql: str, *, max_rows: int | None = None) -> QueryResult:
    """Execute one statement read-only; a write or an SQL error is one clear UsageError."""
    if not sql.strip():
        raise UsageError("no SQL statement given")
    try:
        with registry.read_only() as session:
            # Driver-level execution: no bind-parameter parsing, so `::text` casts work.
            result = session.connection().exec_driver_sql(sql)
            if not result.returns_rows:
                return QueryResult([], [])
            columns = list(result.keys())
            rows = [tuple(row) for row in (result.fetchmany(max_rows) if max_rows
                                           else result.fetchall())]
            return QueryResult(columns, rows)
    except (DBAPIError, StatementError) as error:
        message = str(getattr(error, "orig", None) or error).strip().splitlines()[0]
        raise UsageError(f"SQL refused: {message}") from None
