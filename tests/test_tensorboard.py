"""TensorBoard: what a debug run with TensorBoard and profiling on writes, read back as TensorBoard
(and its own server) reads it, and benchmark result files written as TensorBoard scalars."""

from __future__ import annotations

import gzip
import json
import math
import pickle
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from expecttest import assert_expected_inline
from helpers import REPO, run_train
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from titan_mla.tensorboard import load_result, log_result_file, main, result_markdown

pytestmark = pytest.mark.slow

STEPS = 6
TOKENS_PER_STEP = 4 * 128  # local_batch_size x seq_len
LR, WARMUP_STEPS = 3e-3, 5  # train_configs/debug_model.toml
# A frozen copy of a real result file, so that new benchmark runs do not change what tests expect.
RESULT_FILE = REPO / "tests" / "data" / "train-h100.json"
# TensorBoard's PyTorch profiler plugin (torch-tb-profiler) reads the traces named like this.
PROFILER_PLUGIN_TRACE = re.compile(r"^(.*?)(\.\d+)?\.pt\.trace\.json(?:\.gz)?$")


@dataclass
class Run:
    dump_folder: Path
    losses: dict[int, float]  # {step: loss} printed by the trainer

    @property
    def tb_run(self) -> Path:
        (run,) = (self.dump_folder / "tb").iterdir()  # tb/<YYYYMMDD-HHMM>/
        return run


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Run:
    """One short debug run with everything on: TensorBoard, profiling at steps 3 and 6 (warm-up 1)
    and memory snapshots."""
    dump_folder = tmp_path_factory.mktemp("run")
    returncode, losses, output = run_train(
        dump_folder,
        "--metrics.enable_tensorboard",
        "--metrics.log_freq=1",
        f"--training.steps={STEPS}",
        "--training.seq_len=128",
        "--training.local_batch_size=4",
        "--profiling.enable_profiling",
        "--profiling.profile_freq=3",
        "--profiling.profiler_warmup=1",
        "--profiling.enable_memory_snapshot",
    )
    assert returncode == 0, output[-3000:]
    assert sorted(losses) == list(range(1, STEPS + 1)), output[-3000:]
    return Run(dump_folder, losses)


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def test_training_scalars_read_back(run):
    scalars = read_scalars(run.tb_run)
    assert_expected_inline(
        "\n".join(sorted(scalars)),
        """\
grad_norm
loss_metrics/global_avg_loss
loss_metrics/global_max_loss
lr
memory/max_active(%)
memory/max_active(GiB)
memory/max_reserved(%)
memory/max_reserved(GiB)
memory/num_alloc_retries
memory/num_ooms
mfu(%)
n_tokens_seen
tflops
throughput(tps)
time_metrics/data_loading(%)
time_metrics/data_loading(s)
time_metrics/end_to_end(s)""",
    )
    for tag, points in scalars.items():
        assert [step for step, _ in points] == list(range(1, STEPS + 1)), tag
        assert all(math.isfinite(value) for _, value in points), (tag, points)
    values = {tag: dict(points) for tag, points in scalars.items()}
    for step, loss in run.losses.items():  # the printed loss has 5 decimals
        assert values["loss_metrics/global_avg_loss"][step] == pytest.approx(loss, abs=1e-4)
    for step in range(1, WARMUP_STEPS + 1):  # linear warm-up
        assert values["lr"][step] == pytest.approx(LR * step / WARMUP_STEPS, rel=1e-5)
    assert values["n_tokens_seen"] == {s: TOKENS_PER_STEP * s for s in range(1, STEPS + 1)}
    for tag in ("grad_norm", "throughput(tps)", "mfu(%)", "tflops"):
        assert all(value > 0 for value in values[tag].values()), (tag, values[tag])


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get_json(opener: urllib.request.OpenerDirector, url: str) -> object:
    with opener.open(url, timeout=10) as response:
        return json.loads(response.read())


def test_tensorboard_server_serves_the_scalars(run, tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}/data/plugin/scalars"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy
    log = (tmp_path / "tensorboard.log").open("w")
    server = subprocess.Popen(
        [
            *(sys.executable, "-m", "tensorboard.main", "--logdir", str(run.dump_folder / "tb")),
            *("--host", "127.0.0.1", "--port", str(port), "--load_fast=false"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline, tags = time.monotonic() + 60, {}
        while run.tb_run.name not in tags:  # up, and has loaded the run
            assert server.poll() is None, (tmp_path / "tensorboard.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "tensorboard.log").read_text()
            time.sleep(0.5)
            try:
                tags = get_json(opener, f"{base}/tags")
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                continue
        assert "loss_metrics/global_avg_loss" in tags[run.tb_run.name]
        assert "lr" in tags[run.tb_run.name]
        query = urllib.parse.urlencode(
            {"run": run.tb_run.name, "tag": "loss_metrics/global_avg_loss"}
        )
        points = get_json(opener, f"{base}/scalars?{query}")  # [[wall_time, step, value], ...]
        assert [step for _, step, _ in points] == list(range(1, STEPS + 1))
        for _, step, value in points:
            assert value == pytest.approx(run.losses[step], abs=1e-4)
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)
        log.close()


def read_trace(path: Path) -> dict:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return json.load(f)


def test_profiler_traces_parse_and_have_the_plugin_layout(run):
    trace_dir = run.dump_folder / "profile_trace"
    assert sorted(p.name for p in trace_dir.iterdir()) == ["iteration_3", "iteration_6"]
    for iteration in trace_dir.iterdir():
        assert sorted(p.name for p in iteration.iterdir()) == [
            "rank0.pt.trace.json",  # what TensorBoard's profiler plugin reads: worker "rank0"
            "rank0_trace.json",  # torchtitan's name
        ]
        trace = iteration / "rank0_trace.json"
        assert (iteration / "rank0.pt.trace.json").samefile(trace)
        assert PROFILER_PLUGIN_TRACE.match("rank0.pt.trace.json").group(1) == "rank0"
        names = {event.get("name", "") for event in read_trace(trace)["traceEvents"]}
        assert {"aten::mm", "aten::addmm"} & names, sorted(names)[:50]
        assert sum(name.startswith("aten::") for name in names) > 20
        step = int(iteration.name.removeprefix("iteration_"))
        assert f"ProfilerStep#{step - 1}" in names  # the profiler counts steps from 0


def test_memory_snapshots_are_written(run):
    """On the CPU the device shim records no history: the snapshots are empty but present."""
    for step in (3, 6):
        path = (
            run.dump_folder
            / "memory_snapshot"
            / f"iteration_{step}"
            / "rank0_memory_snapshot.pickle"
        )
        with path.open("rb") as f:
            snapshot = pickle.load(f)
        assert {"segments", "device_traces"} <= snapshot.keys()


def test_log_result_file_writes_scalars_and_the_table(tmp_path):
    result = load_result(RESULT_FILE)
    run_dir = log_result_file(RESULT_FILE, tmp_path)
    assert run_dir == tmp_path / "train-h100"

    expected = {
        f"train/{row['case']}/{row['impl']}/{row['metric']}": row["value"] for row in result["rows"]
    } | {f"summary/{key}": value for key, value in result["summary"].items()}
    scalars = read_scalars(run_dir)
    assert scalars.keys() == expected.keys()
    for tag, points in scalars.items():
        ((step, value),) = points
        assert step == 0
        assert value == pytest.approx(expected[tag], rel=1e-6), tag
    assert scalars["train/1B_seq4096_ac-none_b4_float8/titan_mla/tokens/s"] == [(0, 69791.0)]
    assert scalars["summary/tps_ratio_vs_torchtitan_float8"][0][1] == pytest.approx(1.0353)

    events = EventAccumulator(str(run_dir))
    events.Reload()
    (text,) = events.Tensors("train/results/text_summary")
    markdown = text.tensor_proto.string_val[0].decode()
    assert markdown == result_markdown(result) == RESULT_FILE.with_suffix(".md").read_text()


def test_cli(tmp_path, capsys):
    main([str(RESULT_FILE), "--logdir", str(tmp_path)])
    assert capsys.readouterr().out.splitlines() == [
        f"{RESULT_FILE} -> {tmp_path / 'train-h100'}",
        f"view: tensorboard --logdir {tmp_path}",
    ]
    assert len(read_scalars(tmp_path / "train-h100")) == 30
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"benchmark": "x", "rows": [{"case": "c"}]}))
    with pytest.raises(SystemExit) as exit_info:
        main([str(bad), "--logdir", str(tmp_path)])
    assert exit_info.value.code == 1
    assert "'rows' must be a list of {case, impl, metric, value}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(RESULT_FILE)])  # no --logdir
    assert "--logdir is required" in capsys.readouterr().err
