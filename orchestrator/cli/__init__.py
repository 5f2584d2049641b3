"""satrl's command line: `satrl COMMAND`. Each module below registers its commands on `app`."""

from orchestrator.cli import (  # noqa: F401  (registers commands)
    attention,
    db,
    dispatch,
    fetch,
    image,
    report,
    study,
)
from orchestrator.cli.app import app, main, run

__all__ = ["app", "main", "run"]
