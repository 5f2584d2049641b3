"""The run spec: validation, overrides, hashing, presets (agents/spec.py)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from agents.spec import PAPER, PRESETS, SCHEMA_VERSION, SMOKE, RunSpec, SpecError


def test_paper_preset_holds_the_numbers_of_agent_md() -> None:
    assert (PAPER.n_envs, PAPER.n_steps, PAPER.n_epochs, PAPER.batch_size) == (16, 128, 3, 256)
    assert PAPER.total_timesteps == 10_000_000
    assert (PAPER.learning_rate, PAPER.lr_schedule) == (2.5e-4, "linear")
    assert (PAPER.clip_range, PAPER.clip_schedule) == (0.1, "linear")
    assert (PAPER.vf_coef, PAPER.ent_coef, PAPER.gamma, PAPER.gae_lambda) == (1.0, 0.01, 0.99, 0.95)
    assert (PAPER.max_grad_norm, PAPER.normalize_advantage) == (0.5, True)
    assert (PAPER.noop_max, PAPER.frame_skip, PAPER.frame_stack) == (30, 4, 4)
    assert PAPER.terminal_on_life_loss and PAPER.clip_reward
    assert PAPER.repeat_action_probability == 0.0
    assert (PAPER.eval_every_steps, PAPER.eval_episodes, PAPER.eval_deterministic) == (
        200_000, 5, False)
    assert PAPER.checkpoint_every_steps == 500_000
    assert set(PRESETS) == {"paper", "smoke"}


def test_every_field_is_documented_with_unit_and_scientific_flag() -> None:
    for f in dataclasses.fields(RunSpec):
        assert f.metadata["help"], f.name
        assert "unit" in f.metadata and isinstance(f.metadata["scientific"], bool), f.name


def test_round_trip_through_run_json() -> None:
    spec = PAPER.replace(game="Breakout", attn="CWCA", seed=42, run_id=7)
    data = json.loads(json.dumps(spec.to_dict()))
    assert data["schema"] == SCHEMA_VERSION
    assert data["env_id"] == "BreakoutNoFrameskip-v4"
    assert RunSpec.from_dict(data) == spec


def test_hash_covers_scientific_fields_only() -> None:
    base = PAPER.replace(game="Pong", attn="NA", seed=0)
    assert base.replace(experiment="other", run_id=3, torch_threads=2, checkpoint_every_steps=7,
                        deadline_margin_s=1.0, env_backend="dummy").spec_hash() == base.spec_hash()
    for change in ({"seed": 1}, {"attn": "SWA"}, {"total_timesteps": 32}, {"ent_coef": 0.02},
                   {"eval_episodes": 1}, {"clip_reward": False}):
        assert base.replace(**change).spec_hash() != base.spec_hash(), change


def test_an_int_given_for_a_float_field_is_the_same_spec() -> None:
    same = PAPER.replace(vf_coef=1, gamma=1)
    assert isinstance(same.vf_coef, float) and same == PAPER.replace(gamma=1.0)
    assert same.spec_hash() == PAPER.replace(gamma=1.0).spec_hash()
    data = PAPER.to_dict()
    data.pop("spec_hash")
    data["vf_coef"] = 1
    assert RunSpec.from_dict(data).spec_hash() == PAPER.spec_hash()


def test_overrides_parse_by_type() -> None:
    spec = PAPER.with_overrides({"total_timesteps": "2e6", "n_envs": "8", "gamma": "0.98",
                                 "clip_reward": "false", "batch_size": "1_024"})
    assert (spec.total_timesteps, spec.n_envs, spec.gamma, spec.clip_reward, spec.batch_size) == (
        2_000_000, 8, 0.98, False, 1024)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"total_timestep": "5"}, "did you mean total_timesteps"),
        ({"n_envs": "eight"}, "n_envs must be int"),
        ({"total_timesteps": "1.5"}, "total_timesteps must be int"),
        ({"total_timesteps": "-3"}, "total_timesteps must be >= 1"),
        ({"gamma": "1.5"}, "gamma must be <= 1"),
        ({"lr_schedule": "cosine"}, "lr_schedule must be one of"),
        ({"batch_size": "100000"}, "exceeds the rollout"),
        ({"learning_rate": "nan"}, "finite"),
        ({"total_timesteps": "1001"}, "not a multiple of n_envs"),
    ],
)
def test_bad_overrides_are_refused(overrides: dict[str, str], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        PAPER.with_overrides(overrides)


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"game": "Pongg"}, "did you mean Pong"),
        ({"attn": "CWAC"}, "did you mean CWCA"),
        ({"total_timesteps": -1}, ">= 1"),
        ({"n_envs": "16"}, "must be int"),
        ({"seed": True}, "must be int"),
        ({"surprise": 1}, "unknown field"),
        ({"schema": SCHEMA_VERSION + 1}, "newer than this worker"),
        ({"schema": "1"}, "no integer 'schema'"),
        ({"spec_hash": "0" * 64}, "does not match"),
        ({"experiment": "../../etc"}, "not a valid name"),
    ],
)
def test_malformed_run_json_is_refused(patch: dict[str, object], message: str) -> None:
    data = SMOKE.to_dict()
    data.update(patch)
    with pytest.raises(SpecError, match=message):
        RunSpec.from_dict(data)


def test_run_json_must_be_an_object() -> None:
    with pytest.raises(SpecError, match="JSON object"):
        RunSpec.from_dict([1, 2])
