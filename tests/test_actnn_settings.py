"""actnn_aq.set_optimization_level and the config: levels are data, every call starts fresh."""
import pytest
import torch
from torch import nn

import actnn_aq
from actnn_aq.settings import LEVELS


def test_every_original_and_release_level_is_accepted():
    for name in ["L0", "L1", "L2", "L3", "L3.1", "L4", "L5", "swap", "L3_", "L3-aq1.0-1.5b", "L3-aq1.0-1.25b"]:
        assert actnn_aq.set_optimization_level(name).level == name
    for name in LEVELS:
        actnn_aq.set_optimization_level(name)


def test_level_rows():
    cfg = actnn_aq.set_optimization_level("L3-aq1.0-1.25b")
    assert (cfg.bit, cfg.aq_bit, cfg.adaptive, cfg.per_layer) == (1.25, 1.0, True, True)
    cfg = actnn_aq.set_optimization_level("L1")
    assert (cfg.bit, cfg.adaptive, cfg.convert_bn) == (4, False, False)
    cfg = actnn_aq.set_optimization_level("swap")
    assert (cfg.compress, cfg.swap) == (False, True)
    cfg = actnn_aq.set_optimization_level("L5")
    assert cfg.swap and cfg.expandable_segments and cfg.compress
    cfg = actnn_aq.set_optimization_level("L0")
    assert not cfg.compress and not cfg.swap


def test_unknown_level_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown level 'L9'.*L0, L1.*L3-aq1\.0-1\.25b"):
        actnn_aq.set_optimization_level("L9")


def test_each_call_starts_from_the_defaults():
    actnn_aq.set_optimization_level("L3", bit=1.5, aq_bit=0.5)
    actnn_aq.config.use_gradient = True
    actnn_aq.config.group_size = 128
    cfg = actnn_aq.set_optimization_level("L2")
    assert (cfg.bit, cfg.aq_bit, cfg.use_gradient, cfg.group_size) == (4, 0, False, 256)
    assert cfg is actnn_aq.config  # the same object, updated in place


def test_arguments_override_the_level():
    cfg = actnn_aq.set_optimization_level("L3-aq1.0-1.5b", bit=2, aq_bit=0.25)
    assert (cfg.bit, cfg.aq_bit) == (2, 0.25)


@pytest.mark.parametrize("level, bit, aq_bit", [
    ("L3", 0, 0.3),         # not an AQ precision
    ("L3", 0.5, 0),         # below 1 bit needs AQ
    ("L3", 0.4, 0.5),       # below the lowest AQ level
    ("L3", 9, 0),           # nothing above 8 bits to allocate
    ("L2", 3, 0),           # a fixed level must be a level
    ("L0", 2, 0),           # L0 does not compress
    ("swap", 0, 1),
])
def test_bad_bit_and_aq_bit(level, bit, aq_bit):
    with pytest.raises(ValueError):
        actnn_aq.set_optimization_level(level, bit=bit, aq_bit=aq_bit)


def test_valid_bit_and_aq_bit():
    assert actnn_aq.set_optimization_level("L3", bit=0.5, aq_bit=0.5).bit == 0.5
    assert str(actnn_aq.set_optimization_level("L2", bit=0.5, aq_bit=0.5).fixed_level) == "aq0.5"
    assert str(actnn_aq.set_optimization_level("L2", bit=1, aq_bit=1).fixed_level) == "aq1"
    assert str(actnn_aq.set_optimization_level("L2", bit=1).fixed_level) == "1"


def test_ladder_goes_down_to_aq_bit():
    assert [str(l) for l in actnn_aq.set_optimization_level("L3").ladder] == ["8", "4", "2", "1"]
    ladder = actnn_aq.set_optimization_level("L3", aq_bit=0.5).ladder
    assert [str(l) for l in ladder] == ["8", "4", "2", "1", "aq1", "aq0.5"]


def test_config_is_captured_at_conversion():
    actnn_aq.set_optimization_level("L3", bit=1.5, aq_bit=0.5)
    model = actnn_aq.QModule(nn.Sequential(nn.Linear(8, 8)))
    actnn_aq.set_optimization_level("L0")
    assert (model.config.level, model.config.bit, model.config.aq_bit) == ("L3", 1.5, 0.5)
    layer = actnn_aq.QLinear(8, 8)  # a layer built on its own takes the config in force
    assert not layer.aq_scheme.controller.config.compress
    x = torch.randn(4, 8)
    model(x).sum().backward()
    assert model.controller.iteration == 1


def test_edited_config_is_validated_at_conversion():
    actnn_aq.config.bit = 0.25
    with pytest.raises(ValueError, match="bit must lie in"):
        actnn_aq.QModule(nn.Linear(4, 4))
