"""Built-in models and a user's own model and weights."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from tdsearch.errors import UserError
from tdsearch.models import build_model, load_weights
from tdsearch.tensor import count_params


@pytest.mark.parametrize(
    "name,params", [("resnet20", 0.27e6), ("resnet32", 0.46e6), ("resnet56", 0.85e6)]
)
def test_cifar_resnets_have_he_et_al_sizes(name, params):
    model = build_model(name, (3, 32, 32), 10)
    assert abs(count_params(model) - params) / params < 0.03
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_resnet_and_lenet_take_one_channel_inputs():
    for name in ("resnet20", "lenet5"):
        model = build_model(name, (1, 28, 28), 10)
        assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(
        "import torch.nn as nn\n"
        "def tiny(num_classes=10, in_channels=1):\n"
        "    return nn.Sequential(nn.Conv2d(in_channels, 4, 3), nn.Flatten(),\n"
        "                         nn.Linear(4 * 26 * 26, num_classes))\n"
        "def not_a_model():\n"
        "    return 42\n"
        "def broken():\n"
        "    raise RuntimeError('boom')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_models"
    sys.modules.pop("my_models", None)


def test_user_factory_gets_the_task_shape(user_module):
    model = build_model(f"{user_module}:tiny", (1, 28, 28), 7)
    assert model(torch.zeros(1, 1, 28, 28)).shape == (1, 7)


@pytest.mark.parametrize(
    "spec,message",
    [
        ("nosuchpackage.models:net", "cannot import"),
        ("my_models:missing", "no callable named 'missing'"),
        ("my_models:not_a_model", "not a torch.nn.Module"),
        ("my_models:broken", "RuntimeError: boom"),
        ("vgg16", "unknown model"),
    ],
)
def test_bad_model_specs_are_user_errors(user_module, spec, message):
    with pytest.raises(UserError, match=message):
        build_model(spec, (1, 28, 28), 10)


def test_weights_load_and_bad_weights_are_user_errors(tmp_path):
    model = build_model("lenet5", (1, 28, 28), 10)
    good = tmp_path / "good.pt"
    torch.save(model.state_dict(), good)
    other = build_model("lenet5", (1, 28, 28), 10)
    load_weights(other, good)
    assert torch.equal(other.fc1.weight, model.fc1.weight)

    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, wrapped)
    load_weights(other, wrapped)

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00garbage")
    with pytest.raises(UserError, match="cannot read weights file"):
        load_weights(other, corrupt)
    with pytest.raises(UserError, match="does not exist"):
        load_weights(other, tmp_path / "nope.pt")
    mismatched = tmp_path / "mismatched.pt"
    torch.save(nn.Linear(3, 4).state_dict(), mismatched)
    with pytest.raises(UserError, match=r"does not match the model: missing conv1\.weight"):
        load_weights(other, mismatched)
    resized = tmp_path / "resized.pt"
    torch.save(build_model("lenet5", (1, 28, 28), 5).state_dict(), resized)
    with pytest.raises(UserError, match=r"fc2.weight has shape \(5, 500\)"):
        load_weights(other, resized)


def test_a_whole_pickled_module_says_to_save_the_state_dict(tmp_path):
    model = build_model("lenet5", (1, 28, 28), 10)
    path = tmp_path / "whole.pt"
    torch.save(model, path)  # the common habit: the module, not its state_dict
    with pytest.raises(
        UserError, match=r"holds pickled Python objects .*model.state_dict\(\)"
    ) as e:
        load_weights(model, path)
    assert "\x1b" not in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod."])
def test_a_wrapper_prefix_on_every_key_is_stripped_with_a_note(tmp_path, prefix):
    trained = build_model("lenet5", (1, 28, 28), 10)
    path = tmp_path / "wrapped.pt"
    torch.save({prefix + k: v for k, v in trained.state_dict().items()}, path)
    fresh = build_model("lenet5", (1, 28, 28), 10)
    note = load_weights(fresh, path)
    assert note is not None and prefix in note
    assert all(
        torch.equal(a, b)
        for a, b in zip(fresh.state_dict().values(), trained.state_dict().values(), strict=True)
    )
