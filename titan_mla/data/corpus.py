"""Text corpora registered as torchtitan datasets; nothing is downloaded at run time.

The default corpus is the English documentation that every CPython installation carries
(``pydoc_data.topics``: the language reference and library topics ``help()`` shows), so a fresh
machine trains offline. ``builtin:python-stdlib``, the standard library's own .py sources (tens of
MB), is the larger offline corpus for quality comparisons such as the latent ablation. ``--training.dataset_path`` takes a user's own data instead: a .jsonl/.json or
.parquet file (a "text" column), .txt/.md files, a folder of them, or a ``datasets`` folder saved
with ``save_to_disk``.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from pathlib import Path

import datasets
from torchtitan.hf_datasets import DatasetConfig

BUILTIN_CORPUS = "builtin:python-docs"
STDLIB_CORPUS = "builtin:python-stdlib"
BUILTIN_CORPORA = (BUILTIN_CORPUS, STDLIB_CORPUS)
# Every HELD_OUT_EVERY-th documentation text (in topic-name order) is the validation split.
HELD_OUT_EVERY = 10
_FILE_BUILDERS = {
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".txt": "text",
    ".md": "text",
}


def builtin_documents(split: str = "train") -> list[str]:
    """The documentation topics of this Python, train or validation split."""
    from pydoc_data.topics import topics

    _check_split(split, BUILTIN_CORPUS)
    # Several topic names share one text: keep each text once, in topic-name order.
    texts = list(dict.fromkeys(topics[name] for name in sorted(topics)))
    held_out = split == "validation"
    return [text for i, text in enumerate(texts) if (i % HELD_OUT_EVERY == 0) == held_out]


def _check_split(split: str, corpus: str) -> None:
    if split not in ("train", "validation"):
        raise ValueError(f"unknown split '{split}' of {corpus}: use 'train' or 'validation'")


def _skipped_folder(name: str) -> bool:
    return name in ("site-packages", "dist-packages", "test", "tests") or name.endswith("_test")


def stdlib_files(split: str = "train") -> list[Path]:
    """This Python's standard-library .py files (no test suites, no site-packages), sorted by path
    relative to the stdlib root; a file is in the validation split when the stable hash of that
    path falls in 1/HELD_OUT_EVERY of the hash range, so the split does not depend on which
    other files exist."""
    _check_split(split, STDLIB_CORPUS)
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subfolders, names in os.walk(root):
        # Pruned in place, so os.walk never enters test suites or installed packages.
        subfolders[:] = sorted(d for d in subfolders if not _skipped_folder(d))
        for name in names:
            if not name.endswith(".py"):
                continue
            relative = (Path(folder) / name).relative_to(root).as_posix()
            digest = hashlib.sha256(relative.encode()).digest()
            held_out = int.from_bytes(digest[:8], "big") % HELD_OUT_EVERY == 0
            if held_out == (split == "validation"):
                files.append(relative)
    return [root / relative for relative in sorted(files)]


def stdlib_documents(split: str = "train") -> list[str]:
    """The source texts of stdlib_files(split); files that are not UTF-8 are left out."""
    texts = []
    for path in stdlib_files(split):
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            continue
    return texts


def load_corpus(path: str, split: str = "train") -> datasets.Dataset:
    """A dataset with a "text" column: the built-in corpus, or a user's local files."""
    if path == BUILTIN_CORPUS:
        return datasets.Dataset.from_dict({"text": builtin_documents(split)})
    if path == STDLIB_CORPUS:
        return datasets.Dataset.from_dict({"text": stdlib_documents(split)})

    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"dataset path '{path}' does not exist")
    if root.is_dir() and any(
        (root / marker).exists() for marker in ("dataset_info.json", "dataset_dict.json")
    ):
        ds = datasets.load_from_disk(str(root))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(
                    f"dataset folder '{path}' has no '{split}' split (it has {list(ds)})"
                )
            ds = ds[split]
    else:
        files = (
            [root]
            if root.is_file()
            else sorted(f for f in root.rglob("*") if f.suffix in _FILE_BUILDERS)
        )
        builders = {_FILE_BUILDERS.get(f.suffix) for f in files}
        if None in builders or not files:
            raise ValueError(
                f"dataset path '{path}' holds no readable data: expected {sorted(_FILE_BUILDERS)} files "
                "or a folder saved by datasets' save_to_disk"
            )
        if len(builders) > 1:
            raise ValueError(
                f"dataset path '{path}' mixes file kinds {sorted(builders)}: keep one kind"
            )
        builder = builders.pop()
        extra = {"sample_by": "paragraph"} if builder == "text" else {}
        ds = datasets.load_dataset(
            builder, data_files=[str(f) for f in files], split="train", **extra
        )

    if "text" not in ds.column_names:
        raise ValueError(f"dataset '{path}' has no 'text' column (columns: {ds.column_names})")
    if len(ds) == 0 or not any(ds["text"][: min(len(ds), 1000)]):
        raise ValueError(f"dataset '{path}' is empty: it holds no text")
    return ds


def _text(sample: dict) -> str:
    return sample["text"]


def register_datasets() -> None:
    """Add the corpora to torchtitan's dataset registry (the names a config's training.dataset takes)."""
    from torchtitan.hf_datasets.text_datasets import DATASETS

    DATASETS["titan_default"] = DatasetConfig(
        path=BUILTIN_CORPUS, loader=load_corpus, sample_processor=_text
    )
    DATASETS["titan_default_validation"] = DatasetConfig(
        path=BUILTIN_CORPUS,
        loader=lambda path: load_corpus(path, split="validation"),
        sample_processor=_text,
    )
