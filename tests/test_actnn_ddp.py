"""QSyncBatchNorm under DDP: 2 gloo processes on CPU match one process on the whole batch."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import actnn_aq

WORLD = 2


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.SyncBatchNorm(6), nn.ReLU(), nn.Flatten(),
                          nn.Linear(6 * 6 * 6, 4))
    for p in model[1].parameters():
        p.data.uniform_(0.5, 1.5)
    return model


def _data():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 6, 6, generator=gen) * 2 + 1, torch.randn(8, 4, generator=gen)


def _run(model, x, g):
    x = x.clone().requires_grad_()
    y = model(x)
    y.backward(g)
    return y.detach(), x.grad


LEVELS = {"L0": {}, "L3": dict(bit=8)}


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        for level, setting in LEVELS.items():
            actnn_aq.set_optimization_level(level, **setting)
            model = actnn_aq.QModule(_model())
            assert type(model.model[1]).__name__ == "QSyncBatchNorm"
            ddp = nn.parallel.DistributedDataParallel(model)
            x, g = _data()
            part = slice(4 * rank, 4 * rank + 4)
            for _ in range(2):
                ddp.zero_grad()
                y, gx = _run(ddp, x[part], g[part])
            torch.save(dict(y=y, gx=gx, grads=[p.grad for p in model.parameters()],
                            buffers=[b.clone() for b in model.buffers()]),
                       os.path.join(out_dir, f"{level}-{rank}.pt"))
            del ddp
        dist.barrier()  # no rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sync_batch_norm_under_ddp_matches_one_big_batch(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD)
    reference = _model()
    reference[1] = nn.BatchNorm2d(6)
    reference[1].load_state_dict(_model()[1].state_dict())
    x, g = _data()
    for _ in range(2):
        reference.zero_grad()
        y, gx = _run(reference, x, g)
    grads = [p.grad / WORLD for p in reference.parameters()]  # DDP averages the two halves' sums
    for level in LEVELS:
        _check(level, [torch.load(tmp_path / f"{level}-{rank}.pt") for rank in range(WORLD)], y, gx, grads,
               list(reference.buffers()))


def _check(level, results, y, gx, grads, buffers):
    def close(a, b):
        if level == "L0":  # exact storage: the synchronised math itself
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        else:  # 8-bit storage
            assert (a - b).norm() <= 0.02 * b.norm()

    for rank, r in enumerate(results):
        part = slice(4 * rank, 4 * rank + 4)
        torch.testing.assert_close(r["y"], y[part], rtol=1e-5, atol=1e-5)  # forward is exact at any level
        for a, b in zip(r["buffers"], buffers):  # running statistics of the whole batch
            torch.testing.assert_close(a.float(), b.float(), rtol=1e-5, atol=1e-6)
        close(r["gx"], gx[part])
        close(torch.cat([a.flatten() for a in r["grads"]]), torch.cat([b.flatten() for b in grads]))
    for a, b in zip(results[0]["grads"], results[1]["grads"]):
        assert torch.equal(a, b)  # DDP: every rank holds the same averaged gradient
