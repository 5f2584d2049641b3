"""The features extractor and the PPO policy built on it: shapes, parameter counts, init."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.utils import ConstantSchedule

from agents.catalog import ATTENTION_TYPES
from agents.extractor import SelfAttentionCNN, policy_kwargs

torch.set_num_threads(1)

OBS_SPACE = gym.spaces.Box(0, 255, shape=(4, 84, 84), dtype=np.uint8)
PONG_ACTIONS = 6

#: AGENT.md's counts. Attention adds Q, K, V: 3 x (16 x 16 + 16) = 816 (no unused scalars kept).
EXTRACTOR_PARAMS = {"NA": 676_144} | {t: 676_960 for t in ATTENTION_TYPES if t != "NA"}
#: Heads on 256 features: action 256 x 6 + 6, value 256 + 1.
HEADS_PARAMS = 256 * PONG_ACTIONS + PONG_ACTIONS + 256 + 1


def _n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _policy(attn: str) -> ActorCriticPolicy:
    torch.manual_seed(0)
    return ActorCriticPolicy(
        OBS_SPACE, gym.spaces.Discrete(PONG_ACTIONS), ConstantSchedule(2.5e-4),
        **policy_kwargs(attn),  # type: ignore[arg-type]
    )


def _assert_orthogonal(weight: torch.Tensor, gain: float) -> None:
    """Rows (or columns, whichever are fewer) orthonormal up to `gain`, as nn.init.orthogonal_."""
    flat = weight.detach().reshape(weight.shape[0], -1).double()
    gram = flat @ flat.T if flat.shape[0] <= flat.shape[1] else flat.T @ flat
    torch.testing.assert_close(gram, gain**2 * torch.eye(gram.shape[0], dtype=torch.float64),
                               rtol=0, atol=1e-4)


@pytest.mark.parametrize("attn", ATTENTION_TYPES)
def test_shapes(attn: str) -> None:
    extractor = SelfAttentionCNN(OBS_SPACE, self_attn=attn)
    x = torch.rand(3, 4, 84, 84)
    f1 = torch.relu(extractor.c1(x))
    assert f1.shape == (3, 16, 20, 20)
    if extractor.attention is not None:
        assert extractor.attention(f1).shape == (3, 16, 20, 20)
    assert extractor._maps(x).shape == (3, 32, 9, 9)
    assert extractor.l1.in_features == 2592
    assert extractor(x).shape == (3, 256)
    assert extractor.features_dim == 256


@pytest.mark.parametrize("attn", ATTENTION_TYPES)
def test_parameter_counts(attn: str) -> None:
    assert _n_params(SelfAttentionCNN(OBS_SPACE, self_attn=attn)) == EXTRACTOR_PARAMS[attn]
    assert _n_params(_policy(attn)) == EXTRACTOR_PARAMS[attn] + HEADS_PARAMS


def test_full_pong_policy_na_count_of_agent_md() -> None:
    assert _n_params(_policy("NA")) == 677_943


@pytest.mark.parametrize("attn", ["NA", "CWRCA"])
def test_sb3_orthogonal_init_in_the_policy(attn: str) -> None:
    policy = _policy(attn)
    extractor = policy.features_extractor
    assert isinstance(extractor, SelfAttentionCNN)
    convs_and_linears = [m for m in extractor.modules()
                         if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    assert len(convs_and_linears) == (3 if attn == "NA" else 6)  # the 1x1 convs are included
    for module in convs_and_linears:
        _assert_orthogonal(module.weight, math.sqrt(2))
        assert torch.count_nonzero(module.bias) == 0
    _assert_orthogonal(policy.action_net.weight, 0.01)
    _assert_orthogonal(policy.value_net.weight, 1.0)
    optimizer = policy.optimizer
    assert isinstance(optimizer, torch.optim.Adam)
    assert optimizer.defaults["eps"] == 1e-5


def test_heads_share_the_extractor() -> None:
    policy = _policy("CWCA")
    assert policy.share_features_extractor
    assert policy.pi_features_extractor is policy.vf_features_extractor
    assert policy.action_net.in_features == policy.value_net.in_features == 256


@pytest.mark.parametrize(("a", "b"), [("NA", "SWA"), ("NA", "CWCA"), ("CWRA", "CWCA")])
def test_types_differ_with_shared_weights(a: str, b: str) -> None:
    torch.manual_seed(0)
    ext_a = SelfAttentionCNN(OBS_SPACE, self_attn=a)
    ext_b = SelfAttentionCNN(OBS_SPACE, self_attn=b)
    ext_b.load_state_dict(ext_a.state_dict(), strict=False)  # NA lacks only the block
    torch.testing.assert_close(ext_a.c1.weight, ext_b.c1.weight)
    x = torch.rand(2, 4, 84, 84, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (ext_a(x) - ext_b(x)).abs().max() > 1e-4


def test_usable_from_plain_sb3_ppo() -> None:
    # The spelling of issue 3: a plain SB3 PPO on Pong with this extractor.
    import ale_py

    from agents.envs import make_eval_env
    from agents.spec import SMOKE

    gym.register_envs(ale_py)
    env = make_eval_env(SMOKE.replace(attn="CWCA"), monitor_dir=None)
    try:
        model = PPO("CnnPolicy", env, device="cpu", policy_kwargs=dict(
            features_extractor_class=SelfAttentionCNN,
            features_extractor_kwargs=dict(self_attn="CWCA"), net_arch=[]))
        assert _n_params(model.policy) == EXTRACTOR_PARAMS["CWCA"] + HEADS_PARAMS
        obs = env.reset()
        assert obs.shape == (1, 4, 84, 84) and obs.dtype == np.uint8
        action, _ = model.predict(obs)
        assert 0 <= int(action[0]) < PONG_ACTIONS
    finally:
        env.close()


def test_unknown_type_is_refused() -> None:
    with pytest.raises(ValueError, match="CWRCA"):
        SelfAttentionCNN(OBS_SPACE, self_attn="XYZ")
