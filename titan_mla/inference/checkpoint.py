"""Load an MLATransformer from a torchtitan 0.2.2 DCP checkpoint, with no process group.

What torchtitan writes under ``<dump_folder>/checkpoint/step-N`` (a ``.metadata`` file and
``__<rank>_0.distcp`` shards):

- every ``checkpoint.interval`` steps: the full training state, flattened into one namespace: the
  model's weights under their own names (``tok_embeddings.weight``, ``layers.0.attention.wq.weight``,
  ...) beside ``optimizer.*``, ``lr_scheduler.*``, ``dataloader.*`` and ``train_state.*``;
- the last step with ``checkpoint.last_save_model_only`` (and the seed checkpoint ``step-0``): the
  model's weights alone, same names, in ``checkpoint.export_dtype``.

Other writers nest the model under ``model.`` (``model.tok_embeddings.weight``); both are read.
``torch.distributed.checkpoint.load`` copies each stored tensor into the matching model tensor in
place (casting the dtype), whatever the number of ranks that wrote the shards.
"""

from __future__ import annotations

import argparse
import re
import warnings
from pathlib import Path

import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

MODEL_PREFIXES = ("", "model.")
_STEP_FOLDER = re.compile(r"step-(\d+)")


def checkpoint_cli_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The argument parser the commands that load a training checkpoint start from: the job config
    the checkpoint was trained with and the checkpoint folder; other ``--section.key`` options are
    left to the caller, as job config overrides."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        allow_abbrev=False,
        epilog="Other --section.key options override the job config, as for training.",
    )
    parser.add_argument(
        "--job.config_file",
        "--job.config-file",
        dest="config_file",
        required=True,
        help="the training config of the checkpoint",
    )
    parser.add_argument("--checkpoint", required=True, help="DCP step-N folder or its parent")
    return parser


def resolve_checkpoint(path: str | Path) -> Path:
    """The step folder to load: ``path`` itself, or the latest ``step-N`` inside it."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder '{path}' does not exist")
    if (path / ".metadata").is_file():
        return path
    steps = {
        int(match[1]): child
        for child in path.iterdir()
        if (match := _STEP_FOLDER.fullmatch(child.name)) and (child / ".metadata").is_file()
    }
    if not steps:
        raise FileNotFoundError(
            f"'{path}' is not a DCP checkpoint (no .metadata) and holds no step-N checkpoints"
        )
    return steps[max(steps)]


def find_model_weights(checkpoint: str | Path, model: nn.Module, flavor: str) -> tuple[Path, str]:
    """The step folder of ``checkpoint`` and the prefix of the model's weights in it, after checking
    that it holds every weight of ``model`` (which may be on the meta device) with its shape.

    Raises ValueError naming the tensors when weights are missing or of other shapes (a
    checkpoint of another flavor).
    """
    folder = resolve_checkpoint(checkpoint)
    stored = FileSystemReader(folder).read_metadata().state_dict_metadata
    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    prefix = max(MODEL_PREFIXES, key=lambda p: sum(p + name in stored for name in shapes))
    found = [name for name in shapes if prefix + name in stored]
    if not found:
        raise ValueError(
            f"checkpoint '{folder}' holds no titan_mla model weights (it holds e.g. "
            f"{sorted(stored)[:3]})"
        )
    missing = [name for name in shapes if prefix + name not in stored]
    mismatched = [
        f"{name} {tuple(stored[prefix + name].size)} vs {shapes[name]}"
        for name in found
        if not isinstance(stored[prefix + name], TensorStorageMetadata)
        or tuple(stored[prefix + name].size) != shapes[name]
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} are missing (e.g. {', '.join(missing[:2])})")
    if mismatched:
        problems.append(
            f"{len(mismatched)} have another shape (checkpoint vs flavor: "
            + "; ".join(mismatched[:2])
            + ")"
        )
    if problems:
        raise ValueError(
            f"checkpoint '{folder}' does not match flavor '{flavor}': of the flavor's "
            f"{len(shapes)} weights, " + ", ".join(problems)
        )
    return folder, prefix


def load_model_weights(model: nn.Module, folder: Path, prefix: str) -> None:
    """Copy the weights stored under ``prefix`` in the DCP checkpoint ``folder`` into ``model``."""
    state_dict = {prefix + name: tensor for name, tensor in model.state_dict().items()}
    with warnings.catch_warnings():
        # One process and no process group is the intended use here.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state_dict, checkpoint_id=folder)
