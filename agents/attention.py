"""The study's self-attention blocks: one module, four layouts (AGENT.md, "The attention block").

Every block reads the first convolution's output F1 (N, C=16, H=20, W=20), computes Q, K and V with
three separate 1x1 convolutions, applies one head of scaled dot-product attention over the last
two dimensions of a permuted layout, permutes the result back to (N, C, H, W) and adds F1:

    out = softmax(q kᵀ / sqrt(n)) v + F1

The types differ only in the layout (who attends to whom) and the scale n:

| type  | layout       | attention                                     | n  |
|-------|--------------|-----------------------------------------------|----|
| SWA   | (N, C, H, W) | per channel, rows over rows (tokens: W pixels) | W  |
| CWRA  | (N, W, H, C) | per column, pixels along the height (tokens: C) | C  |
| CWCA  | (N, H, W, C) | per row, pixels along the width (tokens: C)    | C  |
| CWRCA | CWRA + CWCA  | both branches from the same q, k, v, summed    | W  |

CWRCA's n = W for both branches is a quirk of the original code, which read the scale from the key
before permuting it; it is kept so that trained weights mean the same thing.

The original module also registered two scalar parameters (alpha=0, beta=1) that the forward pass
never used. They are left out here: they take no gradient and change nothing but the parameter
count (676,960 instead of 676,962 for an extractor with attention).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from agents.catalog import ATTENTION_TYPES

#: Types that have a block (NA is the plain two-convolution extractor).
BLOCK_TYPES: tuple[str, ...] = tuple(t for t in ATTENTION_TYPES if t != "NA")

# Permutations from (N, C, H, W) to each layout; each is its own inverse here or has an explicit
# inverse below, so the result is always returned as (N, C, H, W).
_TO_CWRA = (0, 3, 2, 1)  # (N, W, H, C); self-inverse
_TO_CWCA = (0, 2, 3, 1)  # (N, H, W, C)
_FROM_CWCA = (0, 3, 1, 2)


def scaled_dot_product(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale_dim: int
) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(scale_dim)) v over the last two dimensions (one head)."""
    scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(scale_dim)
    return torch.matmul(torch.softmax(scores, dim=-1), v)


class SelfAttention(nn.Module):
    """One residual self-attention block of the given type on (N, C, H, W) feature maps.

    :param self_attn: "SWA", "CWRA", "CWCA" or "CWRCA".
    :param channels: C of the input (16 after the study's first convolution).
    """

    def __init__(self, self_attn: str, channels: int = 16) -> None:
        super().__init__()
        if self_attn not in BLOCK_TYPES:
            raise ValueError(
                f"unknown attention type {self_attn!r}: use one of {', '.join(BLOCK_TYPES)} "
                "(NA means no block: do not build one)"
            )
        self.self_attn = self_attn
        self.query = nn.Conv2d(channels, channels, kernel_size=1)
        self.key = nn.Conv2d(channels, channels, kernel_size=1)
        self.value = nn.Conv2d(channels, channels, kernel_size=1)

    def attend(self, f1: torch.Tensor) -> torch.Tensor:
        """Y, the attention output before the residual, (N, C, H, W)."""
        q, k, v = self.query(f1), self.key(f1), self.value(f1)
        if self.self_attn == "SWA":
            return scaled_dot_product(q, k, v, scale_dim=k.size(-1))
        if self.self_attn == "CWRA":
            return self._cwra(q, k, v, scale_dim=k.size(1))
        if self.self_attn == "CWCA":
            return self._cwca(q, k, v, scale_dim=k.size(1))
        # CWRCA: the scale of both branches is the unpermuted key's last dimension (W).
        return self._cwra(q, k, v, scale_dim=k.size(-1)) + self._cwca(q, k, v, k.size(-1))

    @staticmethod
    def _cwra(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale_dim: int) -> torch.Tensor:
        """Within each column, each pixel attends along the height; tokens are channel vectors."""
        q, k, v = (t.permute(*_TO_CWRA) for t in (q, k, v))
        return scaled_dot_product(q, k, v, scale_dim).permute(*_TO_CWRA)

    @staticmethod
    def _cwca(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale_dim: int) -> torch.Tensor:
        """Within each row, each pixel attends along the width; tokens are channel vectors."""
        q, k, v = (t.permute(*_TO_CWCA) for t in (q, k, v))
        return scaled_dot_product(q, k, v, scale_dim).permute(*_FROM_CWCA)

    def forward(self, f1: torch.Tensor) -> torch.Tensor:
        """out = Y + F1 (no gamma, no norm, no activation after: AGENT.md)."""
        return self.attend(f1) + f1
