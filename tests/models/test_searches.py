"""A 2-trial search on each test architecture, on synthetic data of its input shape: every
kind of layer the survey lists is searched, compressed, trained and measured end to end, and
a compressed trial is smaller than the dense model (an aliased layer counted once)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from tests.conftest import two_trial_search
from tests.models.test_architectures import MobileNetV2Stack, ResNet18
from tests.tensor.test_grouped import ResNeXtNet
from tests.tensor.test_survey import AliasedMLP

#: model, input shape (small: the search is about the layers, not the resolution), classes.
#: VGG-11-BN has no kind of layer ResNet-18 lacks (conv + batch norm + linear): its layers'
#: survey and full-rank equivalence are tested in test_architectures.py, not searched again.
MODELS = {
    "resnet18": (lambda: ResNet18(classes=10), (3, 32, 32), 10),
    "mobilenetv2": (MobileNetV2Stack, (3, 32, 32), 10),
    "resnext": (lambda: ResNeXtNet(in_channels=3), (3, 16, 16), 10),
    "aliased-mlp": (AliasedMLP, (20,), 10),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_a_search_compresses_the_architecture(name, tmp_path):
    factory, shape, classes = MODELS[name]
    torch.manual_seed(0)
    x = torch.randn(48, *shape)
    y = torch.randint(0, classes, (48,))
    train, val = TensorDataset(x[:32], y[:32]), TensorDataset(x[32:], y[32:])
    search = two_trial_search(factory(), train, val, None, tmp_path)
    assert (search.trials["compression_ratio"] > 1).all(), search.trials["compression_ratio"]
    choice = search.select("min-params")
    assert len(choice.table) > 0
    with torch.no_grad():
        assert choice.model.eval()(x[:2]).shape == (2, classes)
