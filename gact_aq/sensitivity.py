"""Sensitivity estimators: C_i such that storing tensor i with expected squared error e_i
adds about C_i * e_i to the variance of the parameter gradient (docs/frameworks.md).

Both run one exact reference pass that measures every tensor's size and its error at
each ladder level (aqcore.level_errors), then:
* "propagate" (default, propagation.py): local noise propagation during that same pass;
* "probe": the published three passes per tensor.
Each returns (C, measurement, V): C the 1-bit sensitivity (what the published probe
measures, comparable across methods), V[i, l] the gradient variance tensor i is predicted
to add at each ladder level l, which the allocation minimises.
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
    m.finish(ctl.packer.seen, ctl.packer.kinds)
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
        return sensitivity, m, sensitivity[:, None] * m.errors


def propagate(ctl: "Controller", prober: Prober, ladder: Sequence[Level]):
    """Local noise propagation (propagation.py) during the reference pass: no other pass.

    It measures the 1-bit sensitivity C (as the probe does) and each AQ level's own rate.
    Plain levels are priced C * e(l), like the probe prices them. An AQ level is priced
    max(its rate, C) * e(l): its averaging is a deterministic error, a bias that SGD does
    not average out over steps, so it never costs less than independent noise of the same
    energy (how the probe prices it); where the measurement is larger (errors coherent
    across a batch: attention outputs feeding a linear layer cost 5x their energy), the
    measurement wins. Priced by the measured per-step variance alone, AQ spreads and a
    digits CNN at 1.25 bits loses 5 points of accuracy.
    """
    measured = [ONE_BIT] + [level for level in ladder if level.is_aq and not level.zeros]
    tracer = Propagation(ladder, ctl.config.group_size, measured,
                         lambda tid: ctl.seed_for(pass_id=1, tid=tid))
    with tracer.watching(ctl.module):
        ctl.run_pass(prober, {}, pass_id=1, tracer=tracer)
    tracer.finish(ctl.packer.seen, ctl.packer.kinds)
    if tracer.measured_nothing:
        tracer.sensitivities()
        warnings.warn("gact_aq: no tensor could be measured by propagation; using the "
                      "probe method for this adaptation", stacklevel=3)
        return probe(ctl, prober, ladder)
    rates = tracer.sensitivities()
    sensitivity = rates[:, 0]
    columns = []
    for level in ladder:
        column = measured.index(level.codes_level) if level.is_aq else 0
        rate = np.maximum(rates[:, column], sensitivity) if level.is_aq else sensitivity
        with np.errstate(invalid="ignore"):  # 0 * inf: a level the tensor may not take
            columns.append(rate * tracer.error_at(level))
    return sensitivity, tracer, np.stack(columns, axis=1)


ESTIMATORS: dict[str, Callable] = {"propagate": propagate, "probe": probe}
