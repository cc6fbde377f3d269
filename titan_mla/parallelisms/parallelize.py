"""Apply parallelisms to an MLATransformer, in torchtitan's order: TP -> CP -> AC -> compile -> FSDP."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torchtitan.config import TORCH_DTYPE_MAP, JobConfig
from torchtitan.distributed import ParallelDims
from torchtitan.distributed.activation_checkpoint import apply_ac
from torchtitan.models.llama3.infra.parallelize import apply_compile
from torchtitan.tools.logging import logger

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
    unsupported = {
        "tensor_parallel_degree": parallel_dims.tp_enabled,
        "context_parallel_degree": parallel_dims.cp_enabled,
        "pipeline_parallel_degree": parallel_dims.pp_enabled,
    }
    requested = [name for name, enabled in unsupported.items() if enabled]
    if requested:
        raise NotImplementedError(
            f"titan_mla does not support parallelism.{', parallelism.'.join(requested)} > 1 yet; "
            "use data parallel (FSDP2) degrees only"
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
    elif parallel_dims.dp_replicate_enabled:
        raise NotImplementedError(
            "titan_mla shards data parallel ranks with FSDP2; set data_parallel_shard_degree"
        )
    return model


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
    parameters are needed again at the start of backward.
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
