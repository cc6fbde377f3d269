"""Apply parallelisms to an MLATransformer, in torchtitan's order: TP -> CP -> AC -> compile -> FSDP.

Degrees come from the job's [parallelism] section (torchtitan's ParallelDims): any product of
data-parallel shard/replicate, tensor and context parallel degrees that equals the world size, on
one node or many.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    parallelize_module,
)
from torchtitan.config import TORCH_DTYPE_MAP, JobConfig
from torchtitan.distributed import NoParallel, ParallelDims
from torchtitan.distributed.activation_checkpoint import apply_ac
from torchtitan.distributed.context_parallel import apply_cp_to_attention_module
from torchtitan.distributed.tensor_parallel import maybe_enable_async_tp
from torchtitan.models.llama3.infra.parallelize import apply_compile
from torchtitan.tools.logging import logger

from ..models.model import MultiHeadLatentAttention

FLOAT8_CONVERTER = "quantize.linear.float8"

# Selective per-op activation checkpointing keeps the outputs of these (expensive to recompute)
# and recomputes the rest: norms, RoPE, SiLU, elementwise ops.
SAC_SAVE_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops._c10d_functional.reduce_scatter_tensor.default,
    # float8 training computes scales from the abs max: keep it rather than recompute it.
    torch.ops.aten.max.default,
}


def parallelize_mla(
    model: nn.Module, parallel_dims: ParallelDims, job_config: JobConfig
) -> nn.Module:
    """torchtitan's parallelize_fn for titan_mla: TP, CP, activation checkpointing, per-block
    compile and FSDP2, each when the job asks for it."""
    check_parallel_config(parallel_dims, job_config)

    if parallel_dims.tp_enabled:
        tp_mesh = parallel_dims.get_mesh("tp")
        apply_tp(
            model,
            tp_mesh,
            loss_parallel=not job_config.parallelism.disable_loss_parallel,
            cp_enabled=parallel_dims.cp_enabled,
        )
        maybe_enable_async_tp(job_config, tp_mesh)
        logger.info(f"Applied tensor parallel (degree {parallel_dims.tp}) with the MLA plan")

    if parallel_dims.cp_enabled:
        apply_cp_to_attention_module(
            [block.attention.sdpa for block in model.layers.values()],
            parallel_dims.get_mesh("cp"),
            "sdpa",
        )

    compile_model = job_config.compile.enable and "model" in job_config.compile.components
    if job_config.activation_checkpoint.mode != "none":
        apply_ac(
            model,
            job_config.activation_checkpoint,
            model_compile_enabled=compile_model,
            op_sac_save_list=SAC_SAVE_OPS,
            base_folder=job_config.job.dump_folder,
        )
    if compile_model:
        apply_compile(model, job_config.compile)

    if parallel_dims.fsdp_enabled:
        dp_mesh_names = ["dp_replicate", "fsdp"] if parallel_dims.dp_replicate_enabled else ["fsdp"]
        apply_fsdp(
            model,
            parallel_dims.get_mesh(dp_mesh_names),
            param_dtype=TORCH_DTYPE_MAP[job_config.training.mixed_precision_param],
            reduce_dtype=TORCH_DTYPE_MAP[job_config.training.mixed_precision_reduce],
            cpu_offload=job_config.training.enable_cpu_offload,
            reshard_after_forward=job_config.parallelism.fsdp_reshard_after_forward != "never",
        )
        logger.info(f"Applied FSDP2 over mesh {dp_mesh_names}")
    return model


def check_parallel_config(parallel_dims: ParallelDims, job_config: JobConfig) -> None:
    """Raise ValueError / NotImplementedError for degree combinations titan_mla cannot run."""
    if parallel_dims.pp_enabled:
        raise NotImplementedError(
            "titan_mla does not support parallelism.pipeline_parallel_degree > 1; "
            "supported: data_parallel_shard/replicate, tensor_parallel, context_parallel degrees"
        )
    if parallel_dims.dp_replicate_enabled and not parallel_dims.fsdp_enabled:
        raise NotImplementedError(
            "titan_mla shards data parallel ranks with FSDP2 (HSDP with replicate degree > 1 "
            "needs data_parallel_shard_degree > 1 or context parallel); set "
            "data_parallel_shard_degree"
        )
    seq_len = job_config.training.seq_len
    if seq_len % parallel_dims.seq_len_divisor:
        raise ValueError(
            f"training.seq_len={seq_len} must be divisible by tensor_parallel_degree "
            f"({parallel_dims.tp}) x 2 x context_parallel_degree ({parallel_dims.cp}) "
            f"= {parallel_dims.seq_len_divisor}"
        )
    float8 = job_config.quantize.linear.float8
    if (
        parallel_dims.tp_enabled
        and FLOAT8_CONVERTER in job_config.model.converters
        and float8.recipe_name not in ("rowwise", "rowwise_with_gw_hp")
    ):
        raise NotImplementedError(
            f"tensor parallel with the float8 recipe '{float8.recipe_name}' is not supported; "
            "use quantize.linear.float8.recipe_name 'rowwise' or 'rowwise_with_gw_hp', "
            "or tensor_parallel_degree = 1"
        )


class SequenceParallelNorm(ParallelStyle):
    """Sequence parallel for titan_mla's RMSNorm, including its fused residual add.

    The weight is replicated; x and the optional ``residual`` (positional or keyword) arrive as
    local shards of the sequence (dim 1), or as Shard(1) DTensors (the first block's input, from the
    embedding), and every output leaves as a local shard. The norm
    ops run on DTensors through their sharding rules (titan_mla.ops.sharding), so the weight's
    gradient is the sum of every rank's rows.
    """

    sequence_sharding = (Shard(1),)

    def _to_sequence_shard(self, tensor, mesh: DeviceMesh):
        if isinstance(tensor, DTensor):
            return tensor.redistribute(placements=self.sequence_sharding)
        if isinstance(tensor, torch.Tensor):
            return DTensor.from_local(tensor, mesh, self.sequence_sharding, run_check=False)
        return tensor

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        for name, param in module.named_parameters(recurse=False):
            # RMSNorm weights start as ones on every rank: from_local needs no broadcast.
            replicated = DTensor.from_local(param, device_mesh, [Replicate()], run_check=False)
            module.register_parameter(name, nn.Parameter(replicated))

        def shard_inputs(_module, args, kwargs):
            args = tuple(self._to_sequence_shard(a, device_mesh) for a in args)
            kwargs = {k: self._to_sequence_shard(v, device_mesh) for k, v in kwargs.items()}
            return args, kwargs

        def local_outputs(_module, _inputs, outputs):
            if isinstance(outputs, tuple):
                return tuple(o.to_local() for o in outputs)
            return outputs.to_local()

        module.register_forward_pre_hook(shard_inputs, with_kwargs=True)
        module.register_forward_hook(local_outputs)
        return module


def _mla_attention_plan(attention: MultiHeadLatentAttention, positions_layout) -> dict:
    """Heads split over TP ranks: query and KV up-projections column-wise, output row-wise; the
    latent down-projection (wkv_a), shared by all heads, and the latent norms are replicated.
    Intermediates stay DTensors so the gradient of the replicated k_pe sums over all heads."""
    plan = {
        "attention": PrepareModuleInput(
            input_layouts=(Shard(1), Replicate(), positions_layout),
            desired_input_layouts=(Replicate(), Replicate(), positions_layout),
        ),
        "attention.wkv_a": NoParallel(use_local_output=False),
        "attention.kv_norm": NoParallel(use_local_output=False),
        "attention.wkv_b": ColwiseParallel(use_local_output=False),
        # SDPA sees the local heads, (batch, heads, seq, dim) plain tensors.
        "attention.sdpa": PrepareModuleInput(
            input_layouts=(Shard(1), Shard(1), Shard(1)),
            desired_input_layouts=(Shard(1), Shard(1), Shard(1)),
            use_local_output=True,
        ),
        "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
    }
    if attention.q_lora_rank == 0:
        plan["attention.wq"] = ColwiseParallel(use_local_output=False)
    else:
        plan["attention.wq_a"] = NoParallel(use_local_output=False)
        plan["attention.q_norm"] = NoParallel(use_local_output=False)
        plan["attention.wq_b"] = ColwiseParallel(use_local_output=False)
    return plan


def _gqa_attention_plan() -> dict:
    """Plain attention baselines: query, key and value heads split column-wise (n_kv_heads must be
    divisible by the TP degree), all local tensors, output row-wise."""
    return {
        "attention": PrepareModuleInput(
            input_layouts=(Shard(1), None, None),
            desired_input_layouts=(Replicate(), None, None),
            use_local_output=True,
        ),
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
    }


def _default_positions_hook(model: nn.Module, args: tuple, kwargs: dict):
    """Pass explicit positions 0..seq-1 when the caller gives none: under TP the MLA rotation runs
    on DTensors, and a position tensor made inside it would be a plain tensor among DTensors."""
    if len(args) < 2 and kwargs.get("positions") is None:
        tokens = args[0] if args else kwargs["tokens"]
        kwargs["positions"] = torch.arange(tokens.shape[1], device=tokens.device)
    return args, kwargs


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, *, loss_parallel: bool, cp_enabled: bool):
    """Tensor + sequence parallel: between blocks activations are sharded over the sequence
    (norms, residual adds); inside attention and the SwiGLU over heads / hidden units."""
    tp = tp_mesh.size()
    args = model.model_args
    if args.n_heads % tp or args.n_kv_heads % tp:
        raise ValueError(
            f"tensor_parallel_degree={tp} must divide n_heads={args.n_heads} and "
            f"n_kv_heads={args.n_kv_heads}"
        )
    parallelize_module(
        model,
        tp_mesh,
        {
            # The embeddings leave as a DTensor: as a local tensor they would be the asynchronous
            # reduce-scatter's AsyncCollectiveTensor, whose gradient a compiled first block hands
            # back as a plain tensor, which the reduce-scatter's backward cannot take.
            "tok_embeddings": RowwiseParallel(
                input_layouts=Replicate(), output_layouts=Shard(1), use_local_output=False
            ),
            "norm": SequenceParallelNorm(),
            # Loss parallel: logits stay sharded over the vocabulary into the cross entropy.
            "output": ColwiseParallel(
                input_layouts=Shard(1),
                output_layouts=Shard(-1) if loss_parallel else Replicate(),
                use_local_output=not loss_parallel,
            ),
        },
    )
    # Context parallel hands every rank its own (load-balanced) positions: the same on all TP ranks.
    positions_layout = Replicate() if args.attention == "mla" else None
    for block in model.layers.values():
        attention = block.attention
        plan = (
            _mla_attention_plan(attention, positions_layout)
            if isinstance(attention, MultiHeadLatentAttention)
            else _gqa_attention_plan()
        )
        plan.update(
            {
                "attention_norm": SequenceParallelNorm(),
                "ffn_norm": SequenceParallelNorm(),
                "feed_forward": PrepareModuleInput(
                    input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
                ),
                "feed_forward.w1": ColwiseParallel(),
                "feed_forward.w3": ColwiseParallel(),
                "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
            }
        )
        parallelize_module(block, tp_mesh, plan)
    if args.attention == "mla" and not cp_enabled:
        model.register_forward_pre_hook(_default_positions_hook, with_kwargs=True)


def apply_fsdp(
    model: nn.Module,
    dp_mesh: DeviceMesh,
    *,
    param_dtype: torch.dtype,
    reduce_dtype: torch.dtype,
    cpu_offload: bool = False,
    reshard_after_forward: bool = True,
) -> None:
    """FSDP2: one unit per block, and the root holding embeddings, final norm and output head.

    Keeping the embedding in the root unit (rather than a unit of its own as torchtitan's Llama does)
    lets a tied output head share its weight. The root is not resharded after forward: its
    parameters are needed again at the start of backward. Float8 weights (torchao's converter
    with enable_fsdp_float8_all_gather) are all-gathered in float8 by their own tensor subclass.
    """
    fsdp_config: dict = {
        "mesh": dp_mesh,
        "mp_policy": MixedPrecisionPolicy(param_dtype, reduce_dtype),
    }
    if cpu_offload:
        fsdp_config["offload_policy"] = CPUOffloadPolicy()
    for block in model.layers.values():
        fully_shard(block, **fsdp_config, reshard_after_forward=reshard_after_forward)
    fully_shard(model, **fsdp_config)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            # The trainer divides the loss by the global token count itself.
            module.set_gradient_divide_factor(1.0)
            # gloo (CPU) has no PREMUL_SUM, which FSDP would use to apply that factor of 1.
            module.set_force_sum_reduction_for_comms(dp_mesh.device_type == "cpu")
