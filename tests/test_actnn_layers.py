"""Every Q-layer: forward identical to torch.nn, exact gradients at L0 (and gradcheck),
and, when compressed, the gradient torch.autograd gives on the decompressed input."""
import copy

import pytest
import torch
from torch import nn

import actnn_aq
from capture import Capture
import aqcore
from actnn_aq.qmodule import CONVERSIONS

pytestmark = pytest.mark.filterwarnings("ignore:Using padding=.same.:UserWarning")


# (torch.nn layer factory, input shape): every conversion and the awkward arguments.
CASES = {
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1), (5, 4, 17)),
    "conv1d_circular": (lambda: nn.Conv1d(4, 6, 4, padding=2, padding_mode="circular"), (5, 4, 17)),
    "conv2d": (lambda: nn.Conv2d(4, 6, 3, padding=1), (5, 4, 9, 9)),
    "conv2d_grouped_dilated": (lambda: nn.Conv2d(4, 8, 3, stride=2, padding=2, dilation=2, groups=2), (5, 4, 11, 10)),
    "conv2d_depthwise": (lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), (5, 4, 9, 9)),
    "conv2d_same_even": (lambda: nn.Conv2d(4, 6, (4, 3), padding="same", dilation=(1, 2)), (5, 4, 9, 9)),
    "conv2d_valid": (lambda: nn.Conv2d(4, 6, 3, padding="valid"), (5, 4, 9, 9)),
    "conv2d_reflect": (lambda: nn.Conv2d(4, 6, 3, padding=(1, 2), padding_mode="reflect"), (5, 4, 9, 9)),
    "conv2d_replicate": (lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="replicate"), (5, 4, 9, 9)),
    "conv3d": (lambda: nn.Conv3d(3, 4, 3, stride=(1, 2, 2), padding=1), (3, 3, 5, 6, 6)),
    "conv_transpose1d": (lambda: nn.ConvTranspose1d(4, 6, 3, stride=2, padding=1, output_padding=1), (5, 4, 9)),
    "conv_transpose2d": (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, groups=2, dilation=2),
                         (5, 4, 7, 6)),
    "conv_transpose3d": (lambda: nn.ConvTranspose3d(3, 4, 2, stride=2, bias=False), (3, 3, 3, 4, 4)),
    "linear": (lambda: nn.Linear(40, 12), (6, 40)),
    "linear_3d": (lambda: nn.Linear(40, 12), (4, 7, 40)),
    "linear_4d_nobias": (lambda: nn.Linear(20, 12, bias=False), (3, 2, 5, 20)),
    "batchnorm1d": (lambda: nn.BatchNorm1d(6), (8, 6)),
    "batchnorm1d_seq": (lambda: nn.BatchNorm1d(6, momentum=None), (8, 6, 9)),
    "batchnorm2d": (lambda: nn.BatchNorm2d(5), (6, 5, 7, 7)),
    "batchnorm2d_no_affine": (lambda: nn.BatchNorm2d(5, affine=False, track_running_stats=False), (6, 5, 7, 7)),
    "batchnorm3d": (lambda: nn.BatchNorm3d(3), (4, 3, 3, 4, 4)),
    "syncbatchnorm": (lambda: nn.SyncBatchNorm(5), (6, 5, 7, 7)),
    "layernorm": (lambda: nn.LayerNorm(24), (5, 7, 24)),
    "layernorm_2d_nobias": (lambda: nn.LayerNorm((4, 6), bias=False), (5, 3, 4, 6)),
    "layernorm_plain": (lambda: nn.LayerNorm(24, elementwise_affine=False), (5, 24)),
    "gelu": (lambda: nn.GELU(), (6, 5, 30)),
    "gelu_tanh": (lambda: nn.GELU(approximate="tanh"), (6, 5, 30)),
    "silu": (lambda: nn.SiLU(), (6, 5, 30)),
    "relu": (lambda: nn.ReLU(), (6, 5, 30)),
    "dropout": (lambda: nn.Dropout(0.3), (6, 5, 30)),
    "maxpool": (lambda: nn.MaxPool2d(3, 2, 1), (4, 3, 11, 11)),
    "maxpool_dilated_ceil": (lambda: nn.MaxPool2d((3, 2), stride=(2, 1), padding=1, dilation=(2, 3), ceil_mode=True),
                             (4, 3, 12, 11)),
    "maxpool_big_window": (lambda: nn.MaxPool2d(17, 3), (2, 3, 40, 40)),
    "avgpool": (lambda: nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False), (4, 3, 11, 11)),
    "avgpool_divisor": (lambda: nn.AvgPool2d(2, divisor_override=3), (4, 3, 10, 10)),
}
# What each layer stores that we compare against autograd on the decompressed input.
WEIGHTED = {"conv", "linear"}


def convert(module: nn.Module) -> nn.Module:
    """The module, converted in place like QModule does (the conversion under test)."""
    return actnn_aq.QModule(module).model


def run(module: nn.Module, x: torch.Tensor, g: torch.Tensor, seed: int = 0):
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)
    y = module(x)
    y.backward(g)
    grads = [x.grad] + [p.grad for p in module.parameters()]
    return y.detach(), grads


def grad_like(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A random output gradient (from a copy: running statistics stay untouched)."""
    return torch.randn_like(copy.deepcopy(module)(x))


def make(name, dtype=torch.float32):
    factory, shape = CASES[name]
    torch.manual_seed(hash(name) % 1000)
    module = factory().to(dtype)
    for p in module.parameters():  # non-trivial affine parameters
        p.data.uniform_(0.5, 1.5)
    x = torch.randn(shape, dtype=dtype) * 2 + 0.3
    return module, x


@pytest.mark.parametrize("name", list(CASES))
def test_forward_identical_and_l0_gradients_exact(name):
    actnn_aq.set_optimization_level("L0")
    ref, x = make(name)
    q = convert(copy.deepcopy(ref))
    assert type(q) is CONVERSIONS[type(ref)]
    g = grad_like(ref, x)
    y_ref, grads_ref = run(ref, x, g)
    y_q, grads_q = run(q, x, g)
    assert torch.equal(y_ref, y_q)
    for a, b in zip(grads_ref, grads_q):
        assert torch.equal(a, b)
    for a, b in zip(ref.buffers(), q.buffers()):  # running statistics, batch counters
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", list(CASES))
def test_forward_identical_when_compressing(name):
    actnn_aq.set_optimization_level("L3", bit=1.5, aq_bit=0.5)
    ref, x = make(name)
    q = convert(copy.deepcopy(ref))
    y_ref, _ = run(ref, x, grad_like(ref, x))
    y_q, grads = run(q, x, torch.ones_like(y_ref))
    assert torch.equal(y_ref, y_q)
    assert all(torch.isfinite(t).all() for t in grads)
    for a, b in zip(ref.buffers(), q.buffers()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", [n for n in CASES if n != "dropout"])
def test_gradcheck_float64(name):
    """Our backward formulas against finite differences (L0 keeps float64 exact)."""
    actnn_aq.set_optimization_level("L0")
    module, x = make(name, torch.float64)
    module = convert(module)
    small = x[:3].clone().requires_grad_()
    fn = lambda inp, *params: module(inp)
    assert torch.autograd.gradcheck(fn, (small, *module.parameters()), eps=1e-6, atol=1e-5, fast_mode=True)


def _reference_norm_grads(name, module, x_hat, x_exact, g):
    """BatchNorm / LayerNorm backward from its textbook formula: decompressed input, exact
    statistics (those of the exact input)."""
    if "layernorm" in name:
        dims = tuple(range(x_exact.dim() - len(module.normalized_shape), x_exact.dim()))
        mean = x_exact.mean(dims, keepdim=True)
        rstd = torch.rsqrt(x_exact.var(dims, unbiased=False, keepdim=True) + module.eps)
        xhat = (x_hat - mean) * rstd
        w = module.weight if module.weight is not None else torch.ones(module.normalized_shape)
        gw = g * w
        gx = rstd * (gw - gw.mean(dims, keepdim=True) - xhat * (gw * xhat).mean(dims, keepdim=True))
        red = tuple(range(x_exact.dim() - len(dims)))
        return gx, [(g * xhat).sum(red), g.sum(red)]
    dims = [0, *range(2, x_exact.dim())]
    view = (1, -1, *([1] * (x_exact.dim() - 2)))
    mean = x_exact.mean(dims).view(view)
    invstd = torch.rsqrt(x_exact.var(dims, unbiased=False).view(view) + module.eps)
    xhat = (x_hat - mean) * invstd
    w = module.weight.view(view) if module.weight is not None else 1.0
    gx = w * invstd * (g - g.mean(dims, keepdim=True) - xhat * (g * xhat).mean(dims, keepdim=True))
    return gx, [(g * xhat).sum(dims), g.sum(dims)]


@pytest.mark.parametrize("name", [n for n in CASES if not n.startswith(("relu", "dropout", "maxpool", "avgpool"))])
@pytest.mark.parametrize("setting", [dict(bit=2), dict(bit=1.25, aq_bit=0.5)])
def test_compressed_gradient_is_autograd_on_the_decompressed_input(name, setting, monkeypatch):
    actnn_aq.set_optimization_level("L3", **setting)
    capture = Capture(monkeypatch)
    ref, x = make(name)
    q = convert(copy.deepcopy(ref))
    g = grad_like(ref, x)
    _, grads = run(q, x, g)
    (x_in, ct), = capture.items
    x_hat = aqcore.decompress(ct)
    if "batchnorm" in name:  # batch norms store their input normalized (ops/norm.py)
        view = (1, -1, *([1] * (x.dim() - 2)))
        dims = [0, *range(2, x.dim())]
        mean = x.mean(dims).view(view)
        invstd = torch.rsqrt(x.var(dims, unbiased=False).view(view) + ref.eps)
        torch.testing.assert_close(x_in, (x - mean) * invstd)
        x_hat = x_hat / invstd + mean
    else:
        assert torch.equal(x_in, x)
    assert not torch.equal(x_hat, x)  # really compressed
    params = list(q.parameters())
    if any(name.startswith(k) for k in ("batchnorm", "syncbatchnorm", "layernorm")):
        gx, gparams = _reference_norm_grads(name, ref, x_hat, x, g)
        torch.testing.assert_close(grads[0], gx, rtol=1e-4, atol=1e-5)
        for got, want in zip(grads[1:], gparams):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        return
    _, on_decompressed = run(copy.deepcopy(ref), x_hat, g)
    if any(name.startswith(k) for k in ("conv", "linear")):
        # the weight gradient uses the stored input; the input gradient needs only the weight
        torch.testing.assert_close(grads[0], run(ref, x, g)[1][0], rtol=1e-5, atol=1e-5)
        for got, want in zip(grads[1:], on_decompressed[1:]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(grads[0], on_decompressed[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["relu", "dropout", "maxpool", "maxpool_dilated_ceil", "avgpool"])
def test_masks_and_indices_are_lossless(name, monkeypatch):
    """ReLU, dropout and pooling keep masks / offsets, never quantized values: their
    gradients stay exact at any level."""
    actnn_aq.set_optimization_level("L3", bit=1, aq_bit=0.25)
    capture = Capture(monkeypatch)
    ref, x = make(name)
    q = convert(copy.deepcopy(ref))
    g = grad_like(ref, x)
    y_ref, grads_ref = run(ref, x, g, seed=3)
    y_q, grads_q = run(q, x, g, seed=3)
    assert torch.equal(y_ref, y_q) and torch.equal(grads_ref[0], grads_q[0])
    assert capture.items == []


def _saved_by_autograd(fn):
    """Bytes of the tensors autograd saves while running fn: all that a layer keeps, so
    autograd frees it when backward has used it, as it does exact saved tensors."""
    sizes = []

    def pack(t):
        sizes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(sizes), out


def test_what_each_layer_keeps():
    actnn_aq.set_optimization_level("L3", bit=2)
    x = torch.randn(8, 16, 16, 16, requires_grad=True)
    relu = convert(nn.ReLU())
    nbytes, y = _saved_by_autograd(lambda: relu(x))
    assert nbytes == x.numel() // 8  # a 1-bit mask
    pool = convert(nn.MaxPool2d(3, 2, 1))
    nbytes, y = _saved_by_autograd(lambda: pool(x))
    assert nbytes == y.numel()  # a uint8 offset per output
    avg = convert(nn.AvgPool2d(2))
    nbytes, _ = _saved_by_autograd(lambda: avg(x))
    assert nbytes == 0
    drop = convert(nn.Dropout(0.5))
    nbytes, y = _saved_by_autograd(lambda: drop(x))
    assert nbytes == x.numel() // 8
    conv = convert(nn.Conv2d(16, 16, 3, padding=1))
    nbytes, y = _saved_by_autograd(lambda: conv(x))
    assert nbytes == conv.weight.numel() * 4 + y.grad_fn.held.nbytes  # the weight (a reference)
    assert y.grad_fn.held.nbytes < x.numel() * 4 / 12  # 2 bits + metadata
    conv.weight.requires_grad_(False)  # frozen: the input gradient needs no input at all
    nbytes, y = _saved_by_autograd(lambda: conv(x))
    assert y.grad_fn.held is None and nbytes == conv.weight.numel() * 4


def test_relu_nan_gradient_matches_torch():
    actnn_aq.set_optimization_level("L0")
    x = torch.tensor([[-1.0, float("nan"), 2.0, 0.0, float("inf"), -float("inf")]])
    g = torch.tensor([[1.0, 2.0, 3.0, float("nan"), 5.0, 6.0]])
    _, ref = run(nn.ReLU(), x, g)
    _, got = run(convert(nn.ReLU()), x, g)
    torch.testing.assert_close(got[0], ref[0], equal_nan=True)


@pytest.mark.parametrize("name", ["conv2d", "linear_3d", "batchnorm2d", "layernorm", "gelu"])
def test_non_finite_inputs_give_non_finite_gradients(name):
    actnn_aq.set_optimization_level("L3", bit=2)
    actnn_aq.config.guard = False  # it would zero them (tests/test_actnn_guard.py)
    ref, x = make(name)
    x = x.clone()
    x.view(-1)[5] = float("nan")
    q = convert(copy.deepcopy(ref))
    g = grad_like(ref, x)
    _, grads = run(q, x, g)
    _, grads_ref = run(ref, x, g)
    for got, want in zip(grads, grads_ref):
        assert torch.isfinite(got).all() == torch.isfinite(want).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["conv2d", "linear_3d", "batchnorm2d", "layernorm", "gelu", "silu", "maxpool"])
def test_half_precision_inputs(name, dtype):
    actnn_aq.set_optimization_level("L3", bit=8)
    ref, x = make(name, dtype)
    q = convert(copy.deepcopy(ref))
    g = grad_like(ref, x)
    y_ref, grads_ref = run(ref, x, g)
    y_q, grads_q = run(q, x, g)
    assert torch.equal(y_ref, y_q)
    for got, want in zip(grads_q, grads_ref):
        assert got.dtype == want.dtype
        assert (got.float() - want.float()).norm() <= 0.05 * want.float().norm()


@pytest.mark.parametrize("name", ["conv2d", "linear_3d", "batchnorm2d", "layernorm", "gelu"])
def test_autocast(name):
    actnn_aq.set_optimization_level("L3", bit=8)
    ref, x = make(name)
    q = convert(copy.deepcopy(ref))
    g = None
    results = []
    for module in (ref, q):
        leaf = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = module(leaf)
        g = torch.randn_like(y) if g is None else g
        y.backward(g)
        results.append((y.detach(), leaf.grad, [p.grad for p in module.parameters()]))
    (y_ref, gx_ref, gp_ref), (y_q, gx_q, gp_q) = results
    assert torch.equal(y_ref, y_q)
    assert gx_q.dtype == gx_ref.dtype
    for got, want in zip([gx_q, *gp_q], [gx_ref, *gp_ref]):
        assert got.dtype == want.dtype
        assert (got.float() - want.float()).norm() <= 0.05 * want.float().norm()


def test_channels_last():
    torch.manual_seed(0)
    actnn_aq.set_optimization_level("L2", bit=8)
    ref = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.BatchNorm2d(6))
    ref = ref.to(memory_format=torch.channels_last)
    q = convert(copy.deepcopy(ref))
    x = torch.randn(4, 4, 8, 8).to(memory_format=torch.channels_last)
    g = torch.randn(4, 6, 4, 4)
    y_ref, grads_ref = run(ref, x, g)
    y_q, grads_q = run(q, x, g)
    assert torch.equal(y_ref, y_q)
    for got, want in zip(grads_q, grads_ref):
        assert (got - want).norm() <= 0.05 * want.norm()


def test_inplace_layers_modify_their_input_like_torch():
    actnn_aq.set_optimization_level("L3", bit=8)
    for make_layer in (lambda: nn.ReLU(inplace=True), lambda: nn.SiLU(inplace=True),
                       lambda: nn.Dropout(0.4, inplace=True)):
        base = torch.randn(6, 50, requires_grad=True)
        outs = []
        for module in (make_layer(), convert(make_layer())):
            h = base * 1.0
            torch.manual_seed(0)
            y = module(h)
            assert y is h
            y.sum().backward()
            outs.append((y.detach(), base.grad.clone()))
            base.grad = None
        assert torch.equal(outs[0][0], outs[1][0])
        assert torch.allclose(outs[0][1], outs[1][1], rtol=0.02, atol=0.02)  # SiLU's input is compressed


def test_standalone_q_layers_have_torch_signatures():
    conv = actnn_aq.QConv2d(3, 8, kernel_size=3, stride=2, padding=1, bias=False)
    assert conv.weight.shape == (8, 3, 3, 3) and conv.bias is None
    bn = actnn_aq.QBatchNorm2d(8, eps=1e-3, momentum=None)
    assert bn.eps == 1e-3 and bn.momentum is None
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    bn(conv(x)).sum().backward()
    assert conv.weight.grad is not None and x.grad is not None
    assert conv.aq_scheme.controller is not bn.aq_scheme.controller


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bit", [2, 4])
def test_batch_norm_error_does_not_depend_on_channel_scale(channels_last, bit):
    """Issue 9: a batch norm's backward reads its input as (x - mean) * invstd. Stored raw in
    channels_last, a quantization group spans 16 channels, and the channel of standard
    deviation 1e-3 took the rounding noise of the one of 1 times invstd: at 2 bits the input
    gradient came out 489x its own norm off (0.6% in NCHW). Stored normalized, every
    channel's error is relative to its own spread."""
    torch.manual_seed(0)
    channels = 16
    x = torch.randn(32, channels, 16, 16) * torch.logspace(-3, 0, channels).view(1, -1, 1, 1) \
        + torch.randn(1, channels, 1, 1)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(x)
    bn = nn.BatchNorm2d(channels)
    exact = torch.autograd.grad(bn(x.requires_grad_()), x, g)[0]
    actnn_aq.set_optimization_level("L2", bit=bit)
    q = actnn_aq.QModule(copy.deepcopy(bn)).model
    found = torch.autograd.grad(q(x), x, g)[0]
    assert (found - exact).norm() < 0.05 * exact.norm()


def test_autocast_training_with_aq_levels():
    """Re-allocation passes measure AQ's deviation inside forwards that run under autocast;
    what they hold must stay float32 (a bfloat16 sketch made the backward's einsum fail)."""
    torch.manual_seed(0)
    actnn_aq.set_optimization_level("L3", bit=1.25, aq_bit=0.5)
    model = actnn_aq.QModule(nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 8)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(32, 16, 64), torch.randint(0, 8, (32, 16))
    for _ in range(4):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x).float().flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
