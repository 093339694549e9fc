"""The error model the bit-allocation solver prices levels with (DESIGN.md section 5).

For each row of a tensor and each quantized level, the expected squared error
sum (x_hat - x)^2 that storing the row at that level adds:

  plain b bits:  sum over groups g of n_g * R_g^2 / (6 * B^2),  B = 2^b - 1
                 (stochastic rounding on a grid of step R_g / B has variance step^2 / 6
                 averaged over positions; R_g = max - min of the group)
  AQ, k values:  D_k + k * sum over groups g' of averages of n_g' * R_g'^2 / (6 * 3^2)
                 D_k = sum (x - mean_k(x))^2, the within-run deviation energy (the bias of
                 replacing a run by its mean), plus the rounding variance of the 2-bit
                 averages, each repeated k times.

The published allocators price AQ like 1-bit rounding; this uses the data instead.
"""
from __future__ import annotations

import torch

from .levels import QUANTIZED_LEVELS, Level
from .reference import _pad_groups, average_runs

ERROR_LEVELS: tuple[Level, ...] = QUANTIZED_LEVELS


def _range_energy(values: torch.Tensor, group_size: int) -> torch.Tensor:
    """sum_g n_g R_g^2 per row of (R, n) values: the part every plain level shares."""
    n = values.shape[1]
    groups = _pad_groups(values, group_size)
    spread = (groups.amax(-1) - groups.amin(-1)).square()
    counts = torch.full((groups.shape[1],), float(group_size), device=values.device)
    counts[-1] = n - (groups.shape[1] - 1) * group_size
    return (spread * counts).sum(-1)


def _rounding_error(energy: torch.Tensor, bits: int) -> torch.Tensor:
    return energy / (6.0 * ((1 << bits) - 1) ** 2)


def level_errors(rows: torch.Tensor, group_size: int = 256,
                 levels: tuple[Level, ...] = ERROR_LEVELS) -> torch.Tensor:
    """(R, F) values -> (R, len(levels)) float32 expected squared error per row and level."""
    rows = rows.float()
    if rows.shape[1] == 0:
        return rows.new_zeros(rows.shape[0], len(levels))
    columns = []
    plain_energy = None
    for level in levels:
        if level.avg == 1:
            if plain_energy is None:
                plain_energy = _range_energy(rows, group_size)
            columns.append(_rounding_error(plain_energy, level.bits))
            continue
        means = average_runs(rows, level.avg)
        repeated = means.repeat_interleave(level.avg, dim=1)[:, : rows.shape[1]]
        deviation = (rows - repeated).square().sum(-1)
        energy = _range_energy(means, group_size)
        columns.append(deviation + level.avg * _rounding_error(energy, level.bits))
    return torch.stack(columns, -1)
