"""`satrl sql`: plain SQL over the registry, in a transaction the database keeps read-only.

PostgreSQL runs the statement inside `SET TRANSACTION READ ONLY`, which refuses every write,
a data-modifying CTE included; SQLite runs it with `PRAGMA query_only=ON`. Either way the
transaction is rolled back afterwards, so nothing a statement does can persist.

Exactly one statement runs: a `COMMIT; DELETE ...` string would otherwise end the read-only
transaction and run the rest read-write. sqlite3 refuses several statements in one execute; on
PostgreSQL the statement is sent as a prepared statement, which the server refuses to hold more
than one command.
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
            connection = session.connection()
            if registry.is_sqlite:
                # Driver-level execution: no bind-parameter parsing, so `::text` casts work.
                result = connection.exec_driver_sql(sql)
                if not result.returns_rows:
                    return QueryResult([], [])
                columns = list(result.keys())
                rows = result.fetchmany(max_rows) if max_rows else result.fetchall()
                return QueryResult(columns, [tuple(row) for row in rows])
            cursor = connection.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
            try:
                cursor.execute(sql, prepare=True)
                if cursor.description is None:
                    return QueryResult([], [])
                columns = [column.name for column in cursor.description]
                rows = cursor.fetchmany(max_rows) if max_rows else cursor.fetchall()
                return QueryResult(columns, [tuple(row) for row in rows])
            finally:
                cursor.close()
    except Exception as error:  # noqa: BLE001 - any driver error is the statement's fault
        if not _is_database_error(error):
            raise
        message = str(getattr(error, "orig", None) or error).strip().splitlines()[0]
        raise UsageError(f"SQL refused: {message}") from None


def _is_database_error(error: Exception) -> bool:
    """SQLAlchemy's wrapped errors, and the DB-API errors of sqlite3 and psycopg raised raw."""
    import sqlite3

    import psycopg

    return isinstance(error, DBAPIError | StatementError | sqlite3.Error | psycopg.Error)
