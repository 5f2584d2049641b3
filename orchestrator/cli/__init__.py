"""satrl's command line: `satrl COMMAND`. Each module below registers its commands on `app`."""

from orchestrator.cli import attention, db, fetch, report, study  # noqa: F401  (registers commands)
from orchestrator.cli.app import app, main, run

__all__ = ["app", "main", "run"]
