"""Random and human reference scores (the standard Atari-57 table) and human normalisation."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from functools import cache
from importlib import resources

import numpy as np

from orchestrator.errors import UsageError

#: VideoPinball's random score: the study used 0.0, the standard table 16256.9.
VIDEOPINBALL_CONVENTIONS = ("paper", "standard")


@dataclass(frozen=True)
class Reference:
    """Random and human score of one game."""

    random: float
    human: float


@cache
def _standard_table() -> dict[str, Reference]:
    text = (resources.files("orchestrator.analysis") / "data" /
            "atari_random_human_scores.csv").read_text()
    return {row["game"]: Reference(float(row["random"]), float(row["human"]))
            for row in csv.DictReader(io.StringIO(text))}


def reference_scores(videopinball_random: str = "paper") -> dict[str, Reference]:
    """The reference table, with the study's (`paper`: 0.0) or the standard VideoPinball random."""
    if videopinball_random not in VIDEOPINBALL_CONVENTIONS:
        raise UsageError(f"--videopinball-random must be paper or standard, not "
                         f"{videopinball_random!r}")
    table = dict(_standard_table())
    if videopinball_random == "paper":
        table["VideoPinball"] = Reference(0.0, table["VideoPinball"].human)
    return table


def normalise(scores: np.ndarray, games: list[str], table: dict[str, Reference]) -> np.ndarray:
    """Human-normalised scores (score - random) / (human - random); games on axis 1."""
    missing = [g for g in games if g not in table]
    if missing:
        raise UsageError(f"no reference score for {', '.join(missing)}")
    random = np.array([table[g].random for g in games])
    human = np.array([table[g].human for g in games])
    shape = (1, len(games)) + (1,) * (scores.ndim - 2)
    return (scores - random.reshape(shape)) / (human - random).reshape(shape)
