"""VPD-SR's high-frequency perception loss (Haar detail bands)."""

from __future__ import annotations

import pytest
import torch

from onestep_sr.training.losses.high_frequency import HighFrequencyPerceptionLoss, haar_details, haar_level


def test_haar_bands_by_hand_and_energy_is_preserved():
    x = torch.tensor([[[[1.0, 2.0], [3.0, 5.0]]]])  # a=1 b=2 c=3 d=5
    low, details = haar_level(x)
    assert float(low) == pytest.approx((1 + 2 + 3 + 5) / 2)
    assert details.flatten().tolist() == pytest.approx([(1 + 2 - 3 - 5) / 2, (1 - 2 + 3 - 5) / 2, (1 - 2 - 3 + 5) / 2])
    y = torch.randn(2, 3, 8, 6, generator=torch.Generator().manual_seed(0))
    low, details = haar_level(y)
    torch.testing.assert_close((low ** 2).sum() + (details ** 2).sum(), (y ** 2).sum())


def test_loss_by_hand_and_blind_to_low_frequencies():
    sr = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    target = torch.zeros_like(sr)
    # one level: the three detail bands are 0.5 each -> mean |.| = 0.5; mse -> 0.25
    assert float(HighFrequencyPerceptionLoss(levels=1)(sr, target)) == pytest.approx(0.5)
    assert float(HighFrequencyPerceptionLoss(levels=1, norm="mse")(sr, target)) == pytest.approx(0.25)
    image = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    loss = HighFrequencyPerceptionLoss(levels=3)
    assert float(loss(image + 0.7, image)) == pytest.approx(0.0, abs=1e-6)  # a constant shift is all low band
    blurred = torch.nn.functional.avg_pool2d(image, 3, stride=1, padding=1, count_include_pad=False)
    assert float(loss(blurred, image)) > 0.1


def test_levels_weights_and_odd_sizes():
    gen = torch.Generator().manual_seed(2)
    a, b = torch.randn(1, 2, 9, 7, generator=gen), torch.randn(1, 2, 9, 7, generator=gen)
    da, db = haar_details(a, 2), haar_details(b, 2)
    assert da[0].shape == (1, 3, 2, 5, 4) and da[1].shape == (1, 3, 2, 3, 2)
    expected = 0.3 * (da[0] - db[0]).abs().mean() + 2.0 * (da[1] - db[1]).abs().mean()
    got = HighFrequencyPerceptionLoss(levels=2, level_weights=(0.3, 2.0))(a, b)
    torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="level weights"):
        HighFrequencyPerceptionLoss(levels=2, level_weights=(1.0,))
