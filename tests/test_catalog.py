"""The catalogue and the command-line selections built on it."""

from __future__ import annotations

import pytest

from orchestrator import catalog
from orchestrator.errors import UsageError
from orchestrator.registry.queries import parse_states


def test_catalogue_has_the_studys_56_games_in_five_axis_classes() -> None:
    assert len(catalog.GAMES) == 56
    sizes = {axis: len(catalog.games_of_axis(axis)) for axis in catalog.AXES}
    assert sizes == {"horizontal": 12, "vertical": 18, "no-axis": 5, "off-axis": 5,
                     "several-axes": 16}
    assert catalog.GAMES["Pong"] == "horizontal" and catalog.GAMES["Breakout"] == "vertical"
    assert catalog.ATTENTION_TYPES == ("NA", "SWA", "CWRA", "CWCA", "CWRCA")
    assert catalog.PAPER_SEEDS == (0, 1, 10, 42, 1234)


def test_env_ids_every_game_in_the_installed_ale() -> None:
    import ale_py
    import gymnasium as gym

    gym.register_envs(ale_py)
    registered = set(gym.registry)
    missing = [g for g in catalog.GAMES if catalog.env_id(g) not in registered]
    assert not missing


def test_selections() -> None:
    assert catalog.parse_games("all") == list(catalog.GAMES)
    assert catalog.parse_games("Pong,Breakout,Pong") == ["Breakout", "Pong"]
    assert catalog.parse_games("axis:horizontal") == catalog.games_of_axis("horizontal")
    assert catalog.parse_games("axis:no-axis,Pong") == ["Hero", "Krull", "MontezumaRevenge",
                                                        "Pitfall", "Pong", "PrivateEye"]
    assert catalog.parse_attn("all") == list(catalog.ATTENTION_TYPES)
    assert catalog.parse_attn("cwca,NA") == ["NA", "CWCA"]
    assert catalog.parse_seeds(2, None) == [0, 1]
    assert catalog.parse_seeds(None, "42,0,42") == [42, 0]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: catalog.parse_games("Pongg"), "did you mean Pong"),
        (lambda: catalog.parse_games("breakout"), "did you mean Breakout"),
        (lambda: catalog.parse_games("axis:horizontl"), "did you mean horizontal"),
        (lambda: catalog.parse_attn("CWAC"), "did you mean CWCA"),
        (lambda: catalog.parse_attn("SW"), "did you mean SWA"),
        # Too far for the edit distance, but only one name begins so.
        (lambda: parse_states("sucess"), "did you mean succeeded"),
        (lambda: catalog.parse_games("Montezuma"), "did you mean MontezumaRevenge"),
        (lambda: catalog.parse_seeds(6, None), "1..5"),
        (lambda: catalog.parse_seeds(None, "1,x"), "not an integer"),
        (lambda: catalog.parse_games(","), "empty"),
    ],
)
def test_typos_get_the_nearest_valid_name(call, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(UsageError, match=message):
        call()


@pytest.mark.parametrize("word", ["Asterx", "xyzzyq", "Ast", "Astroids"])
def test_no_suggestion_unless_one_name_is_near_or_begins_so(word: str) -> None:
    """Asterix and Asteroids both begin `Ast`: neither is suggested for a word far from both."""
    suggestion = catalog.nearest(word, ["Asterix", "Asteroids", "Pong"])
    expected = {"Asterx": " (did you mean Asterix?)", "Astroids": " (did you mean Asteroids?)"}
    assert suggestion == expected.get(word, "")
