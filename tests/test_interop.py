"""Hugging Face interop: exported models give transformers' DeepseekV3ForCausalLM our logits, export
then import gives back the same weights bit for bit, and mistakes are clear errors (CPU; the GPU
test at the end skips without CUDA)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from expecttest import assert_expected_inline
from helpers import REPO

# Before titan_mla.interop, which needs safetensors (a transformers dependency).
transformers = pytest.importorskip(
    "transformers", reason="the Hugging Face interop tests need transformers>=5.17"
)
import huggingface_hub.constants  # noqa: E402

from titan_mla import export_hf, import_hf  # noqa: E402
from titan_mla.inference.checkpoint import find_model_weights, load_model_weights  # noqa: E402
from titan_mla.interop.hf import MLAStateDictAdapter, hf_config, save_hf_model  # noqa: E402
from titan_mla.models import MLAModelArgs, MLATransformer, mla_flavors  # noqa: E402
from titan_mla.models.rope import rope_cos_sin, rope_inv_freq  # noqa: E402


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch):
    """Nothing may come from the Hub. huggingface_hub read HF_HUB_OFFLINE when first imported
    (before this module), so its constant is set too; every load also passes local_files_only."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


DEBUG_CONFIG = REPO / "train_configs" / "debug_model.toml"
TOKENIZER_OVERRIDE = f"--model.hf_assets_path={REPO / 'titan_mla' / 'data' / 'tokenizer'}"
# PyTorch norms and rotations: the Triton interpreter (conftest, no CUDA) would only be slower.
TINY = dataclasses.replace(mla_flavors["debugmodel"], n_layers=2, kernels="torch")
# Measured: 2.1e-7 to 5.8e-7 of the largest logit (fp32, CPU) for every case below. A RoPE layout
# mismatch (rope_interleave false) gives 0.29 and a missing YaRN softmax correction 0.14.
FP32_TOLERANCE = 1e-4

CASES = {
    "full_rank_q": TINY,
    "q_lora": dataclasses.replace(TINY, q_lora_rank=32),
    "tied_embeddings": dataclasses.replace(TINY, tie_embeddings=True),
    # Positions up to 200 against an original context of 64.
    "yarn": dataclasses.replace(TINY, rope_factor=4.0, original_seq_len=64, max_seq_len=256),
}


def random_model(args: MLAModelArgs, device: torch.device | str = "cpu") -> MLATransformer:
    """Weights of unit-scale activations (std 1/sqrt(fan_in)) and norms away from 1, so that every
    weight, the rotation layout and the softmax scale all move the logits visibly."""
    torch.manual_seed(0)
    with torch.device(device):
        model = MLATransformer(args)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            elif name == "tok_embeddings.weight":
                param.normal_()
            else:
                param.normal_(std=param.shape[1] ** -0.5)
    return model.eval()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest deviation as a fraction of the largest expected logit."""
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


def load_transformers_model(path: Path, dtype: torch.dtype = torch.float32):
    return transformers.DeepseekV3ForCausalLM.from_pretrained(
        path, local_files_only=True, dtype=dtype
    ).eval()


@pytest.mark.parametrize("case", CASES)
def test_transformers_gives_our_logits(tmp_path, case):
    args = CASES[case]
    model = random_model(args)
    save_hf_model(model, tmp_path, log=lambda _: None)
    hf_model = load_transformers_model(tmp_path)

    tokens = torch.randint(0, args.vocab_size, (2, 200), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(tokens), hf_model(tokens).logits
    assert relative_error(theirs, ours) <= FP32_TOLERANCE

    attention = hf_model.model.layers[0].self_attn
    assert attention.scaling == pytest.approx(args.softmax_scale, rel=1e-12)
    rotary = hf_model.model.rotary_emb
    assert rotary.attention_scaling == 1.0
    # transformers computes YaRN in float32, we in float64: a few ulps apart.
    torch.testing.assert_close(rotary.inv_freq, rope_inv_freq(args), rtol=1e-6, atol=0)
    if args.tie_embeddings:
        assert hf_model.lm_head.weight is hf_model.model.embed_tokens.weight
    if args.yarn_enabled:
        rope = hf_model.config.rope_parameters
        survived = {key: rope[key] for key in ("rope_type", "factor", "beta_fast", "beta_slow")}
        survived |= {key: rope[key] for key in ("original_max_position_embeddings", "mscale")}
        survived["max_position_embeddings"] = hf_model.config.max_position_embeddings
        assert_expected_inline(
            str(survived),
            """{'rope_type': 'yarn', 'factor': 4.0, 'beta_fast': 32.0, 'beta_slow': 1.0, 'original_max_position_embeddings': 64, 'mscale': 1.0, 'max_position_embeddings': 256}""",
        )
        beyond = slice(args.original_seq_len, None)
        assert relative_error(theirs[:, beyond], ours[:, beyond]) <= FP32_TOLERANCE


def test_transformers_greedy_generation_matches_ours(tmp_path):
    """transformers' generate (its latent KV cache, positions past original_seq_len) picks the
    tokens that our full forward picks."""
    args = CASES["yarn"]
    model = random_model(args)
    save_hf_model(model, tmp_path, log=lambda _: None)
    hf_model = load_transformers_model(tmp_path)
    prompt = torch.randint(2, args.vocab_size, (1, 60), generator=torch.Generator().manual_seed(3))
    theirs = hf_model.generate(prompt, max_new_tokens=40, min_new_tokens=40, do_sample=False)
    ours = prompt
    with torch.no_grad():
        for _ in range(40):
            ours = torch.cat([ours, model(ours)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(theirs, ours)


def test_adapter_names_are_transformers_names():
    """Every name to_hf gives is a parameter of transformers' model, and from_hf inverts it."""
    args = CASES["q_lora"]
    config = transformers.DeepseekV3Config(**hf_config(args, bos_token_id=0, eos_token_id=1))
    with torch.device("meta"):
        hf_model = transformers.DeepseekV3ForCausalLM(config)
        model = MLATransformer(args)
    adapter = MLAStateDictAdapter(args)
    hf_names = adapter.to_hf(model.state_dict())
    assert sorted(hf_names) == sorted(hf_model.state_dict())
    assert sorted(adapter.from_hf(hf_names)) == sorted(model.state_dict())


def save_debug_checkpoint(folder: Path) -> MLATransformer:
    """A random debugmodel DCP checkpoint (model weights only, our names) as training writes it."""
    model = random_model(mla_flavors["debugmodel"])
    dcp.save(model.state_dict(), checkpoint_id=folder)
    return model


def test_export_then_import_gives_identical_weights(tmp_path, capsys):
    original = save_debug_checkpoint(tmp_path / "checkpoint" / "step-5")
    hf_dir, imported = tmp_path / "hf", tmp_path / "imported" / "step-0"
    # 30 MB of fp32 weights in shards of at most 10 MiB.
    export_hf.main(
        [
            f"--job.config_file={DEBUG_CONFIG}",
            f"--checkpoint={tmp_path / 'checkpoint'}",
            f"--out={hf_dir}",
            "--max-shard-gb=0.01",
            TOKENIZER_OVERRIDE,
        ]
    )
    import_hf.main([f"--job.config_file={DEBUG_CONFIG}", f"--hf-dir={hf_dir}", f"--out={imported}"])
    log = capsys.readouterr().out.replace(str(tmp_path), "TMP")
    assert_expected_inline(
        log,
        """\
loading TMP/checkpoint/step-5 (flavor 'debugmodel', torch.float32)
writing TMP/hf/model-00001-of-00003.safetensors (9 tensors)
writing TMP/hf/model-00002-of-00003.safetensors (31 tensors)
writing TMP/hf/model-00003-of-00003.safetensors (3 tensors)
wrote TMP/hf (43 tensors in 3 file(s))
reading TMP/hf
writing TMP/imported/step-0 (43 tensors, flavor 'debugmodel')
""",
    )
    assert sorted(p.name for p in hf_dir.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert json.loads((hf_dir / "generation_config.json").read_text()) == {
        "bos_token_id": 0,
        "eos_token_id": 1,
    }
    assert load_transformers_model(hf_dir).lm_head.weight.shape == (8192, 256)

    # What --checkpoint.initial_load_path reads: our names, no prefix, the model alone.
    with torch.device("meta"):
        reloaded = MLATransformer(mla_flavors["debugmodel"])
    folder, prefix = find_model_weights(imported, reloaded, "debugmodel")
    assert prefix == ""
    reloaded = reloaded.to_empty(device="cpu")
    load_model_weights(reloaded, folder, prefix)
    expected = original.state_dict()
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def error_of(main, tmp_path: Path, *argv: str) -> str:
    with pytest.raises(SystemExit) as raised:
        main([str(arg) for arg in argv])
    return str(raised.value).replace(str(tmp_path), "TMP")


def test_mistakes_are_clear_errors(tmp_path):
    config = f"--job.config_file={DEBUG_CONFIG}"
    hf_dir = tmp_path / "hf"

    def export(*argv: str) -> str:
        return error_of(export_hf.main, tmp_path, config, TOKENIZER_OVERRIDE, *argv)

    def import_(*argv: str) -> str:
        return error_of(import_hf.main, tmp_path, config, f"--out={tmp_path / 'out'}", *argv)

    assert_expected_inline(
        export(f"--checkpoint={tmp_path / 'missing'}", f"--out={hf_dir}"),
        """titan_mla.export_hf: error: checkpoint folder 'TMP/missing' does not exist""",
    )
    save_debug_checkpoint(tmp_path / "step-1")
    assert_expected_inline(
        export(f"--checkpoint={tmp_path}", f"--out={hf_dir}", "--model.flavor=2B"),
        """titan_mla.export_hf: error: unknown model.flavor '2B'; titan_mla has ['1B', '1B_long', '1B_yarn128k', '1B_yarn32k', 'debugmodel']""",
    )
    hf_dir.mkdir()
    (hf_dir / "notes.txt").write_text("keep me")
    assert_expected_inline(
        export(f"--checkpoint={tmp_path}", f"--out={hf_dir}"),
        """titan_mla.export_hf: error: output folder 'TMP/hf' is not empty (--force replaces it)""",
    )
    export_hf.main(
        [config, TOKENIZER_OVERRIDE, f"--checkpoint={tmp_path}", f"--out={hf_dir}", "--force"]
    )

    assert_expected_inline(
        import_(f"--hf-dir={tmp_path / 'missing'}"),
        """titan_mla.import_hf: error: 'TMP/missing' holds no config.json (not a Hugging Face model)""",
    )
    assert_expected_inline(
        import_(f"--hf-dir={hf_dir}", "--model.flavor=1B"),
        """titan_mla.import_hf: error: the Hugging Face model does not match flavor '1B' (config.json vs flavor): dim 256 vs 2048, n_layers 4 vs 16, n_heads 8 vs 16, vocab_size 8192 vs 32768, ffn_hidden_dim 768 vs 8192, kv_lora_rank 64 vs 512, qk_nope_head_dim 32 vs 128, qk_rope_head_dim 16 vs 64, v_head_dim 32 vs 128""",
    )
    moe_config = json.loads((hf_dir / "config.json").read_text())
    moe_config |= {"first_k_dense_replace": 1, "num_key_value_heads": 1, "rope_interleave": False}
    (hf_dir / "config.json").write_text(json.dumps(moe_config))
    assert_expected_inline(
        import_(f"--hf-dir={hf_dir}"),
        """titan_mla.import_hf: error: config.json is not a titan_mla model: first_k_dense_replace=1 < num_hidden_layers=4 (MoE layers); num_key_value_heads differs from num_attention_heads; rope_interleave is false""",
    )

    with pytest.raises(ValueError) as raised:
        hf_config(dataclasses.replace(TINY, norm_eps=1e-5), bos_token_id=0, eos_token_id=1)
    assert_expected_inline(
        str(raised.value),
        """norm_eps=1e-05 cannot be exported: transformers' DeepseekV3 normalizes the q/kv latents with eps 1e-06 whatever rms_norm_eps says""",
    )


# GPU: the 1B flavor in bf16. The bound is relative to what bf16 costs our own model: transformers'
# bf16 logits must stay as close to our fp32 logits as our bf16 logits are (within 2x), and all
# three deviations within BF16_TOLERANCE of the largest fp32 logit. Measured on CPU (PyTorch
# kernels, 512 tokens, these random weights): ours 1.9e-2, transformers 2.1e-2, ours vs
# transformers 2.1e-2 (4 layers: 1.0e-2, 1.1e-2, 1.1e-2).
BF16_TOLERANCE = 5e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_1b_bf16_logits_match_transformers_on_gpu(tmp_path):
    args = dataclasses.replace(mla_flavors["1B"], max_seq_len=512)  # Triton kernels
    errors = bf16_logit_errors(args, "cuda", tmp_path)
    print(f"bf16 logits vs our fp32 reference (fraction of the largest logit): {errors}")
    assert errors["transformers"] <= 2 * errors["ours"] + 1e-3
    assert max(errors.values()) <= BF16_TOLERANCE


def bf16_logit_errors(
    args: MLAModelArgs, device: str, tmp_path: Path, seq_len: int = 512
) -> dict[str, float]:
    """Deviations from our fp32 logits of our bf16 model, of transformers' bf16 model (exported
    through save_hf_model), and of one from the other. Peak memory for the 1B flavor: fp32 weights
    (4.6 GB) + one bf16 copy (2.3 GB) + logits (0.1 GB each)."""
    reference = random_model(args, device)
    tokens = torch.randint(0, args.vocab_size, (1, seq_len), device=device)
    with torch.no_grad():
        reference_logits = reference(tokens)
    save_hf_model(reference, tmp_path, dtype=torch.bfloat16, log=lambda _: None)
    ours = reference.to(torch.bfloat16)  # in place: the fp32 weights are no longer needed
    ours.rope_cache = rope_cos_sin(args, device)  # .to(bf16) cast the fp32 rope table too
    with torch.no_grad():
        our_logits = ours(tokens)
    del ours
    hf_model = load_transformers_model(tmp_path, torch.bfloat16).to(device)
    with torch.no_grad():
        hf_logits = hf_model(tokens).logits
    return {
        "ours": relative_error(our_logits, reference_logits),
        "transformers": relative_error(hf_logits, reference_logits),
        "ours_vs_transformers": relative_error(hf_logits, our_logits),
    }
