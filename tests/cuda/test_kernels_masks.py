"""The fused 1-bit mask packer matches reference.pack_bits / unpack_bits."""
import pytest
import torch

import aqcore
from aqcore import kernels, reference

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 15, 16, 17, 100, 4099, 70_001, 10_000_000])
def test_pack_and_unpack_match_the_reference(n):
    mask = torch.rand(n, device="cuda") < 0.3
    packed = kernels.pack_bits(mask)
    assert torch.equal(packed.cpu(), reference.pack_bits(mask.cpu()))
    assert torch.equal(kernels.unpack_bits(packed, n), mask)
    assert torch.equal(kernels.unpack_bits(packed.cpu().cuda(), n).cpu(),
                       reference.unpack_bits(packed.cpu(), n))


def test_misaligned_views_and_nonzero_bytes():
    base = torch.randint(0, 4, (5003,), device="cuda", dtype=torch.uint8)
    view = base[3:]
    assert torch.equal(kernels.pack_bits(view).cpu(), reference.pack_bits(view.cpu() != 0))
    packed = kernels.pack_bits(view)
    out = torch.empty(5001, dtype=torch.bool, device="cuda")
    kernels._extension().unpack_bits(packed, out[1:])
    assert torch.equal(out[1:], view != 0)


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8])
def test_pack_mask_through_the_api(dtype):
    mask = (torch.rand(8, 3, 33, 17, device="cuda") < 0.5).to(dtype)
    ct = aqcore.pack_mask(mask)
    assert ct.payload.is_cuda and ct.nbytes == (mask.numel() + 7) // 8
    assert torch.equal(ct.payload.cpu(), aqcore.pack_mask(mask.cpu()).payload)
    back = aqcore.decompress(ct)
    assert back.dtype == dtype and back.is_cuda and torch.equal(back, mask)
    out = torch.empty_like(mask)
    aqcore.decompress(ct, out=out)
    assert torch.equal(out, mask)
    assert torch.equal(aqcore.decompress(ct.to("cpu")), mask.cpu())
    last = mask.contiguous(memory_format=torch.channels_last)
    ct = aqcore.pack_mask(last)
    assert torch.equal(ct.payload.cpu(), aqcore.pack_mask(last.cpu()).payload)
    back = aqcore.decompress(ct)
    assert torch.equal(back, mask) and back.stride() == last.stride()
