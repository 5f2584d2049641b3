"""`satrl db upgrade|current`: the registry's schema."""

from __future__ import annotations

import typer

from orchestrator.cli.app import app, console

db_app = typer.Typer(help="The registry database's schema (Alembic).", no_args_is_help=True)
app.add_typer(db_app, name="db")


@db_app.command("upgrade")
def upgrade() -> None:
    """Create or upgrade the registry schema to the newest revision."""
    from orchestrator.registry.db import current_revision, head_revision, open_registry

    registry = open_registry(upgrade=False)
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
    from orchestrator.registry.db import (
        current_revision,
        head_revision,
        known_revisions,
        open_registry,
        shown_url,
    )

    registry = open_registry(upgrade=False)
    revision = current_revision(registry.engine)
    if revision == head_revision():
        state = "up to date"
    elif revision is not None and revision not in known_revisions():
        state = "unknown to this satrl: a newer satrl made it; upgrade satrl"
    else:
        state = "needs `satrl db upgrade`"
    console.print(f"registry: {shown_url(registry.url)}", highlight=False, markup=False,
                  soft_wrap=True)
    console.print(f"revision: {revision or 'empty'} (head {head_revision()}, {state})",
                  highlight=False, markup=False, soft_wrap=True)
