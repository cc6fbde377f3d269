"""The latent ablation runner: cache-size formula, its MHA/GQA decode baseline, the stdlib corpus,
the passkey fine-tune and score, and a tiny CPU ablation end to end (table, result file, MLflow
runs)."""

import json
import math

import pytest
import torch
from expecttest import assert_expected_inline

from titan_mla.ablate_latent import (
    Setup,
    Variant,
    dense_decode_step,
    kv_cache_bytes_per_token,
    main,
    passkey_rows,
    summarize,
    train_variant,
)
from titan_mla.data import STDLIB_CORPUS, load_corpus
from titan_mla.data.corpus import stdlib_documents, stdlib_files
from titan_mla.longctx.eval import ANSWER_ROOM, complete_full_forward
from titan_mla.models import MLAModelArgs, MLATransformer
from titan_mla.models.rope import rope_cos_sin

DEBUG = dict(dim=256, n_layers=4, n_heads=8, qk_rope_head_dim=16)


@pytest.mark.parametrize(
    "overrides,dtype,expected",
    [
        # layers x (kv_lora_rank + qk_rope_head_dim) x bytes
        ({"kv_lora_rank": 64}, torch.bfloat16, 4 * (64 + 16) * 2),
        ({"kv_lora_rank": 512}, torch.float32, 4 * (512 + 16) * 4),
        # layers x 2 x kv_heads x head_dim x bytes (head_dim = 256 / 8 unless given)
        ({"attention": "mha"}, torch.bfloat16, 4 * 2 * 8 * 32 * 2),
        ({"attention": "gqa", "n_kv_heads": 2}, torch.bfloat16, 4 * 2 * 2 * 32 * 2),
        ({"attention": "gqa", "n_kv_heads": 1, "head_dim": 64}, torch.float32, 4 * 2 * 64 * 4),
    ],
)
def test_kv_cache_bytes_per_token(overrides, dtype, expected):
    args = MLAModelArgs(**DEBUG, **overrides)
    assert kv_cache_bytes_per_token(args, dtype) == expected


def fake_result(attention: str, val_loss: float, cache_bytes: int, rank: int = 0) -> dict:
    return {
        "variant": {"attention": attention, "kv_lora_rank": rank},
        "val_loss": val_loss,
        "kv_cache_bytes_per_token": cache_bytes,
    }


def test_summary_picks_smallest_rank_within_one_percent_of_mha():
    mha = fake_result("mha", 3.00, 4096)
    results = [
        fake_result("mla", 3.02, 1024, rank=256),  # within 1%
        fake_result("mla", 3.05, 640, rank=128),  # 1.7% worse
        fake_result("mla", 3.029, 1536, rank=512),
        mha,
        fake_result("gqa", 2.9, 1024),  # not an MLA rank, even though better
    ]
    summary = summarize(results)
    assert summary["best_latent_rank_within_1pct_of_mha"] == 256
    assert summary["cache_ratio_vs_mha_at_that_rank"] == 1024 / 4096
    none_close = summarize([fake_result("mla", 3.1, 640, rank=128), mha])
    assert none_close["best_latent_rank_within_1pct_of_mha"] is None
    assert none_close["cache_ratio_vs_mha_at_that_rank"] is None


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_dense_decode_step_matches_the_full_forward(n_kv_heads):
    """Decoding token by token through the dense KV cache gives the logits of the causal forward."""
    torch.manual_seed(0)
    args = MLAModelArgs(
        dim=64,
        n_layers=2,
        n_heads=4,
        vocab_size=97,
        ffn_hidden_dim=96,
        attention="gqa",
        n_kv_heads=n_kv_heads,
        max_seq_len=12,
        kernels="torch",
    )
    model = MLATransformer(args)
    with torch.no_grad():
        model.init_weights()
    tokens = torch.randint(0, 97, (2, 12))
    shape = (args.n_layers, 2, n_kv_heads, 12, args.head_dim)
    k_cache, v_cache = torch.zeros(shape), torch.zeros(shape)
    rope_cache = rope_cos_sin(args)
    decoded = torch.cat(
        [
            dense_decode_step(model, tokens[:, i : i + 1], rope_cache, k_cache, v_cache, i)
            for i in range(12)
        ],
        dim=1,
    )
    torch.testing.assert_close(decoded, model(tokens), rtol=1e-5, atol=1e-5)

    # The passkey scorer's greedy completion through the full forward is dense decoding's.
    prompt, greedy = tokens[:, :6], []
    k_cache.zero_(), v_cache.zero_()
    for i in range(11):
        next_token = prompt[:, i : i + 1] if i < 6 else greedy[-1]
        logits = dense_decode_step(model, next_token, rope_cache, k_cache, v_cache, i)
        if i >= 5:
            greedy.append(logits.argmax(-1))
    assert torch.equal(complete_full_forward(model, prompt, 6), torch.cat(greedy, dim=1))


def tiny_setup(passkey_steps: int) -> Setup:
    return Setup(
        model=dict(dim=64, n_layers=2, n_heads=4, vocab_size=8192, ffn_hidden_dim=96, **HEAD_DIMS),
        steps=2,
        batch=2,
        seq_len=72,
        val_tokens=144,
        lr=3e-3,
        warmup_steps=1,
        seed=0,
        compile=False,
        decode_batch=1,
        decode_context=16,
        decode_iters=1,
        kernels="torch",
        passkey_steps=passkey_steps,
        passkey_samples=2,
    )


HEAD_DIMS = dict(qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16)


def test_passkey_fine_tune_comes_after_the_validation_loss(monkeypatch):
    """The validation loss is the pretrained model's: the same with and without the passkey
    fine-tune, which changes the weights the passkey prompts are then completed with."""
    import titan_mla.ablate_latent as ablate

    weights_seen = []  # the output weights at the validation loss, then at the passkey score

    def recording(function):
        def record(model, *args, **kwargs):
            weights_seen.append(model.output.weight.detach().clone())
            return function(model, *args, **kwargs)

        return record

    monkeypatch.setattr(ablate, "validation_loss", recording(ablate.validation_loss))
    monkeypatch.setattr(
        ablate,
        "passkey_accuracy_full_forward",
        recording(ablate.passkey_accuracy_full_forward),
    )
    rows = torch.randint(0, 8192, (6, 73), generator=torch.Generator().manual_seed(0))
    results = {}
    for steps in (0, 2):
        setup = tiny_setup(steps)
        inputs, labels = passkey_data = passkey_rows(setup)
        assert inputs.shape == labels.shape == (2 * steps, 72)
        results[steps] = train_variant(
            Variant("mha", "mha"), setup, rows[:4], rows[4:], passkey_data, torch.device("cpu")
        )
    assert results[0]["val_loss"] == results[2]["val_loss"]
    assert results[0]["train_losses"] == results[2]["train_losses"]
    assert results[0]["passkey_losses"] == [] and len(results[2]["passkey_losses"]) == 2
    assert len(results[2]["passkey_examples"]) == 5
    no_fine_tune, fine_tuned = weights_seen[:2], weights_seen[2:]
    assert torch.equal(*no_fine_tune) and torch.equal(no_fine_tune[0], fine_tuned[0])
    assert not torch.equal(*fine_tuned)
    # Every fine-tune row labels its answer and end-of-sequence token only (-100 elsewhere).
    labelled = (passkey_data[1] != -100).sum(dim=1)
    assert ((labelled >= 4) & (labelled <= 7)).all()
    assert torch.equal(passkey_rows(tiny_setup(2))[0], inputs)  # the same rows for every variant


def test_stdlib_corpus_splits_are_deterministic_and_disjoint():
    train, validation = stdlib_files("train"), stdlib_files("validation")
    assert stdlib_files("validation") == validation
    assert not set(train) & set(validation)
    assert train == sorted(train) and validation == sorted(validation)
    # Roughly one file in HELD_OUT_EVERY = 10 is held out; no test suites are included.
    assert 0.05 < len(validation) / (len(train) + len(validation)) < 0.15
    assert len(train) > 300
    folders = {folder for p in train + validation for folder in p.parent.parts}
    assert not {"test", "tests", "idle_test", "site-packages"} & folders
    assert "unittest" in folders  # a library package, not a test suite
    assert any(p.name == "functools.py" for p in train + validation)
    texts = stdlib_documents("validation")
    assert load_corpus(STDLIB_CORPUS, "validation")["text"] == texts
    assert sum(map(len, texts)) > 100_000 and all("\n" in t for t in texts)
    with pytest.raises(ValueError, match="unknown split 'test' of builtin:python-stdlib"):
        stdlib_files("test")


def test_tiny_cpu_ablation_writes_the_table_and_one_mlflow_run_per_variant(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    steps = 3
    result = main(
        [
            "--size=debug",
            "--ranks=16,32",
            f"--steps={steps}",
            "--batch=2",
            "--seq-len=72",
            "--val-tokens=288",
            "--passkey-steps=2",
            "--passkey-samples=1",
            "--decode-context=64",
            "--decode-batch=1",
            "--decode-iters=1",
            "--mlflow",
            f"--tracking-uri={uri}",
            f"--out={tmp_path}",
        ]
    )
    names = [v["variant"]["name"] for v in result["variants"]]
    assert names == ["mla_r16", "mla_r32", "mha", "gqa_kv2"]
    for v in result["variants"]:
        if v["variant"]["attention"] == "mla":
            assert v["kv_cache_bytes_per_token"] == 4 * (v["variant"]["kv_lora_rank"] + 16) * 4
        # Trained: three steps on the same rows lower the training loss well below its start;
        # the validation loss of a barely trained model stays near uniform over 8192 tokens.
        assert v["train_losses"][-1] < v["train_losses"][0] - 0.5
        assert abs(v["val_loss"] - math.log(8192)) < 1.0
        assert v["val_ppl"] == pytest.approx(math.exp(v["val_loss"]))
        assert len(v["train_losses"]) == steps
        assert v["params"] > 7_000_000 and v["decode_tokens_per_s"] > 0
        # Passkey: two fine-tune steps on answer-only rows (the loss falls from about uniform),
        # then a prompt per depth scored, which a barely trained model gets wrong.
        assert len(v["passkey_losses"]) == 2 and abs(v["passkey_losses"][0] - math.log(8192)) < 1.0
        assert v["passkey_losses"][1] < v["passkey_losses"][0] - 0.5
        assert v["passkey_acc"] == 0.0
        assert v["passkey_acc_by_depth"] == {"0.0": 0, "0.25": 0, "0.5": 0, "0.75": 0, "1.0": 0}
        assert len(v["passkey_examples"]) == 5
    by_name = {v["variant"]["name"]: v for v in result["variants"]}
    assert by_name["mha"]["kv_cache_bytes_per_token"] == 4 * 2 * 8 * 32 * 4
    assert by_name["gqa_kv2"]["kv_cache_bytes_per_token"] == 4 * 2 * 2 * 32 * 4
    # Same width: MLA's latent projections make the attention smaller than MHA's at these ranks.
    assert by_name["mla_r16"]["params"] < by_name["mla_r32"]["params"] < by_name["mha"]["params"]

    summary = result["summary"]
    assert summary["train_tokens_per_variant"] == steps * 2 * 72
    assert summary["val_tokens"] == 288
    assert summary["passkey_acc_at_train_len"] == {n: 0.0 for n in names}
    assert summary["passkey_prompt_tokens"] == 72 - ANSWER_ROOM
    assert (summary["passkey_finetune_steps"], summary["passkey_finetune_rows"]) == (2, 4)
    assert summary["passkey_prompts"] == 5
    assert result["setup"]["passkey_steps"] == 2 and result["setup"]["passkey_samples"] == 1
    assert {k: summary[k] for k in ("best_latent_rank_within_1pct_of_mha", "mha_val_loss")} == {
        k: summarize(result["variants"])[k]
        for k in ("best_latent_rank_within_1pct_of_mha", "mha_val_loss")
    }
    on_disk = json.loads((tmp_path / "latent_ablation-cpu.json").read_text())
    assert on_disk["benchmark"] == "latent_ablation" and len(on_disk["rows"]) == 4 * 6
    passkey_rows_on_disk = [r for r in on_disk["rows"] if r["metric"] == "passkey acc @ 72"]
    assert [(r["case"], r["value"]) for r in passkey_rows_on_disk] == [(n, 0.0) for n in names]
    table = (tmp_path / "latent_ablation-cpu.md").read_text().splitlines()
    variant_rows = [line.split(" | ")[:5] for line in table if line.startswith("| ")][-5:]
    assert_expected_inline(
        "\n".join(" | ".join(cells[:1] + cells[4:]) for cells in variant_rows),
        """\
| variant | passkey acc @ 72
| mla_r16 | 0.00
| mla_r32 | 0.00
| mha | 0.00
| gqa_kv2 | 0.00""",
    )
    assert (tmp_path / "latent_ablation-cpu.png").read_bytes()[:4] == b"\x89PNG"

    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("latent_ablation")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == sorted(names)
    for run in runs:
        losses = client.get_metric_history(run.info.run_id, "loss")
        assert [m.step for m in losses] == [1, 2, 3]
        expected = by_name[run.info.run_name]
        assert [m.value for m in losses] == pytest.approx(expected["train_losses"])
        assert run.data.metrics["val_loss"] == pytest.approx(expected["val_loss"])
        assert run.data.metrics["passkey_acc"] == expected["passkey_acc"]
        passkey_losses = client.get_metric_history(run.info.run_id, "passkey_loss")
        assert [m.value for m in passkey_losses] == pytest.approx(expected["passkey_losses"])
        assert run.data.params["setup.steps"] == str(steps)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("variant", ["mla", "gqa"])
def test_variant_trains_compiled_and_decodes_in_a_cuda_graph(variant):
    from titan_mla.ablate_latent import SIZES

    setup = Setup(
        model=SIZES["debug"]["model"],
        steps=4,
        batch=4,
        seq_len=128,
        val_tokens=1024,
        lr=3e-3,
        warmup_steps=1,
        seed=0,
        compile=True,
        decode_batch=4,
        decode_context=1000,
        decode_iters=5,
        kernels="triton",
        passkey_steps=2,
        passkey_samples=4,
    )
    # Tokens drawn from 64 of the 8,192 ids: learning their unigram distribution drops the loss
    # by > 2 nats in 4 steps (on random ids of the whole vocabulary it only wanders by noise).
    rows = torch.randint(0, 64, (24, 129), generator=torch.Generator().manual_seed(0))
    spec = (
        Variant("mla_r64", "mla", kv_lora_rank=64)
        if variant == "mla"
        else Variant("gqa_kv2", "gqa", n_kv_heads=2)
    )
    data = passkey_rows(setup)
    result = train_variant(spec, setup, rows[:16], rows[16:], data, torch.device("cuda"))
    assert result["train_losses"][-1] < result["train_losses"][0] - 1.0
    assert len(result["passkey_losses"]) == 2 and 0.0 <= result["passkey_acc"] <= 1.0
    assert math.isfinite(result["val_loss"]) and result["decode_tokens_per_s"] > 0
    assert result["cache_dtype"] == "bfloat16"
