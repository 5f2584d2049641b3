"""`satrl db upgrade|current`: the registry's schema."""

from __future__ import annotations

import typer

from orchestrator.cli.app import app, console

db_app = typer.Typer(help="The registry database's schema (Alembic).", no_args_is_help=True)
app.add_typer(db_app, name="db")


@db_app.command("upgrade")
def upgrade() -> None:
    """Create or upgrade the registry schema to the newest revision."""
    from orchestrator.registry.db import Registry, current_revision, head_revision
    from orchestrator.settings import settings

    registry = Registry(settings().database_url, upgrade=False)
    before = current_revision(registry.engine)
    from orchestrator.registry.db import ensure_schema

    ensure_schema(registry.engine)
    after = current_revision(registry.engine)
    if before == after:
        console.print(f"registry already at {after} (head {head_revision()})")
    else:
        console.print(f"registry upgraded from {before or 'empty'} to {after}")


@db_app.command("current")
def current() -> None:
    """Print the registry's schema revision, the newest one, and where the registry is."""
    from orchestrator.registry.db import Registry, current_revision, head_revision
    from orchestrator.settings import settings

    url = settings().database_url
    registry = Registry(url, upgrade=False)
    revision = current_revision(registry.engine)
    state = "up to date" if revision == head_revision() else "needs `satrl db upgrade`"
    from sqlalchemy.engine import make_url

    console.print(f"registry: {make_url(url).render_as_string(hide_password=True)}")
    console.print(f"revision: {revision or 'empty'} (head {head_revision()}, {state})")
