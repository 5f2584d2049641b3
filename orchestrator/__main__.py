"""`python -m orchestrator` is `satrl`."""

from orchestrator.cli import main

main()
