import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HEADSTEER_CACHE", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "headsteer"))
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def default_model():
    import headsteer

    return headsteer.load("default")
