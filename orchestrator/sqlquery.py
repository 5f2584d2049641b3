"""`satrl sql`: plain SQL over the registry, in a transaction the database keeps read-only.

PostgreSQL runs the statement inside `SET TRANSACTION READ ONLY`, which refuses every write,
a data-modifying CTE included; SQLite runs it with `PRAGMA query_only=ON`. Either way the
transaction is rolled back afterwards, so nothing a statement does can persist.

Exactly one statement runs: a `COMMIT; DELETE ...` string would otherwise end the read-only
transaction and run the rest read-write. sqlite3 refuses several statements in one execute; on
PostgreSQL the statement is sent as a prepared statement, which the server refuses to hold more
than one command.

A read-only transaction still lets a few statements write files outside the registry: SQLite's
ATTACH creates the database file it names, and PostgreSQL's COPY ... TO 'file' (also from inside
a DO block) writes one on the server. Those statements are refused by their first keyword, and
on SQLite an authorizer denies ATTACH and DETACH wherever they appear.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import DBAPIError, StatementError

from orchestrator.errors import UsageError
from orchestrator.registry.db import Registry

#: Statements that reach beyond the registry's tables, which a read-only transaction allows.
REFUSED_STATEMENTS = ("ATTACH", "DETACH", "VACUUM", "COPY", "DO")


@dataclass(frozen=True)
class QueryResult:
    columns: list[str]
    rows: list[tuple[Any, ...]]


def run_readonly_sql(registry: Registry, sql: str, *, max_rows: int | None = None) -> QueryResult:
    """Execute one statement read-only; a write or an SQL error is one clear UsageError."""
    if not sql.strip():
        raise UsageError("no SQL statement given")
    keyword = first_keyword(sql)
    if keyword in REFUSED_STATEMENTS:
        raise UsageError(f"SQL refused: {keyword} is not allowed; `satrl sql` only reads the "
                         "registry (and writes no files)")
    try:
        with registry.read_only() as session:
            connection = session.connection()
            if registry.is_sqlite:
                raw = connection.connection.dbapi_connection
                raw.set_authorizer(_sqlite_authorizer)  # type: ignore[union-attr]
                try:
                    # Driver-level execution: no bind-parameter parsing, so `::text` casts work.
                    result = connection.exec_driver_sql(sql)
                    if not result.returns_rows:
                        return QueryResult([], [])
                    columns = list(result.keys())
                    rows = result.fetchmany(max_rows) if max_rows else result.fetchall()
                    return QueryResult(columns, [tuple(row) for row in rows])
                finally:
                    # The connection goes back to the pool: satrl's own statements on it
                    # later must not meet this authorizer.
                    raw.set_authorizer(None)  # type: ignore[union-attr]
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


def first_keyword(sql: str) -> str:
    """The statement's first word, upper-cased, past blanks, comments, parentheses and empty
    statements (`; COPY ...` is one COPY to PostgreSQL, which drops the empty one before it).

    Block comments nest (as PostgreSQL reads them): `/* /* */ */ COPY` starts with COPY.
    """
    at = 0
    while at < len(sql):
        if sql[at].isspace() or sql[at] in "(;":
            at += 1
        elif sql.startswith("--", at):
            end = sql.find("\n", at)
            at = len(sql) if end < 0 else end + 1
        elif sql.startswith("/*", at):
            depth, at = 1, at + 2
            while at < len(sql) and depth:
                if sql.startswith("/*", at):
                    depth, at = depth + 1, at + 2
                elif sql.startswith("*/", at):
                    depth, at = depth - 1, at + 2
                else:
                    at += 1
        else:
            break
    match = re.match(r"[A-Za-z_]+", sql[at:])
    return match.group(0).upper() if match else ""


def _sqlite_authorizer(action: int, *_args: Any) -> int:
    """Deny ATTACH (it creates the file it names, read-only or not) and DETACH."""
    import sqlite3

    denied = (sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH)
    return sqlite3.SQLITE_DENY if action in denied else sqlite3.SQLITE_OK


def _is_database_error(error: Exception) -> bool:
    """SQLAlchemy's wrapped errors, and the DB-API errors of sqlite3 and psycopg raised raw."""
    import sqlite3

    import psycopg

    return isinstance(error, DBAPIError | StatementError | sqlite3.Error | psycopg.Error)
