"""titan_mla.longctx: needle samples, their datasets, the DPO loss and trainer, the evaluation CLI."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.distributed.checkpoint as dcp
from expecttest import TestCase
from helpers import REPO, run_train
from torchtitan.components.loss import IGNORE_INDEX

from titan_mla.longctx import eval as needle_eval
from titan_mla.longctx.datasets import EVAL_SEED_BASE, NeedleDataset, needle_task
from titan_mla.longctx.dpo import dpo_loss, sequence_logprobs
from titan_mla.longctx.needles import HAYSTACKS, TASKS, NeedleGenerator, is_correct, parse_answers
from titan_mla.models import MLATransformer, mla_flavors

DEBUG_CONFIG = str(REPO / "train_configs" / "passkey_debug.toml")


@pytest.mark.parametrize("haystack", HAYSTACKS)
@pytest.mark.parametrize("task", TASKS)
def test_needles_land_at_their_offsets_and_depth(task, haystack):
    generator = NeedleGenerator(task, haystack)
    tokenizer = generator.tokenizer
    for depth in (0.0, 0.3, 1.0):
        record = generator.record(400, depth, seed=7)
        assert record.length == len(record.input_ids) == 400
        assert record.input_ids[0] == tokenizer.bos_id
        for needle in record.needles:
            span = record.input_ids[needle.token_start : needle.token_end]
            assert tokenizer.decode(span) == needle.text
            assert needle.value in needle.text
        # The first needle sits at depth x the haystack: haystack tokens before it / all of them.
        first = record.needles[0]
        before = first.token_start - sum(
            n.token_end - n.token_start for n in record.needles if n.token_end <= first.token_start
        )
        instruction = len(
            tokenizer.encode(record.prompt.split("\n")[0] + "\n", add_bos=False, add_eos=False)
        )
        needle_tokens = sum(n.token_end - n.token_start for n in record.needles)
        question = len(
            tokenizer.encode(
                record.prompt[record.prompt.rindex("\n") :], add_bos=False, add_eos=False
            )
        )
        haystack_tokens = 400 - 1 - instruction - needle_tokens - question
        assert abs((before - 1 - instruction) - depth * haystack_tokens) <= 0.5


def test_generator_is_deterministic_by_seed():
    first = NeedleGenerator("multikey", "corpus").record(300, 0.5, seed=3).to_json()
    again = NeedleGenerator("multikey", "corpus").record(300, 0.5, seed=3).to_json()
    other = NeedleGenerator("multikey", "corpus").record(300, 0.5, seed=4).to_json()
    assert first == again
    assert first["input_ids"] != other["input_ids"] and first["answers"] != other["answers"]
    json.dumps(first)  # a JSONL line


@pytest.mark.parametrize("task", TASKS)
def test_answers_parse_and_rejected_answers_are_wrong(task):
    record = NeedleGenerator(task, "repeat", value_digits=6).record(300, 0.5, seed=11)
    expected = {"multivalue": 2, "multiquery": 2}.get(task, 1)
    assert len(record.answers) == expected and all(len(a) == 6 for a in record.answers)
    assert is_correct(record.answer_text, record.answers)
    assert not is_correct(record.rejected_text, record.answers)
    assert len(parse_answers(record.rejected_text, expected)) == expected
    if task == "multikey":  # the rejected answer is a distractor's value
        assert record.rejected_text.strip(" .") == record.needles[1].value
    assert parse_answers(" 12345, 678. and 9", 2) == ["12345", "678"]
    assert not is_correct(" 1234", ["12345"])


def test_too_short_and_unknown_inputs_are_clear_errors():
    with pytest.raises(
        ValueError, match="length 20 is too short for a passkey sample: it needs at least"
    ):
        NeedleGenerator().record(20, 0.5, seed=0)
    with pytest.raises(
        ValueError, match="unknown needle task 'needle'; supported: passkey, single"
    ):
        NeedleGenerator("needle")
    with pytest.raises(ValueError, match=r"needle depth must be in \[0, 1\], not 1.5"):
        NeedleGenerator().record(200, 1.5, seed=0)


def test_training_rows_label_the_answer_and_dpo_rows_pair_the_answers():
    generator = NeedleGenerator("passkey")
    eos = generator.tokenizer.eos_id
    assert needle_task("passkey") == ("passkey", False)
    assert needle_task("niah_multikey_dpo") == ("multikey", True)
    assert needle_task("titan_default") is None

    supervised = NeedleDataset(generator, 128, dpo=False)
    inputs, labels = supervised.sample(5)
    assert inputs["input"].shape == labels.shape == (128,)
    scored = labels[labels != IGNORE_INDEX].tolist()
    assert generator.tokenizer.decode(scored[:-1]).strip(" .").isdigit() and scored[-1] == eos
    assert torch.equal(supervised.sample(5)[1], labels)  # the same row again
    whole = NeedleDataset(generator, 128, dpo=False, answer_only_loss=False).sample(5)[1]
    assert (whole != IGNORE_INDEX).sum() > 100

    pairs = NeedleDataset(generator, 128, dpo=True)
    inputs, labels = pairs.sample(5)
    assert inputs["input"].shape == labels.shape == (2, 128)
    chosen, rejected = (labels[i][labels[i] != IGNORE_INDEX].tolist() for i in range(2))
    assert chosen != rejected
    start = (labels[0] != IGNORE_INDEX).nonzero()[0].item()
    assert torch.equal(inputs["input"][0, : start + 1], inputs["input"][1, : start + 1])


def test_dpo_loss_on_a_hand_computed_case():
    # beta * ((-1 - -1.5) - (-2 - -1.5)) = 0.1 * (0.5 + 0.5) = 0.1; -log sigmoid(0.1) = log(1 + e^-0.1)
    loss = dpo_loss(
        torch.tensor([-1.0, -3.0]),
        torch.tensor([-2.0, -1.0]),
        torch.tensor([-1.5, -2.0]),
        torch.tensor([-1.5, -2.0]),
        beta=0.1,
    )
    # second pair: 0.1 * ((-3 + 2) - (-1 + 2)) = -0.2
    assert loss.tolist() == pytest.approx([math.log1p(math.exp(-0.1)), math.log1p(math.exp(0.2))])
    assert loss[0].item() == pytest.approx(0.6443966600735709)

    # Two rows of 3 positions over a vocabulary of 2; row 0 scores positions 1 and 2, row 1 position 0.
    logits = torch.tensor(
        [
            [[0.0, 0.0], [0.0, math.log(3.0)], [math.log(4.0), 0.0]],
            [[0.0, 0.0], [5.0, 5.0], [1.0, 2.0]],
        ]
    )
    labels = torch.tensor([[IGNORE_INDEX, 1, 1], [0, IGNORE_INDEX, IGNORE_INDEX]])
    # log(3/4) + log(1/5) and log(1/2)
    assert sequence_logprobs(logits, labels).tolist() == pytest.approx(
        [math.log(0.75) + math.log(0.2), math.log(0.5)]
    )


def test_dpo_training_is_one_command(tmp_path):
    code, losses, output = run_train(
        tmp_path,
        "--job.config_file=train_configs/passkey_dpo_debug.toml",
        "--training.steps=2",
        "--training.seq_len=64",
        "--training.local_batch_size=2",
    )
    assert code == 0, output[-3000:]
    # At step 1 the policy is the reference: every pair's margin is 0, the loss log 2.
    assert losses[1] == pytest.approx(math.log(2), abs=1e-4)
    assert set(losses) == {1, 2}


def test_dpo_needs_a_pair_dataset():
    from torchtitan.config import ConfigManager

    from titan_mla.train import check_job_config, trainer_class

    def config(*overrides: str):
        return ConfigManager().parse_args(
            [
                "--job.config_file",
                str(REPO / "train_configs" / "passkey_dpo_debug.toml"),
                *overrides,
            ]
        )

    assert trainer_class(config()).__name__ == "DPOTrainer"
    assert trainer_class(config("--dpo.no-enable")).__name__ == "Trainer"
    with pytest.raises(ValueError) as error:
        check_job_config(config("--training.dataset=passkey"))
    assertExpectedInline = TestCase().assertExpectedInline
    assertExpectedInline(
        str(error.value),
        """dpo.enable=True needs a DPO dataset (a '*_dpo' name), not training.dataset 'passkey'""",
    )


def test_evaluation_scores_completions_by_their_numbers(monkeypatch):
    """The scoring: a completion is right when its first numbers are the answers."""
    generator = NeedleGenerator("passkey")
    tokenizer = generator.tokenizer

    def complete(_, prompts, new_tokens):
        # Right for prompts whose pass key is even, a wrong number for the others.
        out = []
        for ids in prompts:
            value = int(tokenizer.decode(ids).split("The pass key is ")[1][:5])
            text = f" {value}." if value % 2 == 0 else f" {value + 1}."
            out.append(tokenizer.encode(text, add_bos=False, add_eos=False))
        return out

    monkeypatch.setattr(needle_eval, "_complete", complete)

    result = needle_eval.evaluate(
        SimpleNamespace(tokenizer=tokenizer),
        generator,
        [100, 150],
        [0.0, 1.0],
        samples=6,
        batch=4,
        log=lambda _: None,
    )
    even = [
        int(generator.record(100, 0.0, EVAL_SEED_BASE + i).answers[0]) % 2 == 0 for i in range(6)
    ]
    assert 0 < sum(even) < 6  # both outcomes occur
    assert result["accuracy"] == [[sum(even) / 6] * 2] * 2
    assert result["accuracy_overall"] == sum(even) / 6


def test_evaluation_cli_on_a_tiny_model(tmp_path, monkeypatch):
    # The kernels' own tests check them under the interpreter; here the PyTorch reference is enough.
    monkeypatch.setattr("titan_mla.ops.dispatch.KERNELS_INTERPRETED", False)
    torch.manual_seed(0)
    model = MLATransformer(mla_flavors["debugmodel"])
    dcp.save(model.state_dict(), checkpoint_id=tmp_path / "checkpoint" / "step-1")
    out = tmp_path / "eval"
    needle_eval.main(
        [
            "--job.config_file",
            DEBUG_CONFIG,
            "--checkpoint",
            str(tmp_path / "checkpoint"),
            "--lengths",
            "96",
            "160",
            "--depths",
            "0",
            "1",
            "--samples",
            "2",
            "--batch",
            "2",
            "--rope-factor",
            "2",
            "--out",
            str(out),
            "--name",
            "tiny",
        ]
    )
    result = json.loads((out / "tiny.json").read_text())
    assert result["lengths"] == [96, 160] and result["depths"] == [0.0, 1.0]
    assert len(result["accuracy"]) == 2 and all(len(row) == 2 for row in result["accuracy"])
    assert result["rope_factor"] == 2.0
    # A random model does not find pass keys; its completions were decoded and scored.
    assert result["accuracy_overall"] == 0.0
    assert result["examples"] and all(e["completion"] for e in result["examples"])
    assert (out / "tiny.png").stat().st_size > 1000
    assert any((out / "tb").iterdir())
