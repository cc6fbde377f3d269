"""Shared by the tests that train through ./run_train.sh (import as ``from helpers import ...``:
pytest puts tests/ on sys.path, tests is not a package)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METRIC_LINE = re.compile(r"step:\s*(\d+)\s+loss:\s*([\d.]+)")


def run_train(
    dump_folder: Path, *overrides: str, ngpu: int = 1
) -> tuple[int, dict[int, float], str]:
    """Run ./run_train.sh; returns (exit code, {step: loss} of rank 0, combined output)."""
    cmd = [
        str(REPO / "run_train.sh"),
        f"--job.dump_folder={dump_folder}",
        "--metrics.disable_color_printing",
        *overrides,
    ]
    # Training runs as a user runs it: Triton ops on GPU, their PyTorch reference on CPU (conftest's
    # TRITON_INTERPRET, meant for kernel tests, would run every training op in the interpreter).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(NGPU=str(ngpu), LOG_RANK="0")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    losses = {int(step): float(loss) for step, loss in METRIC_LINE.findall(output)}
    return proc.returncode, losses, output
