"""Where a training step of the 1B flavor spends its GPU time, with kernels "triton" and "torch".

Each variant is a real ./run_train.sh run of train_configs/mla_1b.toml (seq 4096, compile, selective
AC) with torchtitan's profiler on for one step; the trace's kernels are summed by kind: matmuls,
attention, titan_mla's Triton norm/RoPE kernels, Inductor's generated kernels (the fused norms, RoPE,
SwiGLU, residual adds, loss of the "torch" path), other. The share of the step that is neither matmul
nor attention bounds what any norm/RoPE kernel can win: the speedup of a step is at most
1 / (1 - that share). Writes benchmarks/results/train_breakdown-<gpu>.json (+ .md).

    COMMIT=$(git rev-parse HEAD) python benchmarks/bench_train_breakdown.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import write_result

REPO = Path(__file__).resolve().parents[1]
PROFILED_STEP = 8
KERNEL_KINDS = [
    ("matmul", re.compile(r"gemm|xmma|cutlass|nvjet|wgmma|cublas|Gemm|splitK", re.IGNORECASE)),
    ("attention", re.compile(r"cudnn|flash|fmha|attention|sdpa", re.IGNORECASE)),
    # titan_mla's Triton kernels keep their function names; Inductor's are named triton_*.
    ("titan_mla_norm_rope", re.compile(r"^(_rms_norm_|_sum_partials_|_mla_rope_)")),
    ("inductor", re.compile(r"^triton_")),
]


def kernel_kind(name: str) -> str:
    return next((kind for kind, pattern in KERNEL_KINDS if pattern.search(name)), "other")


TOP_KERNELS = 30  # printed per variant: where to look next


def step_breakdown(trace_path: Path) -> dict[str, float]:
    """Milliseconds of GPU kernel time by kind in the profiled step, their sum, and the GPU span
    (first kernel start to last kernel end); prints the kernels that take the most time."""
    events = json.loads(trace_path.read_text())["traceEvents"]
    # One record per kernel launch (a trace can list a kernel more than once).
    kernels = {
        (e.get("pid"), e.get("tid"), e["ts"]): e
        for e in events
        if e.get("cat") == "kernel" and e.get("ph") == "X"
    }.values()
    totals: dict[str, float] = defaultdict(float)
    by_name: dict[str, list[float]] = defaultdict(list)
    for kernel in kernels:
        totals[kernel_kind(kernel["name"])] += kernel["dur"] / 1e3
        by_name[kernel["name"]].append(kernel["dur"] / 1e3)
    totals["kernels_total"] = sum(totals.values())
    start = min(k["ts"] for k in kernels)
    totals["gpu_span"] = (max(k["ts"] + k["dur"] for k in kernels) - start) / 1e3
    for name, durations in sorted(by_name.items(), key=lambda item: -sum(item[1]))[:TOP_KERNELS]:
        print(
            f"   {sum(durations):8.2f} ms {len(durations):5d}x {kernel_kind(name):20s} {name[:110]}"
        )
    return dict(totals)


def profile_variant(kernels: str, timeout_s: int, keep_traces: Path | None) -> dict[str, float]:
    dump = Path(f"/tmp/bench_train_breakdown/{kernels}")
    cmd = [
        "./run_train.sh",
        "--job.config_file=train_configs/mla_1b.toml",
        f"--job.dump_folder={dump}",
        f"--model.kernels={kernels}",
        f"--training.steps={PROFILED_STEP}",
        "--profiling.enable_profiling",
        f"--profiling.profile_freq={PROFILED_STEP}",
        "--metrics.no-enable-tensorboard",
        "--checkpoint.no-enable",
    ]
    print(f"== kernels={kernels}: {' '.join(cmd)}", flush=True)
    proc = subprocess.run(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout_s
    )
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.decode(errors="replace").splitlines()[-20:])
        raise RuntimeError(f"kernels={kernels} training failed:\n{tail}")
    traces = sorted(dump.rglob("rank0_trace.json"))
    if keep_traces is not None and traces:
        shutil.copy(traces[-1], keep_traces / f"trace_kernels-{kernels}.json")
    if not traces:
        raise RuntimeError(f"kernels={kernels}: no profiler trace under {dump}")
    breakdown = step_breakdown(traces[-1])
    print(f"   {breakdown}", flush=True)
    return breakdown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=int, default=300, help="seconds per variant")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--keep-traces", type=Path, help="copy the profiled traces to this folder")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_train_breakdown.py needs a CUDA GPU")

    breakdowns = {
        kernels: profile_variant(kernels, args.timeout, args.keep_traces)
        for kernels in ("triton", "torch")
    }
    rows = [
        {
            "case": "1B_seq4096_ac-selective_b4_bf16",
            "impl": f"kernels={kernels}",
            "metric": f"{kind} ms",
            "value": ms,
        }
        for kernels, breakdown in breakdowns.items()
        for kind, ms in sorted(breakdown.items())
    ]
    torch_path = breakdowns["torch"]
    memory_bound_share = (
        1 - (torch_path["matmul"] + torch_path["attention"]) / torch_path["kernels_total"]
    )
    summary = {
        "torch_path_non_matmul_attention_share": round(memory_bound_share, 4),
        "max_step_speedup_from_norm_rope_kernels": round(1 / (1 - memory_bound_share), 4),
        "kernel_time_ratio_torch_vs_triton": round(
            torch_path["kernels_total"] / breakdowns["triton"]["kernels_total"], 4
        ),
        "gpu_span_ratio_torch_vs_triton": round(
            torch_path["gpu_span"] / breakdowns["triton"]["gpu_span"], 4
        ),
    }
    command = "COMMIT=$(git rev-parse HEAD) python benchmarks/bench_train_breakdown.py"
    path = write_result("train_breakdown", command, rows, summary, args.out)
    print(path.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
