"""How much gradient variance one unit of squared input error costs, by layer kind.

First order, errors spread evenly over a sample's values (what ActNN assumes, ALGORITHMS.md
B.6). A layer whose input carries an error of energy e_n (sample n) adds

    C_n * e_n,   C_n = coef * ||g_n||^2  +  propagated_n

to the variance of the parameter gradients:

- coef * ||g_n||^2: its own weight gradient. A conv weight gradient sums input x output-
  gradient products; an output value meets K * C_in / groups inputs, so (g the output
  gradient, P positions per sample) Var = ||g_n||^2 * K / (groups * P_in) * e_n: ActNN's
  K / 4 / groups * Range_sqr_n * S with its own rounding constant. Norm layers scale their
  input by invstd (rstd), so Var = ||g_n||^2 * mean(invstd^2) / F * e_n.
- propagated: norms and GELU/SiLU also pass the error into their input gradient, and that
  noise reaches the weight gradient of the layer that produced their input (the source:
  the last conv/linear run before them), a sum of (output gradient) x (source input x_s)
  products, fan_in of them per weight. Noise independent from value to value, energy
  u_n e_n, adds fan_in * mean(x_s^2) * u_n e_n. A batch norm also adds noise along xhat
  with one random factor per channel; that sums coherently over the M positions and adds
  about mean(x_s^2) * v_n e_n (v_n defined below). So
  C_n += mean(x_s^2) * (fan_in * u_n + v_n). Propagation further down is left out.
"""
from __future__ import annotations

import math

import torch


def conv_coef(kernel_numel: int, groups: int, in_positions: int) -> float:
    """Convolution and linear (K = 1, positions = tokens): K / (groups * P_in)."""
    return kernel_numel / (groups * max(in_positions, 1))


def conv_transpose_coef(kernel_numel: int, groups: int, out_positions: int) -> float:
    """Transposed convolution: an input value meets K * C_out / groups outputs: K / (groups * P_out)."""
    return kernel_numel / (groups * max(out_positions, 1))


def norm_coef(sample_numel: int, invstd: torch.Tensor) -> float:
    """BatchNorm / LayerNorm weight gradient: mean(invstd^2) / F."""
    return invstd.float().square().mean().item() / max(sample_numel, 1)


def conv_fan(kernel_numel: int, in_channels: int, groups: int) -> float:
    """Gain of output-gradient noise into a conv/linear weight gradient, per mean(x^2);
    a transposed conv's is this times P_in / P_out."""
    return kernel_numel * in_channels / groups


def _per_sample(t: torch.Tensor, n: int) -> torch.Tensor:
    return t.reshape(n, -1).mean(1).double().cpu()


def batch_norm_noise(g: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
                     weight: torch.Tensor | None, sum_dy_xmu: torch.Tensor | None = None,
                     count: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """grad_x = w invstd (g - mean(g) - xhat m), m = mean(g xhat). An input error d (energy
    e per channel) moves xhat by invstd d: an independent term -w invstd^2 m d, so
    u = w^2 invstd^4 m^2; and m by invstd mean(g d): a term along xhat of energy
    w^2 invstd^4 mean(g^2) e / M, which the source's weight gradient sums coherently
    (M times), so v = w^2 invstd^4 mean(g^2). Returns (u_n, v_n), (N,) each, channel means.
    sum_dy_xmu / count: the (all-reduced) sums of a synchronised batch norm."""
    dims = [0, *range(2, x.dim())]
    gf = g.float()
    if sum_dy_xmu is None:
        sum_dy_xmu = (gf * (x.float() - mean.view(1, -1, *([1] * (x.dim() - 2))))).sum(dims)
        count = x.numel() / x.shape[1]
    m = sum_dy_xmu * invstd / count
    w2 = weight.float().square() if weight is not None else 1.0
    scale = w2 * invstd.float().pow(4)
    u = (scale * m.square()).mean()
    v = (scale * gf.square().mean(dims)).mean()
    n = x.shape[0]
    return u.double().cpu().expand(n), v.double().cpu().expand(n)


def layer_norm_noise(g: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                     weight: torch.Tensor | None, normalized_ndim: int) -> tuple[torch.Tensor, None]:
    """The batch-norm argument per token, m = mean(g w xhat): u = rstd^4 m^2 mean(w^2).
    (Its term along xhat varies token by token, so a source sums it incoherently: it is
    1/D of u's order and left out.)"""
    dims = tuple(range(x.dim() - normalized_ndim, x.dim()))
    xhat = (x.float() - mean) * rstd
    gw = g.float() * weight.float() if weight is not None else g.float()
    m = (gw * xhat).mean(dims, keepdim=True)
    w2 = weight.float().square().mean() if weight is not None else 1.0
    n = x.shape[0] if x.dim() > normalized_ndim else 1
    return _per_sample(rstd.float().pow(4) * w2 * m.square(), n), None


def gelu_noise(g: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, None]:
    """d grad_x = g f''(x) d (incoherent) with f''(x) = pdf(x) (2 - x^2), the erf form for
    both variants."""
    x = x.float()
    second = torch.exp(-0.5 * x.square()) / math.sqrt(2 * math.pi) * (2 - x.square())
    return _per_sample((g.float() * second).square(), x.shape[0] if x.dim() > 1 else 1), None


def silu_noise(g: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, None]:
    """f''(x) = s (1 - s) (2 + x (1 - 2 s)), s = sigmoid(x)."""
    x = x.float()
    s = torch.sigmoid(x)
    second = s * (1 - s) * (2 + x * (1 - 2 * s))
    return _per_sample((g.float() * second).square(), x.shape[0] if x.dim() > 1 else 1), None
