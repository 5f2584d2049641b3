"""The study's catalogue and how a person selects from it on the command line.

The data (56 games with their axis of dynamics, attention types, paper seeds, presets) lives in
`agents/` because the worker validates run.json against it; this module adds the parsing of
`--games all|Pong,Breakout|axis:horizontal`, `--attn all|CWCA,NA` and the seed options, with a
suggestion of the nearest valid name for every typo.
"""

from __future__ import annotations

from agents.catalog import (
    ATTENTION_TYPES,
    AXES,
    GAMES,
    PAPER_SEEDS,
    env_id,
    game_from_env_id,
    nearest,
)
from agents.spec import PRESETS, RunSpec
from orchestrator.errors import UsageError

__all__ = [
    "ATTENTION_TYPES", "AXES", "GAMES", "PAPER_SEEDS", "PRESETS", "env_id", "game_from_env_id",
    "games_of_axis", "parse_games", "parse_attn", "parse_seeds", "parse_game", "parse_attn_one",
    "preset", "nearest",
]


def games_of_axis(axis: str) -> list[str]:
    """The games whose main axis of dynamics is `axis`."""
    if axis not in AXES:
        raise UsageError(f"unknown axis {axis!r}{nearest(axis, AXES)}; axes: {', '.join(AXES)}")
    return [game for game, game_axis in GAMES.items() if game_axis == axis]


def parse_game(name: str) -> str:
    """One game by short name (or env id); exact case, else a suggestion."""
    name = name.strip()
    if name.endswith("NoFrameskip-v4"):
        name = game_from_env_id(name)
    if name in GAMES:
        return name
    raise UsageError(f"unknown game {name!r}{nearest(name, GAMES)}")


def parse_games(text: str) -> list[str]:
    """`all`, a comma list of games, `axis:<class>` items, or a mix; catalogue order, no repeats."""
    chosen: set[str] = set()
    for item in _items(text, "--games"):
        if item.lower() == "all":
            chosen.update(GAMES)
        elif item.lower().startswith("axis:"):
            chosen.update(games_of_axis(item.split(":", 1)[1].strip()))
        else:
            chosen.add(parse_game(item))
    return [game for game in GAMES if game in chosen]


def parse_attn_one(name: str) -> str:
    """One attention type; case-insensitive, else a suggestion."""
    upper = name.strip().upper()
    if upper in ATTENTION_TYPES:
        return upper
    raise UsageError(
        f"unknown attention type {name.strip()!r}{nearest(upper, ATTENTION_TYPES)}; "
        f"types: {', '.join(ATTENTION_TYPES)}"
    )


def parse_attn(text: str) -> list[str]:
    """`all` or a comma list of attention types; paper order, no repeats."""
    chosen: set[str] = set()
    for item in _items(text, "--attn"):
        if item.lower() == "all":
            chosen.update(ATTENTION_TYPES)
        else:
            chosen.add(parse_attn_one(item))
    return [attn for attn in ATTENTION_TYPES if attn in chosen]


def parse_seeds(n_seeds: int | None, seed_list: str | None) -> list[int]:
    """`--seeds N` (the first N paper seeds) or `--seed-list 0,42` (any non-negative ints)."""
    if seed_list is not None:
        seeds: list[int] = []
        for item in _items(seed_list, "--seed-list"):
            try:
                seed = int(item)
            except ValueError:
                raise UsageError(f"--seed-list: {item!r} is not an integer") from None
            if seed < 0 or seed >= 2**31:
                raise UsageError(f"--seed-list: seed {seed} is outside 0..2147483647")
            if seed not in seeds:
                seeds.append(seed)
        return seeds
    n = len(PAPER_SEEDS) if n_seeds is None else n_seeds
    if not 1 <= n <= len(PAPER_SEEDS):
        raise UsageError(
            f"--seeds takes 1..{len(PAPER_SEEDS)} (the paper's seeds "
            f"{', '.join(map(str, PAPER_SEEDS))}); use --seed-list for others"
        )
    return list(PAPER_SEEDS[:n])


def preset(name: str) -> RunSpec:
    """A named preset spec."""
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}{nearest(name, PRESETS)}; "
                         f"presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def _items(text: str, option: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise UsageError(f"{option} is empty")
    return items
