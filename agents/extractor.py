"""The study's features extractor: two convolutions with an optional self-attention block.

Not SB3's NatureCNN (which has three convolutions): AGENT.md, "Features extractor".

    (N, 4, 84, 84) /255 -> c1 Conv(4, 16, 8, s4) + ReLU = F1 (N, 16, 20, 20)
                        -> [attention block: Y + F1]              (N, 16, 20, 20)
                        -> c2 Conv(16, 32, 4, s2) + ReLU          (N, 32, 9, 9)
                        -> flatten (2592) -> Linear(2592, 256) + ReLU

Use it from plain SB3::

    PPO("CnnPolicy", env, policy_kwargs=dict(features_extractor_class=SelfAttentionCNN,
        features_extractor_kwargs=dict(self_attn="CWCA"), net_arch=[]))
"""

from __future__ import annotations

import math

import gymnasium as gym
import torch
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import nn

from agents.attention import SelfAttention
from agents.catalog import ATTENTION_TYPES


class SelfAttentionCNN(BaseFeaturesExtractor):
    """Two-convolution extractor with the study's attention block after the first convolution.

    :param observation_space: channel-first image space, (frame_stack, 84, 84).
    :param self_attn: "NA" (no block), "SWA", "CWRA", "CWCA" or "CWRCA".
    :param features_dim: width of the last linear layer (256 in the study).
    """

    def __init__(
        self, observation_space: gym.spaces.Box, self_attn: str = "NA", features_dim: int = 256
    ) -> None:
        if self_attn not in ATTENTION_TYPES:
            raise ValueError(
                f"unknown attention type {self_attn!r}: use one of {', '.join(ATTENTION_TYPES)}"
            )
        super().__init__(observation_space, features_dim)
        self.self_attn = self_attn
        n_input_channels = observation_space.shape[0]
        self.c1 = nn.Conv2d(n_input_channels, 16, kernel_size=8, stride=4)
        self.attention: SelfAttention | None = (
            None if self_attn == "NA" else SelfAttention(self_attn, channels=16)
        )
        self.c2 = nn.Conv2d(16, 32, kernel_size=4, stride=2)
        # Size of the flattened maps from a dummy pass, as NatureCNN does (2592 for 84x84).
        with torch.no_grad():
            n_flatten = self._maps(torch.zeros(1, *observation_space.shape)).flatten(1).shape[1]
        self.l1 = nn.Linear(n_flatten, features_dim)
        # SB3's policy re-applies this (gain sqrt(2) on the whole extractor) when ortho_init is
        # on; doing it here too makes the extractor correct on its own, e.g. in unit tests.
        self.apply(lambda m: ActorCriticPolicy.init_weights(m, gain=math.sqrt(2)))

    def _maps(self, x: torch.Tensor) -> torch.Tensor:
        """Feature maps before the flatten: (N, 32, 9, 9)."""
        f1 = torch.relu(self.c1(x))
        if self.attention is not None:
            f1 = self.attention(f1)  # Y + F1, deliberately no ReLU after (AGENT.md)
        return torch.relu(self.c2(f1))

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        """(N, 4, 84, 84) floats in [0, 1] (SB3 divides by 255) -> (N, features_dim)."""
        return torch.relu(self.l1(self._maps(observations).flatten(1)))


def policy_kwargs(self_attn: str) -> dict[str, object]:
    """The study's PPO policy kwargs: this extractor, shared heads (net_arch=[]), Adam eps 1e-5."""
    return dict(
        features_extractor_class=SelfAttentionCNN,
        features_extractor_kwargs=dict(self_attn=self_attn),
        net_arch=[],
        optimizer_kwargs=dict(eps=1e-5),
    )
