"""Parallelisms: DTensor sharding rules of the custom ops (2 gloo ranks), the shipped multi-GPU
configs, clear errors for layouts titan_mla cannot run, and context parallel on 2 GPUs.

The end-to-end "2 ranks reproduce 1 rank" checks of FSDP2 and TP are in test_train.py.
"""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from expecttest import assert_expected_inline
from helpers import REPO, exact_length_documents, run_train
from torchtitan.config import ConfigManager
from torchtitan.distributed import ParallelDims

from titan_mla.parallelisms.parallelize import check_parallel_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _sharded_ops_worker(rank: int, world_size: int, port: int) -> None:
    """On each rank: the ops on DTensors (sequence-sharded norms, head-sharded rotation) give the
    same outputs and gradients as on full tensors."""
    os.environ.update(MASTER_ADDR="localhost", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor, Replicate, Shard

        from titan_mla.models.args import MLAModelArgs
        from titan_mla.models.rope import rope_cos_sin
        from titan_mla.ops import mla_rope, rms_norm, rms_norm_add

        mesh = init_device_mesh("cpu", (world_size,))
        gen = torch.Generator().manual_seed(0)
        batch, seq, heads, dim = 2, 8, 4, 16

        def leaf(*shape):
            return torch.randn(*shape, generator=gen, dtype=torch.float32).requires_grad_()

        def check(fn, tensors_and_placements):
            fulls = [t for t, _ in tensors_and_placements]
            sharded = [
                DTensor.from_local(
                    t.detach() if p == Replicate() else t.detach().chunk(world_size, p.dim)[rank],
                    mesh,
                    [p],
                    run_check=False,
                ).requires_grad_(t.requires_grad)
                for t, p in tensors_and_placements
            ]
            out_full = fn(*fulls)
            out_sharded = fn(*sharded)
            out_full = out_full if isinstance(out_full, tuple) else (out_full,)
            out_sharded = out_sharded if isinstance(out_sharded, tuple) else (out_sharded,)
            loss_full = sum((o * (i + 1)).sin().sum() for i, o in enumerate(out_full))
            loss_sharded = sum((o * (i + 1)).sin().sum() for i, o in enumerate(out_sharded))
            loss_full.backward()
            loss_sharded.backward()
            for o_full, o_sharded in zip(out_full, out_sharded, strict=True):
                torch.testing.assert_close(o_sharded.full_tensor(), o_full, rtol=1e-5, atol=1e-6)
            for t_full, t_sharded in zip(fulls, sharded, strict=True):
                if not t_full.requires_grad:
                    continue
                # Sharded gradients are sums of per-rank partial sums: float32 rounding differs.
                torch.testing.assert_close(
                    t_sharded.grad.full_tensor(), t_full.grad, rtol=1e-5, atol=1e-6
                )

        def weight():
            return (1 + 0.1 * torch.randn(dim, generator=gen)).requires_grad_()

        # Sequence parallel norms: rows sharded over the sequence, weight replicated.
        check(
            lambda x, w: rms_norm(x, w, 1e-6),
            [(leaf(batch, seq, dim), Shard(1)), (weight(), Replicate())],
        )
        check(
            lambda x, r, w: rms_norm_add(x, r, w, 1e-6),
            [
                (leaf(batch, seq, dim), Shard(1)),
                (leaf(batch, seq, dim), Shard(1)),
                (weight(), Replicate()),
            ],
        )
        # The latent norms under TP: replicated.
        check(
            lambda x, w: rms_norm(x, w, 1e-6),
            [(leaf(batch, seq, dim), Replicate()), (weight(), Replicate())],
        )

        # MLA rotation under TP: query heads sharded, the shared k_pe replicated (its gradient sums
        # over every rank's heads).
        args = MLAModelArgs(qk_rope_head_dim=8, max_seq_len=seq, n_heads=heads)
        rope_cache = rope_cos_sin(args)
        positions = torch.arange(seq).expand(batch, seq)

        def rotate(q, k_pe, cache, pos):
            q_out, k_out = mla_rope(q, k_pe, cache, pos)
            # k_pe broadcast to every head, as the attention does: its gradient sums over heads.
            return q_out, q_out[..., -8:] + k_out.unsqueeze(2)

        check(
            rotate,
            [
                (leaf(batch, seq, heads, 24), Shard(2)),
                (leaf(batch, seq, 8), Replicate()),
                (rope_cache, Replicate()),
                (positions, Replicate()),
            ],
        )
    finally:
        dist.destroy_process_group()


def test_sharded_ops_match_full_tensors(monkeypatch):
    # The rules are what is under test: the ranks run the ops' PyTorch reference, not the Triton
    # interpreter (the kernels' own numerics are tested in test_ops_*).
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    mp.spawn(_sharded_ops_worker, args=(2, _free_port()), nprocs=2, join=True)


def _job_config(config_file: str, *overrides: str):
    return ConfigManager().parse_args(
        ["--job.config_file", str(REPO / "train_configs" / config_file), *overrides]
    )


def _parallel_dims(job_config, world_size: int) -> ParallelDims:
    p = job_config.parallelism
    return ParallelDims(
        dp_replicate=p.data_parallel_replicate_degree,
        dp_shard=p.data_parallel_shard_degree,
        cp=p.context_parallel_degree,
        tp=p.tensor_parallel_degree,
        pp=p.pipeline_parallel_degree,
        ep=p.expert_parallel_degree,
        etp=p.expert_tensor_parallel_degree,
        world_size=world_size,
    )


@pytest.mark.parametrize(
    ("config_file", "world_size", "degrees"),
    [
        ("mla_1b_8gpu.toml", 8, (1, 8, 1, 1)),
        ("mla_1b_multinode.toml", 16, (2, 8, 1, 1)),
        ("mla_1b_cp4_64k.toml", 4, (1, 1, 4, 1)),
    ],
)
def test_multi_gpu_configs_give_valid_layouts(config_file, world_size, degrees):
    job_config = _job_config(config_file)
    dims = _parallel_dims(job_config, world_size)
    assert (dims.dp_replicate, dims.dp_shard, dims.cp, dims.tp) == degrees
    check_parallel_config(dims, job_config)  # raises on a layout titan_mla cannot run


def _layout_error(world_size: int, *overrides: str) -> str:
    job_config = _job_config("debug_model.toml", *overrides)
    with pytest.raises((ValueError, NotImplementedError)) as err:
        check_parallel_config(_parallel_dims(job_config, world_size), job_config)
    return str(err.value)


def test_unsupported_layouts_are_clear_errors():
    assert_expected_inline(
        _layout_error(2, "--parallelism.pipeline_parallel_degree=2"),
        """titan_mla does not support parallelism.pipeline_parallel_degree > 1; supported: data_parallel_shard/replicate, tensor_parallel, context_parallel degrees""",
    )
    assert_expected_inline(
        _layout_error(4, "--parallelism.context_parallel_degree=4", "--training.seq_len=100"),
        """training.seq_len=100 must be divisible by tensor_parallel_degree (1) x 2 x context_parallel_degree (4) = 8""",
    )
    assert_expected_inline(
        _layout_error(
            2,
            "--parallelism.tensor_parallel_degree=2",
            "--model.converters=quantize.linear.float8",
            "--quantize.linear.float8.recipe_name=tensorwise",
        ),
        """tensor parallel with the float8 recipe 'tensorwise' is not supported; use quantize.linear.float8.recipe_name 'rowwise' or 'rowwise_with_gw_hp', or tensor_parallel_degree = 1""",
    )


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs"
)
def test_context_parallel_two_gpus_match_one_gpu(tmp_path):
    """CP=2 (ring attention over the load-balanced sequence halves) reproduces one GPU's losses."""
    seq_len = 256
    data = tmp_path / "docs.jsonl"
    data.write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in exact_length_documents(8, seq_len + 1))
    )
    seed = tmp_path / "seed"
    code, _, out = run_train(
        seed,
        "--checkpoint.enable",
        "--checkpoint.create_seed_checkpoint",
        "--parallelism.data_parallel_shard_degree=1",
    )
    assert code == 0, out[-3000:]
    common = (
        f"--training.dataset_path={data}",
        f"--training.seq_len={seq_len}",
        "--training.steps=5",
        "--training.local_batch_size=8",
        "--checkpoint.enable",
        "--checkpoint.load_only",
        f"--checkpoint.initial_load_path={seed / 'checkpoint' / 'step-0'}",
    )
    code_1, losses_1, out_1 = run_train(tmp_path / "one", *common)
    code_2, losses_2, out_2 = run_train(
        tmp_path / "cp", *common, "--parallelism.context_parallel_degree=2", ngpu=2
    )
    assert code_1 == 0, out_1[-3000:]
    assert code_2 == 0, out_2[-3000:]
    assert "Applied Context Parallel" in out_2
    assert sorted(losses_1) == sorted(losses_2) == [1, 2, 3, 4, 5]
    # fp32 attention through the memory-efficient kernel, split in two and merged: 1e-3.
    for step, loss in losses_1.items():
        assert losses_2[step] == pytest.approx(loss, rel=1e-3), (step, losses_1, losses_2)
    assert losses_1[5] < losses_1[1]
