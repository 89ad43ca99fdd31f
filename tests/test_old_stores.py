"""Searches recorded before scores and MACs had their names still read back: their ``flops``
metrics are MACs, their trials are ranked by accuracy."""

from __future__ import annotations

from mlflow import MlflowClient

from tdsearch.cli import main
from tdsearch.mlflow.tracking import Tracker
from tdsearch.tensor import LayerRanks, RankTable


def write_old_search(uri: str) -> None:
    """A parent and two trials as tdsearch wrote them before: ``flops``, no score tag."""
    client = MlflowClient(uri)
    experiment = client.create_experiment("tdsearch")
    parent = client.create_run(
        experiment, run_name="old", tags={"tdsearch.role": "search", "tdsearch.search": "old"}
    )
    table = RankTable([("conv2", LayerRanks("tt", (1, 4, 4, 1)))]).to_json()
    for number, (accuracy, params, flops) in enumerate([(0.9, 1000, 5000), (0.8, 500, 2000)], 1):
        run = client.create_run(
            experiment,
            run_name=f"trial-{number:04d}",
            tags={
                "mlflow.parentRunId": parent.info.run_id,
                "tdsearch.trial_id": f"t{number}",
                "tdsearch.trial_number": str(number),
                "tdsearch.rank_table": table,
            },
        )
        for key, value in [
            ("val_accuracy", accuracy),
            ("params", params),
            ("flops", flops),
            ("flops_reduction", 10000 / flops),
            ("compression_ratio", 2.0),
        ]:
            client.log_metric(run.info.run_id, key, value)
        client.set_terminated(run.info.run_id, "FINISHED")
    client.set_terminated(parent.info.run_id, "FINISHED")


def test_flops_of_an_old_store_read_as_macs(tmp_path, monkeypatch, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    write_old_search(uri)
    tracker = Tracker(uri, "tdsearch")
    tracker.connect()
    parent = tracker.find_searches("old")[0]
    frame = tracker.trials_frame(parent.info.run_id)
    assert {"macs", "macs_reduction"} <= set(frame.columns) and "flops" not in frame
    assert tracker.score_of(parent).column == "val_accuracy"
    monkeypatch.chdir(tmp_path)
    assert main(["export", "--tracking-uri", uri, "--name", "old", "--select", "min-flops"]) == 0
    err = capsys.readouterr().err
    assert "trial 0002" in err and "2.00k MACs" in err
