"""Shared by the GPU benchmarks: the result file of ../shared/notes/BENCHMARKS.md."""

from __future__ import annotations

import datetime
import json
import os
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
