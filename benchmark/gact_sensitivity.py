"""gact_aq sensitivity estimators on the two small test models (CPU).

For the CNN with BatchNorm and the transformer encoder of tests/test_gact_models.py, at
GACT-AQ's 1.5-bit setting (L2.2, bit=1.5, aq_bit=0.5) and at 1.25 bits (and a wider
encoder at 1.5 bits, for the cost):
* Spearman rank correlation of the default ("propagate") sensitivities with the
  published probe's;
* measured gradient variance E||g - g_exact||^2 of each allocation (same rounding seeds),
  and the ratio default / probe;
* compression: bytes held for backward (compressed tensors with metadata, plus what stays
  uncompressed) against what exact training saves (unique storages, parameters and the
  input batch excluded);
* cost of one adaptation: backprop() calls, and wall time in units of one plain
  forward+backward.

    python benchmark/gact_sensitivity.py [--steps 32] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from gact_aq import settings  # noqa: E402
from gact_aq.controller import Controller  # noqa: E402
from gact_aq.packing import Tracer, derives_from_leaf  # noqa: E402
from test_gact_models import (SmallEncoder, _warmed, backprop_fn, cnn_problem,  # noqa: E402
                              encoder_problem)
from test_gact_sensitivity import allocation_variance  # noqa: E402


def wider_encoder_problem():
    """The encoder at width 128, 4 layers, 16 x 64 tokens: where compute, not Python
    overhead, dominates a pass, so adaptation time in passes means something."""
    torch.manual_seed(0)
    model = SmallEncoder(width=128, layers=4, max_len=64)
    x, y = torch.randint(0, 64, (16, 64)), torch.randint(0, 4, (16,))
    return _warmed(model, x, y, steps=5)


PROBLEMS = {"cnn_bn": cnn_problem, "transformer_encoder": encoder_problem,
            "transformer_encoder_wide": wider_encoder_problem}
BUDGETS = [dict(bit=1.5, aq_bit=0.5), dict(bit=1.25, aq_bit=0.5)]


class KeptBytes(Tracer):
    """Bytes of the saved activations a pass keeps uncompressed (unique storages)."""

    def __init__(self) -> None:
        self.storages: dict[int, int] = {}

    def on_pack(self, x, unit, new) -> None:
        if unit is None and not derives_from_leaf(x):
            storage = x.untyped_storage()
            self.storages[storage.data_ptr()] = storage.nbytes()

    @property
    def nbytes(self) -> int:
        return sum(self.storages.values())


def held_bytes(model, x, y, ctl: Controller) -> tuple[int, int]:
    """(bytes held after the forward: compressed + kept, bytes of the compressed ones)."""
    kept = KeptBytes()
    with ctl:
        ctl.packer.tracer = kept
        loss = torch.nn.functional.cross_entropy(model(x), y)
        ctl.packer.tracer = None
        compressed = ctl.report().nbytes
        loss.backward()
    return compressed + kept.nbytes, compressed


def adapted(model, backprop, method: str, budget: dict) -> tuple[Controller, float]:
    cfg = settings.build_config("L2.2", **budget)
    cfg.sensitivity = method
    ctl = Controller(model, cfg)
    with ctl:
        backprop()
        start = time.perf_counter()
        ctl.iterate(backprop)
        seconds = time.perf_counter() - start
    return ctl, seconds


def pass_seconds(backprop, repeats: int = 5) -> float:
    backprop()
    start = time.perf_counter()
    for _ in range(repeats):
        backprop()
    return (time.perf_counter() - start) / repeats


def measure(name: str, budget: dict, steps: int) -> dict:
    model, x, y = PROBLEMS[name]()
    backprop = backprop_fn(model, x, y)
    one_pass = pass_seconds(backprop)
    default, default_s = adapted(model, backprop, "propagate", budget)
    probe, probe_s = adapted(model, backprop, "probe", budget)
    exact_bytes, _ = held_bytes(model, x, y, Controller(model, settings.build_config("L0")))
    replay = Controller(model, default.config)
    replay.load_state_dict(default.state_dict())
    held, compressed = held_bytes(model, x, y, replay)
    var_default = allocation_variance(model, backprop, default, steps)
    var_probe = allocation_variance(model, backprop, probe, steps)
    return {
        "model": name, **budget, "tensors": len(default.levels),
        "spearman": float(spearmanr(default.sensitivity, probe.sensitivity).statistic),
        "variance_default": var_default, "variance_probe": var_probe,
        "variance_ratio": var_default / var_probe,
        "exact_saved_bytes": exact_bytes, "held_bytes": held, "compressed_bytes": compressed,
        "compression": exact_bytes / held,
        "passes_default": default.extra_passes, "passes_probe": probe.extra_passes,
        "adapt_default_in_passes": default_s / one_pass,
        "adapt_probe_in_passes": probe_s / one_pass,
        "levels_default": [level.name for level in default.levels],
        "levels_probe": [level.name for level in probe.levels],
    }


def markdown(rows: list[dict]) -> str:
    lines = ["| model | bit / aq | tensors | Spearman vs probe | variance default / probe | "
             "exact saved -> held (x smaller) | adaptation: passes (time in passes) default | probe |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['bit']:g} / {r['aq_bit']:g} | {r['tensors']} | {r['spearman']:.3f} | "
            f"{r['variance_ratio']:.2f} | {r['exact_saved_bytes']:,} -> {r['held_bytes']:,} "
            f"({r['compression']:.1f}x) | {r['passes_default']} ({r['adapt_default_in_passes']:.1f}) | "
            f"{r['passes_probe']} ({r['adapt_probe_in_passes']:.1f}) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=32, help="compressed steps per variance")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    rows = [measure(name, budget, args.steps) for name in PROBLEMS for budget in BUDGETS
            if name != "transformer_encoder_wide" or budget is BUDGETS[0]]
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
