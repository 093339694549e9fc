"""gact_aq under DistributedDataParallel: 2 gloo processes on CPU."""
import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

import gact_aq
from gact_aq.controller import Controller
from test_gact_models import SmallCNN

STEPS = 4


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        ddp = DistributedDataParallel(SmallCNN())
        all_reduces = [0]

        def counting_allreduce(state, bucket):
            all_reduces[0] += 1
            return default_hooks.allreduce_hook(state, bucket)

        ddp.register_comm_hook(None, counting_allreduce)
        torch.manual_seed(100 + rank)  # every rank has its own data
        x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05)

        def backprop():
            opt.zero_grad()
            nn.functional.cross_entropy(ddp(x[:8]), y[:8]).backward()

        gact_aq.set_optimization_level("L2.2", bit=1.5, aq_bit=0.5)
        gact_aq.set_adapt_interval(2)
        losses, during_iterate = [], 0
        with Controller(ddp) as ctl:
            for _ in range(STEPS):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(ddp(x), y)
                loss.backward()
                opt.step()
                losses.append(loss.item())
                before = all_reduces[0]
                ctl.iterate(backprop)
                during_iterate += all_reduces[0] - before
        result = {
            "levels": [level.name for level in ctl.levels],
            "sensitivity": ctl.sensitivity.tolist(),
            "seed": ctl.seed_for(0, 0),
            "params": torch.cat([p.detach().flatten() for p in ddp.parameters()]).tolist(),
            "losses": losses,
            "training_all_reduces": all_reduces[0] - during_iterate,
            "probe_all_reduces": during_iterate,
        }
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_gloo_ranks_pick_identical_levels_and_train(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["levels"] == r1["levels"] and len(set(r0["levels"])) > 1
    assert r0["sensitivity"] == r1["sensitivity"]  # averaged across ranks
    assert r0["seed"] != r1["seed"]  # independent rounding on each rank
    assert r0["params"] == r1["params"]  # gradients were all-reduced: replicas agree
    assert r0["training_all_reduces"] >= STEPS and r0["probe_all_reduces"] == 0
    assert r0["losses"][-1] < r0["losses"][0] and r1["losses"][-1] < r1["losses"][0]
