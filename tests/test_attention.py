"""The attention blocks against naive loop implementations and the axis of each type (AGENT.md)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from agents.attention import BLOCK_TYPES, SelfAttention

torch.set_num_threads(1)

C, H, W = 16, 20, 20


def _softmax_weights(scores: list[float]) -> list[float]:
    top = max(scores)
    exps = [math.exp(s - top) for s in scores]
    total = sum(exps)
    return [e / total for e in exps]


def naive_attention(block: SelfAttention, f1: torch.Tensor) -> torch.Tensor:
    """Y of a batch of one, (1, C, H, W) -> (C, H, W), as explicit loops over tokens (AGENT.md).

    SWA: in each channel, row i attends over rows j; a token is a row's W pixels; n = W.
    CWRA: in each column, pixel (i, w) attends over pixels (j, w); a token is C channels; n = C.
    CWCA: in each row, pixel (h, i) attends over pixels (h, j); a token is C channels; n = C.
    CWRCA: CWRA + CWCA, both with n = W (the original's quirk).
    """
    with torch.no_grad():
        q, k, v = (m(f1)[0].double() for m in (block.query, block.key, block.value))
    y = torch.zeros(C, H, W, dtype=torch.float64)
    kind = block.self_attn

    if kind == "SWA":
        for c in range(C):
            for i in range(H):
                scores = [float(q[c, i] @ k[c, j]) / math.sqrt(W) for j in range(H)]
                for j, a in enumerate(_softmax_weights(scores)):
                    y[c, i] += a * v[c, j]
        return y

    def along_height(scale: int) -> torch.Tensor:
        out = torch.zeros_like(y)
        for w in range(W):
            for i in range(H):
                scores = [float(q[:, i, w] @ k[:, j, w]) / math.sqrt(scale) for j in range(H)]
                for j, a in enumerate(_softmax_weights(scores)):
                    out[:, i, w] += a * v[:, j, w]
        return out

    def along_width(scale: int) -> torch.Tensor:
        out = torch.zeros_like(y)
        for h in range(H):
            for i in range(W):
                scores = [float(q[:, h, i] @ k[:, h, j]) / math.sqrt(scale) for j in range(W)]
                for j, a in enumerate(_softmax_weights(scores)):
                    out[:, h, i] += a * v[:, h, j]
        return out

    if kind == "CWRA":
        return along_height(C)
    if kind == "CWCA":
        return along_width(C)
    return along_height(W) + along_width(W)


def _block(kind: str, seed: int = 0) -> SelfAttention:
    torch.manual_seed(seed)
    return SelfAttention(kind)


def _f1(seed: int = 1) -> torch.Tensor:
    # Non-negative like the ReLU output it stands for, and large enough that softmax is not flat.
    return torch.relu(torch.randn(1, C, H, W, generator=torch.Generator().manual_seed(seed))) * 2


def _changed(kind: str, edit: tuple[slice | int, slice | int]) -> torch.Tensor:
    """(H, W) bool map of where Y moves when F1 is edited at [:, rows, cols] (all channels)."""
    block = _block(kind)
    f1 = _f1()
    f1_edited = f1.clone()
    f1_edited[0, :, edit[0], edit[1]] += 3.0
    with torch.no_grad():
        delta = (block.attend(f1_edited) - block.attend(f1)).abs().amax(dim=(0, 1))
    # "Visible": well above float32 noise, so a test of "only there" is not passed vacuously.
    return delta > 1e-4


@pytest.mark.parametrize("kind", BLOCK_TYPES)
def test_shapes_and_residual(kind: str) -> None:
    block = _block(kind)
    f1 = _f1()
    with torch.no_grad():
        y = block.attend(f1)
        out = block(f1)
    assert y.shape == out.shape == (1, C, H, W)
    torch.testing.assert_close(out, y + f1)


@pytest.mark.parametrize("kind", BLOCK_TYPES)
def test_matches_naive_loops(kind: str) -> None:
    block = _block(kind)
    f1 = _f1()
    with torch.no_grad():
        y = block.attend(f1)[0].double()
    expected = naive_attention(block, f1)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)


def test_cwca_edit_in_one_row_moves_only_that_row() -> None:
    h = 7
    changed = _changed("CWCA", (h, slice(None)))
    expected = torch.zeros(H, W, dtype=torch.bool)
    expected[h, :] = True
    assert torch.equal(changed, expected)


def test_cwca_single_pixel_moves_its_whole_row_only() -> None:
    changed = _changed("CWCA", (4, 11))
    expected = torch.zeros(H, W, dtype=torch.bool)
    expected[4, :] = True
    assert torch.equal(changed, expected)


def test_cwra_edit_in_one_column_moves_only_that_column() -> None:
    w = 13
    changed = _changed("CWRA", (slice(None), w))
    expected = torch.zeros(H, W, dtype=torch.bool)
    expected[:, w] = True
    assert torch.equal(changed, expected)


def test_cwrca_single_pixel_moves_its_row_and_column_only() -> None:
    h, w = 5, 16
    changed = _changed("CWRCA", (h, w))
    expected = torch.zeros(H, W, dtype=torch.bool)
    expected[h, :] = True
    expected[:, w] = True
    assert torch.equal(changed, expected)


def test_swa_has_no_row_or_column_locality() -> None:
    # One pixel moves its row's token in every channel (the 1x1 convs mix channels), and every
    # row attends over all rows: the whole map moves. The naive-loop test pins down the rest.
    changed = _changed("SWA", (5, 16))
    assert bool(changed.all())


@pytest.mark.parametrize(("a", "b"), list(itertools.combinations(BLOCK_TYPES, 2)))
def test_every_pair_of_types_differs(a: str, b: str) -> None:
    block_a, block_b = _block(a), _block(b)
    block_b.load_state_dict(block_a.state_dict())  # same Q, K, V: only the layout differs
    f1 = _f1()
    with torch.no_grad():
        assert (block_a(f1) - block_b(f1)).abs().max() > 1e-3


@pytest.mark.parametrize("kind", BLOCK_TYPES)
def test_gradients_reach_q_k_v(kind: str) -> None:
    block = _block(kind)
    block(_f1()).square().sum().backward()
    for name in ("query", "key", "value"):
        conv = getattr(block, name)
        assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0, name
        assert conv.bias.grad is not None, name


def test_unknown_type_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="CWCA"):
        SelfAttention("NA")
