"""Per-row levels chosen on the tensor's own device, without a host synchronization.

A per-sample allocation at every layer's forward (ActNN) cannot wait for the host: the
numpy solver (solver.py) needs the errors on the CPU, one device sync per layer, and the
GPU idles while Python solves. Here the same multiple-choice knapsack is solved where the
data lives, by the Lagrangian method, in one CUDA launch (or the torch code below, which
is its specification and the CPU path).

Inputs: weighted errors W (N, L), W[n, l] = C_n e_n(l) (NaN, Inf and negative entries
count as 0: statistics of non-finite data price every level alike), integer costs (N, L)
or (L,) (bytes), an integer budget >= the cheapest choice. Levels must run from
expensive to cheap, so that ties go to the cheaper one. The procedure, bit for bit:

1. For a multiplier lam (float32), row n takes the largest l minimising
   W[n, l] + lam * cost[n, l] (float32, each operation rounded); total(lam) = sum of costs.
2. lam = 0 if total(0) fits. Otherwise lam is searched among float32 bit patterns in
   [0, +inf]: with lo infeasible and hi feasible, the 31 patterns lo + (i + 1) * (hi - lo) // 32
   are tried at once; hi becomes the first that fits, lo the one before; until hi = lo + 1.
3. Repair: the rows whose choice at the next smaller pattern (hi - 1) costs more take it,
   in row order, as long as the running sum of their extra costs fits the budget left
   (ties broken towards the cheap level would leave budget unspent without this step).

The result is the LP relaxation's optimum rounded down plus a first-fit repair: at most
one row's step from the optimum of the knapsack (solver.py's "lp" method does the same on
the host).
"""
from __future__ import annotations

import torch

SEARCH_WAYS = 32
INF_BITS = 0x7F800000  # the float32 bit pattern of +inf


def _choices(weighted: torch.Tensor, costs: torch.Tensor, patterns: list[int]) -> torch.Tensor:
    """(K, N) level index per row at each multiplier given as a float32 bit pattern."""
    lam = torch.tensor(patterns, dtype=torch.int32, device=weighted.device).view(torch.float32)
    scaled = lam.view(-1, 1, 1) * costs.float().expand_as(weighted).unsqueeze(0)
    values = weighted.unsqueeze(0) + scaled
    last = weighted.shape[1] - 1
    return last - values.flip(-1).argmin(-1)  # argmin takes the first minimum


def _totals(costs: torch.Tensor, choices: torch.Tensor) -> torch.Tensor:
    full = costs.expand(choices.shape[-1], -1) if costs.dim() == 1 else costs
    return full.gather(1, choices.t()).sum(0)


def _search(weighted: torch.Tensor, costs: torch.Tensor, budget: int) -> int:
    """The multiplier's bit pattern of step 2."""
    if int(_totals(costs, _choices(weighted, costs, [0]))[0]) <= budget:
        return 0
    lo, hi = 0, INF_BITS
    while hi - lo > 1:
        span = hi - lo
        trials = [lo + (i + 1) * span // SEARCH_WAYS for i in range(SEARCH_WAYS - 1)]
        fits = (_totals(costs, _choices(weighted, costs, trials)) <= budget).tolist()
        first = fits.index(True) if True in fits else SEARCH_WAYS - 1
        lo, hi = (trials[first - 1] if first > 0 else lo), (trials + [hi])[first]
    return hi


def reference_allocate_rows(weighted: torch.Tensor, costs: torch.Tensor, budget: int) -> torch.Tensor:
    """The specification of allocate_rows (module docstring); synchronizes freely."""
    if weighted.shape[0] == 0:
        return torch.zeros(0, dtype=torch.int64, device=weighted.device)
    pattern = _search(weighted, costs, budget)
    choice, alternative = _choices(weighted, costs, [pattern, max(pattern - 1, 0)])
    full = costs.expand_as(weighted) if costs.dim() == 1 else costs
    spent = full.gather(1, choice.unsqueeze(1)).squeeze(1)
    extra = (full.gather(1, alternative.unsqueeze(1)).squeeze(1) - spent).clamp_min(0)
    take = (extra > 0) & (extra.cumsum(0) <= budget - spent.sum())
    return torch.where(take, alternative, choice)


def _check(weighted: torch.Tensor, costs: torch.Tensor | None = None) -> None:
    """Shapes and dtypes (values are the caller's: checking them would sync)."""
    if not isinstance(weighted, torch.Tensor) or not isinstance(costs, (torch.Tensor, type(None))):
        raise TypeError(f"allocate_rows takes torch tensors: weighted errors (rows, levels) "
                        f"float32 and costs int64, got {type(weighted).__name__} and "
                        f"{type(costs).__name__}")
    if weighted.dim() != 2 or weighted.dtype != torch.float32:
        raise ValueError(f"weighted errors must be a (rows, levels) float32 tensor, got "
                         f"{tuple(weighted.shape)} {weighted.dtype}")
    if weighted.shape[1] > 8:
        raise ValueError(f"at most 8 levels per row, got {weighted.shape[1]}")
    if costs is None:
        return
    if costs.dtype != torch.int64 or costs.shape not in ((weighted.shape[1],), weighted.shape):
        raise ValueError(f"costs must be int64 of shape ({weighted.shape[1]},) or "
                         f"{tuple(weighted.shape)}, got {tuple(costs.shape)} {costs.dtype}")
    if costs.device != weighted.device:
        raise ValueError("weighted errors and costs must be on the same device")


def reference_row_table(choice: torch.Tensor, codes: list[int], slots: list[int],
                        payloads: list[int]) -> torch.Tensor:
    """The table of format.py's allocated layout for rows at ladder positions `choice`:
    rows sorted by level code (stable), slot after slot; (code, byte offset, metadata word
    offset, row) per slot."""
    device = choice.device
    code = torch.tensor(codes, device=device)[choice]
    order = torch.argsort(code, stable=True)
    slot = torch.tensor(slots, device=device)[choice][order]
    start = slot.cumsum(0) - slot
    meta = (start + torch.tensor(payloads, device=device)[choice][order]) // 4
    return torch.stack([code[order], start, meta, order], 1)


def _finite(weighted: torch.Tensor) -> torch.Tensor:
    return weighted.nan_to_num(0.0, 0.0, 0.0).clamp_min(0.0)


def allocate_rows(weighted: torch.Tensor, costs: torch.Tensor, budget: int) -> torch.Tensor:
    """Level index per row (int64, weighted's device) minimising sum_n weighted[n, l_n]
    within sum_n costs[n, l_n] <= budget (module docstring). The caller guarantees levels
    ordered from expensive to cheap and a budget that the cheapest levels meet; on CUDA
    this runs as one kernel with no host synchronization."""
    _check(weighted, costs)
    weighted = _finite(weighted)
    if weighted.is_cuda:
        from . import kernels

        if kernels.available():
            return kernels.allocate_rows(weighted, costs, budget)
    return reference_allocate_rows(weighted, costs, budget)


def allocate_layout(weighted: torch.Tensor, budget: int, codes: list[int], slots: list[int],
                    payloads: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """allocate_rows with costs = slots (bytes of a row's slot per ladder level), and the
    row table of the chosen levels (reference_row_table): (choice, table), one launch on CUDA."""
    _check(weighted)
    if not len(codes) == len(slots) == len(payloads) == weighted.shape[-1]:
        raise ValueError("codes, slots and payloads need one entry per level of weighted")
    weighted = _finite(weighted)
    if weighted.is_cuda:
        from . import kernels

        if kernels.available():  # the lists travel as kernel arguments: no upload, no sync
            return kernels.allocate_layout(weighted, budget, codes, slots, payloads)
    choice = reference_allocate_rows(weighted, torch.tensor(slots, device=weighted.device), budget)
    return choice, reference_row_table(choice, codes, slots, payloads)
