"""train.report_to: TensorBoard and MLflow, read back from the run folder, hold every step metrics.jsonl holds and
the evaluation's scores; nothing leaks into the environment."""

from __future__ import annotations

import json
import os

import pytest
import yaml
from test_train import tiny_recipe

from finetune import pipeline, runs, tracking


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, tiny_llama_dir):
    folder = tmp_path_factory.mktemp("tracked")
    suite = folder / "suite.yaml"
    suite.write_text(
        yaml.safe_dump(
            {
                "tasks": {"sentiment": {"reader": "phrasebank", "path": "datasets/finance/phrasebank_sample.txt"}},
                "bootstrap": 200,
            }
        )
    )
    recipe = tiny_recipe(folder, tiny_llama_dir, max_steps=5, report_to=["tensorboard", "mlflow"])
    recipe.eval.suite, recipe.eval.n = str(suite), 6
    outcome = pipeline.run(recipe)
    return recipe, outcome


def logged_losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in runs.read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


def test_tensorboard_holds_every_logged_loss_and_the_evaluation(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe, outcome = tracked_run
    events = EventAccumulator(str(outcome.run_dir / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    losses = {e.step: e.value for e in events.Scalars("train/loss")}
    assert list(losses) == list(range(1, 6))
    assert losses == pytest.approx(logged_losses(outcome.run_dir), rel=1e-6)  # TensorBoard stores float32
    task = outcome.evaluation["tasks"]["sentiment"]
    for field in ("base", "adapter", "delta"):
        (scalar,) = events.Scalars(f"eval_suite/sentiment/accuracy/{field}")
        assert (scalar.step, scalar.value) == (5, pytest.approx(task[field], abs=1e-6))
    assert [s.value for s in events.Scalars("eval_suite/sentiment/accuracy/ci95_low")] == pytest.approx(
        [task["ci95"][0]], abs=1e-6
    )


def test_mlflow_holds_every_logged_loss_and_the_evaluation(tracked_run):
    from mlflow.tracking import MlflowClient

    recipe, outcome = tracked_run
    client = MlflowClient((outcome.run_dir / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name(recipe.name)
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == outcome.run_dir.name
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    assert history == pytest.approx(logged_losses(outcome.run_dir), rel=1e-9)
    task = outcome.evaluation["tasks"]["sentiment"]
    (delta,) = client.get_metric_history(run.info.run_id, "eval_suite/sentiment/accuracy/delta")
    assert (delta.step, delta.value) == (5, pytest.approx(task["delta"]))
    assert json.loads((outcome.run_dir / "run.json").read_text())["steps"] == 5


def test_the_trackers_settings_end_with_the_run_and_the_users_own_win(tracked_run, monkeypatch, tmp_path):
    recipe, _ = tracked_run
    assert not {"TENSORBOARD_LOGGING_DIR", "MLFLOW_TRACKING_URI", "WANDB_MODE"} & set(os.environ)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    with tracking.environment(recipe, tmp_path / "run"):
        assert os.environ["MLFLOW_TRACKING_URI"] == "http://tracking.example:5000"
        assert os.environ["TENSORBOARD_LOGGING_DIR"] == str((tmp_path / "run" / "tb").resolve())
        assert os.environ["WANDB_MODE"] == "offline"
    assert "TENSORBOARD_LOGGING_DIR" not in os.environ


def test_report_to_accepts_one_name_or_none():
    from finetune.recipe import TrainSection

    assert TrainSection(report_to="tensorboard").report_to == ["tensorboard"]
    assert TrainSection(report_to="none").report_to == []
    assert TrainSection().report_to == []
