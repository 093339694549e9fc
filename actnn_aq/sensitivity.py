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
  input by invstd (rstd), so Var = ||g_n||^2 * mean(invstd^2) / F * e_n; batch norms store
  their input normalized (ops/norm.py), so their errors come in xhat units and invstd = 1.
- propagated_n: norms and GELU/SiLU also pass the error into their input gradient, and
  that noise reaches the weight gradient of the layer that produced their input (the
  source: the last conv/linear run before them), a sum of (output gradient) x (source
  input x_s) products, fan_in of them per weight. Noise independent from value to value
  adds fan_in * mean(x_s^2) per unit of its energy; a batch norm's noise along its
  normalized output adds far more, as the source's sum is coherent (InputNoise).
  Propagation further down is left out: benchmark/actnn_resnet_bytes.py compares.

Averaging (AQ levels) is priced with three corrections on top (Observation.level_factor):

- run_gain: one AQ code's rounding error is shared by the k values of its run. Along a
  conv's spatial axis those k inputs meet k / stride neighbouring outputs of the same
  weight, so the error adds coherently where the output gradient is smooth: the factor
  ||g summed over runs||^2 / ||g||^2 (on a small ResNet's convs this factor is 1.0-2.9x
  where run-shared noise measured 1.0-2.2x; applied to the whole AQ error, so the
  deviation, a bias, pays it too).
- the deviation of a batch norm's input: its input gradient holds -kappa_c (x - mean_c),
  kappa_c = w invstd^2 mean(g xhat); averaging moves that by -kappa_c d, d = x -
  runmean(x), a deterministic field coherent with the activations that made x. The
  independent-noise model priced a last-stage batch norm of a small ResNet at AQ 0.5 at
  0.6e-3 of ||grad||^2 against 29e-3 measured, and every batch norm went to AQ. So it is
  measured: when the batch norm's input is the output of a conv/linear (the source),
  the source's weight gradient of d (source_grad_sq, on measuring passes, with the
  source's exact input) gives the error kappa_c^2 ||G_c(d)||^2 per output channel c;
  DEEPER_GAIN adds the layers below the source. Measured one batch norm at a time on a
  small ResNet (runs of 2 and 4, after 40 and 100 steps): the source term holds 4-48% of
  the whole gradient error in NCHW (median ~30% at step 100, 13% at step 40) and 20-160%
  in channels_last, where runs average across channels: measured / priced 0.3-13
  (mostly 1-4), where the independent-noise model's was 5-90.
- the mean of the deviation over positions: runs that cross channels (channels_last
  convs, linear layers' features) leave each channel of a sample a deviation with a
  mean over positions, which meets the output gradient's sum over positions the same
  way at every position: coherent, ||sum_n G_n (x) dbar_n||^2 per kernel offset (G_n: g
  summed over positions, dbar_n: the deviation's mean, per channel; mean_deviation_price).
  Runs along a conv's spatial axis (NCHW) leave no such mean. On a small ResNet in
  channels_last the convs' AQ was measured 2-6x above the independent-noise price; with
  this term within 0.5-2x (a linear layer's whole deviation is this term: exact).

Against measured single-layer compression on a small trained ResNet, conv/linear
predictions land within 0.6-1.7x at 2 bits; batch norms stay 2-8x low at 2 bits (deeper
propagation left out): a model that ranks layers, not a bound.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

import aqcore

DEEPER_GAIN = 2.0  # whole gradient error of a batch norm's deviation / its source term


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
    coherent: torch.Tensor | None = None  # (C,) kappa_c^2 of a batch norm (deviation_price)

    def deviation_price(self, source_grad_sq: torch.Tensor) -> torch.Tensor | None:
        """(K,) what averaging the input (K ways) adds to the gradients, from source_grad_sq
        (K, C): ||G_c(d)||^2, the source's weight gradient of each way's deviation per output
        channel (module docstring). None without a batch norm's kappa or a matching source."""
        if self.coherent is None or source_grad_sq.shape[-1] != self.coherent.shape[0]:
            return None
        return DEEPER_GAIN * (self.coherent.to(source_grad_sq) * source_grad_sq).sum(-1)

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
                     count: float | None = None, normalized: bool = False) -> InputNoise:
    """grad_x = w invstd (g - mean(g) - xhat m), m = mean(g xhat). An input error d (energy
    e per channel) moves xhat by invstd d: an independent term -w invstd^2 m d, so
    u = w^2 invstd^4 m^2 (kappa^2, also deviation_price's); and m by r = invstd mean(g d),
    variance invstd^2 mean(g^2) e / M^2,
    a term -w invstd r xhat: v_c = w^2 invstd^4 mean(g^2) / M^2 * M^2 (InputNoise.propagated
    brings the M^2 and the rest). Channel means. sum_dy_xmu / count: the (all-reduced) sums
    of a synchronised batch norm. normalized: the error is in xhat's units (what a batch norm
    stores, ops/norm.py), one invstd^2 less; kappa^2 stays per unit of x (deviation_price
    takes the source's gradient of the deviation in x's units)."""
    dims = [0, *range(2, x.dim())]
    gf = g.float()
    if sum_dy_xmu is None:
        sum_dy_xmu = (gf * (x.float() - mean.view(1, -1, *([1] * (x.dim() - 2))))).sum(dims)
        count = x.numel() / x.shape[1]
    inv_var = invstd.float().square()
    m = sum_dy_xmu * invstd / count
    scale = (weight.float().square() if weight is not None else 1.0) * inv_var
    kappa_sq = scale * inv_var * m.square()
    v = scale * inv_var * gf.square().mean(dims)
    per_error = inv_var if normalized else 1.0
    return InputNoise((kappa_sq / per_error).mean().double().expand(x.shape[0]), (v / per_error).double(),
                      inv_var.double(), kappa_sq.double())


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


def deviation(x: torch.Tensor, run: int) -> torch.Tensor:
    """x - runmean(x), float32, shaped and laid out like x: what averaging runs of `run`
    values in x's memory order (aqcore's rows of a per-sample allocation) takes away; a
    row's values after its last whole run count 0."""
    rows = aqcore.sample_rows(x.detach())
    field = torch.empty_like(x, dtype=torch.float32)
    view = aqcore.sample_rows(field)
    if view.data_ptr() != field.data_ptr():  # a layout sample_rows reads in contiguous order
        field = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        view = field.view(x.shape[0], -1)
    whole = rows.shape[1] - rows.shape[1] % run
    view[:, whole:] = 0
    runs = rows[:, :whole].float().unflatten(1, (whole // run, run))
    view[:, :whole] = (runs - runs.mean(-1, keepdim=True)).flatten(1)
    return field


def run_gain(g: torch.Tensor, runs: Sequence[int], stride: int) -> torch.Tensor:
    """(len(runs),) float64: ||g summed over runs of max(k // stride, 1) along its last dim||^2
    / ||g||^2, at least 1: how much more an error shared by k consecutive inputs along a
    conv's last spatial dim adds to the weight gradient than independent errors (module
    docstring). g: the output gradient (N, C_out, ..., W_out)."""
    gains = []
    for k in runs:
        span = max(k // stride, 1)
        whole = g.shape[-1] - g.shape[-1] % span
        kept = g[..., :whole].float()
        summed = kept.unflatten(-1, (whole // span, span)).sum(-1)
        total = kept.square().sum(dtype=torch.float64).clamp_min(1e-300)
        gains.append(summed.square().sum(dtype=torch.float64) / total)
    return torch.stack(gains).clamp_min(1.0)


SKETCH = 32  # channels kept by mean_deviation's projection


def _rademacher(rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """A fixed (rows, cols) matrix of +-1 / sqrt(cols) from an integer hash (no RNG state)."""
    i = torch.arange(rows, device=device, dtype=torch.int64).view(-1, 1)
    j = torch.arange(cols, device=device, dtype=torch.int64).view(1, -1)
    h = (i * 0x9E3779B1 + j * 0x85EBCA77 + 0x165667B1) & 0xFFFFFFFF
    h = ((h ^ (h >> 15)) * 0x2C1B3C6D) & 0xFFFFFFFF
    h = ((h ^ (h >> 12)) * 0x297A2D39) & 0xFFFFFFFF
    return (((h ^ (h >> 15)) & 1) * 2 - 1).float() / math.sqrt(cols)


def mean_deviation(x: torch.Tensor, runs: Sequence[int], channel_dim: int, groups: int = 1) -> torch.Tensor:
    """(len(runs), N, C') float32: per sample and channel, the mean over positions of
    deviation(x, k) (a linear layer's (N, C) input: the deviation itself). With more than
    SKETCH channels (and groups == 1) they are projected to SKETCH by a fixed random sign
    matrix S, E[S S^T] = I: mean_deviation_price stays unbiased, what is held stays small."""
    channel_dim %= x.dim()
    dims = [d for d in range(1, x.dim()) if d != channel_dim]
    channels = x.shape[channel_dim]
    sketch = _rademacher(channels, SKETCH, x.device) if groups == 1 and channels > SKETCH else None
    means = []
    with torch.autocast(x.device.type, enabled=False):  # forwards run under autocast: stay float32
        for k in runs:
            field = deviation(x, k)
            mean = field.mean(dims) if dims else field
            means.append(mean if sketch is None else mean @ sketch)
    return torch.stack(means)


def mean_deviation_price(g: torch.Tensor, means: torch.Tensor, channel_dim: int, kernel_numel: int,
                         groups: int = 1) -> torch.Tensor:
    """(len(runs),) float64: kernel_numel * ||sum_n G_n (x) means_n||^2 per run length (module
    docstring), G_n = the output gradient g summed over positions (N, C_out); means from
    mean_deviation (sketched or not); channels in `groups` blocks (grouped convs)."""
    channel_dim %= g.dim()
    dims = [d for d in range(1, g.dim()) if d != channel_dim]
    summed = g.float().sum(dims) if dims else g.float()  # (N, C_out)
    n, k = summed.shape[0], means.shape[0]
    coherent = torch.einsum("ngo,kngc->kgoc", summed.view(n, groups, -1), means.view(k, n, groups, -1))
    return kernel_numel * coherent.square().sum((1, 2, 3), dtype=torch.float64)
