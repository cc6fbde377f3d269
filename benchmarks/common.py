"""Shared by the GPU benchmarks: the result file of ../shared/notes/BENCHMARKS.md."""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch


def gpu_tag() -> str:
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    kind = next((k for k in ("h200", "h100", "a100", "b200") if k in name.lower()), "gpu")
    count = torch.cuda.device_count()
    return kind if count <= 1 else f"{count}x{kind}"


def write_result(
    benchmark: str, command: str, rows: list[dict], summary: dict, out_dir: Path, n_gpus: int = 1
) -> Path:
    """Write <benchmark>-<gpu>.json and a markdown table beside it; returns the JSON path."""
    import triton

    result = {
        "benchmark": benchmark,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "n_gpus": n_gpus,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": os.environ.get("COMMIT", "unknown"),
        "date": datetime.date.today().isoformat(),
        "command": command,
        "rows": rows,
        "summary": summary,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{benchmark}-{gpu_tag()}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# {benchmark} on {result['device']} (torch {result['torch']}, commit {result['commit'][:12]}, {result['date']})",
        "",
        f"`{command}`",
        "",
        "| case | impl | metric | value |",
        "|---|---|---|---|",
        *(f"| {r['case']} | {r['impl']} | {r['metric']} | {r['value']:.4g} |" for r in rows),
        "",
        "| summary | value |",
        "|---|---|",
        *(
            f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
            for k, v in summary.items()
        ),
    ]
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return path


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, in float64."""
    expected = expected.double()
    return ((actual.double() - expected).norm() / expected.norm()).item()


def graph_time_ms(
    fn: Callable[[], object], calls: int = 1, warmup_calls: int = 1, rep_ms: int = 100
) -> float:
    """Milliseconds per call of ``fn``, as a decode step runs it: ``calls`` back-to-back calls
    captured in one CUDA graph, its replays timed for about ``rep_ms`` (median), so host-side
    launch cost (Python, the dispatcher) is not counted and every variant is launched the same
    way."""
    import triton.testing

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup_calls):  # compilation, autotuning, allocator: outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
    except RuntimeError as err:  # not capturable: time eager launches, and say so
        print(f"  (not capturable, timed eagerly: {str(err).splitlines()[0]})")
        return triton.testing.do_bench(fn, rep=rep_ms, return_mode="median")
    ms = triton.testing.do_bench(graph.replay, rep=rep_ms, return_mode="median") / calls
    del graph
    return ms
