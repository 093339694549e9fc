"""The error model the bit-allocation solver prices levels with (docs/errors.md).

For each row of a tensor and each quantized level, the expected squared error
sum (x_hat - x)^2 that storing the row at that level adds:

  plain b bits:  sum over groups g of n_g * R_g^2 / (6 * B^2),  B = 2^b - 1
                 (stochastic rounding on a grid of step R_g / B has variance step^2 / 6
                 averaged over positions; R_g = max - min of the group)
  AQ, k values:  D_k + k * sum over groups g' of averages of n_g' * R_g'^2 / (6 * 3^2)
                 D_k = sum (x - mean_k(x))^2, the within-run deviation energy (the bias of
                 replacing a run by its mean), plus the rounding variance of the 2-bit
                 averages, each repeated k times.

A short last run averages the values it has and deviates about its own mean; a short
last group counts its n_g values.

  zero-keeping AQ, k values: the AQ error of the rows whose zeros are filled with their
                 run's nonzero mean (reference.fill_zeros): D_k is then the deviation of
                 the nonzeros about their own mean (zeros are exact); the rounding
                 variance is scaled by the row's share of nonzeros (zeros are exact) and
                 taken on the zero-keeping grid of B - 1 steps (runs of zeros average to 0).

The published allocators price AQ like 1-bit rounding; this uses the data instead.

How it is computed (training steps call it for every layer, so it stays cheap on any
device: no host synchronization, no data-dependent shapes, few ops and passes; on CUDA
with group_size 256, aqcore.level_errors takes the fused kernel statistics instead):

  * every plain level shares one energy sum_g n_g R_g^2, from one min/max pass over the
    (R, groups, group_size) view of the rows;
  * runs of 2k are pairs of runs of k: their means are the pair means of the run-k means,
    and by the law of total variance D_2k = D_k + k * sum over pairs (a, b) of run-k
    means of (a - b)^2 / 2. Deviations come from differences, never from
    sum x^2 - k * mean^2, so a large common offset does not swamp them. Each AQ level
    costs a difference, a pair mean and a min/max over tensors half the size of the
    level before, and only the runs the requested levels need are built;
  * a ragged end (a short last run, a short last group) is merged from slices of a few
    values with the unequal-count form of the same identity (counts n1, n2: the pair
    adds n1 n2 / (n1 + n2) (a - b)^2), never by padding or copying the whole tensor.

Sums are float32 (half-precision rows are read as they are for the ranges and upcast
once for the averages).
"""
from __future__ import annotations

import math

import torch

from .levels import QUANTIZED_LEVELS, Level
from .reference import fill_zeros

ERROR_LEVELS: tuple[Level, ...] = QUANTIZED_LEVELS


def _min_max(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (min, max) over the last dim in one aminmax pass; on the CPU amin + amax,
    which are vectorized where aminmax is not (several times faster there)."""
    if groups.device.type == "cpu":
        return groups.amin(-1), groups.amax(-1)
    return torch.aminmax(groups, dim=-1)


def _range_root(body: torch.Tensor, tail: torch.Tensor | None,
                group_size: int) -> torch.Tensor:
    """sqrt(sum over groups g of (n_g / group_size) * R_g^2), float32 (R,), for each row
    of the sequence body (R, q) followed by tail ((R,) or None: one more value per row).

    The full groups come from one min/max over a view of body; the last, possibly short,
    group from the fewer than group_size + 1 values left over, so nothing is padded. (The
    root lets the caller square and scale in one op.)"""
    rows, q = body.shape
    full = q - q % group_size
    root = None
    if full:
        head = body if full == q else body[:, :full]
        low, high = _min_max(head.reshape(rows, full // group_size, group_size))
        root = torch.linalg.vector_norm(high.float() - low.float(), dim=-1)
    rest = body[:, full:] if full < q else None
    if tail is not None:
        tail = tail.unsqueeze(1)
        rest = tail if rest is None else torch.cat([rest, tail], 1)
    if rest is None:
        return root
    low, high = _min_max(rest)
    spread = (high.float() - low.float()) * math.sqrt(rest.shape[1] / group_size)
    return spread if root is None else torch.hypot(root, spread)


def _halve(body: torch.Tensor, tail: torch.Tensor | None, tail_count: int, run: int,
           deviation: torch.Tensor):
    """Runs of `run` values -> runs of 2 * run.

    body (R, q) holds the means of the full runs, tail (R,) the mean of a short last run
    of tail_count values (None when run divides the row length), deviation D_run (R,).
    Returns the same four for runs of 2 * run."""
    rows, q = body.shape
    half = q // 2
    if half:
        first, second = body[:, 0 : 2 * half : 2], body[:, 1 : 2 * half : 2]
        # each pair (a, b) of run means adds run * (a - b)^2 / 2 (a difference: a large
        # common offset drops out before anything is squared)
        gap = torch.linalg.vector_norm(first - second, dim=-1)
        deviation = torch.addcmul(deviation, gap, gap, value=run / 2)
        means = torch.lerp(first, second, 0.5)
    else:
        means = body[:, :0]
    if q % 2:  # the unpaired last full run joins the short run, or becomes it
        odd = body[:, q - 1]
        if tail is None:
            tail, tail_count = odd, run
        else:  # counts run and c: the pair adds run * c / (run + c) * (a - b)^2
            share = tail_count / (run + tail_count)
            gap = odd - tail
            deviation = torch.addcmul(deviation, gap, gap, value=run * share)
            tail = torch.lerp(odd, tail, share)
            tail_count += run
    return means, tail, tail_count, deviation


def _rounding_scale(bits: int, group_size: int) -> float:
    """Range energy in units of group_size (see _range_root) -> rounding variance."""
    return group_size / (6.0 * ((1 << bits) - 1) ** 2)


def level_errors(rows: torch.Tensor, group_size: int = 256,
                 levels: tuple[Level, ...] = ERROR_LEVELS) -> torch.Tensor:
    """(R, F) values -> (R, len(levels)) float32 expected squared error per row and level."""
    deviation, rounding = error_terms(rows, group_size, levels)
    return deviation + rounding


def error_terms(rows: torch.Tensor, group_size: int = 256,
                levels: tuple[Level, ...] = ERROR_LEVELS) -> tuple[torch.Tensor, torch.Tensor]:
    """level_errors in its two parts, each (R, len(levels)) float32: the deterministic
    deviation of averaging (D_k: the same every time, a bias; 0 for plain levels) and the
    variance of stochastic rounding (fresh noise every time)."""
    n_rows, n = rows.shape
    if n == 0 or not levels:
        zero = torch.zeros(n_rows, len(levels), device=rows.device)
        return zero, zero.clone()
    plain = tuple(dict.fromkeys(level for level in levels if not level.zeros))
    columns = {}
    if plain:
        deviation, rounding = _error_terms(rows, group_size, plain)
        columns = dict(zip(plain, zip(deviation.unbind(-1), rounding.unbind(-1))))
    for level in levels:
        if level.zeros and level not in columns:
            # rounding reaches the nonzeros only, scaled by their share of the row, on the
            # zero-keeping grid (B - 1 steps: runs of zeros make 0 a code of its own)
            filled = fill_zeros(rows, level.avg)
            deviation, rounding = _error_terms(filled, group_size, (level.codes_level,))
            steps = (1 << level.bits) - 1
            density = (rows != 0).sum(1, dtype=torch.float32) * (steps / (steps - 1)) ** 2 / n
            columns[level] = (deviation[:, 0], rounding[:, 0] * density)
    return tuple(torch.stack([columns[level][part] for level in levels], -1) for part in (0, 1))


def _error_terms(rows: torch.Tensor, group_size: int, levels: tuple[Level, ...]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(deviation D_k, rounding variance) per row and plain or AQ level, each (R, len(levels))."""
    n_rows = rows.shape[0]
    runs = {level.avg for level in levels}
    if any(k & (k - 1) for k in runs):
        raise ValueError(f"level_errors: AQ runs must be powers of two, got {sorted(runs)}")
    zero = torch.zeros(n_rows, device=rows.device)
    roots, deviations = {}, {1: zero}
    if 1 in runs:
        roots[1] = _range_root(rows, None, group_size)
    means, tail, tail_count, deviation, run = rows, None, 0, zero, 1
    if max(runs) > 1:
        means = rows.float()  # the one upcast of half-precision rows
    while run < max(runs):
        means, tail, tail_count, deviation = _halve(means, tail, tail_count, run, deviation)
        run *= 2
        if run in runs:
            roots[run], deviations[run] = _range_root(means, tail, group_size), deviation
    rounding = [roots[level.avg].square() * (level.avg * _rounding_scale(level.bits, group_size))
                for level in levels]
    return torch.stack([deviations[level.avg] for level in levels], -1), torch.stack(rounding, -1)
