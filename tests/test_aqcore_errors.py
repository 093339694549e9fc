import pytest
import torch

import aqcore


def measured_error(x, level, seeds=30):
    runs = [(aqcore.decompress(aqcore.compress(x, level, seed=s)) - x).square().sum(1)
            for s in range(seeds)]
    return torch.stack(runs).mean(0)


@pytest.mark.parametrize("kind", ["noise", "smooth", "relu"])
def test_level_errors_predict_measured_error(kind):
    torch.manual_seed(0)
    x = torch.randn(3, 4096)
    if kind == "smooth":
        x = x.cumsum(1) / 20
    if kind == "relu":
        x = torch.relu(x)
    predicted = aqcore.level_errors(x)
    for i, level in enumerate(aqcore.ERROR_LEVELS):
        ratio = measured_error(x, level) / predicted[:, i]
        # zero-keeping groups (ReLU) round better than the range model assumes
        low = 0.2 if kind == "relu" and level.avg == 1 else 0.7
        assert ((ratio > low) & (ratio < 1.4)).all(), (level, ratio)


def test_aq_is_priced_from_data():
    torch.manual_seed(0)
    pairs = torch.rand(4096).repeat_interleave(2).view(1, -1)   # averaging pairs is free
    alternating = torch.rand(4096).repeat_interleave(2).view(1, -1) * torch.tensor([1.0, -1.0]).repeat(4096)
    e_pairs, e_alt = aqcore.level_errors(pairs)[0], aqcore.level_errors(alternating)[0]
    names = [level.name for level in aqcore.ERROR_LEVELS]
    one, aq1 = names.index("1"), names.index("aq1")
    # the published allocators price aq1 exactly like 1-bit in both cases
    assert e_pairs[aq1] < 0.3 * e_pairs[one]
    assert e_alt[aq1] / e_alt[one] > 3 * e_pairs[aq1] / e_pairs[one]
    assert (e_pairs[:4].diff() > 0).all()  # fewer bits, more error


def test_level_errors_shapes():
    assert aqcore.level_errors(torch.randn(5, 0)).shape == (5, len(aqcore.ERROR_LEVELS))
    assert aqcore.level_errors(torch.randn(2, 7), group_size=32).shape == (2, 7)
