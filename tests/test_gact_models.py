"""Small real architectures the gact_aq tests (and benchmark/gact_sensitivity.py) use:
a CNN with BatchNorm and a transformer encoder (nn.TransformerEncoderLayer: SDPA inside,
dropout, GELU, LayerNorm), plus the bundled digits data."""
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gact_aq import settings
from gact_aq.controller import Controller

DIGITS = Path(__file__).resolve().parents[1] / "benchmark" / "data" / "digits.npz"


class SmallCNN(nn.Module):
    def __init__(self, in_channels: int = 3, classes: int = 10):
        super().__init__()

        def block(i, o, stride):
            return [nn.Conv2d(i, o, 3, stride, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(*block(in_channels, 16, 1), *block(16, 32, 2),
                                      *block(32, 32, 1), *block(32, 64, 2))
        self.head = nn.Linear(64, classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


class SmallEncoder(nn.Module):
    def __init__(self, vocab: int = 64, width: int = 32, heads: int = 4, layers: int = 2,
                 classes: int = 4, max_len: int = 32, dropout: float = 0.1):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.randn(1, max_len, width) * 0.1)
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=dropout,
                                           activation="gelu", batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, classes)

    def forward(self, tokens):
        x = self.embed(tokens) + self.pos[:, : tokens.shape[1]]
        return self.head(self.encoder(x).mean(1))


def cnn_problem(seed: int = 0, batch: int = 16):
    """(model, inputs, targets) of the CNN, with a few SGD steps taken (not at init)."""
    torch.manual_seed(seed)
    model = SmallCNN()
    x, y = torch.randn(batch, 3, 16, 16), torch.randint(0, 10, (batch,))
    return _warmed(model, x, y)


def encoder_problem(seed: int = 0, batch: int = 8, length: int = 16):
    torch.manual_seed(seed)
    model = SmallEncoder()
    x, y = torch.randint(0, 64, (batch, length)), torch.randint(0, 4, (batch,))
    return _warmed(model, x, y)


def _warmed(model, x, y, steps: int = 20):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, x, y


def backprop_fn(model, x, y):
    def backprop():
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
    return backprop


def grads(model):
    return [p.grad.detach().clone() for p in model.parameters()]


def digits(n: int = 1797):
    data = np.load(DIGITS)
    images = torch.tensor(data["images"][:n], dtype=torch.float32).unsqueeze(1) / 16.0
    return images, torch.tensor(data["labels"][:n], dtype=torch.int64)


def test_both_models_save_activations_that_get_compressed():
    for model, x, y in (cnn_problem(), encoder_problem()):
        with Controller(model, settings.build_config("L1.2")) as ctl:
            loss = nn.functional.cross_entropy(model(x), y)
            report = ctl.report()
            loss.backward()
        compressed = [r for r in report.rows if r.tid is not None and r.level != "32"]
        assert len(compressed) >= 9 and all(r.level == "2" for r in compressed)
        assert all(np.prod(r.shape) < 1024 for r in report.rows if r.level == "32")
