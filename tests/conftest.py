import os

import pytest
import torch

# Tests never touch the network: timm/Hub downloads fail fast instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# One thread: tiny test models gain nothing from more, and oversubscribed threads stall badly on a busy machine.
torch.set_num_threads(1)


@pytest.fixture
def tiny_config():
    """The tiny CPS config of the tests ([`helpers.make_tiny_config`]): `test_resnet`, slim heads, the synthetic
    classes."""
    from helpers import make_tiny_config

    return make_tiny_config()
