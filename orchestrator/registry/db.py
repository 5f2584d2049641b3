"""Engines, sessions and the schema's first-use upgrade.

Several satrl processes may share one registry (a watch loop, a fetch, a queue). SQLite runs in WAL
mode with a busy timeout, and writers take the write lock at BEGIN (`BEGIN IMMEDIATE`) so that two
writers queue up instead of failing on lock upgrade. The schema is created or upgraded by Alembic
on first use, under a lock (a file lock beside the SQLite file, an advisory lock on PostgreSQL).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    NoSuchModuleError,
    OperationalError,
    SQLAlchemyError,
)
from sqlalchemy.orm import Session

from orchestrator.errors import SatrlError, UsageError

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"
#: Arbitrary constant naming satrl's migration lock among PostgreSQL advisory locks.
PG_MIGRATION_LOCK = 0x5A7A1


#: The databases the registry's schema and queries are written for.
BACKENDS = ("sqlite", "postgresql")
_URL_SOURCES = "SATRL_DATABASE_URL or satrl.toml [registry] url"


def shown_url(url: str) -> str:
    """`url` as messages show it: the password hidden."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return url if "@" not in url else "(a URL that does not parse)"


def check_database_url(url: str) -> URL:
    """`url` parsed, or a UsageError saying how to fix it (a typo must not be a traceback)."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number
        # Unparsed, a password cannot be told from the rest: show the URL only without one.
        shown = f" {url}" if "@" not in url else ""
        raise UsageError(f"the registry URL{shown} ({_URL_SOURCES}) is not a database URL: "
                         "give sqlite:///PATH or postgresql://USER@HOST/DB") from None
    backend = parsed.get_backend_name()
    if backend not in BACKENDS:
        raise UsageError(f"the registry URL {shown_url(url)} names {backend!r}: satrl's registry "
                         "runs on SQLite (sqlite:///PATH) or PostgreSQL (postgresql://...)")
    return parsed


def is_in_memory(url: URL) -> bool:
    """An SQLite database that lives in one connection's memory (sqlite://, :memory:)."""
    database = url.database or ""
    return url.get_backend_name() == "sqlite" and (
        database in ("", ":memory:") or url.query.get("mode") == "memory")


def make_engine(url: str) -> Engine:
    """An engine for `url` with satrl's SQLite settings (WAL, busy timeout, IMMEDIATE writers)."""
    parsed = check_database_url(url)
    try:
        if parsed.get_backend_name() == "sqlite":
            database = parsed.database
            # `sqlite:///file:/path?uri=true` (the way to open a registry read-only or
            # immutable) names a URI, not a folder to make in the current one.
            if database and database != ":memory:" and not database.startswith("file:"):
                try:
                    Path(database).parent.mkdir(parents=True, exist_ok=True)
                except OSError as error:
                    raise SatrlError(f"cannot create the registry's folder for {database}: "
                                     f"{error.strerror}") from None
            engine = create_engine(url, connect_args={"timeout": 60})
            _configure_sqlite(engine)
            return engine
        return create_engine(url, pool_pre_ping=True)
    except (NoSuchModuleError, ImportError) as error:
        # A driver named in the URL (postgresql+psycopg2://) that is not installed.
        raise UsageError(f"cannot use the registry at {shown_url(url)}: its driver is not "
                         f"installed ({error}); plain postgresql:// uses psycopg 3") from None


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the sqlite3 module, emit BEGIN (so it can be IMMEDIATE).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA busy_timeout=60000")
        _enable_wal(cursor)
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        options = connection.get_execution_options()
        if options.get("satrl_read_only"):
            connection.exec_driver_sql("PRAGMA query_only=ON")
            connection.exec_driver_sql("BEGIN")
        elif options.get("satrl_write"):
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            connection.exec_driver_sql("BEGIN")


def _enable_wal(cursor: Any) -> None:
    """Switch a database file to WAL once (the mode is stored in the file).

    Two processes opening a fresh file together both try the switch, and SQLite answers the
    loser "database is locked" at once, without waiting for the busy timeout: retry briefly.
    """
    import sqlite3
    import time

    deadline = time.monotonic() + 60
    while True:
        try:
            if cursor.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


class Registry:
    """One registry database: its engine, and sessions for reading and writing."""

    def __init__(self, url: str, *, upgrade: bool = True) -> None:
        self.url = url
        self.engine = make_engine(url)
        self.is_sqlite = self.engine.dialect.name == "sqlite"
        check_connection(self.engine)
        if upgrade:
            ensure_schema(self.engine)

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """A read session; rolled back at the end (use `write()` to change anything)."""
        with Session(self.engine) as session:
            try:
                yield session
            finally:
                session.rollback()

    @contextlib.contextmanager
    def write(self) -> Iterator[Session]:
        """A write transaction: committed at the end, rolled back on any error."""
        bind = self.engine.execution_options(satrl_write=True)
        with Session(bind, expire_on_commit=False) as session, session.begin():
            yield session

    @contextlib.contextmanager
    def read_only(self) -> Iterator[Session]:
        """A transaction in which the database itself refuses every change; always rolled back."""
        bind = self.engine.execution_options(satrl_read_only=True)
        with Session(bind) as session:
            try:
                if not self.is_sqlite:
                    session.execute(text("SET TRANSACTION READ ONLY"))
                yield session
            finally:
                session.rollback()
                if self.is_sqlite:
                    session.connection().exec_driver_sql("PRAGMA query_only=OFF")
                    session.commit()

    def insert_ignoring_conflicts(self, session: Session, model: Any, rows: list[dict[str, Any]],
                                  key: list[str], returning: Any) -> list[Any]:
        """INSERT ... ON CONFLICT (key) DO NOTHING RETURNING: the values of the rows added.

        Idempotent and race-free on both dialects: rows another transaction added first are
        skipped (PostgreSQL waits for that transaction), never duplicated or failed on.
        """
        if not rows:
            return []
        if self.is_sqlite:
            from sqlalchemy.dialects.sqlite import insert
        else:
            from sqlalchemy.dialects.postgresql import insert
        statement = insert(model).on_conflict_do_nothing(index_elements=key).returning(returning)
        return list(session.scalars(statement, rows))

    def dispose(self) -> None:
        self.engine.dispose()


def check_connection(engine: Engine) -> None:
    """Connect once: a server that does not answer, or a file that is no SQLite database,
    becomes one line naming the registry (the connection stays in the pool for the command)."""
    try:
        with engine.connect():
            pass
    except DBAPIError as error:
        reason = str(error.orig or error).strip().splitlines()
        raise SatrlError(f"cannot use the registry at "
                         f"{engine.url.render_as_string(hide_password=True)}: "
                         f"{reason[0] if reason else type(error.orig).__name__}") from None


def alembic_config(connection: Any = None, url: str | None = None) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


@cache
def head_revision() -> str:
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise SatrlError(f"no Alembic revisions in {MIGRATIONS_DIR}")
    return head


@cache
def known_revisions() -> frozenset[str]:
    """Every schema revision this satrl's migrations hold."""
    from alembic.script import ScriptDirectory

    return frozenset(script.revision for script in
                     ScriptDirectory.from_config(alembic_config()).walk_revisions())


def check_known_revision(engine: Engine, revision: str | None) -> None:
    """Refuse a registry whose schema a newer satrl wrote: Alembic could neither upgrade nor
    read it, and this satrl's queries would not match its tables."""
    if revision is not None and revision not in known_revisions():
        raise SatrlError(f"the registry at {engine.url.render_as_string(hide_password=True)} is "
                         f"at schema revision {revision}, which this satrl does not know: a "
                         "newer satrl made it; upgrade satrl to use it")


def current_revision(engine: Engine) -> str | None:
    """The schema revision the database is at (None for an empty database)."""
    with engine.connect() as connection:
        try:
            row = connection.execute(text("SELECT version_num FROM alembic_version")).first()
        except (OperationalError, SQLAlchemyError):
            return None
        return row[0] if row else None


def ensure_schema(engine: Engine) -> bool:
    """Create or upgrade the schema to head; safe when several processes start at once.

    Returns whether an upgrade ran. The common case, a database at head, costs one query.
    """
    revision = current_revision(engine)
    if revision == head_revision():
        return False
    check_known_revision(engine, revision)
    with _migration_lock(engine):
        revision = current_revision(engine)
        if revision == head_revision():
            return False
        check_known_revision(engine, revision)
        upgrade(engine, "head")
        return True


def upgrade(engine: Engine, target: str = "head") -> None:
    from alembic import command

    # A writer from BEGIN on (IMMEDIATE on SQLite): a deferred transaction that reads and then
    # writes can be refused at once when another connection is mid-commit.
    with engine.execution_options(satrl_write=True).begin() as connection:
        command.upgrade(alembic_config(connection), target)


def downgrade(engine: Engine, target: str = "base") -> None:
    from alembic import command

    with engine.begin() as connection:
        command.downgrade(alembic_config(connection), target)


@contextlib.contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    if engine.dialect.name == "sqlite":
        from filelock import FileLock

        database = engine.url.database
        if not database or database == ":memory:":
            yield
            return
        with FileLock(f"{database}.migrate.lock", timeout=120):
            yield
        return
    with engine.connect() as connection:
        connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": PG_MIGRATION_LOCK})
        connection.commit()
        try:
            yield
        finally:
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": PG_MIGRATION_LOCK})
            connection.commit()


def open_registry(url: str | None = None, *, upgrade: bool = True) -> Registry:
    """The registry of the current workspace (or of `url`), upgraded to head."""
    if url is None:
        from orchestrator.settings import settings

        url = settings().database_url
    if is_in_memory(check_database_url(url)):
        # Each command is its own process: an in-memory registry would forget every change.
        raise UsageError(f"the registry URL {shown_url(url)} is an in-memory database, so "
                         "nothing would persist: give a file (sqlite:///PATH) or a PostgreSQL "
                         "URL")
    return Registry(url, upgrade=upgrade)
