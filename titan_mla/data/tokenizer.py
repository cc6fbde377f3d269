"""The project's tokenizer: byte-level BPE trained on the default corpus and shipped in the package.

Rebuild it with ``python -m titan_mla.data.tokenizer`` (deterministic for a given tokenizers version).
The configs point ``model.hf_assets_path`` at it (``./titan_mla/data/tokenizer``); a folder with
another tokenizer.json uses that tokenizer instead, and the empty string means the shipped one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torchtitan.components.tokenizer import HuggingFaceTokenizer
from torchtitan.config import JobConfig

from .corpus import builtin_documents

TOKENIZER_DIR = Path(__file__).parent / "tokenizer"
BOS_TOKEN, EOS_TOKEN = "<|bos|>", "<|eos|>"
DEFAULT_VOCAB_SIZE = 8192


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: Path) -> None:
    """Train a byte-level BPE on texts; write tokenizer.json and tokenizer_config.json to out_dir."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "add_bos_token": True,
        "add_eos_token": True,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def build_tokenizer(job_config: JobConfig) -> HuggingFaceTokenizer:
    path = job_config.model.hf_assets_path or str(TOKENIZER_DIR)
    if not (Path(path) / "tokenizer.json").exists():
        raise FileNotFoundError(
            f"model.hf_assets_path='{path}' holds no tokenizer.json; "
            f"the tokenizer shipped with titan_mla is at '{TOKENIZER_DIR}'"
        )
    return HuggingFaceTokenizer(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    parser.add_argument("--out", type=Path, default=TOKENIZER_DIR)
    args = parser.parse_args()
    train_tokenizer(builtin_documents("train"), args.vocab_size, args.out)
    print(
        f"wrote {args.out}/tokenizer.json ({Tokenizer.from_file(str(args.out / 'tokenizer.json')).get_vocab_size()} tokens)"
    )


if __name__ == "__main__":
    main()
