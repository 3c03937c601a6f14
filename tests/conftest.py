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
    from cps_hf import CPSConfig

    return CPSConfig(
        backbone="test_resnet",
        num_labels=3,
        multi_grid=None,
        aspp_channels=16,
        low_level_channels=8,
        decoder_channels=16,
        id2label={0: "background", 1: "disc", 2: "square"},
        label2id={"background": 0, "disc": 1, "square": 2},
    )
