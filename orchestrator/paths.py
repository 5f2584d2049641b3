"""Where a run lives: its run directory on scratch and its folder in the store (ARCHITECTURE.md)."""

from __future__ import annotations

import re
from pathlib import Path

from agents.catalog import EXPERIMENT_NAME_PATTERN
from orchestrator.errors import UsageError


def check_experiment_name(name: str) -> str:
    """The name itself, or one clear error: it becomes a folder under scratch and the store."""
    if not re.fullmatch(EXPERIMENT_NAME_PATTERN, name):
        raise UsageError(f"experiment name {name!r} is not valid: use 1-64 letters, digits, "
                         "'_', '.' or '-', starting with a letter or digit")
    return name


def run_relpath(experiment: str, game: str, attn: str, seed: int) -> Path:
    """`<experiment>/<Game>/<TYPE>/<seed>`: the same below scratch and below the store."""
    return Path(check_experiment_name(experiment)) / game / attn / str(seed)


def run_dir(scratch: Path, experiment: str, game: str, attn: str, seed: int) -> Path:
    """The run directory the worker writes: `<scratch>/<experiment>/<Game>/<TYPE>/<seed>/`."""
    return scratch / run_relpath(experiment, game, attn, seed)


def store_dir(store: Path, experiment: str, game: str, attn: str, seed: int) -> Path:
    """Where a run's fetched results live: `<store>/<experiment>/<Game>/<TYPE>/<seed>/`."""
    return store / run_relpath(experiment, game, attn, seed)


def paper_checkpoint_name(game: str, attn: str, seed: int, steps: int) -> str:
    """The published checkpoint name, e.g. `Pong_CWCA_42_model_checkpoint_3000000_steps.zip`."""
    return f"{game}_{attn}_{seed}_model_checkpoint_{steps}_steps.zip"
