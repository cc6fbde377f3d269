"""Needle retrieval accuracy by context length x needle depth, through the inference engine.

    python -m titan_mla.longctx.eval --job.config_file train_configs/passkey_debug.toml \\
        --checkpoint outputs/passkey_debug/checkpoint --lengths 256 512 1024 --depths 0 0.5 1 \\
        --out outputs/passkey_debug/eval [--rope-factor 4 --original-seq-len 256]

Each cell prefills ``--samples`` prompts of that many tokens (chunked, into the paged latent cache)
and decodes the answer greedily; a sample is right when the first numbers of its completion are
its answers. ``--rope-factor`` applies YaRN at evaluation (from ``--original-seq-len``, default the
training length) to a model trained without it. Writes ``<out>/<name>.json`` (accuracy per cell,
per length, overall, a few completions), ``<out>/<name>.png`` (heatmap) and TensorBoard scalars
``<name>/accuracy/len_<L>`` (step = depth in percent) and ``<name>/accuracy`` under ``<out>/tb``.

``passkey_accuracy_full_forward`` scores the same prompts through a model's plain forward instead
of the engine, so models without a latent cache (MHA, GQA) are scored too.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torchtitan.components.tokenizer import HuggingFaceTokenizer

import titan_mla  # noqa: F401  (first: picks the device for torchtitan)
from titan_mla.inference.checkpoint import checkpoint_cli_parser
from titan_mla.inference.generator import Generator

from .datasets import EVAL_SEED_BASE
from .needles import HAYSTACKS, TASKS, NeedleGenerator, NeedleRecord, is_correct

# Prompts of L - ANSWER_ROOM tokens at a context length L: the answer (" 12345.", at most 6 tokens)
# then ends within L positions, as in the training rows, instead of at positions (and query-to-BOS
# distances) a model trained at L never saw.
ANSWER_ROOM = 8
# Needle depths of the passkey scores (the ablations, bench_passkey, this CLI): start, quarters, end.
PASSKEY_DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]


def cache_seq_len(lengths: list[int], page_size: int = 64) -> int:
    """Tokens per sequence the cache must hold for prompts of ``lengths`` and their answers (up to
    32 tokens), in whole pages so every sequence of a full batch gets its pages."""
    return -(-(max(lengths) + 32) // page_size) * page_size


def with_yarn(
    generator: Generator,
    rope_factor: float,
    original_seq_len: int,
    max_batch: int,
    max_seq_len: int,
    chunk_size: int,
) -> Generator:
    """A generator over the same weights whose rotary embedding is YaRN-scaled by rope_factor."""
    model = generator.model
    model.model_args = dataclasses.replace(
        model.model_args, rope_factor=rope_factor, original_seq_len=original_seq_len
    )
    return Generator(
        model,
        generator.tokenizer,
        max_batch=max_batch,
        max_seq_len=max_seq_len,
        chunk_size=chunk_size,
        cuda_graph=False,
    )


def _complete(generator: Generator, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Greedy completions of ``new_tokens`` tokens for prompts of token ids."""
    engine = generator.engine
    seqs = list(range(len(prompts)))
    try:
        tokens = engine.prefill(prompts, seqs).argmax(-1)
        out = [tokens]
        for _ in range(new_tokens - 1):
            tokens = engine.decode(tokens[:, None], seqs)[:, -1].argmax(-1)
            out.append(tokens)
    finally:
        for seq in seqs:
            engine.cache.free(seq)
    return torch.stack(out, dim=1).tolist()


def _answer_tokens(tokenizer: HuggingFaceTokenizer, records: list[NeedleRecord]) -> int:
    """Tokens to generate for a group of prompts: the longest of their answers."""
    return max(len(tokenizer.encode(r.answer_text, add_bos=False, add_eos=False)) for r in records)


def evaluate(
    generator: Generator,
    needles: NeedleGenerator,
    lengths: list[int],
    depths: list[float],
    *,
    samples: int = 10,
    batch: int = 1,
    log=print,
) -> dict[str, Any]:
    """Accuracy of every (length, depth) cell over ``samples`` prompts (seeds shared by all cells
    of a row, disjoint from the training rows' seeds)."""
    tokenizer = generator.tokenizer
    accuracy, examples = [], []
    start = time.perf_counter()
    for length in lengths:
        row = []
        for depth in depths:
            records = [needles.record(length, depth, EVAL_SEED_BASE + i) for i in range(samples)]
            correct = 0
            for first in range(0, samples, batch):
                group = records[first : first + batch]
                completions = _complete(
                    generator, [r.input_ids for r in group], _answer_tokens(tokenizer, group)
                )
                for record, ids in zip(group, completions, strict=True):
                    text = tokenizer.decode(ids)
                    correct += is_correct(text, record.answers)
                    if len(examples) < 8 and record.seed == EVAL_SEED_BASE:
                        examples.append(
                            {
                                "length": length,
                                "depth": depth,
                                "answers": record.answers,
                                "completion": text,
                            }
                        )
            row.append(correct / samples)
            log(
                f"length {length:>7} depth {depth:.2f}: {correct}/{samples} ({time.perf_counter() - start:.0f}s)"
            )
        accuracy.append(row)
    return {
        "task": needles.task,
        "haystack": needles.haystack,
        "lengths": lengths,
        "depths": depths,
        "samples": samples,
        "accuracy": accuracy,  # [length][depth]
        "accuracy_by_length": {
            str(n): sum(r) / len(r) for n, r in zip(lengths, accuracy, strict=True)
        },
        "accuracy_overall": sum(map(sum, accuracy)) / (len(lengths) * len(depths)),
        "seconds": time.perf_counter() - start,
        "examples": examples,
    }


@torch.no_grad()
def complete_full_forward(
    model: torch.nn.Module, prompts: torch.Tensor, new_tokens: int
) -> torch.Tensor:
    """Greedy completions (batch, new_tokens) of ``prompts`` (batch, length) through the model's
    plain forward, no cache: any attention, one full forward per new token. The forward always
    sees all ``model_args.max_seq_len`` positions: causal attention makes a position's logits
    independent of the positions after it (zeros, then the tokens still to come), and one shape
    lets a compiled model reuse one graph."""
    batch, length = prompts.shape
    window = model.model_args.max_seq_len
    if length + new_tokens - 1 > window:
        raise ValueError(
            f"{length} prompt tokens and {new_tokens} new tokens need "
            f"{length + new_tokens - 1} positions; the model has max_seq_len={window}"
        )
    tokens = prompts.new_zeros(batch, window)
    tokens[:, :length] = prompts
    completion = []
    for position in range(length - 1, length - 1 + new_tokens):
        next_tokens = model(tokens)[:, position].argmax(-1)
        completion.append(next_tokens)
        if position + 1 < window:
            tokens[:, position + 1] = next_tokens
    return torch.stack(completion, dim=1)


def passkey_accuracy_full_forward(
    model: torch.nn.Module,
    tokenizer: HuggingFaceTokenizer,
    length: int,
    depths: list[float],
    samples: int,
    device: torch.device,
    *,
    batch: int | None = None,
) -> dict[str, Any]:
    """Passkey accuracy (repeat haystack) of any model with the training forward, MHA and GQA as
    well as MLA: at every depth, ``samples`` prompts of ``length`` tokens (the seeds of
    ``evaluate``), completed greedily by complete_full_forward ``batch`` prompts at a time
    (default: all at once) and scored as ``evaluate`` scores them."""
    needles = NeedleGenerator("passkey", "repeat", tokenizer=tokenizer)
    records = [
        needles.record(length, depth, EVAL_SEED_BASE + i)
        for depth in depths
        for i in range(samples)
    ]
    batch = batch or len(records)
    texts = []
    for first in range(0, len(records), batch):
        group = records[first : first + batch]
        prompts = torch.tensor([r.input_ids for r in group], device=device)
        ids = complete_full_forward(model, prompts, _answer_tokens(tokenizer, group))
        texts += [tokenizer.decode(row) for row in ids.tolist()]
    correct = [is_correct(t, r.answers) for t, r in zip(texts, records, strict=True)]
    by_depth = [sum(correct[i : i + samples]) / samples for i in range(0, len(records), samples)]
    completions = [texts[i : i + samples] for i in range(0, len(records), samples)]
    return {
        "length": length,
        "depths": depths,
        "samples": samples,
        "accuracy": sum(by_depth) / len(by_depth),
        "accuracy_by_depth": by_depth,
        "completions": completions,  # [depth][sample]
    }


def plot_heatmaps(results: dict[str, dict[str, Any]], path: Path) -> Path:
    """One accuracy heatmap (length x depth) per named result, side by side, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = max(len(r["depths"]) for r in results.values())
    rows = max(len(r["lengths"]) for r in results.values())
    size = (1.5 + (1.0 + 0.9 * columns) * len(results), 1.8 + 0.6 * rows)
    fig, axes = plt.subplots(1, len(results), figsize=size, squeeze=False)
    for ax, (name, result) in zip(axes[0], results.items(), strict=True):
        image = ax.imshow(result["accuracy"], vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(result["depths"])), [f"{d:.0%}" for d in result["depths"]])
        ax.set_yticks(range(len(result["lengths"])), [str(n) for n in result["lengths"]])
        for i, row in enumerate(result["accuracy"]):
            for j, value in enumerate(row):
                ax.text(j, i, f"{value:.0%}", ha="center", va="center", fontsize=8)
        ax.set_xlabel("needle depth")
        if ax is axes[0][0]:
            ax.set_ylabel("context length (tokens)")
        ax.set_title(f"{name}: {result['accuracy_overall']:.0%}")
    fig.colorbar(image, ax=axes[0].tolist(), label="accuracy")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def log_tensorboard(name: str, result: dict[str, Any], logdir: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with contextlib.closing(SummaryWriter(str(logdir))) as writer:
        for length, row in zip(result["lengths"], result["accuracy"], strict=True):
            for depth, value in zip(result["depths"], row, strict=True):
                writer.add_scalar(f"{name}/accuracy/len_{length}", value, round(depth * 100))
        for length, value in result["accuracy_by_length"].items():
            writer.add_scalar(f"{name}/accuracy_by_length", value, int(length))
        writer.add_scalar(f"{name}/accuracy", result["accuracy_overall"], 0)


def write_outputs(name: str, result: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_heatmaps({name: result}, out / f"{name}.png")
    log_tensorboard(name, result, out / "tb")


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = checkpoint_cli_parser("python -m titan_mla.longctx.eval", __doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", required=True, help="prompt tokens")
    parser.add_argument("--depths", type=float, nargs="+", default=list(PASSKEY_DEPTHS))
    parser.add_argument("--task", choices=TASKS, default="passkey")
    parser.add_argument("--haystack", choices=HAYSTACKS, default="repeat")
    parser.add_argument("--samples", type=int, default=10, help="prompts per cell")
    parser.add_argument("--batch", type=int, default=1, help="prompts prefilled together")
    parser.add_argument(
        "--rope-factor", type=float, help="apply YaRN with this factor at evaluation"
    )
    parser.add_argument(
        "--original-seq-len", type=int, help="YaRN's original length (default: training seq_len)"
    )
    parser.add_argument("--chunk-size", type=int, default=2048, help="prefill tokens per chunk")
    parser.add_argument("--device", help="default: cuda when available, else cpu")
    parser.add_argument("--out", type=Path, required=True, help="folder for the JSON, PNG and tb/")
    parser.add_argument("--name", default="passkey_eval", help="file stem and TensorBoard tag")
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> None:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    max_seq_len = cache_seq_len(args.lengths)
    try:
        generator = Generator.from_checkpoint(
            args.config_file,
            args.checkpoint,
            overrides=overrides,
            device=args.device,
            max_batch=args.batch,
            max_seq_len=max_seq_len,
            chunk_size=args.chunk_size,
            cuda_graph=False,
        )
        if args.rope_factor:
            original = args.original_seq_len or generator.model.model_args.max_seq_len
            generator = with_yarn(
                generator, args.rope_factor, original, args.batch, max_seq_len, args.chunk_size
            )
        needles = NeedleGenerator(args.task, args.haystack, tokenizer=generator.tokenizer)
        result = evaluate(
            generator, needles, args.lengths, args.depths, samples=args.samples, batch=args.batch
        )
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"titan_mla.longctx.eval: error: {err}")
    result["checkpoint"] = str(args.checkpoint)
    result["rope_factor"] = args.rope_factor or generator.model.model_args.rope_factor
    write_outputs(args.name, result, args.out)
    print(
        f"accuracy {result['accuracy_overall']:.1%}; wrote {args.out}/{args.name}.json, .png, tb/"
    )


if __name__ == "__main__":
    main()
