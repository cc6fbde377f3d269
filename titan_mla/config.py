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
class JobConfig:
    model: Model = field(default_factory=Model)
    mlflow: MLflow = field(default_factory=MLflow)
