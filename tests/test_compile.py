"""The model under torch.compile(fullgraph=True): no graph breaks, no recompiles after warm-up."""

import os
from dataclasses import replace

import pytest
import torch

from titan_mla.models import MLAModelArgs, MLATransformer, mla_flavors
from titan_mla.models.model import TransformerBlock
from titan_mla.models.rope import rope_cos_sin

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def block_inputs(args: MLAModelArgs, batch: int, device: str, dtype: torch.dtype):
    x = torch.randn(
        batch, args.max_seq_len, args.dim, device=device, dtype=dtype, requires_grad=True
    )
    return x, rope_cos_sin(args, device)


def test_cpu_model_compiles_fullgraph_through_reference_path():
    torch.manual_seed(0)
    args = replace(mla_flavors["debugmodel"], n_layers=2, max_seq_len=32)
    model = MLATransformer(args)
    with torch.no_grad():
        model.init_weights()
    tokens = torch.randint(0, args.vocab_size, (2, 32))
    eager_logits = model(tokens)
    eager_logits.square().mean().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    compiled = torch.compile(model, fullgraph=True)
    logits = compiled(tokens)
    logits.square().mean().backward()
    torch.testing.assert_close(logits, eager_logits, rtol=1e-4, atol=1e-5)
    for p, expected in zip(model.parameters(), eager_grads, strict=True):
        torch.testing.assert_close(p.grad, expected, rtol=1e-3, atol=1e-6)


def train_steps_without_recompiles(block: torch.nn.Module, inputs, steps: int = 3) -> None:
    compiled = torch.compile(block, fullgraph=True)  # fullgraph: any graph break raises
    x, rope_cache = inputs
    compiled(x, rope_cache).float().square().mean().backward()  # warm-up compiles
    torch._dynamo.config.error_on_recompile = True
    try:
        for _ in range(steps):
            compiled(x, rope_cache).float().square().mean().backward()
    finally:
        torch._dynamo.config.error_on_recompile = False
    torch.cuda.synchronize()


@cuda
def test_1b_block_with_triton_ops_compiles_fullgraph_on_cuda():
    torch._dynamo.reset()
    args = mla_flavors["1B"]
    block = TransformerBlock(0, args).cuda().bfloat16()
    assert block.ffn_norm.kernels == "triton"
    train_steps_without_recompiles(block, block_inputs(args, 2, "cuda", torch.bfloat16))


@cuda
def test_1b_block_compiles_fullgraph_with_fsdp2_and_selective_ac():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torchtitan.config import ActivationCheckpoint
    from torchtitan.distributed.activation_checkpoint import apply_ac

    from titan_mla.parallelisms import apply_fsdp
    from titan_mla.parallelisms.parallelize import SAC_SAVE_OPS

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    if not dist.is_initialized():
        dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        torch._dynamo.reset()
        args = replace(mla_flavors["1B"], n_layers=2, vocab_size=1024)
        model = MLATransformer(args).cuda()
        apply_ac(
            model,
            ActivationCheckpoint(mode="selective", selective_ac_option="op"),
            model_compile_enabled=True,
            op_sac_save_list=SAC_SAVE_OPS,
        )
        for layer_id, block in model.layers.named_children():
            model.layers.register_module(layer_id, torch.compile(block, fullgraph=True))
        apply_fsdp(
            model,
            init_device_mesh("cuda", (1,)),
            param_dtype=torch.bfloat16,
            reduce_dtype=torch.float32,
        )
        tokens = torch.randint(0, args.vocab_size, (2, args.max_seq_len), device="cuda")
        model(tokens).float().square().mean().backward()  # warm-up compiles
        torch._dynamo.config.error_on_recompile = True
        try:
            for _ in range(3):
                model(tokens).float().square().mean().backward()
        finally:
            torch._dynamo.config.error_on_recompile = False
        stats = torch._dynamo.utils.counters
        assert not stats["graph_break"], dict(stats["graph_break"])
    finally:
        dist.destroy_process_group()
