import os
import sys

import pytest
import torch

# tests import the independent reference as a plain module
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture
def fresh_dynamo():
    """A clean torch.compile cache and counters (``torch._dynamo.utils.counters``) for one test."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
