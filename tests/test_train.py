"""End-to-end training through ./run_train.sh on the CPU (gloo), as a newcomer runs it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from expecttest import assert_expected_inline
from helpers import exact_length_documents, run_train

pytestmark = pytest.mark.slow


def assert_trained(returncode: int, output: str) -> None:
    assert returncode == 0, output[-3000:]


def test_debug_training_loss_falls_on_default_corpus(tmp_path):
    returncode, losses, output = run_train(tmp_path)  # the default: train_configs/debug_model.toml
    assert_trained(returncode, output)
    assert sorted(losses) == list(range(1, 31))
    last = sum(losses[s] for s in (28, 29, 30)) / 3
    assert last < 0.7 * losses[1], losses


@pytest.fixture(scope="module")
def seed_checkpoint(tmp_path_factory) -> Path:
    """Step-0 weights every run below starts from (sharded and unsharded runs alike)."""
    folder = tmp_path_factory.mktemp("seed")
    returncode, _, output = run_train(
        folder,
        "--checkpoint.enable",
        "--checkpoint.create_seed_checkpoint",
        "--parallelism.data_parallel_shard_degree=1",
    )
    assert_trained(returncode, output)
    return folder / "checkpoint" / "step-0"


SHARDED_SEQ_LEN = 64


@pytest.fixture(scope="module")
def sharding_job(tmp_path_factory, seed_checkpoint) -> tuple[tuple[str, ...], dict[int, float]]:
    """(the overrides of a 5-step job on 8 exact windows from the seed weights, its one-rank losses):
    the reference every multi-rank layout must reproduce."""
    folder = tmp_path_factory.mktemp("sharding")
    data = folder / "docs.jsonl"
    docs = exact_length_documents(8, SHARDED_SEQ_LEN + 1)
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    common = (
        f"--training.dataset_path={data}",
        f"--training.seq_len={SHARDED_SEQ_LEN}",
        "--training.steps=5",
        "--checkpoint.enable",
        f"--checkpoint.initial_load_path={seed_checkpoint}",
        "--checkpoint.interval=1000",
    )
    code, losses, out = run_train(folder / "one", *common, "--training.local_batch_size=8")
    assert_trained(code, out)
    assert "Applied FSDP2" not in out and "Applied tensor parallel" not in out
    assert sorted(losses) == [1, 2, 3, 4, 5]
    assert losses[5] < losses[1]
    return common, losses


@pytest.mark.parametrize(
    ("parallelism", "local_batch_size", "applied"),
    [
        # One rank sees windows 0-7; with two FSDP ranks rank 0 sees 0-3 and rank 1 sees 4-7: the same
        # global batch.
        (("--parallelism.data_parallel_shard_degree=2",), 4, "Applied FSDP2"),
        # Both TP ranks see windows 0-7 and split the heads, the FFN and the vocabulary.
        (("--parallelism.tensor_parallel_degree=2",), 8, "Applied tensor parallel (degree 2)"),
        # The same with per-block torch.compile (aot_eager on CPU): DTensors cross the compiled
        # blocks' boundaries in forward and backward.
        (
            (
                "--parallelism.tensor_parallel_degree=2",
                "--compile.enable",
                "--compile.components=model",
            ),
            8,
            "Compiling each TransformerBlock with torch.compile",
        ),
    ],
    ids=["fsdp", "tp", "tp_compile"],
)
def test_two_ranks_match_one_rank(tmp_path, sharding_job, parallelism, local_batch_size, applied):
    common, losses_1 = sharding_job
    code, losses_2, out = run_train(
        tmp_path, *common, *parallelism, f"--training.local_batch_size={local_batch_size}", ngpu=2
    )
    assert_trained(code, out)
    assert applied in out
    assert sorted(losses_2) == [1, 2, 3, 4, 5]
    for step, loss in losses_1.items():
        assert losses_2[step] == pytest.approx(loss, rel=1e-4), (step, losses_1, losses_2)


def test_resume_from_checkpoint_matches_uninterrupted_run(tmp_path, seed_checkpoint):
    common = (
        "--checkpoint.enable",
        "--training.seq_len=128",
        "--training.local_batch_size=4",
        "--training.steps=9",
    )
    code, uninterrupted, out = run_train(
        tmp_path / "straight",
        *common,
        f"--checkpoint.initial_load_path={seed_checkpoint}",
        "--checkpoint.interval=4",
    )
    assert_trained(code, out)
    step_4 = tmp_path / "straight" / "checkpoint" / "step-4"
    assert step_4.is_dir()
    # Resume the full training state (model, optimizer, LR schedule, data position) of step 4.
    code, resumed, out = run_train(
        tmp_path / "resumed",
        *common,
        f"--checkpoint.initial_load_path={step_4}",
        "--checkpoint.no-initial_load_model_only",
        "--checkpoint.interval=1000",
    )
    assert_trained(code, out)
    assert "Training starts at step 5" in out
    assert sorted(resumed) == [5, 6, 7, 8, 9]
    for step in resumed:
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-5), (
            step,
            resumed,
            uninterrupted,
        )


def error_line(output: str) -> str:
    return next(line for line in output.splitlines() if "error:" in line).split("error: ", 1)[1]


def test_unknown_flavor_is_a_clear_error(tmp_path):
    returncode, _, output = run_train(tmp_path, "--model.flavor=2B")
    assert returncode != 0
    assert_expected_inline(
        error_line(output),
        """unknown model.flavor '2B'; titan_mla has ['1B', '1B_long', '1B_yarn128k', '1B_yarn32k', 'debugmodel']""",
    )


def test_missing_config_file_is_a_clear_error(tmp_path):
    returncode, _, output = run_train(tmp_path, "--job.config_file", "train_configs/nope.toml")
    assert returncode == 2
    assert error_line(output).startswith("config file 'train_configs/nope.toml' does not exist")


def test_missing_dataset_path_is_a_clear_error(tmp_path):
    returncode, _, output = run_train(tmp_path, "--training.dataset_path=/nonexistent/corpus")
    assert returncode != 0
    assert_expected_inline(
        error_line(output), """training.dataset_path '/nonexistent/corpus' does not exist"""
    )
