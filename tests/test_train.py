"""End-to-end training through ./run_train.sh on the CPU (gloo), as a newcomer runs it."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from expecttest import assert_expected_inline
from helpers import run_train

from titan_mla.data import builtin_documents

pytestmark = pytest.mark.slow


def assert_trained(returncode: int, output: str) -> None:
    assert returncode == 0, output[-3000:]


def test_debug_training_loss_falls_on_default_corpus(tmp_path):
    returncode, losses, output = run_train(tmp_path)  # the default: train_configs/debug_model.toml
    assert_trained(returncode, output)
    assert sorted(losses) == list(range(1, 31))
    last = sum(losses[s] for s in (28, 29, 30)) / 3
    assert last < 0.7 * losses[1], losses


def exact_length_documents(n_docs: int, n_tokens: int) -> list[str]:
    """Documents that each encode (with BOS and EOS) to exactly n_tokens tokens, so every training
    window of n_tokens is one document and each rank's shard is a known set of windows."""
    from tokenizers import Tokenizer

    from titan_mla.data.tokenizer import TOKENIZER_DIR

    tokenizer = Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json"))
    words = sorted({w for doc in builtin_documents() for w in doc.split() if w.isalpha()})
    word_len = {w: len(tokenizer.encode(" " + w).ids) for w in words}
    rng = random.Random(0)
    docs = []
    for _ in range(n_docs):
        text, count = "", 2  # BOS, EOS
        while count < n_tokens:
            word = rng.choice(words)
            if count + word_len[word] <= n_tokens:
                text, count = text + " " + word, count + word_len[word]
        assert len(tokenizer.encode(text).ids) + 2 == n_tokens
        docs.append(text)
    return docs


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


def test_fsdp_two_ranks_match_one_rank(tmp_path, seed_checkpoint):
    seq_len = 64
    data = tmp_path / "docs.jsonl"
    data.write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in exact_length_documents(8, seq_len + 1))
    )
    common = (
        f"--training.dataset_path={data}",
        f"--training.seq_len={seq_len}",
        "--training.steps=5",
        "--checkpoint.enable",
        f"--checkpoint.initial_load_path={seed_checkpoint}",
        "--checkpoint.interval=1000",
    )
    # One rank sees windows 0-7; with two ranks, rank 0 sees 0-3 and rank 1 sees 4-7: the same global batch.
    code_1, losses_1, out_1 = run_train(tmp_path / "one", *common, "--training.local_batch_size=8")
    code_2, losses_2, out_2 = run_train(
        tmp_path / "two", *common, "--training.local_batch_size=4", ngpu=2
    )
    assert_trained(code_1, out_1)
    assert_trained(code_2, out_2)
    assert "Applied FSDP2" in out_2 and "Applied FSDP2" not in out_1
    assert sorted(losses_1) == sorted(losses_2) == [1, 2, 3, 4, 5]
    for step, loss in losses_1.items():
        assert losses_2[step] == pytest.approx(loss, rel=1e-4), (step, losses_1, losses_2)
    assert losses_1[5] < losses_1[1]


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
        """unknown model.flavor '2B'; titan_mla has ['1B', '1B_long', 'debugmodel']""",
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
