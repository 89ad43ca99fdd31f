"""SearchConfig: file + flags, validated before any compute."""

from __future__ import annotations

import pytest

from tdsearch.config import SearchConfig
from tdsearch.errors import UserError


def test_flags_override_the_file(tmp_path):
    path = tmp_path / "search.yaml"
    path.write_text(
        "budget: 12\nmodel: resnet20\ndataset: synthetic\nexclude-layers: [fc]\noptions: {}\n"
    )
    config = SearchConfig.from_sources(path, {"budget": 3, "seed": None})
    assert (config.budget, config.model, config.exclude_layers) == (3, "resnet20", ["fc"])
    assert config.seed == 0


def test_defaults_are_the_documented_task():
    config = SearchConfig.from_sources()
    assert (config.model, config.dataset, config.method, config.budget) == (
        "lenet5",
        "fashion-mnist",
        "decompose",
        50,
    )
    train = config.train_settings()
    assert (train.optimizer, train.lr, train.epochs) == ("adam", 1e-3, 2)


@pytest.mark.parametrize(
    "text,message",
    [
        ("budget: [unclosed", "does not parse"),
        ("- just\n- a list\n", "must hold a mapping"),
        ("bugdet: 5\n", "unknown setting.*bugdet"),
        ("budget: five\n", "setting budget: expected int"),
        ("budget: 0\n", "budget must be at least 1"),
        ("budget: -3\n", "budget must be at least 1"),
        ("model: vgg\n", "unknown model 'vgg'"),
        ("dataset: imagenet\n", "unknown dataset"),
        ("method: magic\n", "unknown method"),
        ("format: cp\n", "unknown format"),
        ("tie: layer\n", "unknown tie"),
        ("objectives: [params, flops]\n", "objectives must include accuracy"),
        ("name: 'bad name!'\n", "may hold only"),
        ("options: {rho: 3}\n", "unknown option"),
        ("data_dir: /no/such/dir\n", "does not exist"),
        ("weights: /no/such/file.pt\n", "does not exist"),
        ("rank_bounds: {conv2: 5}\n", "must be \\[low, high\\]"),
        ("budget: 3\nepochs: 1\nbudget: 5\n", "setting 'budget' is given twice"),
    ],
)
def test_bad_config_files_are_one_sentence(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        SearchConfig.from_sources(path)


def test_a_missing_config_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        SearchConfig.from_sources(tmp_path / "nope.yaml")


def test_workers_are_reused_unless_fresh_ones_are_asked_for(tmp_path):
    from tdsearch.cli import build_parser, search_config

    def parsed(*flags: str):
        return search_config(build_parser().parse_args(["search", *flags]))

    assert parsed().fresh_workers is False
    assert parsed("--fresh-workers").fresh_workers is True
    path = tmp_path / "search.yaml"
    path.write_text("fresh-workers: true\n")
    assert parsed("--config", str(path)).fresh_workers is True


def test_layer_names_from_python_may_be_one_string_as_the_flag_takes_them():
    config = SearchConfig(layers="all", exclude_layers="fc*, conv1")
    assert (config.layers, config.exclude_layers) == (["all"], ["fc*", "conv1"])
    assert SearchConfig(layers=["conv2"]).layers == ["conv2"]
    with pytest.raises(UserError, match="setting layers: expected list"):
        SearchConfig(layers=3)
