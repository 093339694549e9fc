import torch

from aqcore import noise


def test_mix32_matches_python_int_version():
    values = torch.randint(0, 2**32, (1000,), dtype=torch.int64)
    expected = [noise.mix32_int(v) for v in values.tolist()]
    mixed = noise.mix32((values & noise.MASK32).to(torch.int32)).to(torch.int64) & noise.MASK32
    assert mixed.tolist() == expected


def test_noise_is_pinned():
    # The noise stream is part of the compressed format: kernels must reproduce it.
    u = noise.uniform(7, torch.arange(4), 4)
    assert [round(v * 2**17) for v in u.tolist()] == [101017, 113945, 95801, 96621]
    assert noise.stream_key(0) == 2488251732


def test_noise_uniform_and_seed_dependent():
    index = torch.arange(200_000)
    u = noise.uniform(1, index, index.numel())
    assert 0 <= u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.005
    counts = torch.histc(u, bins=10, min=0, max=1)
    assert (counts - 20_000).abs().max() < 800
    v = noise.uniform(2, index, index.numel())
    assert abs(torch.corrcoef(torch.stack([u, v]))[0, 1].item()) < 0.01
    lag = torch.corrcoef(torch.stack([u[1:], u[:-1]]))[0, 1].item()
    assert abs(lag) < 0.01


def test_pairs_share_one_hash():
    u = noise.uniform(7, torch.arange(4), 4)
    h = noise.mix32_int(0 ^ noise.stream_key(7))
    assert [round(v * 2**16 - 0.5) for v in u[:2].tolist()] == [h >> 16, h & 0xFFFF]
    assert round(u[2].item() * 2**16 - 0.5) == noise.mix32_int(1 ^ noise.stream_key(7)) >> 16


def test_wide_indices_use_their_own_key():
    index = torch.tensor([5, 5 + 2**33])  # pairs 2 and 2 + 2**32: same low word
    u = noise.uniform(3, index, 2**34)
    assert u[0] != u[1]
    assert u[0] == noise.uniform(3, index[:1], 6)[0]
