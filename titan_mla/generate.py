"""Generate text from a titan_mla checkpoint.

    python -m titan_mla.generate --job.config_file train_configs/debug_model.toml \\
        --checkpoint outputs/debug_model/checkpoint/step-30 --prompt "The list" --max-new-tokens 64

The job config is the training one (any ``--section.key value`` override works as for training:
``--model.flavor``, ``--model.hf_assets_path``, ...). ``--checkpoint`` is a DCP step folder, or the
checkpoint folder for its latest step. One prompt streams its completion as it is generated; several
are printed when done. Throughput of prefill and decode comes last.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import titan_mla  # noqa: F401  (first: picks the device for torchtitan)
from titan_mla.inference.cache import CacheFullError
from titan_mla.inference.checkpoint import checkpoint_cli_parser
from titan_mla.inference.generator import Generator


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Our options, and the job config overrides for torchtitan's ConfigManager."""
    parser = checkpoint_cli_parser("python -m titan_mla.generate", __doc__.splitlines()[0])
    parser.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: bf16 on cuda")
    parser.add_argument("--max-seq-len", type=int, help="prompt + completion tokens per sequence")
    parser.add_argument("--fp8-cache", action="store_true", help="store latents as float8 e4m3")
    parser.add_argument("--chunk-size", type=int, default=2048, help="prefill tokens per chunk")
    parser.add_argument("--no-cuda-graph", action="store_true", help="decode eagerly on CUDA")
    parser.add_argument("--ignore-eos", action="store_true", help="always generate every token")
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> None:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        start = time.perf_counter()
        generator = Generator.from_checkpoint(
            args.config_file,
            args.checkpoint,
            overrides=overrides,
            device=args.device,
            dtype=getattr(torch, args.dtype) if args.dtype else None,
            max_batch=len(args.prompt),
            max_seq_len=args.max_seq_len,
            fp8_cache=args.fp8_cache,
            chunk_size=args.chunk_size,
            cuda_graph=not args.no_cuda_graph,
        )
        print(
            f"loaded {args.checkpoint} on {generator.device} in {time.perf_counter() - start:.1f}s",
            file=sys.stderr,
        )
        stream = len(args.prompt) == 1
        if stream:
            print(args.prompt[0], end="", flush=True)
        completions = generator.generate(
            args.prompt,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            stream_callback=(lambda _, text: print(text, end="", flush=True)) if stream else None,
            stop_at_eos=not args.ignore_eos,
        )
    except (FileNotFoundError, ValueError, CacheFullError) as err:
        sys.exit(f"titan_mla.generate: error: {err}")
    if stream:
        print()
    else:
        for i, completion in enumerate(completions):
            print(f"[{i}] {completion.prompt}{completion.text}")
    stats = completions[0]
    prompt_tokens = sum(c.prompt_tokens for c in completions)
    new_tokens = sum(len(c.token_ids) for c in completions)
    print(
        f"prefill: {prompt_tokens} tokens, {stats.prefill_tokens_per_s:.1f} tokens/s | "
        f"decode: {new_tokens} tokens, {stats.decode_tokens_per_s:.1f} tokens/s"
    )


if __name__ == "__main__":
    main()
