import pytest
import torch

import actnn_aq
import gact_aq


@pytest.fixture(autouse=True)
def default_levels():
    """Every test starts and ends with each framework at its default level: the configs are
    module-wide, and a test that sets one must not leak it into the next."""
    gact_aq.set_optimization_level("L2")
    actnn_aq.set_optimization_level("L3")
    yield
    gact_aq.set_optimization_level("L2")
    actnn_aq.set_optimization_level("L3")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)
