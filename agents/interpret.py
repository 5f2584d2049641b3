"""Attention maps of a policy: what each stage of the study's extractor makes of an observation.

For one stacked observation (1, 4, 84, 84) uint8 the extractor is run stage by stage
(agents/extractor.py): the input x = obs / 255, F1 = ReLU(c1(x)), the attention output
Y = attend(F1), the attended features Y + F1 and F2 = ReLU(c2(Y + F1)). NA has no block, so no Y
and no Y + F1. Each stage is summed over its channels, upsampled (bilinear) to 84x84 and min-max
normalised to [0, 1] per observation: the maps of the paper's interpretability figures.

Checkpoints are untrusted input. An SB3 zip's `data` member carries cloudpickled objects that
`PPO.load` would unpickle (running whatever code they name), so it is never read here: only
`policy.pth` is loaded, with `torch.load(weights_only=True)`, into a policy rebuilt from the
attention type (known from run.json or given by the user) and the action count (read from the
action head's weight shape), strictly: a checkpoint of any other architecture is refused.
"""

from __future__ import annotations

import io
import lzma
import pickle
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3.common.policies import ActorCriticCnnPolicy
from stable_baselines3.common.preprocessing import preprocess_obs
from torch.nn import functional as F  # noqa: N812  (torch's own convention)

from agents.catalog import ATTENTION_TYPES
from agents.extractor import SelfAttentionCNN, policy_kwargs

#: One observation dump as the worker writes it: a batch of one stacked observation.
OBS_SHAPE: tuple[int, ...] = (1, 4, 84, 84)
#: Side of every map after upsampling (the observation's own size).
MAP_SIZE = 84
#: policy.pth of the study's policy is ~2.7 MB; anything far bigger is not one (nor read whole).
MAX_POLICY_BYTES = 64 * 2**20
POLICY_MEMBER = "policy.pth"

#: Stages in figure order; `stages_of` drops the attention stages for NA.
STAGES: tuple[str, ...] = ("input", "f1", "y", "attended", "f2")
STAGE_TITLES: dict[str, str] = {
    "input": "input (4 frames)",
    "f1": "F1 = ReLU(c1)",
    "y": "Y (attention)",
    "attended": "Y + F1",
    "f2": "ReLU(c2)",
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or is not this extractor's policy; one line, how to fix."""


class ObservationError(ValueError):
    """An observation dump that is not a (1, 4, 84, 84) uint8 .npy array."""


def stages_of(attn: str) -> tuple[str, ...]:
    """The stages a policy of type `attn` has (NA: no Y, no Y + F1)."""
    return tuple(s for s in STAGES if attn != "NA" or s not in ("y", "attended"))


# --- checkpoints ------------------------------------------------------------------------------


def read_policy_state(path: Path) -> dict[str, torch.Tensor]:
    """The policy's state dict from an SB3 zip, without unpickling anything but plain tensors."""
    try:
        with zipfile.ZipFile(path) as archive:
            try:
                info = archive.getinfo(POLICY_MEMBER)
            except KeyError:
                raise CheckpointError(
                    f"{path}: no {POLICY_MEMBER} inside: not a stable-baselines3 checkpoint"
                ) from None
            if info.file_size > MAX_POLICY_BYTES:
                raise CheckpointError(
                    f"{path}: {POLICY_MEMBER} is {info.file_size} bytes, far more than the "
                    f"study's policy (~3 MB): not a checkpoint of this extractor"
                )
            payload = archive.read(info)
    except (zipfile.BadZipFile, OSError) as error:
        raise CheckpointError(f"{path}: not a readable zip ({error})") from None
    except (zlib.error, lzma.LZMAError, EOFError, NotImplementedError) as error:
        # zipfile checks a member's CRC only after inflating it: bytes flipped inside a deflated
        # member raise the decompressor's own error (EOFError: a stream cut short).
        detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise CheckpointError(
            f"{path}: {POLICY_MEMBER} cannot be decompressed "
            f"({detail[:200] or type(error).__name__}): a damaged or unreadable checkpoint"
        ) from None
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError) as error:
        # weights_only refuses any pickled object but tensors and plain containers.
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"{path}: {POLICY_MEMBER} is not a plain tensor state dict (refused without "
            f"running it): {first[:200]}"
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items()
    ):
        raise CheckpointError(f"{path}: {POLICY_MEMBER} is not a state dict of named tensors")
    return state


def build_policy(
    attn: str, state: dict[str, torch.Tensor], source: str = "checkpoint"
) -> ActorCriticCnnPolicy:
    """The study's policy of type `attn` with `state` loaded strictly (eval mode, CPU).

    :param source: how to name the checkpoint in error messages (its path).
    """
    if attn not in ATTENTION_TYPES:
        raise CheckpointError(f"unknown attention type {attn!r}: use one of "
                              f"{', '.join(ATTENTION_TYPES)}")
    head = state.get("action_net.weight")
    if head is None or head.ndim != 2:
        raise CheckpointError(f"{source}: no action head (action_net.weight): not an SB3 "
                              f"actor-critic policy with a discrete action space")
    if head.shape[0] < 1:
        raise CheckpointError(f"{source}: the action head has no actions")
    policy = fresh_policy(attn, n_actions=int(head.shape[0]))
    problem = _mismatch(attn, policy.state_dict(), state)
    if problem:
        raise CheckpointError(f"{source}: not a {attn} checkpoint of satrl's two-convolution "
                              f"extractor: {problem}")
    policy.load_state_dict(state, strict=True)
    return policy


def fresh_policy(attn: str, n_actions: int, seed: int | None = None) -> ActorCriticCnnPolicy:
    """A freshly initialised study policy (SB3's orthogonal init), eval mode, on the CPU."""
    if seed is not None:
        torch.manual_seed(seed)
    observation_space = gym.spaces.Box(0, 255, OBS_SHAPE[1:], np.uint8)
    # The learning rate only feeds the optimizer, which maps never use.
    policy = ActorCriticCnnPolicy(observation_space, gym.spaces.Discrete(n_actions),
                                  lambda _: 0.0, **policy_kwargs(attn))
    policy.set_training_mode(False)
    return policy


def _mismatch(
    attn: str, expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]
) -> str | None:
    """Why `state` does not fit the policy `expected` describes (None when it does)."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(key for key in set(expected) & set(state)
                    if tuple(expected[key].shape) != tuple(state[key].shape))
    if not (missing or unexpected or shapes):
        return None
    if any(".cnn." in key for key in unexpected):
        return "its extractor has a `cnn` stack (SB3's NatureCNN?), not c1/c2/l1"
    if attn == "NA" and any(".attention." in key for key in unexpected):
        return ("it has an attention block (SWA, CWRA, CWCA or CWRCA): pass its type, "
                "e.g. --attn CWCA")
    if attn != "NA" and missing and all(".attention." in key for key in missing):
        return "it has no attention block: it is an NA checkpoint (pass --attn NA)"
    parts = []
    if missing:
        parts.append(f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    if unexpected:
        parts.append(f"unexpected {', '.join(unexpected[:3])}"
                     f"{' ...' if len(unexpected) > 3 else ''}")
    for key in shapes[:3]:
        parts.append(f"{key} is {tuple(state[key].shape)}, expected {tuple(expected[key].shape)}")
    return "; ".join(parts)


# --- observations -----------------------------------------------------------------------------


def load_observation(path: Path) -> np.ndarray:
    """One (1, 4, 84, 84) uint8 dump; pickled .npy files are refused, not loaded."""
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise ObservationError(f"{path}: not a plain .npy array ({str(error)[:160]})") from None
    if not isinstance(array, np.ndarray):  # an .npz archive
        array.close()
        raise ObservationError(f"{path}: an .npz archive, not one .npy observation")
    if array.dtype != np.uint8:
        raise ObservationError(f"{path}: dtype {array.dtype}, expected uint8 frames (0..255) "
                               f"as the worker dumps them")
    if array.shape != OBS_SHAPE:
        raise ObservationError(f"{path}: shape {array.shape}, expected {OBS_SHAPE} "
                               f"(one observation of 4 stacked 84x84 frames)")
    return array


# --- maps -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicyMaps:
    """The maps and decision of one policy on a batch of N observations."""

    attn: str
    #: stage -> (N, 84, 84) float32 in [0, 1], channel-summed, upsampled, min-max per observation.
    maps: dict[str, np.ndarray]
    #: (N,) greedy actions (argmax of the action distribution).
    actions: np.ndarray
    #: (N, A) action probabilities.
    probabilities: np.ndarray
    #: (N,) value estimates.
    values: np.ndarray

    @property
    def stages(self) -> tuple[str, ...]:
        return stages_of(self.attn)


def stage_tensors(policy: ActorCriticCnnPolicy, obs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every stage's tensor for uint8 observations (N, 4, 84, 84), stage by stage."""
    extractor = policy.features_extractor
    if not isinstance(extractor, SelfAttentionCNN):
        raise CheckpointError(f"the policy's extractor is {type(extractor).__name__}, "
                              f"not SelfAttentionCNN")
    x = preprocess_obs(obs, policy.observation_space, normalize_images=policy.normalize_images)
    assert isinstance(x, torch.Tensor)
    tensors = {"input": x}
    f1 = torch.relu(extractor.c1(x))
    tensors["f1"] = attended = f1
    if extractor.attention is not None:
        tensors["y"] = y = extractor.attention.attend(f1)
        tensors["attended"] = attended = y + f1
    tensors["f2"] = f2 = torch.relu(extractor.c2(attended))
    # Guard against the extractor changing under us (a ReLU added after the block, say): the
    # stages must reproduce its own forward pass exactly, or the figures would show other maps.
    features = torch.relu(extractor.l1(f2.flatten(1)))
    if not torch.allclose(features, extractor(x), rtol=1e-5, atol=1e-6):
        raise RuntimeError("the stage-by-stage pass disagrees with SelfAttentionCNN.forward: "
                           "update agents/interpret.py to the extractor's new structure")
    return tensors


def normalised_map(tensor: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) -> (N, 84, 84): channel sum, bilinear upsampling, min-max per observation.

    A constant map (e.g. every unit of F2 dead) becomes all zeros rather than a division by 0.
    """
    summed = tensor.sum(dim=1, keepdim=True).double()
    if tuple(summed.shape[-2:]) != (MAP_SIZE, MAP_SIZE):
        summed = F.interpolate(summed, size=(MAP_SIZE, MAP_SIZE), mode="bilinear",
                               align_corners=False)
    flat = summed.flatten(1)
    low = flat.min(dim=1, keepdim=True).values
    span = flat.max(dim=1, keepdim=True).values - low
    scaled = torch.where(span > 0, (flat - low) / torch.where(span > 0, span, 1.0), 0.0)
    return scaled.reshape(-1, MAP_SIZE, MAP_SIZE).float().numpy()


@torch.no_grad()
def compute_maps(policy: ActorCriticCnnPolicy, attn: str,
                 observations: Sequence[np.ndarray]) -> PolicyMaps:
    """Maps, greedy actions, probabilities and values of `policy` on the observations."""
    if not observations:
        raise ObservationError("no observations to map")
    obs = torch.as_tensor(np.concatenate(list(observations), axis=0))
    tensors = stage_tensors(policy, obs)
    distribution = policy.get_distribution(obs).distribution
    probabilities = distribution.probs.numpy()
    return PolicyMaps(
        attn=attn,
        maps={stage: normalised_map(tensors[stage]) for stage in stages_of(attn)},
        actions=probabilities.argmax(axis=1),
        probabilities=probabilities,
        values=policy.predict_values(obs).squeeze(1).numpy(),
    )


def action_meanings(game: str, n_actions: int) -> list[str] | None:
    """ALE's names of the game's actions when the checkpoint's action count matches, else None.

    Names are a nicety on the figure: any failure to make the env (a game ale-py lacks, an action
    count from another action set) leaves the plain action numbers.
    """
    try:
        import ale_py

        from agents.catalog import env_id

        gym.register_envs(ale_py)
        env = gym.make(env_id(game))
        try:
            names = list(env.unwrapped.get_action_meanings())  # type: ignore[attr-defined]
        finally:
            env.close()
    except Exception:  # see the docstring: names are optional
        return None
    return names if len(names) == n_actions else None
