"""The study's catalogue: games, attention types and seeds (AGENT.md).

Pure data, no imports beyond the standard library: the worker validates run.json against it and
the orchestrator builds its selections on top of it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

#: Attention types in the paper's order; NA has no attention block.
ATTENTION_TYPES: tuple[str, ...] = ("NA", "SWA", "CWRA", "CWCA", "CWRCA")

#: The paper's five seeds, in the order `--seeds N` takes them.
PAPER_SEEDS: tuple[int, ...] = (0, 1, 10, 42, 1234)

#: What an experiment may be called: it names a folder under scratch and the store, so no
#: slashes, no leading dot, no markup or shell characters.
EXPERIMENT_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"

#: Axis-of-dynamics classes of the study, in report order.
AXES: tuple[str, ...] = ("horizontal", "vertical", "no-axis", "off-axis", "several-axes")

_GAMES_BY_AXIS: dict[str, tuple[str, ...]] = {
    "horizontal": (
        "Bowling", "Boxing", "ChopperCommand", "Defender", "FishingDerby", "Frostbite",
        "KungFuMaster", "Pong", "RoadRunner", "Seaquest", "StarGunner", "YarsRevenge",
    ),
    "vertical": (
        "Assault", "Atlantis", "Breakout", "Centipede", "CrazyClimber", "DemonAttack",
        "DoubleDunk", "Gopher", "IceHockey", "Jamesbond", "Kangaroo", "NameThisGame", "Phoenix",
        "Riverraid", "Skiing", "SpaceInvaders", "Tennis", "Zaxxon",
    ),
    "no-axis": ("Hero", "Krull", "MontezumaRevenge", "Pitfall", "PrivateEye"),
    "off-axis": ("BattleZone", "BeamRider", "Enduro", "Robotank", "Solaris"),
    "several-axes": (
        "Alien", "Amidar", "Asterix", "Asteroids", "BankHeist", "Berzerk", "Freeway", "Gravitar",
        "MsPacman", "Qbert", "TimePilot", "Tutankham", "UpNDown", "Venture", "VideoPinball",
        "WizardOfWor",
    ),
}

#: The 56 games by short name, alphabetical, mapped to their axis of dynamics.
GAMES: dict[str, str] = dict(
    sorted((game, axis) for axis, games in _GAMES_BY_AXIS.items() for game in games)
)


def env_id(game: str) -> str:
    """The gymnasium id the paper trained on: `Pong` -> `PongNoFrameskip-v4`."""
    return f"{game}NoFrameskip-v4"


def game_from_env_id(env_id_: str) -> str:
    """The short name of an env id: `PongNoFrameskip-v4` -> `Pong`."""
    suffix = "NoFrameskip-v4"
    if not env_id_.endswith(suffix):
        raise ValueError(f"not a NoFrameskip-v4 env id: {env_id_!r}")
    return env_id_[: -len(suffix)]


def nearest(word: str, candidates: Iterable[str]) -> str:
    """' (did you mean X?)' for the closest candidate by edit distance, or ''."""
    pool = list(candidates)
    if not pool:
        return ""
    key = word.lower()
    scored = sorted(
        (_edit_distance(key, c.lower()), -difflib.SequenceMatcher(None, key, c.lower()).ratio(), c)
        for c in pool
    )
    distance, _, best = scored[0]
    limit = max(1, len(best) // 3)
    if distance <= limit:
        return f" (did you mean {best}?)"
    # A long name typed short and wrong (`sucess` for succeeded, `Spaceinvader`): the one
    # candidate that begins as the word does.
    begins = [c for c in pool if len(key) >= 4 and c.lower().startswith(key[:3])]
    return f" (did you mean {begins[0]}?)" if len(begins) == 1 else ""


def _edit_distance(a: str, b: str) -> int:
    """Levenshtein distance with adjacent transpositions (a swap is one typo)."""
    previous2: list[int] = []
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            cost = 0 if ca == cb else 1
            value = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + cost)
            if i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                value = min(value, previous2[j - 2] + 1)
            current.append(value)
        previous2, previous = previous, current
    return previous[-1]
