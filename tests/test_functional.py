"""Tests of lib_lora.functional: the LoRA scale rule and the delta/merge maths, against naive computations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lib_lora.functional import delta_weight, lora_scale, merge, unmerge


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("alpha, rank, expected", [
    (None, 4, 1.0),
    (0, 4, 1.0),
    (0.0, 16, 1.0),
    (torch.tensor(0.0), 8, 1.0),
    (2, 4, 0.5),
    (torch.tensor(4.0, dtype=torch.float16), 4, 1.0),
    (torch.tensor(1.0), 32, 1.0 / 32),
    (16.0, 8, 2.0),
])
def test_lora_scale_rules(alpha, rank, expected):
    """scale = alpha / rank; a missing alpha (None) or alpha 0 means alpha = rank (scale 1.0), as sd-scripts and A1111;
    alpha may be a 0-dim tensor of any float dtype."""
    assert lora_scale(alpha, rank) == pytest.approx(expected, rel=1e-7)


@pytest.mark.parametrize("rank", [0, -1])
def test_lora_scale_rejects_rank_below_one(rank):
    """rank < 1 raises ValueError."""
    with pytest.raises(ValueError):
        lora_scale(1.0, rank)


def test_delta_weight_3x3_matches_naive_loop():
    """For a k x k conv, delta[o, i, :, :] = sum_r up[o, r] * down[r, i, :, :], checked element by element."""
    g = _gen(1)
    r, cin, cout = 3, 5, 4
    down = torch.randn(r, cin, 3, 3, generator=g)
    up = torch.randn(cout, r, 1, 1, generator=g)
    got = delta_weight(down, up, (cout, cin, 3, 3))
    naive = torch.zeros(cout, cin, 3, 3)
    for o in range(cout):
        for i in range(cin):
            for kh in range(3):
                for kw in range(3):
                    naive[o, i, kh, kw] = sum(up[o, j, 0, 0] * down[j, i, kh, kw] for j in range(r))
    torch.testing.assert_close(got, naive, rtol=1e-5, atol=1e-6)
    assert got.shape == (cout, cin, 3, 3) and got.dtype == torch.float32


def test_delta_weight_3x3_is_what_the_lora_convs_compute():
    """conv(x, W + delta) == conv(x, W) + up_conv1x1(down_conv3x3(x)) with the layer's stride and padding: the delta
    of a k x k module is exactly the runtime LoRA path (this is what merging relies on)."""
    g = _gen(2)
    r, cin, cout = 2, 4, 6
    weight = torch.randn(cout, cin, 3, 3, generator=g)
    down = torch.randn(r, cin, 3, 3, generator=g)
    up = torch.randn(cout, r, 1, 1, generator=g)
    x = torch.randn(2, cin, 9, 9, generator=g)
    for stride, padding in ((1, 1), (2, 1)):
        merged = F.conv2d(x, weight + delta_weight(down, up, weight.shape), stride=stride, padding=padding)
        runtime = F.conv2d(x, weight, stride=stride, padding=padding) + F.conv2d(
            F.conv2d(x, down, stride=stride, padding=padding), up)
        torch.testing.assert_close(merged, runtime, rtol=1e-4, atol=1e-4)


def test_delta_weight_linear_and_1x1():
    """Linear: delta = up @ down. 1x1 conv: the same product shaped (out, in, 1, 1). A 2-D pair fits a 1x1 conv
    target and a 4-D 1x1 pair fits a Linear target (SD2 proj_in saved as conv by sd-scripts) with the same values."""
    g = _gen(3)
    down, up = torch.randn(4, 7, generator=g), torch.randn(5, 4, generator=g)
    naive = torch.tensor([[sum(up[o, j] * down[j, i] for j in range(4)) for i in range(7)] for o in range(5)])
    lin = delta_weight(down, up, (5, 7))
    torch.testing.assert_close(lin, naive, rtol=1e-5, atol=1e-6)
    conv = delta_weight(down[:, :, None, None], up[:, :, None, None], (5, 7, 1, 1))
    assert conv.shape == (5, 7, 1, 1)
    torch.testing.assert_close(conv.reshape(5, 7), lin, rtol=0, atol=0)
    torch.testing.assert_close(delta_weight(down, up, (5, 7, 1, 1)), conv, rtol=0, atol=0)
    torch.testing.assert_close(delta_weight(down[:, :, None, None], up[:, :, None, None], (5, 7)), lin, rtol=0, atol=0)


@pytest.mark.parametrize("down_shape, up_shape, target", [
    ((4, 7), (5, 4), (5, 8)),
    ((4, 7), (5, 4), (6, 7)),
    ((2, 3, 3, 3), (4, 2, 1, 1), (4, 3, 1, 1)),
])
def test_delta_weight_rejects_a_misfit(down_shape, up_shape, target):
    """A product that does not fit the target shape raises ValueError naming both shapes."""
    with pytest.raises(ValueError, match="does not fit"):
        delta_weight(torch.ones(down_shape), torch.ones(up_shape), target)


def test_merge_adds_scaled_delta_and_unmerge_subtracts_it():
    """merge adds multiplier * scale * delta in place (fp32), unmerge takes it off again (up to rounding)."""
    g = _gen(4)
    weight = torch.randn(6, 5, 3, 3, generator=g)
    original = weight.clone()
    down, up = torch.randn(2, 5, 3, 3, generator=g), torch.randn(6, 2, 1, 1, generator=g)
    merge(weight, down, up, scale=0.25, multiplier=0.8)
    torch.testing.assert_close(weight, original + 0.2 * delta_weight(down, up, weight.shape), rtol=1e-6, atol=1e-6)
    unmerge(weight, down, up, scale=0.25, multiplier=0.8)
    torch.testing.assert_close(weight, original, rtol=1e-5, atol=1e-6)


def test_merge_into_half_weight_computes_in_fp32():
    """Merging into an fp16 weight keeps its dtype and equals the fp32 sum rounded once to fp16."""
    g = _gen(5)
    weight = torch.randn(8, 8, generator=g).half()
    original = weight.clone()
    down, up = torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g)
    merge(weight, down, up, scale=0.5, multiplier=1.0)
    assert weight.dtype == torch.float16
    expected = (original.float() + 0.5 * (up @ down)).half()
    assert torch.equal(weight, expected)
