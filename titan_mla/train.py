"""Training entry point: torchtitan's trainer, unchanged, with titan_mla registered.

    torchrun ... -m titan_mla.train --job.config_file train_configs/debug_model.toml [overrides]

Before the trainer starts, the job config is checked for mistakes that would otherwise surface deep
inside torchtitan (an unknown flavor or dataset, a dataset path that does not exist).
"""

from __future__ import annotations

import sys
from pathlib import Path

import titan_mla  # first: picks the device, registers the TrainSpec and datasets)
from titan_mla.data import BUILTIN_CORPORA


def check_job_config(job_config) -> None:
    """Raise ValueError naming the problem when the job cannot run as configured."""
    from torchtitan.hf_datasets.text_datasets import DATASETS
    from torchtitan.protocols.train_spec import get_train_spec

    model = job_config.model
    if model.name == titan_mla.TRAIN_SPEC_NAME:
        flavors = get_train_spec(model.name).model_args
        if model.flavor not in flavors:
            raise ValueError(
                f"unknown model.flavor '{model.flavor}'; titan_mla has {sorted(flavors)}"
            )
    training = job_config.training
    if training.dataset not in DATASETS:
        raise ValueError(
            f"unknown training.dataset '{training.dataset}'; registered: {sorted(DATASETS)}"
        )
    dpo = getattr(getattr(job_config, "dpo", None), "enable", False)
    if dpo != training.dataset.endswith("_dpo"):
        raise ValueError(
            f"dpo.enable={dpo} needs a {'' if dpo else 'non-'}DPO dataset (a '*_dpo' name), "
            f"not training.dataset '{training.dataset}'"
        )
    path = training.dataset_path
    if path and path not in BUILTIN_CORPORA and not Path(path).expanduser().exists():
        raise ValueError(f"training.dataset_path '{path}' does not exist")


def trainer_class(job_config) -> type:
    """torchtitan's Trainer, or titan_mla.longctx's DPOTrainer when ``dpo.enable`` is set."""
    from torchtitan.train import Trainer

    if getattr(getattr(job_config, "dpo", None), "enable", False):
        from titan_mla.longctx.dpo import DPOTrainer

        return DPOTrainer
    return Trainer


def main() -> None:
    from torchtitan.config import ConfigManager
    from torchtitan.train import main as torchtitan_main

    import titan_mla.tensorboard  # noqa: F401  (profiler traces TensorBoard's plugin reads, CPU profiling)

    try:
        job_config = ConfigManager().parse_args()
        check_job_config(job_config)
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"titan_mla: error: {err}")
    torchtitan_main(trainer_class(job_config))


if __name__ == "__main__":
    main()
