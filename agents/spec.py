"""The run spec: every setting of one training run, typed, documented and validated.

One frozen dataclass holds what run.json holds. Each field carries, in its metadata, a help text,
its unit, whether it is *scientific* (can change results, so part of the spec hash) and its
allowed range or choices. The orchestrator builds specs from a preset plus `--set` overrides; the
worker reads them back from run.json with `RunSpec.from_dict`, which refuses anything malformed.

Derived values (env id, rollout size, the hash) are functions of the fields, never stored back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar

from agents.catalog import ATTENTION_TYPES, EXPERIMENT_NAME_PATTERN, GAMES, env_id, nearest

#: Version of run.json's layout. Bump it when a field is added, renamed or changes meaning.
SCHEMA_VERSION = 1

#: Keys of run.json that are derived from the fields, not fields themselves.
DERIVED_KEYS = ("schema", "env_id", "spec_hash")


#: Upper bound of total_timesteps: a thousand paper runs' worth; anything larger is a typo.
MAX_TIMESTEPS = 10**10
#: Samples per rollout (n_envs x n_steps); the paper's is 2,048. SB3 stores them as float32
#: observations: 262,144 x 4 x 84 x 84 x 4 bytes is already 29.6 GB.
MAX_ROLLOUT_SIZE = 262_144


class SpecError(ValueError):
    """A spec that cannot be used: the message says which field and how to fix it."""


def _f(
    default: Any,
    help: str,
    *,
    unit: str = "",
    scientific: bool = True,
    min: float | None = None,
    max: float | None = None,
    choices: tuple[Any, ...] | None = None,
    pattern: str | None = None,
) -> Any:
    return field(
        default=default,
        metadata={
            "help": help,
            "unit": unit,
            "scientific": scientific,
            "min": min,
            "max": max,
            "choices": choices,
            "pattern": pattern,
        },
    )


@dataclass(frozen=True)
class RunSpec:
    """One training run: identity, PPO hyper-parameters, environment, evaluation, execution."""

    # --- identity -------------------------------------------------------------------------
    game: str = _f("Pong", "Atari game by short name (its env id is <Game>NoFrameskip-v4).",
                   choices=tuple(GAMES))
    attn: str = _f("NA", "Self-attention type after the first convolution.",
                   choices=ATTENTION_TYPES)
    seed: int = _f(0, "Random seed of the agent and the environments.", min=0, max=2**31 - 1)
    experiment: str = _f("main", "Experiment the run belongs to (letters, digits, _ . -).",
                         scientific=False, pattern=EXPERIMENT_NAME_PATTERN)
    run_id: int | None = _f(None, "Registry id of the run (set when dispatched).",
                            scientific=False, min=1)

    # --- PPO ------------------------------------------------------------------------------
    total_timesteps: int = _f(10_000_000, "Training budget.", unit="agent steps", min=1,
                              max=MAX_TIMESTEPS)
    n_envs: int = _f(16, "Parallel training environments.", unit="envs", min=1, max=1024)
    n_steps: int = _f(128, "Rollout length per environment per update.", unit="env steps",
                      min=1, max=MAX_ROLLOUT_SIZE)
    n_epochs: int = _f(3, "Passes over each rollout.", unit="epochs", min=1, max=1000)
    batch_size: int = _f(256, "Minibatch size of the update.", unit="samples", min=1)
    learning_rate: float = _f(2.5e-4, "Initial Adam learning rate.", min=0.0, max=1.0)
    lr_schedule: str = _f("linear", "Learning-rate schedule: linear decays to 0 with progress.",
                          choices=("linear", "constant"))
    clip_range: float = _f(0.1, "Initial PPO clip range.", min=0.0, max=1.0)
    clip_schedule: str = _f("linear", "Clip-range schedule: linear decays to 0 with progress.",
                            choices=("linear", "constant"))
    vf_coef: float = _f(1.0, "Value-loss coefficient.", min=0.0)
    ent_coef: float = _f(0.01, "Entropy-bonus coefficient.", min=0.0)
    gamma: float = _f(0.99, "Discount factor.", min=0.0, max=1.0)
    gae_lambda: float = _f(0.95, "GAE lambda.", min=0.0, max=1.0)
    max_grad_norm: float = _f(0.5, "Gradient-norm clip.", min=0.0)
    normalize_advantage: bool = _f(True, "Normalise advantages per minibatch.")

    # --- environment (SB3 AtariWrapper) ---------------------------------------------------
    noop_max: int = _f(30, "Maximum random no-ops at reset.", unit="frames", min=0, max=1000)
    frame_skip: int = _f(4, "Frames repeated per agent step (max-pooled over the last two).",
                         unit="frames", min=1, max=16)
    frame_stack: int = _f(4, "Stacked observations.", unit="frames", min=1, max=16)
    screen_size: int = _f(84, "Side of the square grayscale observation.", unit="pixels",
                          min=84, max=84)
    terminal_on_life_loss: bool = _f(True, "A lost life ends the learner's episode.")
    clip_reward: bool = _f(True, "Clip the learner's rewards to their sign.")
    repeat_action_probability: float = _f(0.0, "Sticky-action probability.", min=0.0, max=1.0)

    # --- evaluation -----------------------------------------------------------------------
    eval_every_steps: int = _f(200_000, "Evaluation interval.", unit="agent steps", min=1)
    eval_episodes: int = _f(5, "Full-game episodes per evaluation.", unit="episodes", min=1,
                            max=1000)
    eval_deterministic: bool = _f(False, "Greedy actions in evaluation (the paper: stochastic).")

    # --- execution (stored, not hashed: they do not change results) -----------------------
    checkpoint_every_steps: int = _f(500_000, "Checkpoint interval (one more at the end).",
                                     unit="agent steps", scientific=False, min=1)
    obs_dump_every_steps: int = _f(2_000_000, "Observation-dump interval; 0 disables dumps.",
                                   unit="agent steps", scientific=False, min=0)
    obs_dump_count: int = _f(10, "Observations dumped per interval.", unit="observations",
                             scientific=False, min=0, max=1000)
    env_backend: str = _f("subproc", "Training envs: SB3's SubprocVecEnv or DummyVecEnv (with "
                          "engine sb3), or ale-py's AtariVectorEnv under the same protocol "
                          "(ale_vector, with engine fast).",
                          scientific=False, choices=("subproc", "dummy", "ale_vector"))
    engine: str = _f("sb3", "PPO loop: SB3's own (sb3, the reference path) or the same "
                     "algorithm with the rollout buffer on the device (fast, agents.fast).",
                     scientific=False, choices=("sb3", "fast"))
    cuda_graphs: bool = _f(False, "Replay the fast engine's per-step and update work as CUDA "
                           "graphs (engine fast, on a CUDA device; eager elsewhere).",
                           scientific=False)
    device: str = _f("auto", "Torch device.", scientific=False, choices=("auto", "cpu", "cuda"))
    torch_threads: int = _f(0, "Torch intra-op threads; 0 lets torch decide.", unit="threads",
                            scientific=False, min=0, max=1024)
    deadline_margin_s: float = _f(300.0, "Checkpoint and exit this long before SATRL_DEADLINE.",
                                  unit="s", scientific=False, min=0.0, max=7 * 86_400.0)
    status_every_s: float = _f(5.0, "Heartbeat interval of status.json.", unit="s",
                               scientific=False, min=0.1, max=3600.0)

    SCHEMA: ClassVar[int] = SCHEMA_VERSION

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            _check_field(f, value)
            if _type_name(f) == "float" and isinstance(value, int):
                # 1 and 1.0 are one spec: store the float so that both hash alike.
                object.__setattr__(self, f.name, float(value))
        if self.total_timesteps % self.n_envs:
            raise SpecError(
                f"total_timesteps {self.total_timesteps} is not a multiple of n_envs "
                f"{self.n_envs}: every env steps once per agent step, so training would end "
                "past the budget"
            )
        if self.rollout_size > MAX_ROLLOUT_SIZE:
            raise SpecError(
                f"a rollout of n_envs x n_steps = {self.rollout_size} samples exceeds "
                f"{MAX_ROLLOUT_SIZE}: its buffer would not fit in memory (the paper's is 2048)"
            )
        if self.batch_size > self.n_envs * self.n_steps:
            raise SpecError(
                f"batch_size {self.batch_size} exceeds the rollout of n_envs x n_steps = "
                f"{self.n_envs * self.n_steps} samples: lower batch_size or raise n_steps"
            )
        if (self.engine == "fast") != (self.env_backend == "ale_vector"):
            raise SpecError(
                f"engine {self.engine} cannot run env_backend {self.env_backend}: the fast engine "
                "steps ale-py's vector env (engine=fast env_backend=ale_vector); the sb3 engine "
                "steps SB3 VecEnvs (subproc or dummy)"
            )
        if self.cuda_graphs and (self.engine != "fast" or self.device == "cpu"):
            raise SpecError(
                f"cuda_graphs needs engine fast on a CUDA device (device cuda or auto), not "
                f"engine {self.engine} on device {self.device}"
            )

    # --- derived values -------------------------------------------------------------------
    @property
    def env_id(self) -> str:
        """The gymnasium id: `Pong` -> `PongNoFrameskip-v4`."""
        return env_id(self.game)

    @property
    def rollout_size(self) -> int:
        """Samples per PPO update (n_envs x n_steps)."""
        return self.n_envs * self.n_steps

    def scientific_dict(self) -> dict[str, Any]:
        """The fields that can change results, by name."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata["scientific"]}

    def spec_hash(self) -> str:
        """sha256 of the scientific fields in canonical JSON."""
        canonical = json.dumps(self.scientific_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        """run.json's content: schema version, every field, the env id and the spec hash."""
        body = {f.name: getattr(self, f.name) for f in fields(self)}
        return {"schema": SCHEMA_VERSION, **body, "env_id": self.env_id,
                "spec_hash": self.spec_hash()}

    def replace(self, **changes: Any) -> RunSpec:
        """A copy with some fields changed (validated like any spec)."""
        return replace(self, **changes)

    def with_overrides(self, overrides: Mapping[str, Any]) -> RunSpec:
        """A copy with `--set KEY=VALUE` overrides applied; string values are parsed by type."""
        changes: dict[str, Any] = {}
        by_name = {f.name: f for f in fields(self)}
        for key, value in overrides.items():
            if key not in by_name:
                raise SpecError(f"unknown spec field {key!r}{_suggest(key, by_name)}")
            changes[key] = _parse_value(by_name[key], value) if isinstance(value, str) else value
        return self.replace(**changes)

    @classmethod
    def from_dict(cls, data: Any) -> RunSpec:
        """Read a spec back from run.json's content, refusing anything malformed or hostile."""
        if not isinstance(data, dict):
            raise SpecError(f"run.json must hold a JSON object, not {type(data).__name__}")
        schema = data.get("schema")
        if not isinstance(schema, int) or isinstance(schema, bool):
            raise SpecError("run.json has no integer 'schema' version")
        if schema > SCHEMA_VERSION:
            raise SpecError(
                f"run.json has schema {schema}, newer than this worker's {SCHEMA_VERSION}: "
                "upgrade satrl where the job runs"
            )
        if schema < 1:
            raise SpecError(f"run.json has an invalid schema version {schema}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names - set(DERIVED_KEYS))
        if unknown:
            raise SpecError(f"run.json has unknown field(s): {', '.join(unknown)}")
        missing = [f.name for f in fields(cls) if f.metadata["scientific"] and f.name not in data]
        if missing:
            raise SpecError(f"run.json lacks the scientific field(s) {', '.join(missing)}: the "
                            "orchestrator writes every one")
        spec = cls(**{k: v for k, v in data.items() if k in names})
        if "env_id" in data and data["env_id"] != spec.env_id:
            raise SpecError(f"run.json's env_id {str(data['env_id'])[:60]!r} is not game "
                            f"{spec.game}'s {spec.env_id}")
        stated = data.get("spec_hash")
        if stated is not None and stated != spec.spec_hash():
            raise SpecError(
                f"run.json's spec_hash {str(stated)[:12]} does not match its fields "
                f"({spec.spec_hash()[:12]}): the file was edited by hand"
            )
        return spec

    @classmethod
    def field_help(cls) -> list[tuple[str, str, str, bool, str]]:
        """(name, type, unit, scientific, help) for every field, for `--set` listings."""
        return [
            (f.name, str(f.type), f.metadata["unit"], f.metadata["scientific"], f.metadata["help"])
            for f in fields(cls)
        ]


def _type_name(f: dataclasses.Field[Any]) -> str:
    return str(f.type).replace(" | None", "")


def _check_field(f: dataclasses.Field[Any], value: Any) -> None:
    """Type, range and choice check of one field; raises SpecError naming the field."""
    meta = f.metadata
    kind = _type_name(f)
    if value is None:
        if "None" in str(f.type):
            return
        raise SpecError(f"{f.name} must not be null")
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, int | float) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
    }.get(kind, False)
    if not ok:
        raise SpecError(f"{f.name} must be {kind}, got {type(value).__name__} {value!r}")
    if kind == "float" and not _finite(value):
        raise SpecError(f"{f.name} must be a finite number, got {value!r}")
    if meta["min"] is not None and value < meta["min"]:
        raise SpecError(f"{f.name} must be >= {meta['min']}, got {value!r}")
    if meta["max"] is not None and value > meta["max"]:
        raise SpecError(f"{f.name} must be <= {meta['max']}, got {value!r}")
    if meta["pattern"] is not None and not re.fullmatch(meta["pattern"], value):
        raise SpecError(f"{f.name} {value!r} is not a valid name: use 1-64 letters, digits, "
                        "'_', '.' or '-', starting with a letter or digit")
    if meta["choices"] is not None and value not in meta["choices"]:
        choices = meta["choices"]
        listed = ", ".join(map(str, choices)) if len(choices) <= 10 else f"{len(choices)} names"
        raise SpecError(
            f"{f.name} must be one of {listed}, got {value!r}{_suggest(str(value), choices)}"
        )


def _finite(value: float) -> bool:
    """math.isfinite, for ints too large for a float as well (they are not finite floats)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _parse_value(f: dataclasses.Field[Any], text: str) -> Any:
    """Parse a `--set` value by the field's type: ints accept 2_000_000 and 2e6."""
    kind = _type_name(f)
    try:
        if kind == "int":
            if text.strip().lower() in ("none", "null") and "None" in str(f.type):
                return None
            number = float(text.replace("_", "")) if any(c in text for c in ".eE") else None
            if number is not None:
                if not number.is_integer():
                    raise ValueError
                return int(number)
            return int(text.replace("_", ""))
        if kind == "float":
            return float(text.replace("_", ""))
        if kind == "bool":
            lowered = text.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError
    except ValueError:
        raise SpecError(f"{f.name} must be {kind}, got {text!r}") from None
    return text


def _suggest(word: str, candidates: Any) -> str:
    return nearest(word, [str(c) for c in candidates])


#: The paper's protocol (AGENT.md): 1e7 steps, 16 envs, eval every 200k with 5 episodes.
PAPER = RunSpec()

#: A study that finishes on a laptop CPU in minutes: the quick start and the tests use it.
SMOKE = PAPER.replace(
    total_timesteps=2_048,
    n_envs=2,
    n_steps=128,
    batch_size=128,
    eval_every_steps=1_024,
    eval_episodes=1,
    checkpoint_every_steps=1_024,
    obs_dump_every_steps=1_024,
    obs_dump_count=2,
    env_backend="dummy",
    torch_threads=1,
    deadline_margin_s=30.0,
    status_every_s=1.0,
)

PRESETS: dict[str, RunSpec] = {"paper": PAPER, "smoke": SMOKE}
