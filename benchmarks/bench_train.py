"""Training throughput of the 1B flavor vs torchtitan's own deepseek_v3 modules as the same dense 1B.

Each variant is a real ./run_train.sh run (seq 4096, torch.compile) on all visible GPUs; tokens/s,
MFU and peak memory are read from torchtitan's own metric lines and averaged (median) over the logged
steps after warm-up. Writes benchmarks/results/train-<gpu>.json (+ .md) or --out.

    COMMIT=$(git rev-parse HEAD) python benchmarks/bench_train.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import write_result

REPO = Path(__file__).resolve().parents[1]
METRIC_LINE = re.compile(
    r"step:\s*(?P<step>\d+)\s+loss:\s*(?P<loss>[\d.]+).*?memory:\s*(?P<mem>[\d.]+)GiB.*?"
    r"tps:\s*(?P<tps>[\d,]+).*?mfu:\s*(?P<mfu>[\d.]+)%"
)
TORCHTITAN_DENSE_1B = [
    "--model.name=deepseek_v3",
    "--model.flavor=dense_1B",
    "--experimental.custom_import=benchmarks.torchtitan_baseline",
]
FLOAT8 = [
    "--model.converters=quantize.linear.float8",
    "--quantize.linear.float8.recipe_name=tensorwise",
    "--quantize.linear.float8.filter_fqns=output",
]


@dataclass
class Variant:
    impl: str  # "titan_mla" | "titan_mla_torch_ops" (kernels = "torch") | "torchtitan_deepseek_v3"
    ac: str  # activation_checkpoint.mode
    batch: int
    float8: bool = False

    @property
    def case(self) -> str:
        return f"1B_seq4096_ac-{self.ac}_b{self.batch}_{'float8' if self.float8 else 'bf16'}"

    def args(self, steps: int) -> list[str]:
        args = [
            "--job.config_file=train_configs/mla_1b.toml",
            f"--training.steps={steps}",
            f"--training.local_batch_size={self.batch}",
            f"--activation_checkpoint.mode={self.ac}",
            "--activation_checkpoint.selective_ac_option=op",
            "--metrics.log_freq=5",
            "--metrics.disable_color_printing",
            "--metrics.no-enable-tensorboard",
            "--checkpoint.no-enable",
            f"--job.dump_folder=/tmp/bench_train/{self.impl}_{self.case}",
        ]
        if self.impl == "torchtitan_deepseek_v3":
            args += TORCHTITAN_DENSE_1B
        if self.impl == "titan_mla_torch_ops":
            args.append("--model.kernels=torch")
        return args + (FLOAT8 if self.float8 else [])


VARIANTS = [
    # Equal settings: the configuration of mla_1b.toml.
    Variant("titan_mla", "selective", 4),
    Variant("torchtitan_deepseek_v3", "selective", 4),
    Variant("titan_mla_torch_ops", "selective", 4),
    # Each side's best bf16 setting measured here for the anchor (no AC, batch 8).
    Variant("titan_mla", "none", 8),
    Variant("torchtitan_deepseek_v3", "none", 8),
    # float8 tensorwise, the anchor's best (no AC, batch 4).
    Variant("titan_mla", "none", 4, float8=True),
    Variant("torchtitan_deepseek_v3", "none", 4, float8=True),
]


def run_variant(variant: Variant, steps: int, log_file: Path, timeout_s: int) -> dict | None:
    cmd = ["./run_train.sh", *variant.args(steps)]
    print(f"== {variant.impl} {variant.case}: {' '.join(cmd)}", flush=True)
    start = time.monotonic()
    try:
        proc = subprocess.run(
            cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout_s
        )
        output, ok = proc.stdout.decode(errors="replace"), proc.returncode == 0
    except subprocess.TimeoutExpired as err:
        output, ok = (
            (err.stdout or b"").decode(errors="replace") + f"\nTIMEOUT after {timeout_s}s",
            False,
        )
    with log_file.open("a") as log:
        log.write(f"\n===== {variant.impl} {variant.case}\n{output}")
    metrics = [m.groupdict() for m in METRIC_LINE.finditer(output)]
    warm = [m for m in metrics if int(m["step"]) > steps // 2]
    if not ok or not warm:
        tail = "\n".join(output.splitlines()[-15:])
        print(f"   FAILED after {time.monotonic() - start:.0f}s:\n{tail}", flush=True)
        return None
    result = {
        "tps": statistics.median(float(m["tps"].replace(",", "")) for m in warm),
        "mfu": statistics.median(float(m["mfu"]) for m in warm),
        "memory_gib": max(float(m["mem"]) for m in metrics),
        "final_loss": float(metrics[-1]["loss"]),
    }
    print(f"   {result} in {time.monotonic() - start:.0f}s", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument(
        "--only-equal-settings",
        action="store_true",
        help="only the mla_1b.toml settings (ours with Triton and with torch ops, and the anchor)",
    )
    parser.add_argument("--timeout", type=int, default=240, help="seconds per variant")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument(
        "--log", type=Path, default=Path(os.environ.get("OUT", "/tmp")) / "bench_train.log"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_train.py needs CUDA GPUs")
    args.log.write_text("")

    results: dict[tuple[str, str], dict] = {}
    rows: list[dict] = []
    for variant in VARIANTS[:3] if args.only_equal_settings else VARIANTS:
        measured = run_variant(variant, args.steps, args.log, args.timeout)
        if measured is None:
            continue
        results[(variant.impl, variant.case)] = measured
        for metric, unit in (
            ("tps", "tokens/s"),
            ("mfu", "MFU %"),
            ("memory_gib", "peak GiB"),
            ("final_loss", "loss"),
        ):
            rows.append(
                {
                    "case": variant.case,
                    "impl": variant.impl,
                    "metric": unit,
                    "value": measured[metric],
                }
            )

    def ratio(case: str, other_impl: str = "torchtitan_deepseek_v3") -> float | None:
        ours, theirs = results.get(("titan_mla", case)), results.get((other_impl, case))
        return round(ours["tps"] / theirs["tps"], 4) if ours and theirs else None

    equal, best_bf16, fp8 = VARIANTS[0].case, VARIANTS[3].case, VARIANTS[5].case
    ours_bf16 = [
        r for (impl, case), r in results.items() if impl == "titan_mla" and case.endswith("bf16")
    ]
    summary = {
        "tps_ratio_vs_torchtitan_bf16": ratio(equal),
        "mfu_bf16": results.get(("titan_mla", equal), {}).get("mfu"),
        "tps_ratio_vs_torchtitan_bf16_best_settings": ratio(best_bf16),
        "mfu_bf16_best": max((r["mfu"] for r in ours_bf16), default=None),
        "tps_ratio_vs_torchtitan_float8": ratio(fp8),
        "tps_ratio_triton_vs_torch": ratio(equal, other_impl="titan_mla_torch_ops"),
        "steps_per_variant": args.steps,
    }
    command = f"COMMIT=$(git rev-parse HEAD) python benchmarks/bench_train.py --steps {args.steps}"
    command += " --only-equal-settings" if args.only_equal_settings else ""
    path = write_result("train", command, rows, summary, args.out, n_gpus=torch.cuda.device_count())
    print(path.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
