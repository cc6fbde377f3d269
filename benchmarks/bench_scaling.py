"""Multi-GPU scaling of the 1B flavor: FSDP2 on 1, 2 and 4 GPUs (bf16, float8), activation
checkpointing modes, tensor and context parallel, and a 65,536-token sequence with CP=4.

Every variant is a real ./run_train.sh run (bench_train.run_variant) of ~15 steps; tokens/s per GPU,
MFU and peak memory come from torchtitan's metric lines. The loss-curve runs start from one seed
checkpoint and train on 16 documents of exactly seq_len + 1 tokens, so that 1, 2 and 4 GPUs see the
same global batch of 16 sequences (gradient accumulation makes up the rest) at every step.

Device time is short, so the matrix runs in phases: the runs of a phase start together on
disjoint GPUs of the host (CUDA_VISIBLE_DEVICES), e.g. three one-GPU AC runs beside the seed
checkpoint, then the next phase. One call on 4 H100s:

    COMMIT=$(git rev-parse HEAD) python benchmarks/bench_scaling.py --out $OUT

writes scaling-raw.json (every run's figures, rewritten as runs finish) and scaling-<n>xh100.json
/.md. --smoke runs the same phases with the debug model (on CPU ranks where there is no GPU), to
validate first; --prior merges an earlier call's scaling-raw.json (the committed one of the last
full call is benchmarks/results/raw/scaling-4xh100.json). The FSDP efficiency at batch 8 per GPU,
with and without resharding after forward, in a second call of ~6 minutes:

    COMMIT=$(git rev-parse HEAD) python benchmarks/bench_scaling.py --only efficiency \
        --prior benchmarks/results/raw/scaling-4xh100.json --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
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
    """One ./run_train.sh job: ``impl`` names the parallel layout, ``case`` the settings. The run
    named "seed" writes the seed checkpoint the loss-curve runs start from."""

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
    timeout_factor: float = 1.0

    @property
    def impl(self) -> str:
        return f"{self.ngpu}gpu_{self.name}"

    @property
    def case(self) -> str:
        ac = self.ac if self.ac != "selective" else f"sel-{self.ac_option}"
        precision = "float8" if self.float8 else "bf16"
        return f"{self.flavor}_seq{self.seq_len}_b{self.batch}_ac-{ac}_{precision}"

    @property
    def dump_folder(self) -> Path:
        return SEED_FOLDER if self.name == "seed" else WORK / self.impl / self.case

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
            f"--job.dump_folder={self.dump_folder}",
        ]
        if self.name == "seed":
            args += [
                "--checkpoint.enable",
                "--checkpoint.create_seed_checkpoint",
                "--checkpoint.async_mode=disabled",
                "--parallelism.data_parallel_shard_degree=1",
                *NO_COMPILE,
            ]
        if self.loss_curve:
            args += [
                f"--training.dataset_path={WORK / 'docs.jsonl'}",
                f"--training.global_batch_size={GLOBAL_BATCH}",
                "--checkpoint.enable",
                f"--checkpoint.initial_load_path={SEED_CHECKPOINT}",
                "--checkpoint.load_only",  # load the seed, never save
            ]
        return args + self.extra


WORK = Path(tempfile.gettempdir()) / "bench_scaling"
SEED_FOLDER = WORK / "seed"
SEED_CHECKPOINT = SEED_FOLDER / "checkpoint" / "step-0"
NO_COMPILE = ["--compile.no-enable"]


def phases(smoke: bool, only: str = "all") -> list[list[Run]]:
    """The matrix as phases of runs that share the host's GPUs (at most 4 at once). The seed
    checkpoint comes first; the phase order is the priority order (a budget cut drops the tail).
    ``only="efficiency"``: FSDP at batch 8 per GPU (half the communication per token of batch 4),
    also without resharding after forward (no backward all-gather), and one GPU without AC."""
    sizes = dict(flavor="debugmodel", seq_len=256, batch=2) if smoke else {}
    if only == "efficiency":
        big = {**sizes, "batch": 2 * sizes.get("batch", 4)}
        no_reshard = ["--parallelism.fsdp_reshard_after_forward=never"]
        return [
            [Run("fsdp", 1, **big), Run("fsdp", 1, ac="none", **big), Run("fsdp", 2, **big)],
            [Run("fsdp", 4, **big)],
            [Run("fsdp_noreshard", 4, no_reshard, **big)],
            [Run("fsdp_noreshard", 2, no_reshard, **big), Run("fsdp", 2, ac="none", **big)],
            [Run("fsdp", 4, ac="none", **big)],
        ]
    long_context = (
        dict(flavor="debugmodel", seq_len=1024, batch=1)
        if smoke
        else dict(flavor="1B_long", seq_len=65536, batch=1)
    )
    tp2 = ["--parallelism.tensor_parallel_degree=2"]
    # Context parallel runs eager: its SDPA dispatcher is not compiled here.
    cp = lambda degree: [f"--parallelism.context_parallel_degree={degree}", *NO_COMPILE]  # noqa: E731
    return [
        [
            Run("seed", 1, **sizes),
            Run("fsdp", 1, ac="none", **sizes),
            Run("fsdp", 1, ac="selective", ac_option="2", **sizes),
            Run("fsdp", 1, ac="full", **sizes),
        ],
        [
            Run("fsdp", 1, loss_curve=True, **sizes),
            Run("fsdp", 1, ac="none", float8=not smoke, **sizes),
            Run("fsdp", 2, loss_curve=True, **sizes),
        ],
        [Run("tp2", 2, tp2, **sizes), Run("cp2", 2, cp(2), **sizes)],
        [Run("fsdp", 4, loss_curve=True, **sizes)],
        [Run("cp4", 4, cp(4), ac="full", timeout_factor=2.0, **long_context)],
        [Run("fsdp", 4, ac="none", float8=not smoke, **sizes)],
        # TP=2 x FSDP2=2 (FSDP brings bf16 mixed precision), with per-block compile.
        [Run("tp2_fsdp2", 4, tp2, **sizes)],
    ]


def prepare_documents(seq_len: int) -> None:
    """The exact-length documents every loss-curve run trains on."""
    docs = WORK / "docs.jsonl"
    if not docs.exists():
        texts = exact_length_documents(GLOBAL_BATCH, seq_len + 1)
        docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def run_phase(
    phase: list[Run], gpus: list[str], steps: int, log_file: Path, timeout_s: int
) -> dict[str, dict]:
    """Start every run of ``phase`` on its own GPUs, wait for all; results by "impl|case"."""
    results: dict[str, dict] = {}
    lock = threading.Lock()

    def job(run: Run, devices: list[str]) -> None:
        env = {"NGPU": str(run.ngpu)}
        if devices:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
        timeout = int(timeout_s * run.timeout_factor)
        if run.name == "seed":
            shutil.rmtree(run.dump_folder, ignore_errors=True)
        measured = run_variant(run, steps, log_file, timeout, env=env)
        if run.name == "seed":  # a seed run logs no steps: run_variant reports it as failed
            if not SEED_CHECKPOINT.is_dir():
                print(f"   no seed checkpoint in {SEED_CHECKPOINT}: see {log_file}", flush=True)
            return
        if measured is not None:
            measured["losses"] = {str(s): loss for s, loss in measured["losses"].items()}
            with lock:
                results[f"{run.impl}|{run.case}"] = measured

    free = list(gpus)
    with ThreadPoolExecutor(max_workers=len(phase)) as pool:
        running = []
        for run in phase:
            devices, free = (free[: run.ngpu], free[run.ngpu :]) if gpus else ([], [])
            running.append(pool.submit(job, run, devices))
        for future in running:
            future.result()  # re-raise a bug in job itself
    return results


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
    for n in (2, 4):
        # Per-GPU tokens/s against one GPU at the same per-GPU settings, for every FSDP layout
        # measured; the headline is the best of them, named in fsdp_scaling_best_{n}gpu.
        ratios = {
            f"{impl}|{case}": round(r["tps"] / results[f"1gpu_fsdp|{case}"]["tps"], 4)
            for key, r in results.items()
            for impl, case in [key.split("|")]
            if impl in (f"{n}gpu_fsdp", f"{n}gpu_fsdp_noreshard") and f"1gpu_fsdp|{case}" in results
        }
        best = max(ratios, key=ratios.get, default=None)
        summary[f"fsdp_scaling_efficiency_{n}gpu"] = ratios[best] if best else None
        summary[f"fsdp_scaling_best_{n}gpu"] = best
        summary[f"fsdp_scaling_all_{n}gpu"] = ratios
    # The loss-curve runs: batch 4 per GPU, selective AC per op, from the seed checkpoint.
    one = get(1, "fsdp", "_b4_ac-sel-op_bf16")
    for n in (2, 4):
        many = get(n, "fsdp", "_b4_ac-sel-op_bf16")
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
    for name, n in (("tp2", 2), ("cp2", 2), ("tp2_fsdp2", 4)):
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
    parser.add_argument("--prior", type=Path, nargs="*", default=[], help="earlier raw JSON")
    parser.add_argument("--smoke", action="store_true", help="the debug model, every phase")
    parser.add_argument(
        "--only", choices=["all", "efficiency"], default="all", help="a subset of the matrix"
    )
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--timeout", type=int, default=180, help="seconds per run")
    parser.add_argument(
        "--budget", type=int, default=460, help="start no phase after this many seconds"
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    n_gpus = torch.cuda.device_count()
    if not n_gpus and not args.smoke:
        sys.exit("bench_scaling.py needs CUDA GPUs (--smoke also runs on CPU ranks)")
    os.environ.update(HOST_ENV)
    # One Inductor cache for every run of this call: later runs hit the FX graph cache.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(WORK / "inductor_cache"))
    WORK.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    log_file = args.out / f"bench_scaling{'-smoke' if args.smoke else ''}.log"
    log_file.write_text("")
    steps = max(args.steps, LOSS_STEPS)
    gpus = [str(i) for i in range(n_gpus)]
    slots = n_gpus or 4  # CPU ranks: the same phases, without CUDA_VISIBLE_DEVICES

    results: dict[str, dict] = {}
    for prior in args.prior:
        results.update(json.loads(prior.read_text()))
    raw_path = args.out / f"scaling{'_smoke' if args.smoke else ''}-raw.json"
    start = time.monotonic()
    for number, phase in enumerate(phases(args.smoke, args.only), 1):
        fitting = [run for run in phase if run.ngpu <= slots]
        for run in phase:
            if run.ngpu > slots:
                print(f"== phase {number}: skip {run.impl}: needs {run.ngpu} GPUs", flush=True)
        if time.monotonic() - start > args.budget:
            print(f"== phase {number}: skipped, past the {args.budget}s budget", flush=True)
            continue
        if any(run.loss_curve for run in fitting):
            prepare_documents(fitting[0].seq_len)
        print(f"== phase {number}: {', '.join(r.impl for r in fitting)}", flush=True)
        results.update(run_phase(fitting, gpus, steps, log_file, args.timeout))
        print(f"   [{time.monotonic() - start:.0f}s elapsed]", flush=True)
        raw_path.write_text(json.dumps(results, indent=1) + "\n")

    rows, summary = summarize(results)
    summary["steps_per_run"] = steps
    command = "COMMIT=$(git rev-parse HEAD) python benchmarks/bench_scaling.py " + " ".join(
        sys.argv[1:]
    )
    name = "scaling_smoke" if args.smoke else "scaling"
    path = write_result(name, command, rows, summary, args.out, n_gpus=max(n_gpus, 1))
    print(path.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
