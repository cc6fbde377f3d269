"""Passkey retrieval after training on passkey data, by context length x needle depth (one GPU).

--stage small: the debugmodel flavor trained at --train-len (256) tokens (./run_train.sh with
  train_configs/passkey_debug.toml), then evaluated through the inference engine at 1x, 2x, 4x and
  8x that length, as trained (no YaRN: positions beyond training are extrapolated) and with YaRN
  applied at evaluation (rope_factor 8 from the training length). Summary: passkey_acc_at_train_len.
  At every context length L the prompts have L - 8 tokens, so that prompt and answer fit in L.
--stage 1b: the 1B flavor trained at 4096 (train_configs/passkey_1b.toml), extended with YaRN to
  32768 by a short fine-tune (train_configs/mla_1b_yarn32k.toml), evaluated at 4K, 32K and 128K.
  Summary: passkey_acc_4k, passkey_acc_32k, passkey_acc_128k.

Each stage merges its rows and summary into <out>/passkey-<gpu>.json (+ .md) and draws its heatmaps
(passkey-<gpu>.png, passkey-1b-<gpu>.png). Training runs are real ./run_train.sh runs on the first
visible GPU; steps, wall time and the final loss are reported.

    COMMIT=$(git rev-parse HEAD) CUDA_VISIBLE_DEVICES=0 python benchmarks/bench_passkey.py --stage small --out benchmarks/results
    COMMIT=$(git rev-parse HEAD) CUDA_VISIBLE_DEVICES=0 python benchmarks/bench_passkey.py --stage 1b --out benchmarks/results
    ... --smoke   # everything at tiny sizes and a few steps, < 1 minute
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import gpu_tag, write_result
from titan_mla.longctx.eval import ANSWER_ROOM, PASSKEY_DEPTHS

REPO = Path(__file__).resolve().parents[1]
LOSS_LINE = re.compile(r"step:\s*(\d+)\s+loss:\s*([\d.]+)")


def train(config: str, dump: Path, steps: int, overrides: list[str], timeout_s: int) -> dict:
    """One ./run_train.sh run on one GPU; returns steps, wall seconds, last loss, checkpoint."""
    cmd = [
        "./run_train.sh",
        f"--job.config_file=train_configs/{config}",
        f"--job.dump_folder={dump}",
        f"--training.steps={steps}",
        f"--checkpoint.interval={steps}",  # a checkpoint at the last step only
        "--checkpoint.last_save_model_only",
        "--metrics.disable_color_printing",  # plain metric lines to parse
        *overrides,
    ]
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    env = {**os.environ, "NGPU": "1"}
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    losses = []
    for line in proc.stdout:
        if match := LOSS_LINE.search(line):
            losses.append((int(match[1]), float(match[2])))
            print(
                f"  step {match[1]} loss {match[2]} ({time.perf_counter() - start:.0f}s)",
                flush=True,
            )
        elif ("Error" in line or "error:" in line) and "lspci" not in line:
            print("  " + line.rstrip(), flush=True)
    if proc.wait(timeout=timeout_s) != 0:
        raise RuntimeError(f"training with {config} failed (exit {proc.returncode})")
    return {
        "steps": steps,
        "seconds": time.perf_counter() - start,
        "final_loss": losses[-1][1] if losses else float("nan"),
        "checkpoint": dump / "checkpoint" / f"step-{steps}",
    }


def evaluate_checkpoint(
    config: str,
    checkpoint: Path,
    lengths: list[int],
    depths: list[float],
    samples: int,
    *,
    rope_factor: float | None = None,
    original_seq_len: int | None = None,
    chunk_size: int = 4096,
    overrides: tuple[str, ...] = (),
    dtype: torch.dtype | None = None,
) -> dict:
    from titan_mla.inference.generator import Generator
    from titan_mla.longctx.eval import cache_seq_len, evaluate, with_yarn
    from titan_mla.longctx.needles import NeedleGenerator

    max_seq_len = cache_seq_len(lengths)
    batch = max(1, min(samples, 2**17 // max(lengths)))  # prompts per prefill: ~128K tokens
    generator = Generator.from_checkpoint(
        REPO / "train_configs" / config,
        checkpoint,
        overrides=overrides,
        max_batch=batch,
        max_seq_len=max_seq_len,
        chunk_size=chunk_size,
        cuda_graph=False,
        dtype=dtype,
    )
    if rope_factor:
        generator = with_yarn(
            generator, rope_factor, original_seq_len, batch, max_seq_len, chunk_size
        )
    needles = NeedleGenerator("passkey", "repeat", tokenizer=generator.tokenizer)
    result = evaluate(generator, needles, lengths, depths, samples=samples, batch=batch)
    del generator
    torch.cuda.empty_cache()
    return result


def rows_of(stage: str, condition: str, result: dict) -> list[dict]:
    return [
        {
            "case": f"{stage}_len{length}_depth{depth:g}",
            "impl": condition,
            "metric": "passkey_acc",
            "value": value,
        }
        for length, row in zip(result["lengths"], result["accuracy"], strict=True)
        for depth, value in zip(result["depths"], row, strict=True)
    ] + [
        {"case": f"{stage}_len{length}", "impl": condition, "metric": "passkey_acc", "value": value}
        for length, value in result["accuracy_by_length"].items()
    ]


def stage_small(args) -> tuple[list[dict], dict, dict]:
    train_len = 128 if args.smoke else args.train_len
    steps = 5 if args.smoke else args.small_steps
    run = train(
        "passkey_debug.toml",
        args.work / "small",
        steps,
        [
            f"--training.seq_len={train_len}",
            f"--training.local_batch_size={args.small_batch}",
            f"--lr_scheduler.warmup_steps={max(steps // 20, 1)}",
            f"--metrics.log_freq={min(50, steps)}",
            *([f"--optimizer.lr={args.small_lr}"] if args.small_lr else []),
            *loss_flags(args),
        ],
        args.timeout,
    )
    lengths = [train_len * f - ANSWER_ROOM for f in (1, 2, 4, 8)]
    depths = PASSKEY_DEPTHS
    samples = 2 if args.smoke else args.samples
    overrides = (f"--training.seq_len={train_len}",)
    dtype = getattr(torch, args.small_eval_dtype)
    results = {
        "no YaRN": evaluate_checkpoint(
            "passkey_debug.toml",
            run["checkpoint"],
            lengths,
            depths,
            samples,
            overrides=overrides,
            dtype=dtype,
        ),
        "YaRN x8 at eval": evaluate_checkpoint(
            "passkey_debug.toml",
            run["checkpoint"],
            lengths,
            depths,
            samples,
            rope_factor=8.0,
            original_seq_len=train_len,
            overrides=overrides,
            dtype=dtype,
        ),
    }
    rows = [
        {"case": "small_train", "impl": "debugmodel", "metric": name, "value": run[name]}
        for name in ("steps", "seconds", "final_loss")
    ]
    for condition, result in results.items():
        rows += rows_of("small", condition, result)
    summary = {
        "passkey_acc_at_train_len": results["no YaRN"]["accuracy_by_length"][str(lengths[0])],
        "passkey_prompt_tokens_at_train_len": lengths[0],
        "small_train_len": train_len,
        "small_train_steps": run["steps"],
        "small_train_seconds": round(run["seconds"], 1),
        "small_eval_dtype": args.small_eval_dtype,
    }
    for factor in (2, 4, 8):
        for condition, key in (("no YaRN", "noyarn"), ("YaRN x8 at eval", "yarn")):
            summary[f"passkey_acc_{factor}x_{key}"] = results[condition]["accuracy_by_length"][
                str(train_len * factor - ANSWER_ROOM)
            ]
    return rows, summary, results


def loss_flags(args) -> list[str]:
    """Answer-only loss, or (default) the whole sequence: copying the key inside its own needle
    ("The pass key is X. Remember it. X is ...") is a short-range induction task that bootstraps
    the long-range retrieval."""
    return [] if args.answer_only else ["--needles.no-answer-only-loss"]


def stage_1b(args) -> tuple[list[dict], dict, dict]:
    if args.smoke:  # the same two stages and evaluations, on the debug model at 256-1024 tokens
        short, long_, longest, steps_4k, steps_32k = 256, 512, 1024, 3, 3
        tiny = [
            "--model.flavor=debugmodel",
            "--compile.no-enable",
            "--activation_checkpoint.mode=none",
        ]
    else:
        short, long_, longest, steps_4k, steps_32k = (
            4096,
            32768,
            131072,
            args.steps_4k,
            args.steps_32k,
        )
        tiny = []
    run_4k = train(
        "passkey_1b.toml",
        args.work / "1b_4k",
        steps_4k,
        [
            *tiny,
            *loss_flags(args),
            f"--training.seq_len={short}",
            f"--training.local_batch_size={args.batch_4k}",
            f"--optimizer.lr={args.lr_4k}",
        ],
        args.timeout,
    )
    run_32k = train(
        "mla_1b_yarn32k.toml",
        args.work / "1b_32k",
        steps_32k,
        [
            *tiny,
            *loss_flags(args),
            f"--training.seq_len={long_}",
            f"--checkpoint.initial_load_path={run_4k['checkpoint']}",
        ],
        args.timeout,
    )
    samples = 2 if args.smoke else args.samples_1b
    depths = [0.1, 0.5, 0.9]
    eval_4k = (*tiny[:1], f"--training.seq_len={short}")
    eval_32k = (*tiny[:1], f"--training.seq_len={long_}")
    results = {
        "4K stage": evaluate_checkpoint(
            "passkey_1b.toml",
            run_4k["checkpoint"],
            [short - ANSWER_ROOM],
            depths,
            samples,
            overrides=eval_4k,
        ),
        "YaRN 32K stage": evaluate_checkpoint(
            "mla_1b_yarn32k.toml",
            run_32k["checkpoint"],
            [short - ANSWER_ROOM, long_ - ANSWER_ROOM],
            depths,
            samples,
            chunk_size=8192,
            overrides=eval_32k,
        ),
        "YaRN 32K stage at 128K": evaluate_checkpoint(
            "mla_1b_yarn32k.toml",
            run_32k["checkpoint"],
            [longest - ANSWER_ROOM],
            depths,
            max(1, samples // 5),
            chunk_size=8192,
            overrides=eval_32k,
        ),
    }
    rows = []
    for name, run in (("1b_train_4k", run_4k), ("1b_train_32k", run_32k)):
        rows += [
            {"case": name, "impl": "1B", "metric": key, "value": run[key]}
            for key in ("steps", "seconds", "final_loss")
        ]
    for condition, result in results.items():
        rows += rows_of("1b", condition, result)
    summary = {
        "passkey_acc_4k": results["4K stage"]["accuracy_overall"],
        "passkey_acc_32k": results["YaRN 32K stage"]["accuracy_by_length"][
            str(long_ - ANSWER_ROOM)
        ],
        "passkey_acc_128k": results["YaRN 32K stage at 128K"]["accuracy_overall"],
        "1b_train_steps_4k": run_4k["steps"],
        "1b_train_steps_32k": run_32k["steps"],
        "1b_train_seconds": round(run_4k["seconds"] + run_32k["seconds"], 1),
    }
    return rows, summary, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=["small", "1b"], required=True)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few steps: < 1 minute")
    parser.add_argument("--train-len", type=int, default=256, help="small stage training length")
    parser.add_argument("--small-steps", type=int, default=2000)
    parser.add_argument("--small-batch", type=int, default=32)
    parser.add_argument("--small-lr", type=float, help="default: passkey_debug.toml's")
    parser.add_argument(
        "--small-eval-dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="small stage evaluation precision (default: float32, as passkey_debug.toml trains)",
    )
    parser.add_argument("--steps-4k", type=int, default=200)
    parser.add_argument("--batch-4k", type=int, default=8)
    parser.add_argument("--lr-4k", type=float, default=5e-4)
    parser.add_argument("--steps-32k", type=int, default=30)
    parser.add_argument("--answer-only", action="store_true", help="loss on the answer tokens only")
    parser.add_argument("--samples", type=int, default=20, help="prompts per (length, depth) cell")
    parser.add_argument("--samples-1b", type=int, default=10, help="1B: per cell (128K: a fifth)")
    parser.add_argument("--timeout", type=int, default=540, help="seconds per training run")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_passkey"), help="checkpoints")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit(
            "bench_passkey.py: error: needs a CUDA GPU (trains and evaluates on the first visible one)"
        )

    from titan_mla.longctx.eval import plot_heatmaps

    rows, summary, results = (stage_small if args.stage == "small" else stage_1b)(args)
    # The two stages share one result file: keep the other stage's rows and summary.
    path = args.out / f"passkey-{gpu_tag()}.json"
    prefix = "small" if args.stage == "small" else "1b"
    if path.exists():
        previous = json.loads(path.read_text())
        rows = [r for r in previous["rows"] if not r["case"].startswith(prefix)] + rows
        summary = {**previous["summary"], **summary}
    command = (
        "COMMIT=$(git rev-parse HEAD) CUDA_VISIBLE_DEVICES=0 python benchmarks/bench_passkey.py "
        + " ".join(sys.argv[1:])
    )
    path = write_result("passkey", command, rows, summary, args.out)
    png = args.out / (
        f"passkey-{gpu_tag()}.png" if args.stage == "small" else f"passkey-1b-{gpu_tag()}.png"
    )
    plot_heatmaps(results, png)
    print(json.dumps(summary, indent=2))
    print(f"wrote {path}, {path.with_suffix('.md')}, {png}")


if __name__ == "__main__":
    main()
