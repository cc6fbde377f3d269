"""The needle tasks as torchtitan datasets: ``passkey``, ``niah_single``, ``niah_multikey``,
``niah_multivalue``, ``niah_multiquery`` (supervised) and the same names + ``_dpo`` (answer pairs).

Every row is a fresh sample of exactly ``training.seq_len + 1`` tokens (prompt, answer,
end-of-sequence, then end-of-sequence padding that no loss sees), the first needle at a uniformly
random depth; rows never repeat and depend only on the seed, the data-parallel rank and the row
index (the dataloader's checkpointed state). Supervised rows label the answer and its
end-of-sequence token (``needles.answer_only_loss``, default) or every token; DPO rows come as a
(2, seq_len) pair, chosen answer first, labelled on the answer only.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor
from torch.distributed.checkpoint.stateful import Stateful
from torch.utils.data import IterableDataset
from torchtitan.components.dataloader import ParallelAwareDataloader
from torchtitan.components.loss import IGNORE_INDEX
from torchtitan.components.tokenizer import HuggingFaceTokenizer
from torchtitan.config import JobConfig
from torchtitan.hf_datasets import DatasetConfig

from .needles import NeedleGenerator

# Dataset name -> needle task.
NEEDLE_DATASETS = {
    "passkey": "passkey",
    "niah_single": "single",
    "niah_multikey": "multikey",
    "niah_multivalue": "multivalue",
    "niah_multiquery": "multiquery",
}
DPO_SUFFIX = "_dpo"
# Training rows take seeds below this; evaluation samples at and above it.
EVAL_SEED_BASE = 1 << 40


def needle_task(dataset: str) -> tuple[str, bool] | None:
    """(needle task, is a DPO dataset) of a dataset name, or None for other datasets."""
    dpo = dataset.endswith(DPO_SUFFIX)
    task = NEEDLE_DATASETS.get(dataset.removesuffix(DPO_SUFFIX) if dpo else dataset)
    return None if task is None else (task, dpo)


def generator_from_config(
    task: str, job_config: JobConfig, tokenizer: HuggingFaceTokenizer | None = None
) -> NeedleGenerator:
    needles = job_config.needles
    return NeedleGenerator(
        task,
        needles.haystack,
        tokenizer=tokenizer,
        value_digits=needles.value_digits,
        distractors=needles.distractors,
        values=needles.values,
    )


class NeedleDataset(IterableDataset, Stateful):
    def __init__(
        self,
        generator: NeedleGenerator,
        seq_len: int,
        *,
        dpo: bool,
        answer_only_loss: bool = True,
        seed: int = 0,
        dp_rank: int = 0,
        dp_world_size: int = 1,
    ):
        self.generator, self.seq_len, self.dpo = generator, seq_len, dpo
        self.answer_only_loss = answer_only_loss
        self.seed, self.dp_rank, self.dp_world_size = seed, dp_rank, dp_world_size
        self.index = 0

    def _row(self, prompt: list[int], answer: str, answer_only: bool) -> tuple[Tensor, Tensor]:
        eos = self.generator.tokenizer.eos_id
        answer_ids = [*self.generator.tokenizer.encode(answer, add_bos=False, add_eos=False), eos]
        ids = prompt + answer_ids
        pad = self.seq_len + 1 - len(ids)
        labels = ids[1:] + [IGNORE_INDEX] * pad
        if answer_only:
            labels[: len(prompt) - 1] = [IGNORE_INDEX] * (len(prompt) - 1)
        return torch.tensor(ids[:-1] + [eos] * pad), torch.tensor(labels)

    def sample(self, index: int) -> tuple[dict[str, Tensor], Tensor]:
        """Row ``index`` of this rank's stream."""
        seed = (self.seed * 1_000_003 + index) * self.dp_world_size + self.dp_rank
        depth = ((seed * 2654435761) % 10_007) / 10_006  # a deterministic spread over [0, 1]
        record = self.generator.record(self.seq_len + 1, depth, seed, reserve_answer=True)
        if not self.dpo:
            tokens, labels = self._row(record.input_ids, record.answer_text, self.answer_only_loss)
            return {"input": tokens}, labels
        chosen = self._row(record.input_ids, record.answer_text, True)
        rejected = self._row(record.input_ids, record.rejected_text, True)
        return (
            {"input": torch.stack([chosen[0], rejected[0]])},
            torch.stack([chosen[1], rejected[1]]),
        )

    def __iter__(self) -> Iterator[tuple[dict[str, Tensor], Tensor]]:
        while True:
            yield self.sample(self.index)
            self.index += 1

    def state_dict(self) -> dict[str, Any]:
        return {"index": self.index}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.index = state_dict["index"]


def build_needle_dataloader(
    dp_world_size: int,
    dp_rank: int,
    tokenizer: HuggingFaceTokenizer,
    job_config: JobConfig,
    **kwargs: Any,
) -> ParallelAwareDataloader:
    """torchtitan's dataloader over a NeedleDataset, for a needle dataset name."""
    task, dpo = needle_task(job_config.training.dataset)
    dataset = NeedleDataset(
        generator_from_config(task, job_config, tokenizer),
        job_config.training.seq_len,
        dpo=dpo,
        answer_only_loss=job_config.needles.answer_only_loss,
        seed=job_config.debug.seed or 0,
        dp_rank=dp_rank,
        dp_world_size=dp_world_size,
    )
    return ParallelAwareDataloader(
        dataset,
        dp_rank=dp_rank,
        dp_world_size=dp_world_size,
        **{
            **asdict(job_config.training.dataloader),
            "batch_size": job_config.training.local_batch_size,
        },
    )


def with_needle_dataloader(build_dataloader_fn):
    """A dataloader builder that serves the needle datasets and leaves others to ``build_dataloader_fn``."""

    def build(*, job_config: JobConfig, **kwargs: Any) -> ParallelAwareDataloader:
        if needle_task(job_config.training.dataset) is not None:
            return build_needle_dataloader(job_config=job_config, **kwargs)
        return build_dataloader_fn(job_config=job_config, **kwargs)

    return build


def _plain_texts(task: str) -> Any:
    """Prompt + answer texts (1024 tokens, repeat haystack) for torchtitan's plain text pipeline."""
    import datasets

    generator = NeedleGenerator(task)
    records = [generator.record(1024, (i % 11) / 10, i) for i in range(256)]
    return datasets.Dataset.from_dict({"text": [r.prompt + r.answer_text for r in records]})


def register_needle_datasets() -> None:
    """Add the needle datasets to torchtitan's registry. Through the titan_mla TrainSpec they are
    generated on the fly (build_needle_dataloader); torchtitan's own text pipeline sees 256 fixed
    prompt + answer texts per task."""
    from torchtitan.hf_datasets.text_datasets import DATASETS

    for name, task in NEEDLE_DATASETS.items():
        for dataset in (name, name + DPO_SUFFIX):
            DATASETS[dataset] = DatasetConfig(
                path=f"needles:{task}",
                loader=lambda path, task=task: _plain_texts(task),
                sample_processor=lambda sample: sample["text"],
            )
