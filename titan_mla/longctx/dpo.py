"""Direct Preference Optimization (Rafailov et al., 2023) in torchtitan's trainer.

    ./run_train.sh --job.config_file train_configs/passkey_dpo_debug.toml

With ``dpo.enable`` titan_mla.train runs DPOTrainer on a ``*_dpo`` dataset, whose rows are
(chosen, rejected) pairs labelled on the answer tokens. The reference model is a frozen copy of
the policy's weights as they are when training starts: the checkpoint the run loaded
(``checkpoint.initial_load_path``), or the seeded initialization without one. Data parallelism
(FSDP) only: no tensor, context or pipeline parallelism.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torchtitan.components.loss import IGNORE_INDEX
from torchtitan.config import TORCH_DTYPE_MAP
from torchtitan.train import Trainer

from titan_mla.models import MLATransformer
from titan_mla.models.rope import rope_cos_sin


def sequence_logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    """Sum over the labelled positions of log p(label) (rows,), for logits (rows, seq, vocab)
    and labels (rows, seq) holding IGNORE_INDEX where nothing is scored."""
    rows, cols = (labels != IGNORE_INDEX).nonzero(as_tuple=True)
    # Only the scored positions: a long prompt's (seq x vocab) log-softmax is never formed.
    picked = logits[rows, cols].float().log_softmax(-1)
    picked = picked.gather(-1, labels[rows, cols].unsqueeze(-1)).squeeze(-1)
    return torch.zeros(labels.shape[0], device=logits.device).index_add(0, rows, picked)


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    reference_chosen: Tensor,
    reference_rejected: Tensor,
    beta: float,
) -> Tensor:
    """Per-pair sigmoid DPO loss: -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), from
    sequence log-probabilities of the chosen and rejected answers."""
    margin = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    return -F.logsigmoid(beta * margin)


class DPOTrainer(Trainer):
    """torchtitan's Trainer with the DPO loss. A batch of ``training.local_batch_size`` pairs
    arrives as inputs and labels of shape (pairs, 2, seq_len), chosen first."""

    def __init__(self, job_config) -> None:
        super().__init__(job_config)
        unsupported = {
            "pipeline": self.parallel_dims.pp_enabled,
            "context": self.parallel_dims.cp_enabled,
            "tensor": self.parallel_dims.tp_enabled,  # logits would be sharded over the vocabulary
        }
        if any(unsupported.values()):
            names = [name for name, on in unsupported.items() if on]
            raise ValueError(
                f"DPO does not support {' or '.join(names)} parallelism; it supports data "
                "parallelism (FSDP)"
            )
        self.beta = job_config.dpo.beta
        batch_degree = (
            self.parallel_dims.get_mesh("batch").size() if self.parallel_dims.dp_enabled else 1
        )
        # The loss of one microbatch is its pairs' sum over every pair of the global batch:
        # gradients are summed over microbatches and data-parallel ranks.
        self.pairs_per_step = (
            job_config.training.local_batch_size * self.gradient_accumulation_steps * batch_degree
        )
        self.reference: MLATransformer | None = None

    def _build_reference(self) -> MLATransformer:
        """A frozen copy of the policy's current weights, whole on every rank."""
        policy = self.model_parts[0]
        args = copy.deepcopy(policy.model_args)
        full = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True))
        dtype = TORCH_DTYPE_MAP[
            self.job_config.training.mixed_precision_param
            if self.device.type == "cuda"
            else self.job_config.training.dtype
        ]
        with torch.device("meta"):
            reference = MLATransformer(args)
        reference = reference.to(dtype).to_empty(device=self.device)
        reference.load_state_dict(full)
        reference.rope_cache = rope_cos_sin(args, self.device)
        return reference.eval().requires_grad_(False)

    def forward_backward_step(
        self, *, input_dict: dict[str, Tensor], labels: Tensor, global_valid_tokens: Tensor
    ) -> Tensor:
        if self.reference is None:
            # Built at the first step: after the trainer has loaded its checkpoint.
            if self.step > 1:
                raise ValueError(
                    "resuming a DPO run is not supported: the reference model would be the "
                    "resumed weights; start from checkpoint.initial_load_path instead"
                )
            self.reference = self._build_reference()
        inputs = input_dict["input"]
        if inputs.ndim != 3 or inputs.shape[1] != 2:
            raise ValueError(
                f"DPO needs (pairs, 2, seq_len) batches from a '*_dpo' dataset, got {tuple(inputs.shape)}"
            )
        inputs, labels = inputs.flatten(0, 1), labels.flatten(0, 1)
        with self.train_context(), self.maybe_enable_amp:
            with torch.no_grad():
                reference = sequence_logprobs(self.reference(inputs), labels).view(-1, 2)
            policy = sequence_logprobs(self.model_parts[0](inputs), labels).view(-1, 2)
            losses = dpo_loss(
                policy[:, 0], policy[:, 1], reference[:, 0], reference[:, 1], self.beta
            )
            loss = losses.sum() / self.pairs_per_step
        loss.backward()
        return loss
