"""MLflow tracking: debug trainings logged to a local store and to a tracking server started here,
read back through MlflowClient; benchmark result files and ablation variant runs; the message when
mlflow is not installed."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import REPO, run_train

from titan_mla.tensorboard import load_result, result_scalars
from titan_mla.tracking import (
    FINAL_CHECKPOINT_TAG,
    MAX_PARAM_VALUE_LENGTH,
    MISSING_MLFLOW,
    VARIANT_TAG,
    MLflowLogger,
    default_tracking_uri,
    default_wandb_mode,
    flatten_params,
    log_result_files,
    mlflow_name,
    start_variant_run,
)

pytestmark = pytest.mark.slow
needs_mlflow = pytest.mark.skipif(
    importlib.util.find_spec("mlflow") is None, reason="mlflow is not installed (.[mlflow])"
)

STEPS = 4
# A frozen copy of a real result file, so that new benchmark runs do not change what tests expect.
RESULT_FILE = REPO / "tests" / "data" / "train-h100.json"
TRAINING_METRICS = {  # torchtitan's [metrics] scalars under their MLflow names
    "grad_norm",
    "loss_metrics/global_avg_loss",
    "loss_metrics/global_max_loss",
    "lr",
    "memory/max_active_GiB",
    "memory/max_active_pct",
    "memory/max_reserved_GiB",
    "memory/max_reserved_pct",
    "memory/num_alloc_retries",
    "memory/num_ooms",
    "mfu_pct",
    "n_tokens_seen",
    "tflops",
    "throughput_tps",
    "time_metrics/data_loading_pct",
    "time_metrics/data_loading_s",
    "time_metrics/end_to_end_s",
}


def train_with_mlflow(dump_folder: Path, *overrides: str) -> dict[int, float]:
    returncode, losses, output = run_train(
        dump_folder,
        "--mlflow.enable",
        "--metrics.log_freq=1",
        f"--training.steps={STEPS}",
        "--training.seq_len=128",
        "--training.local_batch_size=4",
        *overrides,
    )
    assert returncode == 0, output[-3000:]
    assert sorted(losses) == list(range(1, STEPS + 1)), output[-3000:]
    return losses


def check_training_run(tracking_uri: str, experiment: str, run_name: str, losses: dict[int, float]):
    """The experiment holds one finished run with the job config as params and every scalar at
    every step; returns the run."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert run.info.status == "FINISHED"
    assert run.info.run_name == run_name
    params = run.data.params
    assert params["training.steps"] == str(STEPS)
    assert params["training.seq_len"] == "128"
    assert params["model.flavor"] == "debugmodel"
    assert params["mlflow.enable"] == "True"
    assert params["compile.components"] == '["model", "loss"]'
    assert len(params) > 100  # the whole job config
    assert run.data.metrics.keys() == TRAINING_METRICS
    for name in TRAINING_METRICS:
        history = client.get_metric_history(run.info.run_id, name)
        assert sorted(m.step for m in history) == list(range(1, STEPS + 1)), name
    loss = {
        m.step: m.value
        for m in client.get_metric_history(run.info.run_id, "loss_metrics/global_avg_loss")
    }
    assert loss == pytest.approx(losses, abs=1e-4)  # the printed loss has 5 decimals
    return run


@needs_mlflow
@pytest.mark.usefixtures("tracking_server")  # starts now: its start-up overlaps this training
def test_training_logs_to_the_local_store(tmp_path):
    dump_folder = tmp_path / "run"
    losses = train_with_mlflow(
        dump_folder,
        "--mlflow.experiment_name=debug",
        "--mlflow.run_name=local",
        "--checkpoint.enable",
        f"--checkpoint.interval={STEPS}",
    )
    tracking_uri = default_tracking_uri(dump_folder)
    assert tracking_uri == f"sqlite:///{dump_folder.resolve()}/mlflow/mlflow.db"
    run = check_training_run(tracking_uri, "debug", "local", losses)
    checkpoint = dump_folder.resolve() / "checkpoint" / f"step-{STEPS}"
    assert checkpoint.is_dir()
    assert run.data.tags[FINAL_CHECKPOINT_TAG] == str(checkpoint)
    assert run.info.artifact_uri.startswith(
        (dump_folder.resolve() / "mlflow" / "artifacts").as_uri()
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop(server: subprocess.Popen) -> None:
    """Stop the server and the workers it started (its own process group)."""
    try:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=10)
    except ProcessLookupError:
        pass


@dataclass
class TrackingServer:
    process: subprocess.Popen
    uri: str
    log_path: Path

    def wait_until_ready(self, timeout_s: float = 60) -> None:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.process.poll() is None, self.log_path.read_text()
            assert time.monotonic() < deadline, self.log_path.read_text()
            try:
                with opener.open(f"{self.uri}/health", timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory) -> Iterator[TrackingServer]:
    """An MLflow tracking server on loopback (SQLite store, proxied artifacts), starting (call
    ``wait_until_ready``); stopped with the workers it started when the module's tests are done."""
    port = free_port()
    server_dir = tmp_path_factory.mktemp("server")
    log_path = server_dir / "server.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "mlflow", "server", "--workers", "1"),
                *("--host", "127.0.0.1", "--port", str(port)),
                *("--backend-store-uri", f"sqlite:///{server_dir / 'mlflow.db'}"),
                *("--artifacts-destination", str(server_dir / "artifacts")),
            ],
            cwd=server_dir,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, with the uvicorn worker
        )
    try:
        yield TrackingServer(process, f"http://127.0.0.1:{port}", log_path)
    finally:
        stop(process)


@needs_mlflow
def test_training_logs_to_a_tracking_server(tmp_path, tracking_server, monkeypatch):
    # Bounded client requests (MLflow's defaults retry for minutes), never through a proxy; the
    # training subprocess inherits these.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    tracking_server.wait_until_ready()
    uri = tracking_server.uri
    losses = train_with_mlflow(
        tmp_path / "run",
        f"--mlflow.tracking_uri={uri}",
        "--mlflow.experiment_name=remote",
        "--mlflow.run_name=over-http",
    )
    check_training_run(uri, "remote", "over-http", losses)
    assert not (tmp_path / "run" / "mlflow").exists()  # nothing in the local store

    (run_id,) = log_result_files([RESULT_FILE], experiment="results", tracking_uri=uri)
    from mlflow import MlflowClient

    artifacts = MlflowClient(uri).list_artifacts(run_id)
    assert sorted(a.path for a in artifacts) == ["train-h100.json", "train-h100.md"]


@needs_mlflow
def test_log_result_files_reads_back(tmp_path):
    from mlflow import MlflowClient

    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (run_id,) = log_result_files([RESULT_FILE], experiment="benchmarks", tracking_uri=tracking_uri)
    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    assert run.info.run_name == "train-h100"
    assert run.info.status == "FINISHED"
    assert run.info.experiment_id == client.get_experiment_by_name("benchmarks").experiment_id

    result = load_result(RESULT_FILE)
    expected = {mlflow_name(name): value for name, value in result_scalars(result).items()}
    assert run.data.metrics == pytest.approx(expected)
    assert run.data.metrics["summary/tps_ratio_vs_torchtitan_float8"] == pytest.approx(1.0353)
    assert run.data.metrics["train/1B_seq4096_ac-none_b4_float8/titan_mla/tokens/s"] == 69791.0
    assert "train/1B_seq4096_ac-selective_b4_bf16/titan_mla/MFU pct" in run.data.metrics
    (point,) = client.get_metric_history(run_id, "summary/tps_ratio_vs_torchtitan_float8")
    assert point.step == 0
    assert time.strftime("%Y-%m-%d", time.gmtime(point.timestamp / 1000)) == result["date"]
    assert run.data.params["device"] == result["device"]
    assert run.data.params["commit"] == result["commit"]
    assert run.data.params["command"] == result["command"]

    artifacts = sorted(a.path for a in client.list_artifacts(run_id))
    assert artifacts == ["train-h100.json", "train-h100.md"]
    downloaded = Path(client.download_artifacts(run_id, "train-h100.json", str(tmp_path)))
    assert json.loads(downloaded.read_text()) == result


@needs_mlflow
def test_start_variant_run_logs_one_run_per_variant(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    for variant, latent in (("fp8", 512), ("int8", 256)):
        with start_variant_run("quant_ablation", variant, {"model": {"kv_lora_rank": latent}}):
            mlflow.log_metric("loss", latent / 100, step=1)
    with (
        pytest.raises(RuntimeError, match="diverged"),
        start_variant_run("quant_ablation", "bf16", {"lr": 3e-3}),
    ):
        raise RuntimeError("diverged")

    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("quant_ablation")
    runs = {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])}
    assert runs.keys() == {"fp8", "int8", "bf16"}
    assert runs["fp8"].data.params == {"model.kv_lora_rank": "512"}
    assert runs["int8"].data.metrics == {"loss": 2.56}
    assert runs["int8"].data.tags[VARIANT_TAG] == "int8"
    assert runs["int8"].info.status == "FINISHED"
    assert runs["bf16"].info.status == "FAILED"
    # A run given its own tracking URI leaves the process's URI as it was.
    with start_variant_run("elsewhere", "x", {}, f"sqlite:///{tmp_path / 'other.db'}"):
        pass
    assert mlflow.get_tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"


def debug_job_config(dump_folder: Path, *overrides: str):
    from torchtitan.config import ConfigManager

    return ConfigManager().parse_args(
        [
            *("--job.config_file", str(REPO / "train_configs" / "debug_model.toml")),
            *(f"--job.dump_folder={dump_folder}", "--mlflow.enable", *overrides),
        ]
    )


@needs_mlflow
def test_logger_tags_metrics_and_marks_a_failed_training(tmp_path):
    """The trainer closes its loggers inside ``except`` when training raises: the run is FAILED."""
    from mlflow import MlflowClient

    mlflow_logger = MLflowLogger(debug_job_config(tmp_path), tag="eval")
    mlflow_logger.log({"mfu(%)": 1.5, "loss": 2.0}, step=3)
    try:
        raise RuntimeError("out of memory")
    except RuntimeError:
        mlflow_logger.close()
    run = MlflowClient(default_tracking_uri(tmp_path)).get_run(mlflow_logger.run_id)
    assert run.info.status == "FAILED"
    assert run.data.metrics == {"eval/mfu_pct": 1.5, "eval/loss": 2.0}
    assert FINAL_CHECKPOINT_TAG not in run.data.tags  # checkpointing is off


def test_missing_mlflow_names_the_extra(tmp_path, monkeypatch):
    """With ``import mlflow`` failing, each entry point stops with the install command."""
    job_config = debug_job_config(tmp_path)
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow raises ImportError
    for call in (
        lambda: MLflowLogger(job_config),
        lambda: log_result_files([RESULT_FILE], tracking_uri=f"sqlite:///{tmp_path}/mlflow.db"),
        lambda: start_variant_run("ablation", "fp8", {}).__enter__(),
    ):
        with pytest.raises(ImportError) as error:
            call()
        assert str(error.value) == MISSING_MLFLOW
    assert "pip install -e '.[mlflow]'" in MISSING_MLFLOW
    assert not list(tmp_path.iterdir())  # nothing written


def test_mlflow_names_and_params():
    assert {
        name: mlflow_name(name)
        for name in (
            "loss_metrics/global_avg_loss",
            "throughput(tps)",
            "mfu(%)",
            "memory/max_reserved(GiB)",
            "time_metrics/end_to_end(s)",
            "validation_metrics/memory/max_active(%)",
            "MFU %",
            "a+b@c//d/../e",
        )
    } == {
        "loss_metrics/global_avg_loss": "loss_metrics/global_avg_loss",
        "throughput(tps)": "throughput_tps",
        "mfu(%)": "mfu_pct",
        "memory/max_reserved(GiB)": "memory/max_reserved_GiB",
        "time_metrics/end_to_end(s)": "time_metrics/end_to_end_s",
        "validation_metrics/memory/max_active(%)": "validation_metrics/memory/max_active_pct",
        "MFU %": "MFU pct",
        "a+b@c//d/../e": "a_b_c/d/e",
    }
    params = flatten_params({"a": {"b": 1, "c": [1, "x"], "d": None}, "long": "x" * 10_000})
    assert params == {
        "a.b": "1",
        "a.c": '[1, "x"]',
        "a.d": "None",
        "long": params["long"],
    }
    assert len(params["long"]) == MAX_PARAM_VALUE_LENGTH
    assert params["long"].endswith("...[truncated]")


def test_wandb_mode_defaults_to_offline_only_when_unreachable():
    closed = f"http://127.0.0.1:{free_port()}"
    environ = {"WANDB_BASE_URL": closed}
    assert default_wandb_mode(environ) == "offline"
    assert environ["WANDB_MODE"] == "offline"
    # A mode the user chose is kept, reachable or not.
    environ = {"WANDB_BASE_URL": closed, "WANDB_MODE": "disabled"}
    assert default_wandb_mode(environ) is None
    assert environ["WANDB_MODE"] == "disabled"
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        environ = {"WANDB_BASE_URL": f"http://127.0.0.1:{listening.getsockname()[1]}"}
        assert default_wandb_mode(environ) is None
        assert "WANDB_MODE" not in environ


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")
def test_training_with_wandb_and_no_network_logs_offline(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("WANDB_PROJECT", "titan-mla-test")
    dump_folder = tmp_path / "run"
    returncode, losses, output = run_train(
        dump_folder,
        "--metrics.enable_wandb",
        "--metrics.log_freq=1",
        f"--training.steps={STEPS}",
        "--training.seq_len=128",
    )
    assert returncode == 0, output[-3000:]
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert "logging offline (WANDB_MODE=offline)" in output
    (offline_run,) = dump_folder.glob("tb/*/wandb/offline-run-*")
    assert list(offline_run.glob("run-*.wandb"))  # the run's records, for `wandb sync`
