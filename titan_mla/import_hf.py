"""Import a Hugging Face DeepseekV3 model directory (as export_hf writes) as a titan_mla DCP
checkpoint of the model weights, to train further.

    python -m titan_mla.import_hf --job.config_file train_configs/debug_model.toml \\
        --hf-dir hf/debug_model --out outputs/imported/step-0
    ./run_train.sh --checkpoint.enable --checkpoint.initial_load_path outputs/imported/step-0

The directory's config.json must describe the job config's flavor (the error names each field that
differs).
"""

from __future__ import annotations

import argparse
import sys

import torch

import titan_mla  # noqa: F401  (first: picks the device for torchtitan)
from titan_mla.interop.hf import import_checkpoint


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m titan_mla.import_hf",
        description=__doc__.splitlines()[0],
        allow_abbrev=False,
        epilog="Other --section.key options override the job config, as for training.",
    )
    parser.add_argument("--job.config_file", "--job.config-file", dest="config_file", required=True)
    parser.add_argument("--hf-dir", required=True, help="folder with config.json and safetensors")
    parser.add_argument("--out", required=True, help="DCP checkpoint folder to write (e.g. step-0)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: as stored")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        import_checkpoint(
            args.config_file,
            args.hf_dir,
            args.out,
            overrides=overrides,
            dtype=getattr(torch, args.dtype) if args.dtype else None,
            force=args.force,
        )
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        sys.exit(f"titan_mla.import_hf: error: {err}")


if __name__ == "__main__":
    main()
