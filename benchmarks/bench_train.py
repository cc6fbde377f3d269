"""Training throughput of the 1B flavor vs torchtitan's own deepseek_v3 modules as the same dense 1B.

Also torchao float8 training (tensorwise, rowwise, and which linears stay bf16) against bf16 at the
settings of mla_1b.toml.

Each variant is a real ./run_train.sh run (seq 4096, torch.compile) on all visible GPUs; tokens/s,
MFU and peak memory are read from torchtitan's own metric lines and averaged (median) over the logged
steps after warm-up. Writes benchmarks/results/train-<gpu>.json (+ .md) or --out.

    COMMIT=$(git rev-parse HEAD) python benchmarks/bench_train.py --out benchmarks/results
    COMMIT=$(git rev-parse HEAD) python benchmarks/bench_train.py --only fp8 --out $OUT  # float8 only

Every run starts from the same seed and reads the same data in the same order, so the losses of
variants after the same steps are comparable (``fp8_loss_rel_diff``).
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
    r"step:\s*(?P<step>\d+)\s+loss:\s*(?P<loss>[\d.]+).*?memory:\s*(?P<mem>-?[\d.]+)GiB.*?"
    r"tps:\s*(?P<tps>[\d,]+).*?mfu:\s*(?P<mfu>[\d.]+)%"
)
TORCHTITAN_DENSE_1B = [
    "--model.name=deepseek_v3",
    "--model.flavor=dense_1B",
    "--experimental.custom_import=benchmarks.torchtitan_baseline",
]
# The float8 configs are mla_1b.toml plus the converter: tensorwise scaling (with float8 FSDP
# all-gathers on several GPUs) or the rowwise recipe.
FLOAT8_CONFIGS = {
    "tensorwise": "train_configs/mla_1b_fp8.toml",
    "rowwise": "train_configs/mla_1b_fp8_rowwise.toml",
}
LOSS_TAIL = 3  # logged losses averaged for the loss comparison


@dataclass
class Variant:
    impl: str  # "titan_mla" | "titan_mla_torch_ops" (kernels = "torch") | "torchtitan_deepseek_v3"
    ac: str  # activation_checkpoint.mode
    batch: int
    float8: str | None = None  # recipe: "tensorwise" | "rowwise"; None: bf16
    bf16_linears: tuple[str, ...] = ("output",)  # float8 filter_fqns: linears that stay bf16

    @property
    def case(self) -> str:
        if self.float8 is None:
            precision = "bf16"
        else:
            recipe = "" if self.float8 == "tensorwise" else f"-{self.float8}"
            kept = [name for name in self.bf16_linears if name != "output"]
            precision = f"float8{recipe}" + (f"-bf16_{'+'.join(kept)}" if kept else "")
        return f"1B_seq4096_ac-{self.ac}_b{self.batch}_{precision}"

    def args(self, steps: int) -> list[str]:
        config = FLOAT8_CONFIGS[self.float8] if self.float8 else "train_configs/mla_1b.toml"
        args = [
            f"--job.config_file={config}",
            f"--training.steps={steps}",
            f"--training.local_batch_size={self.batch}",
            f"--activation_checkpoint.mode={self.ac}",
            "--activation_checkpoint.selective_ac_option=op",
            "--metrics.log_freq=5",
            "--metrics.disable_color_printing",
            "--metrics.no-enable-tensorboard",
            "--checkpoint.no-enable",
            "--debug.seed=0",
            f"--job.dump_folder=/tmp/bench_train/{self.impl}_{self.case}",
        ]
        if self.float8:
            args.append(f"--quantize.linear.float8.filter_fqns={','.join(self.bf16_linears)}")
        if self.impl == "torchtitan_deepseek_v3":
            args += TORCHTITAN_DENSE_1B
        if self.impl == "titan_mla_torch_ops":
            args.append("--model.kernels=torch")
        return args


BF16_EQUAL = Variant("titan_mla", "selective", 4)
FP8_TENSORWISE = Variant("titan_mla", "selective", 4, float8="tensorwise")
FP8_TENSORWISE_BF16_KV_DOWN = Variant(
    # The small projections stay bf16 too: the KV down-projection (2048 -> 576; wq_a as well
    # when a flavor has a query LoRA).
    "titan_mla",
    "selective",
    4,
    float8="tensorwise",
    bf16_linears=("output", "wkv_a", "wq_a"),
)
FP8_ROWWISE = Variant("titan_mla", "selective", 4, float8="rowwise")
EQUAL_SETTINGS = [
    # The configuration of mla_1b.toml: ours with Triton and with torch ops, and the anchor.
    BF16_EQUAL,
    Variant("torchtitan_deepseek_v3", "selective", 4),
    Variant("titan_mla_torch_ops", "selective", 4),
]
FP8_EQUAL_SETTINGS = [FP8_TENSORWISE, FP8_TENSORWISE_BF16_KV_DOWN, FP8_ROWWISE]
BEST_BF16 = Variant("titan_mla", "none", 8)
FP8_BEST = Variant("titan_mla", "none", 4, float8="tensorwise")
VARIANTS = [
    *EQUAL_SETTINGS,
    *FP8_EQUAL_SETTINGS,
    # Each side's best bf16 setting measured here for the anchor (no AC, batch 8).
    BEST_BF16,
    Variant("torchtitan_deepseek_v3", "none", 8),
    # float8 tensorwise, the anchor's best (no AC, batch 4).
    FP8_BEST,
    Variant("torchtitan_deepseek_v3", "none", 4, float8="tensorwise"),
]
SELECTIONS = {
    "all": VARIANTS,
    "equal": EQUAL_SETTINGS,
    "fp8": [BF16_EQUAL, *FP8_EQUAL_SETTINGS],
}


def run_variant(
    variant: Variant, steps: int, log_file: Path, timeout_s: int, env: dict | None = None
) -> dict | None:
    """Run one variant (anything with impl, case and args(steps)); env adds to os.environ."""
    cmd = ["./run_train.sh", *variant.args(steps)]
    print(f"== {variant.impl} {variant.case}: {' '.join(cmd)}", flush=True)
    start = time.monotonic()
    try:
        proc = subprocess.run(
            cmd,
            cwd=REPO,
            env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout_s,
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
        "tail_loss": statistics.mean(float(m["loss"]) for m in metrics[-LOSS_TAIL:]),
        "losses": {int(m["step"]): float(m["loss"]) for m in metrics},
    }
    print(f"   {result} in {time.monotonic() - start:.0f}s", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument(
        "--only",
        choices=sorted(SELECTIONS),
        default="all",
        help="equal: the mla_1b.toml settings (ours with Triton and torch ops, and the anchor); "
        "fp8: bf16 and the float8 variants at those settings",
    )
    parser.add_argument(
        "--only-equal-settings", action="store_true", help="the same as --only equal"
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
    if args.only_equal_settings:
        args.only = "equal"

    results: dict[tuple[str, str], dict] = {}
    rows: list[dict] = []
    for variant in SELECTIONS[args.only]:
        measured = run_variant(variant, args.steps, args.log, args.timeout)
        if measured is None:
            continue
        results[(variant.impl, variant.case)] = measured
        for metric, unit in (
            ("tps", "tokens/s"),
            ("mfu", "MFU %"),
            ("memory_gib", "peak GiB"),
            ("final_loss", "loss"),
            ("tail_loss", f"mean loss of the last {LOSS_TAIL} logs"),
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

    def versus_bf16(variant: Variant, key: str) -> float | None:
        """tps ratio ("tps") or relative loss difference ("tail_loss") of a titan_mla variant
        against bf16 at the mla_1b.toml settings."""
        ours, bf16 = results.get(("titan_mla", variant.case)), results.get(("titan_mla", equal))
        if not ours or not bf16:
            return None
        if key == "tps":
            return round(ours["tps"] / bf16["tps"], 4)
        return round((ours[key] - bf16[key]) / bf16[key], 6)

    equal, best_bf16, fp8 = BF16_EQUAL.case, BEST_BF16.case, FP8_BEST.case
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
        # float8 against bf16, all at the mla_1b.toml settings (selective AC, batch 4).
        "fp8_tensorwise_speedup": versus_bf16(FP8_TENSORWISE, "tps"),
        "fp8_tensorwise_bf16_kv_down_speedup": versus_bf16(FP8_TENSORWISE_BF16_KV_DOWN, "tps"),
        "fp8_rowwise_speedup": versus_bf16(FP8_ROWWISE, "tps"),
        "fp8_loss_rel_diff": versus_bf16(FP8_TENSORWISE, "tail_loss"),
        "fp8_rowwise_loss_rel_diff": versus_bf16(FP8_ROWWISE, "tail_loss"),
        "steps_per_variant": args.steps,
    }
    command = f"COMMIT=$(git rev-parse HEAD) python benchmarks/bench_train.py --steps {args.steps}"
    command += f" --only {args.only}" if args.only != "all" else ""
    # A subset writes a file of its own (train_fp8-<gpu>.json): it never replaces the full run's.
    benchmark = "train" if args.only == "all" else f"train_{args.only}"
    summary = {key: value for key, value in summary.items() if value is not None}
    path = write_result(
        benchmark, command, rows, summary, args.out, n_gpus=torch.cuda.device_count()
    )
    print(path.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
