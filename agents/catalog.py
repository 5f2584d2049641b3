"""The study's catalogue: games, attention types and seeds (AGENT.md).

Pure data, no imports beyond the standard library: the worker validates run.json against it and
the orchestrator builds its selections on top of it.
"""

from __future__ import annotations

#: Attention types in the paper's order; NA has no attention block.
ATTENTION_TYPES: tuple[str, ...] = ("NA", "SWA", "CWRA", "CWCA", "CWRCA")

#: The paper's five seeds, in the order `--seeds N` takes them.
PAPER_SEEDS: tuple[int, ...] = (0, 1, 10, 42, 1234)

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
