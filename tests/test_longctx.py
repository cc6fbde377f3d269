"""titan_mla.longctx: needle samples, their datasets, the DPO loss and trainer, the evaluation CLI."""

from __future__ import annotations

import json
import math
import re
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
from titan_mla.models import MLAModelArgs, MLATransformer, mla_flavors

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


def tiny_passkey_model(attention: str) -> MLATransformer:
    """A random 2-layer model over the shipped tokenizer's 8192 ids, 128 positions."""
    torch.manual_seed(0)
    extra = {"kv_lora_rank": 32} if attention == "mla" else {}
    args = MLAModelArgs(
        dim=64,
        n_layers=2,
        n_heads=4,
        vocab_size=8192,
        ffn_hidden_dim=96,
        qk_nope_head_dim=16,
        qk_rope_head_dim=16,
        v_head_dim=16,
        attention=attention,
        max_seq_len=128,
        kernels="torch",
        **extra,
    )
    model = MLATransformer(args)
    with torch.no_grad():
        model.init_weights()
    return model.eval()


def test_full_forward_passkey_completions_equal_the_latent_engines(monkeypatch):
    """An MLA model completes the passkey prompts the same through its training forward as
    through the latent-cache engine's prefill and decode (evaluate's path)."""
    from titan_mla.inference.generator import Generator

    monkeypatch.setattr("titan_mla.ops.dispatch.KERNELS_INTERPRETED", False)
    model = tiny_passkey_model("mla")
    needles = NeedleGenerator("passkey")
    tokenizer = needles.tokenizer
    generator = Generator(
        model,
        tokenizer,
        max_batch=3,
        max_seq_len=needle_eval.cache_seq_len([100]),
        cuda_graph=False,
    )
    cpu = torch.device("cpu")
    full = needle_eval.passkey_accuracy_full_forward(
        model, tokenizer, 100, [0.0, 1.0], 3, cpu, batch=3
    )
    engine = needle_eval.evaluate(
        generator, needles, [100], [0.0, 1.0], samples=3, batch=3, log=lambda _: None
    )
    assert full["accuracy_by_depth"] == engine["accuracy"][0]
    assert [e["completion"] for e in engine["examples"]] == [c[0] for c in full["completions"]]
    # Every prompt, token by token.
    records = [needles.record(100, 0.5, EVAL_SEED_BASE + i) for i in range(3)]
    prompts = [r.input_ids for r in records]
    by_engine = needle_eval._complete(generator, prompts, 6)
    by_forward = needle_eval.complete_full_forward(model, torch.tensor(prompts), 6).tolist()
    assert by_forward == by_engine
    assert len({t for ids in by_forward for t in ids}) > 3  # not one token over and over


class PasskeyTeacher(torch.nn.Module):
    """A causal stand-in for a model: after a passkey prompt of ``length`` tokens it predicts the
    prompt's answer (the key, or the key + 1 where ``wrong(key)``) one token per position, as long
    as the tokens fed back so far are that answer's; zeros elsewhere."""

    def __init__(self, tokenizer, length: int, max_seq_len: int, wrong):
        super().__init__()
        self.tokenizer, self.length, self.wrong = tokenizer, length, wrong
        self.model_args = SimpleNamespace(max_seq_len=max_seq_len)
        self.shapes = set()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        self.shapes.add(tuple(tokens.shape))
        logits = torch.zeros(*tokens.shape, 8192)
        for row, ids in enumerate(tokens.tolist()):
            prompt = self.tokenizer.decode(ids[: self.length])
            key = int(re.search(r"The pass key is (\d+)\.", prompt)[1])
            text = f" {key + 1 if self.wrong(key) else key}."
            answer = self.tokenizer.encode(text, add_bos=False, add_eos=False)
            for k, token in enumerate(answer):
                if ids[self.length : self.length + k] == answer[:k]:
                    logits[row, self.length - 1 + k, token] = 1.0
        return logits


@pytest.mark.parametrize("case", ["right", "garbage", "even_keys"])
def test_full_forward_passkey_accuracy_of_constructed_models(case):
    tokenizer = NeedleGenerator("passkey").tokenizer
    wrong = {
        "right": lambda key: False,
        "garbage": lambda key: True,
        "even_keys": lambda key: key % 2 == 1,
    }[case]
    teacher = PasskeyTeacher(tokenizer, 90, 100, wrong)
    depths = [0.0, 0.5, 1.0]
    result = needle_eval.passkey_accuracy_full_forward(
        teacher, tokenizer, 90, depths, 5, torch.device("cpu"), batch=2
    )
    # The pass keys of the 5 samples (the same at every depth: the seed draws the key first).
    keys = [
        int(NeedleGenerator("passkey").record(90, d, EVAL_SEED_BASE + i).answers[0])
        for d in depths
        for i in range(5)
    ]
    expected = [sum(not wrong(k) for k in keys[j * 5 : (j + 1) * 5]) / 5 for j in range(3)]
    assert result["accuracy_by_depth"] == expected
    assert result["accuracy"] == pytest.approx(sum(expected) / 3)
    assert {"right": 1.0, "garbage": 0.0}.get(case, result["accuracy"]) == result["accuracy"]
    if case == "even_keys":
        assert 0.0 < result["accuracy"] < 1.0  # both outcomes occur
    # Batches of 2 then the remaining 1, over the model's whole window.
    assert teacher.shapes == {(2, 100), (1, 100)}
    assert all(
        is_correct(c, [str(k)]) != wrong(k)
        for c, k in zip([c for cs in result["completions"] for c in cs], keys, strict=True)
    )


def test_full_forward_passkey_accuracy_of_a_random_mha_model():
    model = tiny_passkey_model("mha")
    tokenizer = NeedleGenerator("passkey").tokenizer
    result = needle_eval.passkey_accuracy_full_forward(
        model, tokenizer, 120, [0.0, 1.0], 2, torch.device("cpu")
    )
    assert result["accuracy"] == 0.0 and result["accuracy_by_depth"] == [0.0, 0.0]
    assert [len(c) for c in result["completions"]] == [2, 2] and all(
        map(all, result["completions"])
    )
    with pytest.raises(ValueError) as error:
        needle_eval.passkey_accuracy_full_forward(
            model, tokenizer, 125, [0.0], 1, torch.device("cpu")
        )
    TestCase().assertExpectedInline(
        str(error.value),
        """125 prompt tokens and 5 new tokens need 129 positions; the model has max_seq_len=128""",
    )
