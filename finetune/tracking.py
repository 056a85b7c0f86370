"""Experiment trackers (train.report_to): checked before a run starts, kept offline in the run folder, and given
the evaluation's scores at the end.

    RUN_DIR/tb/        TensorBoard event files
    RUN_DIR/mlruns/    the MLflow file store (experiment = the recipe's name)
    RUN_DIR/trackio/   trackio's local store (project = the recipe's name)
    RUN_DIR/wandb/     W&B offline runs (`wandb sync RUN_DIR/wandb/offline-run-*` uploads one later)

The Trainer's own callbacks log every step; an environment variable the user has already set (MLFLOW_TRACKING_URI
for a tracking server, WANDB_MODE=online, ...) wins over these defaults.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
import time
from pathlib import Path

from finetune.errors import FinetuneError
from finetune.recipe import Recipe

log = logging.getLogger(__name__)


def check(recipe: Recipe) -> None:
    """A tracker whose package is missing is one line naming the extra, before anything is read or written (each
    name of train.report_to is the module that must import and the extra that installs it)."""
    for name in recipe.train.report_to:
        if importlib.util.find_spec(name) is None:
            raise FinetuneError(
                f"train.report_to: {name} is not installed; pip install -e '.[{name}]', or remove {name} from "
                "train.report_to"
            )


def run_name(out: Path) -> str:
    """The name a run has in every tracker: its folder's."""
    return Path(out).resolve().name


def settings(recipe: Recipe, out: Path) -> dict[str, str]:
    """The environment the trackers read: stores inside the run folder, nothing sent anywhere."""
    root = Path(out).resolve()
    return {
        "TENSORBOARD_LOGGING_DIR": str(root / "tb"),
        "MLFLOW_TRACKING_URI": (root / "mlruns").as_uri(),
        # MLflow 3 refuses a file store unless asked for one; a folder inside the run folder is what we want here.
        "MLFLOW_ALLOW_FILE_STORE": "true",
        "MLFLOW_EXPERIMENT_NAME": recipe.name,
        "TRACKIO_DIR": str(root / "trackio"),
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(root),
        "WANDB_PROJECT": recipe.name,
    }


@contextlib.contextmanager
def environment(recipe: Recipe, out: Path):
    """The trackers' settings for as long as the block runs (what the user set wins), then the environment as it was."""
    added = {k: v for k, v in settings(recipe, out).items() if k not in os.environ} if recipe.train.report_to else {}
    if "trackio" in recipe.train.report_to and "trackio.utils" in sys.modules:
        # trackio reads TRACKIO_DIR once, when it is first imported.
        log.warning("trackio was imported earlier in this process; it keeps logging to %s", _trackio_dir())
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def _trackio_dir() -> Path:
    from trackio.utils import TRACKIO_DIR

    return TRACKIO_DIR


def evaluation_scalars(result: dict) -> dict[str, float]:
    """Each task's base and adapter scores, delta and 95% interval, named eval_suite/TASK/METRIC/FIELD."""
    scalars = {}
    for name, task in result["tasks"].items():
        prefix = f"eval_suite/{name}/{task['metric']}"
        for field in ("base", "adapter", "merged", "delta"):
            if task.get(field) is not None:
                scalars[f"{prefix}/{field}"] = float(task[field])
        if task.get("ci95"):
            scalars[f"{prefix}/ci95_low"], scalars[f"{prefix}/ci95_high"] = map(float, task["ci95"])
    return scalars


def log_evaluation(recipe: Recipe, out: Path, result: dict, step: int) -> None:
    """The evaluation's scores, logged at the run's last step to each tracker of train.report_to."""
    scalars = evaluation_scalars(result)
    with environment(recipe, out):
        for name in recipe.train.report_to:
            LOGGERS[name](recipe, out, scalars, step)
            log.info("logged the evaluation to %s", name)


def _tensorboard(recipe: Recipe, out: Path, scalars: dict, step: int) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(os.environ["TENSORBOARD_LOGGING_DIR"])
    for key, value in scalars.items():
        writer.add_scalar(key, value, step)
    writer.close()


def _mlflow(recipe: Recipe, out: Path, scalars: dict, step: int) -> None:
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name(os.environ["MLFLOW_EXPERIMENT_NAME"])
    found = (
        client.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.mlflow.runName = '{run_name(out)}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if experiment is not None
        else []
    )
    if not found:
        log.warning("mlflow: no run named %s to add the evaluation to", run_name(out))
        return
    now = int(time.time() * 1000)
    client.log_batch(found[0].info.run_id, metrics=[Metric(k, v, now, step) for k, v in scalars.items()])


def _trackio(recipe: Recipe, out: Path, scalars: dict, step: int) -> None:
    import trackio

    trackio.init(project=recipe.name, name=run_name(out), resume="allow")
    trackio.log(scalars, step=step)
    trackio.finish()


def _wandb(recipe: Recipe, out: Path, scalars: dict, step: int) -> None:
    import wandb

    # The Trainer leaves its run open in this process; a later process (finetune eval) resumes the newest run in
    # WANDB_DIR/wandb (offline-run-DATE-ID, or run-DATE-ID online).
    run = wandb.run
    latest = Path(os.environ["WANDB_DIR"]) / "wandb" / "latest-run"
    if run is None and not latest.exists():
        log.warning("wandb: no run in %s to add the evaluation to", latest.parent)
        return
    if run is None:
        run = wandb.init(
            project=os.environ["WANDB_PROJECT"], id=latest.resolve().name.rsplit("-", 1)[-1], resume="allow"
        )
    # W&B's own step only grows; the training step goes in as the metric the Trainer's callback plots against.
    run.log({**scalars, "train/global_step": step})
    run.finish()


LOGGERS = {"tensorboard": _tensorboard, "mlflow": _mlflow, "trackio": _trackio, "wandb": _wandb}
