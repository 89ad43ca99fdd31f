"""ONNX export of compact models: every format and every kind of layer exports with a dynamic
batch, ONNX Runtime reproduces PyTorch within 1e-4 (relative), and bad cases are one
sentence."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tdsearch
from tdsearch.deploy import deployment_latency, export_onnx, format_latency
from tdsearch.deploy.onnx import example_input, session
from tdsearch.models import build_model
from tdsearch.tensor import LayerRanks, RankTable, compress, survey
from tdsearch.tensor.compress import make_spec
from tests.tensor.test_conv1d import AudioNet
from tests.tensor.test_grouped import ResNeXtNet
from tests.tensor.test_tt_embedding import TextClassifier

pytest.importorskip("onnxruntime")


def _table(model: nn.Module, shape, formats: dict[str, tuple]) -> RankTable:
    infos = {i.name: i for i in survey(model, shape)[0]}
    return RankTable(
        (name, make_spec(infos[name], fmt, ranks, kappa=kappa))
        for name, (fmt, ranks, kappa) in formats.items()
    )


LENET = (1, 28, 28)
#: (model factory, input shape, {layer: (format, ranks, kappa)})
CASES = {
    "tt": (lambda: build_model("lenet5", LENET, 10), LENET, {"conv2": ("tt", (3, 5), None)}),
    "tucker2": (
        lambda: build_model("lenet5", LENET, 10),
        LENET,
        {"conv2": ("tucker2", (6, 3), None), "fc1": ("svd", (12,), None)},
    ),
    "svd": (lambda: build_model("lenet5", LENET, 10), LENET, {"conv2": ("svd", (4,), None)}),
    "tt-matrix": (
        lambda: build_model("lenet5", LENET, 10),
        LENET,
        {"conv2": ("tt-matrix", (3, 4, 4), None), "fc1": ("tt-matrix", (5, 5), None)},
    ),
    "cepd-l+s": (
        lambda: build_model("lenet5", LENET, 10),
        LENET,
        {"conv2": ("tucker2", (4, 3), 2), "fc1": ("svd", (8,), 5)},
    ),
    "grouped": (lambda: ResNeXtNet(), (1, 8, 8), {"block.grouped": ("tucker2", (2, 2), None)}),
    "conv1d": (lambda: AudioNet(mode="reflect"), (2, 400), {"features.3": ("tt", (4, 4), None)}),
    "tt-embedding+lstm": (
        lambda: TextClassifier(),
        (12,),
        {"embedding": ("tt-matrix", (4, 4), None), "lstm": ("svd", (3,), None)},
    ),
    "tt-lstm": (lambda: TextClassifier(), (12,), {"lstm": ("tt-matrix", (4, 4), None)}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_compact_model_exports_and_onnx_runtime_matches_pytorch(case, tmp_path):
    factory, shape, formats = CASES[case]
    torch.manual_seed(0)
    dense = factory().eval()
    compact = compress(dense, _table(dense, shape, formats)).eval()
    path = tmp_path / "model.onnx"
    error = export_onnx(compact, path, shape)
    assert error < 1e-4 and path.is_file()
    runner = session(path)
    x = example_input(compact, shape, 5, seed=9)  # a batch size the export never saw
    got = runner.run(None, {runner.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), compact(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fmt", ["tt", "tucker2", "svd"])
def test_batch_norm_is_folded_into_the_last_factor_conv_of_the_file(fmt, tmp_path):
    import onnx

    shape = (3, 32, 32)
    dense = build_model("resnet20", shape, 10).eval()
    infos = survey(dense, shape)[0]
    conv = next(i for i in infos if i.name == "layer2.0.conv1")
    ranks = {"tt": (8, 8), "tucker2": (8, 8), "svd": (8,)}[fmt]
    table = RankTable([(conv.name, make_spec(conv, fmt, ranks))])
    compact = compress(dense, table).eval()
    path = tmp_path / "model.onnx"
    assert export_onnx(compact, path, shape) < 1e-4
    ops = [node.op_type for node in onnx.load(path).graph.node]
    assert "BatchNormalization" not in ops
    assert ops.count("Conv") == 19 + (2 if fmt != "svd" else 1)  # the factor convs


def test_latency_is_measured_for_both_models_in_both_runtimes(tmp_path):
    model = build_model("lenet5", LENET, 10).eval()
    compact = compress(model, _table(model, LENET, {"conv2": ("tucker2", (4, 4), None)}))
    export_onnx(compact, tmp_path / "m.onnx", LENET)
    rows = deployment_latency(model, compact, tmp_path / "m.onnx", LENET, (1, 4), repeats=3)
    assert {(r.model, r.runtime, r.batch) for r in rows} == {
        (m, rt, b) for m in ("dense", "compact") for rt in ("onnxruntime", "torch") for b in (1, 4)
    }
    assert all(r.ms > 0 for r in rows)
    assert len(format_latency(rows)) == 4


def test_a_model_that_does_not_export_is_one_sentence(tmp_path):
    class DataDependent(nn.Module):
        def forward(self, x):
            return x[x > 0] if int(x.sum()) else x  # control flow on values

    with pytest.raises(tdsearch.UserError, match="does not export to ONNX") as err:
        export_onnx(nn.Sequential(nn.Linear(4, 4), DataDependent()), tmp_path / "m.onnx", (4,))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "m.onnx").exists()


def test_the_python_api_exports(tmp_path):
    model = build_model("lenet5", LENET, 10).eval()
    compact = compress(model, RankTable([("conv2", LayerRanks("tucker2", (4, 4)))]))
    assert tdsearch.export_onnx(compact, tmp_path / "m.onnx", LENET) < 1e-4


def test_the_latency_objective_runs_in_either_runtime():
    from tdsearch.config import ExecutionSettings
    from tdsearch.deploy.onnx import onnx_model_latency

    model = build_model("lenet5", LENET, 10).train()
    assert onnx_model_latency(model, LENET, 2, repeats=3) > 0
    assert model.training  # handed back as it came
    settings = ExecutionSettings(objectives=["accuracy", "latency"], latency_runtime="onnxruntime")
    assert settings.latency_runtime == "onnxruntime"
    with pytest.raises(tdsearch.UserError, match=r"unknown latency_runtime .* torch, onnxruntime"):
        ExecutionSettings(latency_runtime="tensorrt")
