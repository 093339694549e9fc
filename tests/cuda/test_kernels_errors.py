"""compress(..., errors=True): the error model of errors.level_errors from the same pass."""
import pytest
import torch

import aqcore
from aqcore import errors, kernels
from aqcore.levels import LEVELS

pytestmark = pytest.mark.cuda


def close(a, b):
    return torch.allclose(a.cpu(), b.cpu(), rtol=1e-4, atol=1e-30)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (2, 2048), (3, 2100), (1, 100_000), (6, 333)])
def test_fused_statistics_match_level_errors(dtype, shape):
    g = torch.Generator(device="cuda").manual_seed(shape[1])
    smooth = torch.linspace(0, 5, shape[1], device="cuda")
    x = (torch.randn(shape, device="cuda", generator=g) + smooth).to(dtype)
    for level in ("8", "1", "aq1", "aq0.25"):
        payload, meta, found = kernels.compress_rows_with_errors(x, [LEVELS[level]] * shape[0], 4, 256)
        plain = kernels.compress_rows(x, [LEVELS[level]] * shape[0], 4, 256)
        assert torch.equal(payload, plain[0]) and torch.equal(meta.view(torch.int16),
                                                              plain[1].view(torch.int16))
        assert close(found, errors.level_errors(x.float().cpu(), 256))


def test_api_keyword_mixed_levels_and_layouts():
    x = torch.randn(4, 3, 20, 21, device="cuda").to(memory_format=torch.channels_last)
    ct, found = aqcore.compress(x, ["1", "aq0.5", "8", "aq0.25"], seed=2, errors=True)
    ref_ct, expected = aqcore.compress(x.cpu(), ["1", "aq0.5", "8", "aq0.25"], seed=2, errors=True)
    assert torch.equal(ct.payload.cpu(), ref_ct.payload)
    assert found.shape == (4, len(errors.ERROR_LEVELS)) and close(found, expected)
    plain = aqcore.compress(x, "2", seed=2)
    assert isinstance(plain, aqcore.CompressedTensor)


def test_other_group_sizes_fall_back_to_a_second_pass():
    x = torch.randn(2, 3000, device="cuda")
    _, found = aqcore.compress(x, "4", group_size=128, errors=True)  # one row: one level
    assert close(found, errors.level_errors(x.cpu().reshape(1, -1), 128))
    _, per_row = aqcore.compress(x, ["4", "aq1"], group_size=128, errors=True)
    assert close(per_row, errors.level_errors(x.cpu(), 128))


def test_non_finite_rows_give_non_finite_errors():
    x = torch.randn(2, 5000, device="cuda")
    x[1, 17] = float("nan")
    _, found = aqcore.compress(x, ["2", "2"], errors=True)
    expected = errors.level_errors(x.cpu(), 256)
    assert torch.equal(torch.isfinite(found.cpu()), torch.isfinite(expected))
    assert close(found[0], expected[0])
