"""Sensitivity estimators: C_i such that storing tensor i with expected squared error e_i
adds about C_i * e_i to the variance of the parameter gradient (docs/frameworks.md).

Both run one exact reference pass that measures every tensor's size and its error at
each ladder level (aqcore.level_errors), then:
* "propagate" (default, propagation.py): local noise propagation during that same pass;
* "probe": the published three passes per tensor.
Each returns (C, measurement, V): C the 1-bit sensitivity (what the published probe
measures, comparable across methods), V[i, l] = C_i e'_i(l) the gradient error tensor i
is predicted to add at each ladder level l (noise variance plus autoprec.BIAS_WEIGHT times
the squared bias of averaging), which the allocation minimises.
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
from tqdm import tqdm

import aqcore
from aqcore import Level

from .autoprec import Measurement
from .propagation import Propagation
from .probing import Prober, sq_distance

if TYPE_CHECKING:
    from .controller import Controller

ONE_BIT = aqcore.parse_level("1")
EIGHT_BITS = aqcore.parse_level("8")
MAX_PROBE_VALUE = 1e10  # the published clamp for NaN / Inf / huge probe results


def probe(ctl: "Controller", prober: Prober, ladder: Sequence[Level]):
    """The published GACT probe (docs/frameworks.md): three extra passes per tensor.

    Tensor l alone at 1 bit with two seeds, then at 8 bits (all others exact):
    v_l = max(d01, 2 max(d02, d12)) estimates twice the gradient variance l adds at 1 bit;
    divided by 2 e_l(1 bit) it is in the units of our error model. (The published probes
    keep the other tensors at their current bits and, with AQ on, probe AQ instead of 1 bit.)
    """
    m = Measurement(ladder, ctl.config.group_size)
    ctl.run_pass(prober, {}, pass_id=1, tracer=m)
    m.finish(ctl.packer.seen, ctl.packer.kinds, ctl.packer.derived_numel)
    sensitivity = np.zeros(len(m.numels))
    for tid in tqdm(range(len(m.numels)), desc="gact_aq probe", leave=False, disable=None):
        g0 = ctl.run_pass(prober, {tid: ONE_BIT}, pass_id=2 + 3 * tid)
        g1 = ctl.run_pass(prober, {tid: ONE_BIT}, pass_id=3 + 3 * tid)
        g2 = ctl.run_pass(prober, {tid: EIGHT_BITS}, pass_id=4 + 3 * tid)
        d01, d02, d12 = sq_distance(g0, g1), sq_distance(g0, g2), sq_distance(g1, g2)
        value = max(d01, 2 * max(d02, d12))
        if not np.isfinite(value) or value > MAX_PROBE_VALUE:
            value = MAX_PROBE_VALUE
        probed = aqcore.zero_safe(ONE_BIT) if m.zeros[tid] else ONE_BIT  # what the packer stored
        error = m.error_at(probed)[tid]
        sensitivity[tid] = value / (2 * error) if error > 0 else 0.0
    with np.errstate(invalid="ignore"):  # 0 * inf: a level the tensor may not take
        return sensitivity, m, sensitivity[:, None] * m.priced


def propagate(ctl: "Controller", prober: Prober, ladder: Sequence[Level]):
    """Local noise propagation (propagation.py) during the reference pass: no other pass.

    It measures the 1-bit sensitivity C (2 bits for tensors that keep exact zeros, as
    the probe does) and prices every level C * e'(l), e'(l) = autoprec.priced: the error
    energy with its deterministic part (AQ's averaging: a bias, which the optimizer does
    not average out over steps) weighed BIAS_WEIGHT times. Priced by the per-step error
    energy alone, AQ spreads over tensors whose averaging biases the gradient: a small
    ResNet at 1.25 bits lost 3 points of held-out accuracy (docs/frameworks.md).
    """
    tracer = Propagation(ladder, ctl.config.group_size, [ONE_BIT],
                         lambda tid: ctl.seed_for(pass_id=1, tid=tid))
    with tracer.watching(ctl.module):
        ctl.run_pass(prober, {}, pass_id=1, tracer=tracer)
    tracer.finish(ctl.packer.seen, ctl.packer.kinds, ctl.packer.derived_numel)
    if tracer.measured_nothing:
        tracer.sensitivities()
        warnings.warn("gact_aq: no tensor could be measured by propagation; using the "
                      "probe method for this adaptation", stacklevel=3)
        return probe(ctl, prober, ladder)
    sensitivity = tracer.sensitivities()[:, 0]
    with np.errstate(invalid="ignore"):  # 0 * inf: a level the tensor may not take
        return sensitivity, tracer, sensitivity[:, None] * tracer.priced


ESTIMATORS: dict[str, Callable] = {"propagate": propagate, "probe": probe}
