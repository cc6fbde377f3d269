"""TensorBoard for titan_mla: benchmark results as scalars and text, profiles the plugin can read.

Training metrics need nothing from here: torchtitan's ``[metrics] enable_tensorboard`` writes loss,
learning rate, grad norm, tokens/s, MFU and memory to ``<dump_folder>/tb/<YYYYMMDD-HHMM>/``. This
module adds the rest of an experiment to the same ``tensorboard --logdir``:

- ``log_result_file``: a benchmark result file (``benchmarks/results/<benchmark>-<gpu>.json``) as
  scalars ``<benchmark>/<case>/<impl>/<metric>`` and ``summary/<key>``, plus its markdown table as
  text, in a run of its own named after the file;
- ``install_profiling_hooks`` (run on import): torchtitan's ``[profiling]`` traces also get the name
  the PyTorch profiler plugin of TensorBoard (torch-tb-profiler) looks for, ``rank<R>.pt.trace.json``
  beside torchtitan's ``rank<R>_trace.json`` (a hard link: no extra disk), and profiling works on a
  machine without a GPU (torchtitan 0.2.2 passes the profiler a ``None`` activity there).

    python -m titan_mla.tensorboard benchmarks/results/train-h100.json --logdir outputs/mla_1b/tb
    python -m titan_mla.tensorboard --profile-traces outputs/mla_1b/profile_trace  # older traces
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

TORCHTITAN_TRACE = re.compile(r"^rank(\d+)_trace\.json(\.gz)?$")
"""torchtitan's trace file name: ``<trace_dir>/iteration_<step>/rank<R>_trace.json``."""


def load_result(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a benchmark result file (shared/notes/BENCHMARKS.md) and check the keys used here."""
    result = json.loads(Path(path).read_text())
    if not isinstance(result, dict) or not isinstance(result.get("benchmark"), str):
        raise ValueError(f"{path}: not a benchmark result file (no 'benchmark' name)")
    rows = result.get("rows")
    if not isinstance(rows, list) or not all(
        isinstance(row, dict) and {"case", "impl", "metric", "value"} <= row.keys() for row in rows
    ):
        raise ValueError(f"{path}: 'rows' must be a list of {{case, impl, metric, value}}")
    if not isinstance(result.get("summary", {}), dict):
        raise ValueError(f"{path}: 'summary' must be an object")
    return result


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def result_scalars(result: dict[str, Any]) -> dict[str, float]:
    """The numeric figures of a result as {tag: value}: ``<benchmark>/<case>/<impl>/<metric>`` for
    each row and ``summary/<key>`` for each summary entry (non-numeric entries are left out)."""
    scalars: dict[str, float] = {}
    for row in result["rows"]:
        value = _number(row["value"])
        if value is not None:
            scalars[f"{result['benchmark']}/{row['case']}/{row['impl']}/{row['metric']}"] = value
    for key, raw in result.get("summary", {}).items():
        value = _number(raw)
        if value is not None:
            scalars[f"summary/{key}"] = value
    return scalars


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def result_markdown(result: dict[str, Any]) -> str:
    """The result as the markdown of benchmarks/results/<benchmark>-<gpu>.md."""
    header = ", ".join(
        str(part)
        for part in (
            f"torch {result['torch']}" if "torch" in result else None,
            f"commit {str(result['commit'])[:12]}" if "commit" in result else None,
            result.get("date"),
        )
        if part
    )
    title = f"# {result['benchmark']} on {result.get('device', 'unknown device')}"
    lines = [f"{title} ({header})" if header else title, ""]
    if result.get("command"):
        lines += [f"`{result['command']}`", ""]
    lines += ["| case | impl | metric | value |", "|---|---|---|---|"]
    lines += [
        f"| {row['case']} | {row['impl']} | {row['metric']} | {_cell(row['value'])} |"
        for row in result["rows"]
    ]
    if result.get("summary"):
        lines += ["", "| summary | value |", "|---|---|"]
        lines += [f"| {key} | {_cell(value)} |" for key, value in result["summary"].items()]
    return "\n".join(lines) + "\n"


def _walltime(result: dict[str, Any]) -> float | None:
    """The result's date (YYYY-MM-DD, midnight UTC) as a TensorBoard wall time, if it has one."""
    try:
        day = datetime.date.fromisoformat(str(result["date"]))
    except (KeyError, ValueError):
        return None
    return datetime.datetime(day.year, day.month, day.day, tzinfo=datetime.UTC).timestamp()


def log_result_file(
    result_json_path: str | os.PathLike[str], logdir: str | os.PathLike[str]
) -> Path:
    """Write a benchmark result file to TensorBoard; returns the run folder written.

    The run is ``<logdir>/<file stem>`` (e.g. ``train-h100``), so the results of several files (one
    per GPU kind, or an ablation next to its baseline) are separate runs under one ``--logdir`` and
    plot on the same tags. Every figure is one point at step 0, dated by the result's ``date``.
    """
    from torch.utils.tensorboard import SummaryWriter

    path = Path(result_json_path)
    result = load_result(path)
    run_dir = Path(logdir) / path.stem
    walltime = _walltime(result)
    with contextlib.closing(SummaryWriter(str(run_dir))) as writer:
        for tag, value in result_scalars(result).items():
            writer.add_scalar(tag, value, global_step=0, walltime=walltime)
        writer.add_text(
            f"{result['benchmark']}/results", result_markdown(result), 0, walltime=walltime
        )
    return run_dir


def add_profiler_plugin_names(
    trace_dir: str | os.PathLike[str], rank: int | None = None
) -> list[Path]:
    """Give each torchtitan trace under trace_dir (``iteration_<N>/rank<R>_trace.json``) the name
    TensorBoard's PyTorch profiler plugin reads, ``rank<R>.pt.trace.json`` in the same folder: a hard
    link (a copy where links are not possible). Only rank ``rank``'s traces when given. Returns the
    names made; traces that have one already are skipped."""
    made = []
    for trace in sorted(Path(trace_dir).rglob("rank*_trace.json*")):
        match = TORCHTITAN_TRACE.match(trace.name)
        if not match or (rank is not None and int(match.group(1)) != rank):
            continue
        plugin_name = trace.with_name(f"rank{match.group(1)}.pt.trace.json{match.group(2) or ''}")
        if plugin_name.exists():
            continue
        try:
            os.link(trace, plugin_name)
        except FileExistsError:
            continue
        except OSError:
            plugin_name.write_bytes(trace.read_bytes())
        made.append(plugin_name)
    return made


@contextlib.contextmanager
def _profiler_without_missing_accelerator() -> Iterator[None]:
    """torchtitan 0.2.2 passes ``activities=[CPU, None]`` when there is no GPU, which torch rejects;
    while this is active, ``torch.profiler.profile`` leaves a ``None`` activity out."""
    profile = torch.profiler.profile

    class Profile(profile):
        def __init__(self, *args: Any, activities: Any = None, **kwargs: Any) -> None:
            if activities is not None:
                activities = [activity for activity in activities if activity is not None]
            super().__init__(*args, activities=activities, **kwargs)

    torch.profiler.profile = Profile
    try:
        yield
    finally:
        torch.profiler.profile = profile


def install_profiling_hooks() -> None:
    """Wrap torchtitan's ``maybe_enable_profiling`` (the trainer's profiler): unchanged traces and
    schedule, plus the plugin's file names (``add_profiler_plugin_names``) and CPU-only machines.
    Idempotent; takes effect in a trainer created after it, whenever torchtitan.train was imported.
    """
    import torchtitan.tools.profiling as profiling

    original = profiling.maybe_enable_profiling
    if getattr(original, "titan_mla_hooked", False):
        return

    @contextlib.contextmanager
    def maybe_enable_profiling(profiling_config: Any, **kwargs: Any) -> Iterator[Any]:
        with contextlib.ExitStack() as stack:
            with _profiler_without_missing_accelerator():
                profiler = stack.enter_context(original(profiling_config, **kwargs))
            if profiler is not None and profiler.on_trace_ready is not None:
                trace_dir = (
                    Path(kwargs.get("base_folder", "")) / profiling_config.save_traces_folder
                )
                rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
                write_trace = profiler.on_trace_ready

                def on_trace_ready(prof: Any) -> None:
                    write_trace(prof)
                    add_profiler_plugin_names(trace_dir, rank=rank)

                profiler.on_trace_ready = on_trace_ready
            yield profiler

    maybe_enable_profiling.titan_mla_hooked = True  # type: ignore[attr-defined]
    profiling.maybe_enable_profiling = maybe_enable_profiling
    train = sys.modules.get("torchtitan.train")
    if train is not None and hasattr(train, "maybe_enable_profiling"):
        train.maybe_enable_profiling = maybe_enable_profiling


install_profiling_hooks()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m titan_mla.tensorboard",
        description="Write benchmark result files to TensorBoard (scalars + markdown table), "
        "and name torchtitan profiler traces for TensorBoard's profiler plugin.",
    )
    parser.add_argument("results", nargs="*", type=Path, help="benchmark result .json files")
    parser.add_argument("--logdir", type=Path, help="TensorBoard folder for the results")
    parser.add_argument(
        "--profile-traces",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="a run's profile_trace folder to name for the profiler plugin (repeatable)",
    )
    args = parser.parse_args(argv)
    if not args.results and not args.profile_traces:
        parser.error("nothing to do: give result files and --logdir, or --profile-traces")
    if args.results and args.logdir is None:
        parser.error("--logdir is required with result files")
    for result in args.results:
        try:
            run_dir = log_result_file(result, args.logdir)
        except (OSError, ValueError) as err:  # json.JSONDecodeError is a ValueError
            parser.exit(1, f"{parser.prog}: error: {err}\n")
        print(f"{result} -> {run_dir}")
    for trace_dir in args.profile_traces:
        made = add_profiler_plugin_names(trace_dir)
        print(f"{trace_dir}: {len(made)} trace(s) named for the profiler plugin")
    if args.logdir is not None:
        print(f"view: tensorboard --logdir {args.logdir}")


if __name__ == "__main__":
    main()
