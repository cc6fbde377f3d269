"""The FP8-vs-INT8 deployment ablation of a freshly trained 1B checkpoint on one GPU.

A short training of the 1B flavor on the default corpus, then titan_mla.ablate over every scheme
with bf16 in the same run.

Writes quant_ablation-<gpu>.json, .md and .png (and tb/) into --out.

    COMMIT=$(git rev-parse HEAD) python benchmarks/bench_quant.py --out benchmarks/results
    python benchmarks/bench_quant.py --smoke --out /tmp/quant_smoke  # debug model, every path

The checkpoint goes to outputs/quant_ablation/<flavor> (git-ignored): ``--phase ablate`` reuses it
in a later call, ``--phase train`` only trains.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# The summary's schemes first: results are written after every scheme, so a run cut short keeps them.
ALL_SCHEMES = (
    "bf16,int8_weight_only,fp8_rowwise,int8_dynamic,fp8_tensorwise,fp8_weight_only,bf16+fp8cache"
)
# (config, training overrides, ablation options) of the full run and of the smoke run.
FULL = (
    "train_configs/mla_1b.toml",
    # Warm-up as long as the short run allows (mla_1b.toml warms up over 2000 steps).
    ["--lr_scheduler.warmup_steps=20"],
    ["--eval-tokens=6144", "--eval-seq-len=1024", "--prefill-len=2048", "--decode-batches=1,32"],
)
SMOKE = (
    "train_configs/debug_model.toml",
    ["--training.seq_len=256"],
    [
        "--eval-tokens=1024",
        "--eval-seq-len=256",
        "--prefill-len=256",
        "--decode-batches=1,4",
        "--decode-context=32",
        "--decode-steps=8",
        "--repeats=1",
    ],
)


def train(config: str, overrides: list[str], steps: int, dump_folder: Path) -> None:
    cmd = [
        "./run_train.sh",
        f"--job.config_file={config}",
        *overrides,
        f"--training.steps={steps}",
        "--checkpoint.enable",
        f"--checkpoint.interval={steps}",
        "--checkpoint.last_save_model_only",
        "--checkpoint.export_dtype=bfloat16",
        "--checkpoint.async_mode=disabled",
        "--metrics.log_freq=10",
        "--metrics.disable_color_printing",
        "--metrics.no-enable-tensorboard",
        "--debug.seed=0",
        f"--job.dump_folder={dump_folder}",
    ]
    print(f"== training: {shlex.join(cmd)}", flush=True)
    start = time.monotonic()
    env = {**os.environ, "NGPU": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = proc.stdout.decode(errors="replace")
    losses = [line for line in output.splitlines() if " loss: " in line]
    print("\n".join(losses[-3:]) or output[-3000:], flush=True)
    if proc.returncode != 0:
        print(output[-5000:])
        sys.exit(f"training failed (exit {proc.returncode})")
    print(f"   trained {steps} steps in {time.monotonic() - start:.0f}s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true", help="debug model, tiny sizes (< 2 min)")
    parser.add_argument("--phase", choices=["all", "train", "ablate"], default="all")
    parser.add_argument("--steps", type=int, help="training steps (default 200; smoke 10)")
    parser.add_argument("--schemes", default=ALL_SCHEMES)
    # Other options (e.g. --no-compile, --compile-mode, --profile-decode) go to
    # python -m titan_mla.ablate.
    args, ablate_extra = parser.parse_known_args()
    if not torch.cuda.is_available():
        sys.exit("bench_quant.py needs a CUDA GPU")
    config, train_overrides, ablate_options = SMOKE if args.smoke else FULL
    steps = args.steps or (10 if args.smoke else 200)
    dump_folder = REPO / "outputs" / "quant_ablation" / ("smoke" if args.smoke else "1B")
    if args.phase in ("all", "train"):
        train(config, train_overrides, steps, dump_folder)
    if args.phase == "train":
        return

    from titan_mla import ablate

    argv = [
        f"--job.config_file={config}",
        "--checkpoint",
        str(dump_folder / "checkpoint"),
        f"--schemes={args.schemes}",
        "--out",
        str(args.out),
        *ablate_options,
        *ablate_extra,
    ]
    print(f"== ablation: python -m titan_mla.ablate {shlex.join(argv)}", flush=True)
    start = time.monotonic()
    command = "COMMIT=$(git rev-parse HEAD) python benchmarks/bench_quant.py " + shlex.join(
        sys.argv[1:]
    )
    ablate.main(argv, command=command)
    print(f"   ablation in {time.monotonic() - start:.0f}s", flush=True)


if __name__ == "__main__":
    main()
