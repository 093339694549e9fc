import pytest

import aqcore
from aqcore.levels import Level


@pytest.mark.parametrize("spec,bits,avg", [
    ("32", 32, 1), ("16", 16, 1), ("8", 8, 1), (4, 4, 1), ("2", 2, 1), (1.0, 1, 1),
    ("aq1", 2, 2), ("aq1.0", 2, 2), ("AQ0.5", 2, 4), ("aq0.25", 2, 8), ("aq0.5z", 2, 4),
    ("AQ1.0Z", 2, 2),
])
def test_parse_level(spec, bits, avg):
    level = aqcore.parse_level(spec)
    assert (level.bits, level.avg) == (bits, avg)
    assert level.zeros == str(spec).lower().endswith("z")
    assert aqcore.parse_level(level) is level
    assert aqcore.parse_level(str(level)) is level


@pytest.mark.parametrize("bad", ["3", "aq0.3", "0", "L2", "", "aq", 2.5, None, "2z", "aqz"])
def test_parse_level_rejects_with_valid_list(bad):
    with pytest.raises(ValueError, match="valid: 32, 16, 8, 4, 2, 1, aq1, aq0.5, aq0.25, aq1z"):
        aqcore.parse_level(bad)


def test_bits_per_value():
    values = {name: level.bits_per_value for name, level in aqcore.LEVELS.items()}
    assert values == {"32": 32, "16": 16, "8": 8, "4": 4, "2": 2, "1": 1,
                      "aq1": 1.0, "aq0.5": 0.5, "aq0.25": 0.25,
                      "aq1z": 2.0, "aq0.5z": 1.5, "aq0.25z": 1.25}


def test_zero_safe_levels_keep_zeros_for_less():
    safe = {name: aqcore.zero_safe(level).name for name, level in aqcore.LEVELS.items()}
    assert safe == {"32": "32", "16": "16", "8": "8", "4": "4", "2": "2", "1": "2",
                    "aq1": "aq1z", "aq0.5": "aq0.5z", "aq0.25": "aq0.25z",
                    "aq1z": "aq1z", "aq0.5z": "aq0.5z", "aq0.25z": "aq0.25z"}
    assert all(aqcore.parse_level(name).codes_level.name == name[:-1] for name in ("aq1z", "aq0.25z"))


def test_aq_level():
    assert aqcore.aq_level(0.5) == Level("aq0.5", 2, 4)
    assert aqcore.aq_level(0.25, zeros=True) == Level("aq0.25z", 2, 8, zeros=True)
    with pytest.raises(ValueError, match="aq_bit must be one of"):
        aqcore.aq_level(0.3)
