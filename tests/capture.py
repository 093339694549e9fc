"""Test helper: record what the actnn_aq Q-layers hand to aqcore."""
import aqcore
from actnn_aq import saved


class Capture:
    """Every (input, CompressedTensor) the Q-layers store, fixed levels or allocated."""

    def __init__(self, monkeypatch):
        self.items = []
        compress, allocated = aqcore.compress, aqcore.compress_allocated

        def fixed(x, level, **kwargs):
            self.items.append((x.detach().clone(), compress(x, level, **kwargs)))
            return self.items[-1][1]

        def per_row(x, *args, **kwargs):
            ct, errors = allocated(x, *args, **kwargs)
            self.items.append((x.detach().clone(), ct))
            return ct, errors

        monkeypatch.setattr(saved.aqcore, "compress", fixed)
        monkeypatch.setattr(saved.aqcore, "compress_allocated", per_row)
