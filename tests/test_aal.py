import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aal.aal import Conv2d_ARA, Distribute_ARA, Linear_ASA, Linear_asa, learning_indicator


def saved_bytes(fn):
    """Bytes of the tensors autograd saves while fn() builds its graph (by storage)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


@pytest.mark.parametrize("bias", [False, True])
def test_conv_ara_gradients(bias):
    torch.manual_seed(0)
    conv = Conv2d_ARA(4, 4, 3, 1, 1, bias=bias)
    assert (conv.bias is not None) == bias
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    ara = torch.randn(2, 4, 6, 6)
    y, ara_out = conv(x, ara)
    assert ara_out is ara
    assert torch.allclose(y, F.conv2d(x, conv.weight, conv.bias, padding=1), atol=1e-6)
    g = torch.randn_like(y)
    y.backward(g)
    ref_x = x.detach().requires_grad_()
    F.conv2d(ref_x, conv.weight.detach(), padding=1).backward(g)
    assert torch.allclose(x.grad, ref_x.grad, atol=1e-5)
    expected_w = torch.nn.grad.conv2d_weight(ara, conv.weight.shape, g, padding=1)
    assert torch.allclose(conv.weight.grad, expected_w, atol=1e-4)
    if bias:
        assert torch.allclose(conv.bias.grad, g.sum((0, 2, 3)), atol=1e-5)


class AraBlock(nn.Module):
    """The seed README's usage: conv1 exact, conv2/conv3 trained from the ARA."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(8, 8, 3, 1, 1)
        self.conv2 = Conv2d_ARA(8, 8, 3, 1, 1)
        self.conv3 = Conv2d_ARA(8, 8, 3, 1, 1)
        self.dsa = Distribute_ARA()

    def forward(self, x):
        ARA = x.clone()
        x = self.conv1(x)
        x = x + ARA
        x, ARA = self.conv2(x, ARA)
        x = x + ARA
        x, ARA = self.conv3(x, ARA)
        x, ARA = self.dsa(x, ARA)
        return x


def test_ara_segment_stores_one_activation():
    torch.manual_seed(0)
    block = AraBlock()
    exact = nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1), nn.Conv2d(8, 8, 3, 1, 1), nn.Conv2d(8, 8, 3, 1, 1))
    x = torch.randn(4, 8, 16, 16, requires_grad=True)
    out, ara_bytes = saved_bytes(lambda: block(x))
    _, exact_bytes = saved_bytes(lambda: exact(x))
    activation = x.numel() * 4
    weights = sum(p.numel() * 4 for p in block.parameters() if p.dim() > 1)
    assert ara_bytes <= 2 * activation + weights  # x (conv1) and one ARA
    assert exact_bytes >= 3 * activation
    out.sum().backward()
    assert all(p.grad is not None for p in block.parameters())


def test_ara_rejects_mismatched_shapes():
    conv = Conv2d_ARA(4, 4, 3)
    with pytest.raises(ValueError, match="distribute a new ARA"):
        conv(torch.randn(1, 4, 5, 5), torch.randn(1, 4, 6, 6))


def test_ara_trains_a_residual_net():
    torch.manual_seed(0)
    x = torch.randn(64, 8, 8, 8)
    target = (x[:, :4].mean((1, 2, 3)) > 0).long()
    block, head = AraBlock(), nn.Linear(8, 2)
    params = list(block.parameters()) + list(head.parameters())
    opt = torch.optim.Adam(params, lr=1e-2)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = F.cross_entropy(head(block(x).mean((2, 3))), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_linear_asa_forward_and_gradients():
    torch.manual_seed(0)
    layer = Linear_ASA(16, 8)
    x = torch.randn(3, 5, 16, requires_grad=True)
    y = layer(x)
    sign = torch.where(x > 0, 1.0, -1.0)
    assert torch.allclose(y, F.linear(x + 0.01 * sign, layer.weight, layer.bias), atol=1e-6)
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.allclose(x.grad, g @ layer.weight, atol=1e-5)
    expected = g.reshape(-1, 8).t() @ sign.reshape(-1, 16)
    assert torch.allclose(layer.weight.grad, expected, atol=1e-4)
    assert torch.allclose(layer.bias.grad, g.reshape(-1, 8).sum(0), atol=1e-5)


def test_linear_asa_relu_variant_and_alias():
    layer = Linear_asa(4, 2, relu=True, epsilon=0.1, lr_expansion=10)
    x = torch.tensor([[1.0, -1.0, 0.0, 2.0]], requires_grad=True)
    y = layer(x)
    assert torch.allclose(y, F.linear(x + 0.1 * torch.tensor([[1.0, 0, 0, 1]]),
                                      layer.weight, layer.bias))
    y.sum().backward()
    assert torch.allclose(layer.weight.grad, torch.tensor([[1.0, 0, 0, 1]]).expand(2, 4))


def test_linear_asa_stores_one_bit_per_input():
    layer = Linear_ASA(256, 256)
    x = torch.randn(32, 256, requires_grad=True)
    _, stored = saved_bytes(lambda: layer(x))
    weight = layer.weight.numel() * 4
    assert stored <= weight  # only the weight is a saved tensor; the mask is packed


def test_learning_indicator():
    x = torch.randn(3, 10)
    assert torch.allclose(learning_indicator(x, x), torch.ones(3), atol=1e-5)
    assert (learning_indicator(torch.zeros(3, 10), x) == 0).all()
    layer = Linear_ASA(10, 2, get_li=True)
    layer(x)
    assert layer.li.shape == (3,) and (layer.li < 1).all()
