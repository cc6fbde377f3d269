"""Multi-GPU scaling of the 1B flavor: FSDP2 on 1, 2 and 4 GPUs (bf16, float8), activation
checkpointing modes, tensor and context parallel, and a 65,536-token sequence with CP=4.

Every variant is a real ./run_train.sh run (bench_train.run_variant) of ~15 steps; tokens/s per GPU,
MFU and peak memory come from torchtitan's metric lines. The loss-curve runs start from one seed
checkpoint and train on 16 documents of exactly seq_len + 1 tokens, so that 1, 2 and 4 GPUs see the
same global batch of 16 sequences (gradient accumulation makes up the rest) at every step.

Device time is short, so the matrix is split in two calls of < 9 minutes on 4 H100s:

    COMMIT=$(git rev-parse HEAD) python benchmarks/bench_scaling.py --part 1 --out $OUT
    COMMIT=$(git rev-parse HEAD) python benchmarks/bench_scaling.py --part 2 \
        --prior benchmarks/results/scaling-part1.json --out $OUT

Each part writes scaling-part<N>.json (its raw results, rewritten after every variant) and
scaling-<n>xh100.json/.md from its own results plus --prior's. --smoke runs both parts with a tiny
model on 2 GPUs (scaling_smoke-*.json), to validate first.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import exact_length_documents

from benchmarks.bench_train import FLOAT8_CONFIGS, run_variant
from benchmarks.common import write_result

REPO = Path(__file__).resolve().parents[1]
# The GPU host needs NVLink multicast off in every process (NCCL and symmetric memory).
HOST_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
LOSS_STEPS = 10  # loss curves compare the first 10 steps
LOSS_RTOL = 1e-2
GLOBAL_BATCH = 16  # sequences per step in the loss-curve runs


@dataclass
class Run:
    """One ./run_train.sh job: ``impl`` names the parallel layout, ``case`` the settings."""

    name: str
    ngpu: int
    extra: list[str] = field(default_factory=list)
    ac: str = "selective"
    ac_option: str = "op"
    float8: bool = False
    batch: int = 4
    seq_len: int = 4096
    flavor: str = "1B"
    loss_curve: bool = False  # from the seed checkpoint on the exact-length documents

    @property
    def impl(self) -> str:
        return f"{self.ngpu}gpu_{self.name}"

    @property
    def case(self) -> str:
        ac = self.ac if self.ac != "selective" else f"sel-{self.ac_option}"
        precision = "float8" if self.float8 else "bf16"
        return f"{self.flavor}_seq{self.seq_len}_b{self.batch}_ac-{ac}_{precision}"

    def args(self, steps: int) -> list[str]:
        # float8: tensorwise scaling, with float8 FSDP2 all-gathers on several GPUs.
        config = FLOAT8_CONFIGS["tensorwise"] if self.float8 else "train_configs/mla_1b.toml"
        args = [
            f"--job.config_file={config}",
            f"--model.flavor={self.flavor}",
            f"--training.steps={steps}",
            f"--training.seq_len={self.seq_len}",
            f"--training.local_batch_size={self.batch}",
            # A short warm-up so that the loss visibly falls within the run.
            "--lr_scheduler.warmup_steps=2",
            f"--activation_checkpoint.mode={self.ac}",
            f"--activation_checkpoint.selective_ac_option={self.ac_option}",
            f"--metrics.log_freq={1 if self.loss_curve else 5}",
            "--metrics.disable_color_printing",
            "--metrics.no-enable-tensorboard",
            "--checkpoint.no-enable",
            f"--job.dump_folder={WORK / self.impl / self.case}",
        ]
        if self.loss_curve:
            args += [
                f"--training.dataset_path={WORK / 'docs.jsonl'}",
                f"--training.global_batch_size={GLOBAL_BATCH}",
                "--checkpoint.enable",
                f"--checkpoint.initial_load_path={WORK / 'seed' / 'checkpoint' / 'step-0'}",
                "--checkpoint.load_only",  # load the seed, never save
            ]
        return args + self.extra


WORK = Path(tempfile.gettempdir()) / "bench_scaling"
NO_COMPILE = ["--compile.no-enable"]


def parts(smoke: bool) -> dict[int, list[Run]]:
    """The matrix. Part 1: bf16 FSDP scaling with loss curves, AC modes on one GPU. Part 2: float8,
    TP, CP and the 65,536-token sequence."""
    if smoke:
        tiny = dict(flavor="debugmodel", seq_len=256, batch=2)
        return {
            1: [Run("fsdp", 1, loss_curve=True, **tiny), Run("fsdp", 2, loss_curve=True, **tiny)],
            2: [
                Run("tp2", 2, ["--parallelism.tensor_parallel_degree=2"], **tiny),
                Run("cp2", 2, ["--parallelism.context_parallel_degree=2", *NO_COMPILE], **tiny),
            ],
        }
    return {
        1: [
            Run("fsdp", 1, loss_curve=True),
            Run("fsdp", 2, loss_curve=True),
            Run("fsdp", 4, loss_curve=True),
            Run("fsdp", 1, ac="none"),
            Run("fsdp", 1, ac="selective", ac_option="2"),
            Run("fsdp", 1, ac="full"),
        ],
        2: [
            Run("fsdp", 1, ac="none", float8=True),
            Run("fsdp", 4, ac="none", float8=True),
            # TP=2 x FSDP2=2 (FSDP brings bf16 mixed precision), with per-block compile.
            Run("tp2", 4, ["--parallelism.tensor_parallel_degree=2"]),
            # Context parallel runs eager: its SDPA dispatcher is not compiled here.
            Run("cp2", 2, ["--parallelism.context_parallel_degree=2", *NO_COMPILE]),
            Run(
                "cp4",
                4,
                ["--parallelism.context_parallel_degree=4", *NO_COMPILE],
                ac="full",
                batch=1,
                seq_len=65536,
                flavor="1B_long",
            ),
        ],
    }


def prepare_loss_curve_inputs(run: Run, log_file: Path, timeout_s: int) -> None:
    """The exact-length documents and the seed checkpoint every loss-curve run starts from."""
    docs = WORK / "docs.jsonl"
    if not docs.exists():
        texts = exact_length_documents(GLOBAL_BATCH, run.seq_len + 1)
        docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    if (WORK / "seed" / "checkpoint" / "step-0").is_dir():
        return
    seed = Run("seed", 1, flavor=run.flavor, seq_len=run.seq_len, batch=run.batch)
    seed.extra = [
        f"--job.dump_folder={WORK / 'seed'}",
        "--checkpoint.enable",
        "--checkpoint.create_seed_checkpoint",
        "--checkpoint.async_mode=disabled",
        "--parallelism.data_parallel_shard_degree=1",
        *NO_COMPILE,
    ]
    # A seed checkpoint run logs no steps: run_variant reports it as failed; check the folder.
    run_variant(seed, 1, log_file, timeout_s, env={**HOST_ENV, "NGPU": "1"})
    if not (WORK / "seed" / "checkpoint" / "step-0").is_dir():
        raise RuntimeError(f"no seed checkpoint in {WORK / 'seed'}: see {log_file}")


def summarize(results: dict[str, dict]) -> tuple[list[dict], dict]:
    """Rows of every result and the issue's summary figures."""
    rows = []
    for key, r in results.items():
        impl, case = key.split("|")
        for metric, unit in (
            ("tps", "tokens/s/GPU"),
            ("mfu", "MFU %"),
            ("memory_gib", "peak GiB"),
            ("final_loss", "loss"),
        ):
            rows.append({"case": case, "impl": impl, "metric": unit, "value": r[metric]})

    def get(ngpu: int, name: str, case_suffix: str) -> dict | None:
        return next(
            (
                r
                for key, r in results.items()
                if key.startswith(f"{ngpu}gpu_{name}|") and key.endswith(case_suffix)
            ),
            None,
        )

    summary: dict = {}
    one = get(1, "fsdp", "sel-op_bf16")
    for n in (2, 4):
        many = get(n, "fsdp", "sel-op_bf16")
        summary[f"fsdp_scaling_efficiency_{n}gpu"] = (
            round(many["tps"] / one["tps"], 4) if one and many else None
        )
        if one and many:
            steps = [s for s in range(1, LOSS_STEPS + 1) if str(s) in one["losses"]]
            rel = max(
                abs(many["losses"][str(s)] - one["losses"][str(s)]) / one["losses"][str(s)]
                for s in steps
            )
            summary[f"loss_max_rel_diff_{n}gpu_vs_1gpu"] = round(rel, 6)
            summary[f"loss_curve_match_{n}gpu"] = rel <= LOSS_RTOL and len(steps) == LOSS_STEPS
    one_gpu_bf16 = [
        r for key, r in results.items() if key.startswith("1gpu_fsdp|") and "bf16" in key
    ]
    summary["mfu_bf16_1gpu"] = max((r["mfu"] for r in one_gpu_bf16), default=None)
    for name, n in (("tp2", 4), ("cp2", 2)):
        r = get(n, name, "bf16")
        summary[f"{name}_loss_falls"] = (
            r["losses"][min(r["losses"], key=int)] > r["final_loss"] if r else None
        )
    cp4 = get(4, "cp4", "bf16")
    summary["cp4_seq65536_tps"] = cp4["tps"] if cp4 else None
    summary["cp4_seq65536_memory_gib"] = cp4["memory_gib"] if cp4 else None
    return rows, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", type=int, choices=(1, 2), help="default with --smoke: both")
    parser.add_argument("--prior", type=Path, nargs="*", default=[], help="earlier parts' raw JSON")
    parser.add_argument("--smoke", action="store_true", help="tiny model on 2 GPUs, < 2 minutes")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--timeout", type=int, default=150, help="seconds per run")
    parser.add_argument(
        "--budget", type=int, default=420, help="start no run after this many seconds"
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_scaling.py needs CUDA GPUs")
    if args.part is None and not args.smoke:
        sys.exit("bench_scaling.py: error: --part 1 or --part 2 (or --smoke)")
    part_numbers = [args.part] if args.part else [1, 2]
    os.environ.update(HOST_ENV)
    # One Inductor cache for every run of this call: later runs hit the FX graph cache.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(WORK / "inductor_cache"))
    WORK.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "smoke" if args.smoke else f"part{args.part}"
    log_file = args.out / f"bench_scaling-{tag}.log"
    log_file.write_text("")
    steps = max(args.steps, LOSS_STEPS) if not args.smoke else LOSS_STEPS

    results: dict[str, dict] = {}
    for prior in args.prior:
        results.update(json.loads(prior.read_text()))
    raw_path = args.out / f"scaling-{tag}.json"
    start = time.monotonic()
    runs = [run for n in part_numbers for run in parts(args.smoke)[n]]
    own_keys = {f"{run.impl}|{run.case}" for run in runs}
    for run in runs:
        if run.ngpu > torch.cuda.device_count():
            print(f"== skip {run.impl} {run.case}: needs {run.ngpu} GPUs", flush=True)
            continue
        if time.monotonic() - start > args.budget:
            print(f"== skip {run.impl} {run.case}: past the {args.budget}s budget", flush=True)
            continue
        if run.loss_curve:
            prepare_loss_curve_inputs(run, log_file, args.timeout)
        measured = run_variant(run, steps, log_file, args.timeout, env={"NGPU": str(run.ngpu)})
        print(f"   [{time.monotonic() - start:.0f}s elapsed]", flush=True)
        if measured is None:
            continue
        measured["losses"] = {str(s): loss for s, loss in measured["losses"].items()}
        results[f"{run.impl}|{run.case}"] = measured
        own = {key: r for key, r in results.items() if key in own_keys}
        raw_path.write_text(json.dumps(own, indent=1) + "\n")

    rows, summary = summarize(results)
    summary["steps_per_run"] = steps
    command = (
        "COMMIT=$(git rev-parse HEAD) python benchmarks/bench_scaling.py --part 1 --out $OUT; "
    )
    command += "... --part 2 --prior scaling-part1.json --out $OUT"
    name = "scaling_smoke" if args.smoke else "scaling"
    path = write_result(name, command, rows, summary, args.out, n_gpus=torch.cuda.device_count())
    print(path.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
