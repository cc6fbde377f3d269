"""Long context: needle-in-a-haystack data (passkey and RULER-style tasks, DPO pairs), DPO training,
passkey/NIAH evaluation by context length x needle depth, and YaRN context-extension flavors.

Importing titan_mla registers the needle datasets and the flavors below (register()).
"""

from __future__ import annotations

import dataclasses

from titan_mla.models import mla_flavors

from .datasets import NEEDLE_DATASETS, register_needle_datasets, with_needle_dataloader
from .needles import HAYSTACKS, TASKS, NeedleGenerator, NeedleRecord, is_correct, parse_answers

# YaRN extensions of the 1B flavor trained at 4096 positions: to 32K (x8) and 128K (x32).
YARN_FLAVORS = {
    "1B_yarn32k": dataclasses.replace(
        mla_flavors["1B"], original_seq_len=4096, rope_factor=8.0, mscale=1.0
    ),
    "1B_yarn128k": dataclasses.replace(
        mla_flavors["1B"], original_seq_len=4096, rope_factor=32.0, mscale=1.0
    ),
}


def register() -> None:
    """Add the needle datasets and the YaRN flavors (to the titan_mla flavor table)."""
    register_needle_datasets()
    for name, args in YARN_FLAVORS.items():
        mla_flavors.setdefault(name, args)


__all__ = [
    "HAYSTACKS",
    "NEEDLE_DATASETS",
    "TASKS",
    "YARN_FLAVORS",
    "NeedleGenerator",
    "NeedleRecord",
    "is_correct",
    "parse_answers",
    "register",
    "with_needle_dataloader",
]
