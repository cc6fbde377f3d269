"""Export a titan_mla DCP checkpoint as a Hugging Face transformers DeepseekV3 model directory.

    python -m titan_mla.export_hf --job.config_file train_configs/debug_model.toml \\
        --checkpoint outputs/debug_model/checkpoint --out hf/debug_model

The job config is the training one (``--section.key value`` overrides work as for training); its
flavor must match the checkpoint and its ``model.hf_assets_path`` tokenizer files are copied. Load
the result with ``transformers.AutoModelForCausalLM.from_pretrained("hf/debug_model")``.
"""

from __future__ import annotations

import sys

import torch

import titan_mla  # noqa: F401  (first: picks the device for torchtitan)
from titan_mla.inference.checkpoint import checkpoint_cli_parser
from titan_mla.interop.hf import DEFAULT_MAX_SHARD_BYTES, export_checkpoint


def main(argv: list[str] | None = None) -> None:
    parser = checkpoint_cli_parser("python -m titan_mla.export_hf", __doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder (must be empty or new)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: as stored")
    parser.add_argument(
        "--max-shard-gb",
        type=float,
        default=DEFAULT_MAX_SHARD_BYTES / 2**30,
        help="largest safetensors file, in GiB (default %(default)s)",
    )
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        export_checkpoint(
            args.config_file,
            args.checkpoint,
            args.out,
            overrides=overrides,
            dtype=getattr(torch, args.dtype) if args.dtype else None,
            max_shard_bytes=int(args.max_shard_gb * 2**30),
            force=args.force,
        )
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        sys.exit(f"titan_mla.export_hf: error: {err}")


if __name__ == "__main__":
    main()
