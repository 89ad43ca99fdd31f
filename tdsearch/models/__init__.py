"""Built-in models and a user's own: an ``nn.Module`` object, a factory, or
``package.module:factory``."""

from __future__ import annotations

import copy
import hashlib
import importlib
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tdsearch.errors import UserError, first_line
from tdsearch.models.lenet import LeNet5
from tdsearch.models.resnet import CifarResNet
from tdsearch.models.text import TextLSTM

InputShape = tuple[int, int, int]

BUILTIN_MODELS: dict[str, Callable[[InputShape, int], nn.Module]] = {
    "lenet5": lambda shape, classes: LeNet5(shape[0], classes, shape[1]),
    "text-lstm": lambda shape, classes: TextLSTM(classes),
    "resnet20": lambda shape, classes: CifarResNet(20, shape[0], classes),
    "resnet32": lambda shape, classes: CifarResNet(32, shape[0], classes),
    "resnet56": lambda shape, classes: CifarResNet(56, shape[0], classes),
}
#: built-in models that read token ids (B, tokens), not images
TEXT_MODELS = frozenset({"text-lstm"})


def is_user_model(spec: str) -> bool:
    return ":" in spec


def build_model(spec: str, input_shape: InputShape, num_classes: int | None) -> nn.Module:
    """A fresh, randomly initialised model.

    Args:
        spec: a built-in name (``lenet5``, ``resnet20/32/56``; ``text-lstm`` for token ids)
            or ``package.module:factory``.
            A user factory is called with whichever of ``in_channels``, ``num_classes`` and
            ``input_shape`` it accepts as keywords (none is fine) and must return an ``nn.Module``.
        input_shape: (C, H, W) of one input image, or (tokens,) of one text.
        num_classes: number of output classes.
    """
    if spec in BUILTIN_MODELS:
        text = spec in TEXT_MODELS
        if num_classes is None or len(input_shape) != (1 if text else 3):
            needs = "(tokens,) inputs of word ids" if text else "(C, H, W) inputs"
            raise UserError(
                f"model {spec} is {'a text' if text else 'an image'} classifier: it needs "
                f"{needs} and the number of classes (set Data(num_classes=...)), got inputs "
                f"{tuple(input_shape)} and num_classes {num_classes}"
            )
        return BUILTIN_MODELS[spec](input_shape, num_classes)
    if not is_user_model(spec):
        raise UserError(
            f"unknown model {spec!r}; choose one of {', '.join(BUILTIN_MODELS)} "
            "or give your own as package.module:factory"
        )
    return _build_user_model(spec, input_shape, num_classes)


def _build_user_model(spec: str, input_shape: InputShape, num_classes: int | None) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # any import-time failure of user code is the user's to fix
        raise UserError(f"cannot import {module_name!r} for --model {spec}: {err}") from err
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise UserError(f"--model {spec}: {module_name} has no callable named {attr!r}")
    return call_factory(factory, f"--model {spec}", input_shape, num_classes)


def call_factory(
    factory: Callable[..., Any], label: str, input_shape: InputShape, num_classes: int | None
) -> nn.Module:
    """Call a model factory with whichever of ``in_channels``, ``num_classes`` and
    ``input_shape`` it accepts as keywords; it must return an ``nn.Module``."""
    spec = label
    offered = {
        "in_channels": input_shape[0] if input_shape else None,
        "num_classes": num_classes,
        "input_shape": tuple(input_shape),
    }
    try:
        params = inspect.signature(factory).parameters
        kwargs = {k: v for k, v in offered.items() if k in params}
    except (TypeError, ValueError):
        kwargs = {}
    try:
        model = factory(**kwargs)
    except Exception as err:
        raise UserError(f"{spec}: the factory raised {type(err).__name__}: {err}") from err
    if not isinstance(model, nn.Module):
        raise UserError(
            f"{spec}: the factory returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model


@dataclass(frozen=True)
class ModelSource:
    """How a trial gets a fresh copy of the model's architecture.

    Exactly one of: ``spec`` (a built-in name or ``package.module:factory``), ``factory`` (a
    picklable callable returning an ``nn.Module``, called with whichever of ``in_channels``,
    ``num_classes`` and ``input_shape`` it accepts) or ``template`` (a user's module object;
    each trial gets a deep copy of its structure, and its own weights are the trained baseline).
    """

    spec: str | None = None
    factory: Callable[..., nn.Module] | None = None
    template: nn.Module | None = None

    @property
    def label(self) -> str:
        """A short name for logs, MLflow tags and default search names."""
        if self.spec is not None:
            return self.spec
        if self.factory is not None:
            return getattr(self.factory, "__name__", type(self.factory).__name__)
        return type(self.template).__name__

    @property
    def is_trained(self) -> bool:
        """A module object carries its trained weights: the dense baseline is that module."""
        return self.template is not None

    def fingerprint(self) -> str:
        """What identifies the model: its name, its factory's qualified name, or a hash of a
        module object's weights (so that a search is not resumed with another model)."""
        if self.spec is not None:
            return self.spec
        if self.factory is not None:
            module = getattr(self.factory, "__module__", "")
            return f"{module}.{getattr(self.factory, '__qualname__', self.label)}"
        digest = hashlib.sha256(type(self.template).__qualname__.encode())
        for key, tensor in self.template.state_dict().items():
            digest.update(key.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return f"{self.label}@{digest.hexdigest()[:16]}"

    def build(self, input_shape: InputShape, num_classes: int | None) -> nn.Module:
        if self.spec is not None:
            return build_model(self.spec, input_shape, num_classes)
        if self.factory is not None:
            return call_factory(self.factory, f"model {self.label}", input_shape, num_classes)
        return copy.deepcopy(self.template)


def resolve_model(model: Any) -> ModelSource:
    """The :class:`ModelSource` of what a user passed as ``model``.

    Raises:
        UserError: an unknown name, something that is not a module or a factory, or a module
            object that cannot be pickled (trials run in other processes) in one sentence.
    """
    if isinstance(model, ModelSource):
        return model
    if isinstance(model, str):
        if model not in BUILTIN_MODELS and not is_user_model(model):
            raise UserError(
                f"unknown model {model!r}; choose one of {', '.join(BUILTIN_MODELS)} "
                "or give your own as package.module:factory"
            )
        return ModelSource(spec=model)
    if isinstance(model, nn.Module):
        _check_picklable(model)
        return ModelSource(template=model)
    if callable(model):
        return ModelSource(factory=model)
    raise UserError(
        f"model: expected an nn.Module, a factory returning one, a built-in name or "
        f"package.module:factory, got {type(model).__name__}"
    )


def _check_picklable(model: nn.Module) -> None:
    # Ray ships the model to its workers with cloudpickle; fail here, in one sentence, rather
    # than in the first trial with Ray's serialisation traceback.
    import cloudpickle

    try:
        cloudpickle.dumps(model)
    except Exception as err:
        raise UserError(
            f"model {type(model).__name__} cannot be pickled to reach the trials "
            f"({first_line(err)}); "
            "pass a factory that builds it instead, e.g. create_search(model=make_model, ...) "
            "with weights loaded inside make_model"
        ) from None


#: Prefixes that wrappers add to every key of a state_dict: ``nn.DataParallel`` /
#: ``DistributedDataParallel`` (``module.``) and ``torch.compile`` (``_orig_mod.``).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def load_weights(model: nn.Module, path: str | Path) -> str | None:
    """Load a user's trained weights into ``model``.

    The file must hold a ``state_dict`` (or a dict with one under ``state_dict`` /
    ``model_state_dict`` / ``model``); it is read with ``weights_only=True``, so no code in it
    ever runs. A wrapper's prefix on every key (``module.`` of ``nn.DataParallel``,
    ``_orig_mod.`` of ``torch.compile``) is stripped.

    Returns:
        a note on what was adapted (the stripped prefix), or None.

    Raises:
        UserError: a missing, corrupt or mismatched file, naming the first offending keys; a
            whole pickled module (``torch.save(model)``), saying to save ``state_dict()``.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))  # torch colours its message
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if found:
            raise UserError(
                f"weights file {path} holds pickled Python objects ({found.group(1)}), not a "
                "state_dict of tensors, as torch.save(model) writes; save "
                "torch.save(model.state_dict(), path) instead (tdsearch never runs code from a "
                "weights file)"
            ) from None
        if "Weights only load failed" in text or "invalid load key" in text:
            raise UserError(
                f"cannot read weights file {path}: it is not a PyTorch state_dict file; save "
                "one with torch.save(model.state_dict(), path)"
            ) from None
        first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
        raise UserError(f"cannot read weights file {path}: {first}") from None
    if isinstance(state, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise UserError(f"weights file {path} does not hold a state_dict of tensors")
    own = model.state_dict()
    note = None
    for prefix in WRAPPER_PREFIXES:
        if (
            state
            and all(k.startswith(prefix) for k in state)
            and not any(k.startswith(prefix) for k in own)
        ):
            state = {k[len(prefix) :]: v for k, v in state.items()}
            note = f"stripped the prefix {prefix!r} from every key of {path.name}"
            break
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:3])}")
        if wrong:
            k = wrong[0]
            parts.append(
                f"{k} has shape {tuple(state[k].shape)}, model wants {tuple(own[k].shape)}"
            )
        raise UserError(f"weights file {path} does not match the model: {'; '.join(parts)}")
    model.load_state_dict(state)
    return note


__all__ = [
    "BUILTIN_MODELS",
    "CifarResNet",
    "LeNet5",
    "ModelSource",
    "build_model",
    "call_factory",
    "is_user_model",
    "load_weights",
    "resolve_model",
]
