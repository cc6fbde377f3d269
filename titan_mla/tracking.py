"""MLflow experiment tracking for titan_mla, through torchtitan's metrics path (no fork).

- ``MLflow``: the ``[mlflow]`` job config section (``enable``, ``tracking_uri``, ``experiment_name``,
  ``run_name``), merged into torchtitan's JobConfig by ``titan_mla.config``.
- ``build_metrics_processor``: the TrainSpec's ``build_metrics_processor_fn``. It builds
  torchtitan's own MetricsProcessor (TensorBoard and W&B as ``[metrics]`` says) and, when
  ``mlflow.enable`` is on, adds an ``MLflowLogger`` on rank 0: one MLflow run per training with the
  whole job config as parameters, every scalar TensorBoard gets at the same steps (names made
  MLflow-legal by ``mlflow_name``), and the last checkpoint's path as the tag ``final_checkpoint``.
- ``log_result_files``: benchmark/ablation result files (``benchmarks/results/*.json``) as runs with
  the file and its markdown table as artifacts and its figures as metrics.
- ``start_variant_run``: one run per variant of an ablation, under one experiment.
- ``default_wandb_mode``: W&B (torchtitan's ``[metrics] enable_wandb``) writes offline when its
  server cannot be reached and ``WANDB_MODE`` is not set, instead of failing or hanging at start.

MLflow is optional (``pip install -e '.[mlflow]'``); nothing here imports it until it is used.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import socket
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import torch
from torchtitan.components.metrics import BaseLogger, LoggerContainer, MetricsProcessor
from torchtitan.components.metrics import (
    build_metrics_processor as build_torchtitan_metrics_processor,
)
from torchtitan.tools.logging import logger

if TYPE_CHECKING:
    from mlflow import ActiveRun, MlflowClient
    from torchtitan.config import JobConfig
    from torchtitan.distributed import ParallelDims
    from torchtitan.protocols import BaseModelArgs

MISSING_MLFLOW = (
    "MLflow tracking needs the 'mlflow' package, an optional dependency of titan-mla: "
    "pip install -e '.[mlflow]'  (or: pip install mlflow)"
)
MAX_NAME_LENGTH = 250  # MLflow's limit on param, metric and tag keys
MAX_PARAM_VALUE_LENGTH = 6000  # MLflow's limit on a param value
TRUNCATED = "...[truncated]"
FINAL_CHECKPOINT_TAG = "final_checkpoint"
VARIANT_TAG = "titan_mla.variant"
RESULT_FILE_TAG = "titan_mla.result_file"
CHECKPOINT_STEP_FOLDER = re.compile(r"^step-(\d+)$")  # torchtitan's checkpoint/step-N
_ILLEGAL_NAME_CHARACTER = re.compile(r"[^\w\-. /]")
WANDB_DEFAULT_BASE_URL = "https://api.wandb.ai"
WANDB_PROBE_TIMEOUT_S = 3.0


@dataclass
class MLflow:
    enable: bool = False
    """Log the training to MLflow (rank 0): the job config as params, the [metrics] scalars per
    logged step, the final checkpoint path as a tag. Needs pip install -e '.[mlflow]'."""

    tracking_uri: str = ""
    """Where runs go: "" = sqlite:///<dump_folder>/mlflow/mlflow.db (artifacts beside it, in
    mlflow/artifacts), or any MLflow tracking URI, e.g. http://host:5000 for a tracking server."""

    experiment_name: str = "titan_mla"
    """MLflow experiment the run is created in (created if it does not exist)."""

    run_name: str = ""
    """Name of the run; "" lets MLflow generate one."""


def require_mlflow() -> ModuleType:
    """Import mlflow, or raise ImportError naming the extra to install."""
    try:
        import mlflow
    except ImportError as err:
        raise ImportError(MISSING_MLFLOW) from err
    return mlflow


def mlflow_name(name: str) -> str:
    """A metric/param/tag name MLflow accepts (alphanumerics, ``_ - . /`` and spaces; a relative
    path without empty, ``.`` or ``..`` parts; at most 250 characters), e.g. ``mfu(%)`` ->
    ``mfu_pct``, ``throughput(tps)`` -> ``throughput_tps``, ``memory/max_active(GiB)`` ->
    ``memory/max_active_GiB``. Legal names are unchanged."""
    name = name.replace("%", "pct").replace("(", "_").replace(")", "")
    name = _ILLEGAL_NAME_CHARACTER.sub("_", name)
    parts = [part for part in name.split("/") if part not in ("", ".", "..")]
    return "/".join(parts)[:MAX_NAME_LENGTH] or "_"


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, list | tuple | dict) else str(value)
    if len(text) > MAX_PARAM_VALUE_LENGTH:
        return text[: MAX_PARAM_VALUE_LENGTH - len(TRUNCATED)] + TRUNCATED
    return text


def flatten_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mappings as MLflow params: dotted keys (``training.seq_len``), values as strings
    (lists as JSON) cut to MLflow's 6000 characters."""
    params: dict[str, str] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            params.update(flatten_params(value, f"{dotted}."))
        else:
            params[mlflow_name(dotted)] = _param_value(value)
    return params


def default_tracking_uri(dump_folder: str | os.PathLike[str]) -> str:
    """The local store of a job: a SQLite database under ``<dump_folder>/mlflow/``."""
    database = Path(dump_folder).resolve() / "mlflow" / "mlflow.db"
    return f"sqlite:///{database}"


def _artifact_location(tracking_uri: str) -> str | None:
    """Artifacts of a new experiment in a SQLite store go beside the database (MLflow's default is
    ./mlruns in the working directory); other stores (a server, a folder) choose their own."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    database = Path(tracking_uri.removeprefix("sqlite:///"))
    return (database.parent / "artifacts").as_uri()


def _experiment_id(client: MlflowClient, name: str, tracking_uri: str) -> str:
    """The id of the experiment called ``name``, created if it does not exist."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=_artifact_location(tracking_uri))
    except MlflowException:  # created meanwhile by another process
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def _client(tracking_uri: str) -> MlflowClient:
    require_mlflow()
    from mlflow import MlflowClient

    if tracking_uri.startswith("sqlite:///"):
        Path(tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri)


def final_checkpoint(job_config: JobConfig) -> Path | None:
    """The newest ``step-N`` checkpoint folder of the job, if checkpointing is on and wrote one."""
    if not job_config.checkpoint.enable:
        return None
    folder = Path(job_config.job.dump_folder) / job_config.checkpoint.folder
    steps = {
        int(match.group(1)): path
        for path in (folder.iterdir() if folder.is_dir() else ())
        if (match := CHECKPOINT_STEP_FOLDER.match(path.name))
    }
    return steps[max(steps)].resolve() if steps else None


class MLflowLogger(BaseLogger):
    """A torchtitan metric logger writing one MLflow run: created with the job config as params,
    fed the scalars of every logged step, finished at close (FAILED if an exception is in flight,
    i.e. the trainer closes on an error) with the final checkpoint path as a tag."""

    def __init__(self, job_config: JobConfig, tag: str | None = None):
        config: MLflow = job_config.mlflow
        self.job_config = job_config
        self.tag = tag
        self.tracking_uri = config.tracking_uri or default_tracking_uri(job_config.job.dump_folder)
        self.client = _client(self.tracking_uri)
        experiment_id = _experiment_id(self.client, config.experiment_name, self.tracking_uri)
        run = self.client.create_run(
            experiment_id,
            run_name=config.run_name or None,
            tags={"mlflow.note.content": job_config.job.description},
        )
        self.run_id = run.info.run_id
        self._log_params(job_config)
        logger.info(
            f"MLflow logging enabled: run {self.run_id} ({run.info.run_name}) in experiment "
            f"'{config.experiment_name}' at {self.tracking_uri}"
        )

    def _log_params(self, job_config: JobConfig) -> None:
        from mlflow.entities import Param

        params = flatten_params(job_config.to_dict())
        self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in params.items()])

    def log(self, metrics: dict[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        batch = [
            Metric(
                mlflow_name(name if self.tag is None else f"{self.tag}/{name}"),
                float(value),
                timestamp,
                step,
            )
            for name, value in metrics.items()
        ]
        try:
            self.client.log_batch(self.run_id, metrics=batch)
        except Exception as err:  # a tracking outage must not stop the training
            logger.warning(f"MLflow: could not log step {step}: {err}")

    def close(self) -> None:
        checkpoint = final_checkpoint(self.job_config)
        if checkpoint is not None:
            self.client.set_tag(self.run_id, FINAL_CHECKPOINT_TAG, str(checkpoint))
        failed = sys.exc_info()[1] is not None
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


def server_reachable(url: str, timeout_s: float = WANDB_PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the URL's host and port opens within timeout_s."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=timeout_s):
            return True
    except OSError:
        return False


def default_wandb_mode(environ: dict[str, str] | os._Environ = os.environ) -> str | None:
    """Set ``WANDB_MODE=offline`` in environ when W&B's server (``WANDB_BASE_URL``) is unreachable
    and no mode was chosen; returns the mode set, or None when environ is left as it was."""
    if environ.get("WANDB_MODE"):
        return None
    base_url = environ.get("WANDB_BASE_URL", WANDB_DEFAULT_BASE_URL)
    if server_reachable(base_url):
        return None
    environ["WANDB_MODE"] = "offline"
    logger.warning(
        f"W&B: {base_url} is not reachable, logging offline (WANDB_MODE=offline); "
        "upload later with `wandb sync <dump_folder>/tb/<run>/wandb/offline-run-*`"
    )
    return "offline"


def build_metrics_processor(
    job_config: JobConfig,
    parallel_dims: ParallelDims,
    model_args: BaseModelArgs | None = None,
    tag: str | None = None,
) -> MetricsProcessor:
    """torchtitan's metrics processor, plus an MLflow logger on rank 0 when ``mlflow.enable`` is on
    (without an ``[mlflow]`` section in the job config, exactly torchtitan's). W&B goes offline
    when its server is unreachable (``default_wandb_mode``)."""
    if job_config.metrics.enable_wandb:
        default_wandb_mode()
    processor = build_torchtitan_metrics_processor(job_config, parallel_dims, model_args, tag)
    enabled = getattr(getattr(job_config, "mlflow", None), "enable", False)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if enabled and rank == 0:
        loggers = LoggerContainer()
        loggers.add_logger(processor.logger)
        loggers.add_logger(MLflowLogger(job_config, tag))
        processor.logger = loggers
    return processor


def _date_timestamp_ms(result: Mapping[str, Any]) -> int | None:
    try:
        day = datetime.date.fromisoformat(str(result["date"]))
    except (KeyError, ValueError):
        return None
    midnight = datetime.datetime(day.year, day.month, day.day, tzinfo=datetime.UTC)
    return int(midnight.timestamp() * 1000)


RESULT_HEADER_PARAMS = ("benchmark", "device", "n_gpus", "torch", "triton", "commit", "date")


def log_result_files(
    paths: Iterable[str | os.PathLike[str]],
    experiment: str = "benchmarks",
    tracking_uri: str | None = None,
) -> list[str]:
    """Log benchmark result files (shared/notes/BENCHMARKS.md format) to MLflow, one finished run
    per file named after it (``train-h100``); returns the run ids.

    Each run has the file (and the ``.md`` table beside it, if any) as artifacts, the header
    (benchmark, device, n_gpus, torch, triton, commit, date, command) as params, and every figure as
    a metric at step 0 dated by the result's date: ``summary/<key>`` for the summary and
    ``<benchmark>/<case>/<impl>/<metric>`` for the rows (names through ``mlflow_name``, e.g.
    ``MFU %`` -> ``MFU pct``). ``tracking_uri`` None: MLflow's own (``MLFLOW_TRACKING_URI``).
    """
    mlflow = require_mlflow()
    from mlflow.entities import Metric, Param

    from .tensorboard import load_result, result_scalars

    uri = tracking_uri or mlflow.get_tracking_uri()
    client = _client(uri)
    experiment_id = _experiment_id(client, experiment, uri)
    run_ids = []
    for path in map(Path, paths):
        result = load_result(path)
        timestamp = _date_timestamp_ms(result) or int(time.time() * 1000)
        params = {key: result[key] for key in (*RESULT_HEADER_PARAMS, "command") if key in result}
        run = client.create_run(
            experiment_id, run_name=path.stem, tags={RESULT_FILE_TAG: str(path.resolve())}
        )
        run_id = run.info.run_id
        client.log_batch(
            run_id,
            metrics=[
                Metric(mlflow_name(name), value, timestamp, 0)
                for name, value in result_scalars(result).items()
            ],
            params=[Param(key, _param_value(value)) for key, value in params.items()],
        )
        client.log_artifact(run_id, str(path))
        table = path.with_suffix(".md")
        if table.is_file():
            client.log_artifact(run_id, str(table))
        client.set_terminated(run_id, "FINISHED")
        run_ids.append(run_id)
    return run_ids


@contextlib.contextmanager
def _global_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's global tracking URI set to ``uri`` inside, and afterwards exactly as before: the
    fluent API (``mlflow.log_metric``) reads the global, and later runs of the process (other
    ablations, tests) must not inherit it. ``set_tracking_uri`` writes the module global and the
    ``MLFLOW_TRACKING_URI`` variable; both are restored."""
    from mlflow.tracking._tracking_service import utils

    global_uri, env_uri = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    require_mlflow().set_tracking_uri(uri)
    try:
        yield
    finally:
        utils._tracking_uri = global_uri
        if env_uri is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env_uri


@contextlib.contextmanager
def start_variant_run(
    experiment: str,
    variant_name: str,
    params: Mapping[str, Any],
    tracking_uri: str | None = None,
) -> Iterator[ActiveRun]:
    """An active MLflow run for one variant of an ablation (e.g. ``fp8`` / ``int8``, or one latent
    size), in ``experiment`` (created if needed): run name and tag ``titan_mla.variant`` =
    ``variant_name``, ``params`` logged flattened (nested dicts -> dotted keys). Inside, log with
    ``mlflow.log_metric(...)`` / ``log_result_files``; the run ends FINISHED, or FAILED on an
    exception. ``tracking_uri`` None: MLflow's own (``MLFLOW_TRACKING_URI``)."""
    mlflow = require_mlflow()
    with _global_tracking_uri(tracking_uri) if tracking_uri else contextlib.nullcontext():
        uri = mlflow.get_tracking_uri()
        experiment_id = _experiment_id(_client(uri), experiment, uri)
        with mlflow.start_run(
            experiment_id=experiment_id, run_name=variant_name, tags={VARIANT_TAG: variant_name}
        ) as run:
            mlflow.log_params(flatten_params(params))
            yield run
