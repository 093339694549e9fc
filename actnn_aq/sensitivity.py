"""How much gradient variance one unit of squared input error costs, by layer kind.

First order, errors spread evenly over a sample's values (what ActNN assumes;
docs/frameworks.md, "Sensitivity"). A layer whose input carries an error of energy e_n
(sample n) adds

    C_n * e_n,   C_n = coef * ||g_n||^2  +  propagated_n

to the variance of the parameter gradients:

- coef * ||g_n||^2: its own weight gradient. A conv weight gradient sums input x output-
  gradient products; an output value meets K * C_in / groups inputs, so (g the output
  gradient, P positions per sample) Var = ||g_n||^2 * K / (groups * P_in) * e_n: ActNN's
  K / 4 / groups * Range_sqr_n * S with its own rounding constant. Norm layers scale their
  input by invstd (rstd), so Var = ||g_n||^2 * mean(invstd^2) / F * e_n.
- propagated_n: norms and GELU/SiLU also pass the error into their input gradient, and
  that noise reaches the weight gradient of the layer that produced their input (the
  source: the last conv/linear run before them), a sum of (output gradient) x (source
  input x_s) products, fan_in of them per weight. Noise independent from value to value
  adds fan_in * mean(x_s^2) per unit of its energy; a batch norm's noise along its
  normalized output adds far more, as the source's sum is coherent (InputNoise).
  Propagation further down is left out: benchmark/actnn_resnet_bytes.py compares.

Against measured single-layer compression on a small trained ResNet, conv/linear
predictions land within 0.6-1.7x at 2 bits and 1.1-4x low at AQ levels (averaging errors
sit where the gradients are); batch norms stay 2-8x low at 2 bits and 6-15x at AQ levels
(coherence is only estimated, deeper propagation left out): a model that ranks layers,
not a bound.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def conv_coef(kernel_numel: int, groups: int, in_positions: int) -> float:
    """Convolution and linear (K = 1, positions = tokens): K / (groups * P_in)."""
    return kernel_numel / (groups * max(in_positions, 1))


def conv_transpose_coef(kernel_numel: int, groups: int, out_positions: int) -> float:
    """Transposed convolution: an input value meets K * C_out / groups outputs: K / (groups * P_out)."""
    return kernel_numel / (groups * max(out_positions, 1))


def norm_coef(sample_numel: int, invstd: torch.Tensor) -> torch.Tensor:
    """BatchNorm / LayerNorm weight gradient: mean(invstd^2) / F."""
    return invstd.detach().float().square().mean() / max(sample_numel, 1)


def conv_fan(kernel_numel: int, in_channels: int, groups: int) -> float:
    """Gain of output-gradient noise into a conv/linear weight gradient, per mean(x^2);
    a transposed conv's is this times P_in / P_out."""
    return kernel_numel * in_channels / groups


def _per_sample(t: torch.Tensor, n: int) -> torch.Tensor:
    return t.reshape(n, -1).mean(1).double()


@dataclass
class InputNoise:
    """How an input error reaches the layer's input gradient, per unit of error energy.

    independent: (N,) u_n, noise independent from value to value.
    along_output: (C,) v_c, noise along the normalized output of the source (a batch norm's
        mean term), with inv_var (C,) that output's 1 / variance.
    """

    independent: torch.Tensor
    along_output: torch.Tensor | None = None
    inv_var: torch.Tensor | None = None

    def propagated(self, fan: float, mean_sq: "float | torch.Tensor",
                   out_sq: torch.Tensor | None) -> torch.Tensor:
        """The variance it adds to the source's weight gradient, per unit error, (N,).

        Independent noise: fan_in * mean(x_s^2) * u_n. Noise along the output, one random
        factor r_c per channel: it adds r_c^2 ||sum_p xhat_c[p] x_s[p]||^2; that vector's
        projection on the channel's weights W_c is M / sqrt(inv_var_c), and for a trained
        source most of it lies there, so ||.||^2 ~ M^2 / (inv_var_c ||W_c||^2) (out_sq =
        ||W_c||^2; without it the isotropic ||W_c||^2 = 1 / (inv_var_c mean(x_s^2))).
        On the noise's device.
        """
        total = fan * mean_sq * self.independent
        if self.along_output is not None:
            along = self.along_output
            if out_sq is not None and out_sq.shape == along.shape:
                per_channel = along / out_sq.clamp_min(1e-30)
            else:
                per_channel = along * self.inv_var * mean_sq
            total = total + per_channel.mean()
        return total


def batch_norm_noise(g: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
                     weight: torch.Tensor | None, sum_dy_xmu: torch.Tensor | None = None,
                     count: float | None = None) -> InputNoise:
    """grad_x = w invstd (g - mean(g) - xhat m), m = mean(g xhat). An input error d (energy
    e per channel) moves xhat by invstd d: an independent term -w invstd^2 m d, so
    u = w^2 invstd^4 m^2; and m by r = invstd mean(g d), variance invstd^2 mean(g^2) e / M^2,
    a term -w invstd r xhat: v_c = w^2 invstd^4 mean(g^2) / M^2 * M^2 (InputNoise.propagated
    brings the M^2 and the rest). Channel means. sum_dy_xmu / count: the (all-reduced) sums
    of a synchronised batch norm."""
    dims = [0, *range(2, x.dim())]
    gf = g.float()
    if sum_dy_xmu is None:
        sum_dy_xmu = (gf * (x.float() - mean.view(1, -1, *([1] * (x.dim() - 2))))).sum(dims)
        count = x.numel() / x.shape[1]
    inv_var = invstd.float().square()
    m = sum_dy_xmu * invstd / count
    scale = (weight.float().square() if weight is not None else 1.0) * inv_var
    u = (scale * inv_var * m.square()).mean()
    v = scale * inv_var * gf.square().mean(dims)
    return InputNoise(u.double().expand(x.shape[0]), v.double(), inv_var.double())


def layer_norm_noise(g: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                     weight: torch.Tensor | None, normalized_ndim: int) -> InputNoise:
    """The batch-norm argument per token (D values), m = mean(g w xhat): the term in m gets
    a random factor per token, which a source sums incoherently over tokens, so both terms
    are independent noise: u = rstd^4 mean(w^2) (m^2 + mean((g w)^2) / D)."""
    dims = tuple(range(x.dim() - normalized_ndim, x.dim()))
    xhat = (x.float() - mean) * rstd
    gw = g.float() * weight.float() if weight is not None else g.float()
    m = (gw * xhat).mean(dims, keepdim=True)
    w2 = weight.float().square().mean() if weight is not None else 1.0
    width = math.prod(x.shape[-normalized_ndim:])
    per_token = rstd.float().pow(4) * w2 * (m.square() + gw.square().mean(dims, keepdim=True) / width)
    return InputNoise(_per_sample(per_token, x.shape[0] if x.dim() > normalized_ndim else 1))


def gelu_noise(g: torch.Tensor, x: torch.Tensor) -> InputNoise:
    """d grad_x = g f''(x) d (incoherent) with f''(x) = pdf(x) (2 - x^2), the erf form for
    both variants."""
    x = x.float()
    second = torch.exp(-0.5 * x.square()) / math.sqrt(2 * math.pi) * (2 - x.square())
    return InputNoise(_per_sample((g.float() * second).square(), x.shape[0] if x.dim() > 1 else 1))


def silu_noise(g: torch.Tensor, x: torch.Tensor) -> InputNoise:
    """f''(x) = s (1 - s) (2 + x (1 - 2 s)), s = sigmoid(x)."""
    x = x.float()
    s = torch.sigmoid(x)
    second = s * (1 - s) * (2 + x * (1 - 2 * s))
    return InputNoise(_per_sample((g.float() * second).square(), x.shape[0] if x.dim() > 1 else 1))
