"""titan_mla's additions to torchtitan's JobConfig, merged in through ``job.custom_config_module``:

[job]
custom_config_module = "titan_mla.config"

[model]
kernels = "triton"   # or "torch": the same model through plain PyTorch ops, to compare
"""

from dataclasses import dataclass, field
from typing import Literal

from .tracking import MLflow


@dataclass
class Model:
    kernels: Literal["triton", "torch"] = "triton"
    """RMSNorm and RoPE through titan_mla's Triton custom ops ("triton") or plain PyTorch ("torch").
    On CPU tensors the Triton ops run their PyTorch reference."""


@dataclass
class Needles:
    """The needle-in-a-haystack samples of the ``passkey`` / ``niah_*`` datasets (titan_mla.longctx)."""

    haystack: Literal["repeat", "corpus", "noise"] = "repeat"
    value_digits: int = 5
    distractors: int = 3
    """Other keys' needles in ``niah_multikey``."""
    values: int = 2
    """Needles asked for in ``niah_multivalue`` / ``niah_multiquery``."""
    answer_only_loss: bool = True
    """Supervised loss on the answer tokens only; false: on the whole prompt and answer."""


@dataclass
class DPO:
    """Direct Preference Optimization against a frozen copy of the starting weights."""

    enable: bool = False
    """Train with the DPO loss; needs a ``*_dpo`` dataset (chosen/rejected answer pairs)."""
    beta: float = 0.1


@dataclass
class JobConfig:
    model: Model = field(default_factory=Model)
    mlflow: MLflow = field(default_factory=MLflow)
    needles: Needles = field(default_factory=Needles)
    dpo: DPO = field(default_factory=DPO)
