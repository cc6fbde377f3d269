"""The MLA transformer against a float64 reference written plainly from the equations."""

import math

import pytest
import torch
from expecttest import assert_expected_inline

from titan_mla.models import MLAModelArgs, MLATransformer, mla_flavors
from titan_mla.models.rope import rope_inv_freq

SMALL = dict(
    dim=64,
    n_layers=2,
    n_heads=4,
    vocab_size=97,
    ffn_hidden_dim=96,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=12,
    max_seq_len=24,
    original_seq_len=8,
)


def rms_norm64(x, weight, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rotate64(x, angles):
    """Rotate consecutive pairs of x (..., seq, d) by angles (seq, d/2)."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    cos, sin = angles.cos(), angles.sin()
    out = torch.empty_like(x)
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x0 * sin + x1 * cos
    return out


def mla_attention64(args: MLAModelArgs, p: dict, x: torch.Tensor, angles, causal) -> torch.Tensor:
    """Per-head causal softmax attention over the expanded keys and values."""
    if args.q_lora_rank:
        q_latent = rms_norm64(
            x @ p["attention.wq_a.weight"].T, p["attention.q_norm.weight"], args.norm_eps
        )
        q_all = q_latent @ p["attention.wq_b.weight"].T
    else:
        q_all = x @ p["attention.wq.weight"].T
    kv_a = x @ p["attention.wkv_a.weight"].T
    latent = rms_norm64(
        kv_a[..., : args.kv_lora_rank], p["attention.kv_norm.weight"], args.norm_eps
    )
    k_rope = rotate64(kv_a[..., args.kv_lora_rank :], angles)
    kv_all = latent @ p["attention.wkv_b.weight"].T
    heads = []
    for head in range(args.n_heads):
        q = q_all[..., head * args.qk_head_dim : (head + 1) * args.qk_head_dim]
        q = torch.cat(
            [q[..., : args.qk_nope_head_dim], rotate64(q[..., args.qk_nope_head_dim :], angles)],
            -1,
        )
        kv = kv_all[..., head * (args.qk_nope_head_dim + args.v_head_dim) :][
            ..., : args.qk_nope_head_dim + args.v_head_dim
        ]
        k = torch.cat([kv[..., : args.qk_nope_head_dim], k_rope], -1)
        v = kv[..., args.qk_nope_head_dim :]
        scores = (q @ k.transpose(-1, -2)) * args.softmax_scale
        heads.append(scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v)
    return torch.cat(heads, -1)


def gqa_attention64(args: MLAModelArgs, p: dict, x: torch.Tensor, angles, causal) -> torch.Tensor:
    """Query head i attends with key/value head i // (n_heads // n_kv_heads), whole head rotated."""
    d = args.head_dim
    q_all, k_all, v_all = (x @ p[f"attention.{w}.weight"].T for w in ("wq", "wk", "wv"))
    heads = []
    for head in range(args.n_heads):
        kv_head = head // (args.n_heads // args.n_kv_heads)
        q = rotate64(q_all[..., head * d : (head + 1) * d], angles)
        k = rotate64(k_all[..., kv_head * d : (kv_head + 1) * d], angles)
        v = v_all[..., kv_head * d : (kv_head + 1) * d]
        scores = (q @ k.transpose(-1, -2)) * args.softmax_scale
        heads.append(scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v)
    return torch.cat(heads, -1)


def reference_forward(model: MLATransformer, tokens: torch.Tensor) -> torch.Tensor:
    """The whole model in float64, attention by mla_attention64 or gqa_attention64."""
    args = model.model_args
    attention = mla_attention64 if args.attention == "mla" else gqa_attention64
    params = {name: p.detach().double() for name, p in model.named_parameters()}
    seq_len = tokens.shape[1]
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), rope_inv_freq(args).double())
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    h = params["tok_embeddings.weight"][tokens]
    for i in range(args.n_layers):
        p = {
            k.removeprefix(f"layers.{i}."): v
            for k, v in params.items()
            if k.startswith(f"layers.{i}.")
        }
        x = rms_norm64(h, p["attention_norm.weight"], args.norm_eps)
        h = h + attention(args, p, x, angles, causal) @ p["attention.wo.weight"].T
        x = rms_norm64(h, p["ffn_norm.weight"], args.norm_eps)
        gate, up = x @ p["feed_forward.w1.weight"].T, x @ p["feed_forward.w3.weight"].T
        h = h + (torch.nn.functional.silu(gate) * up) @ p["feed_forward.w2.weight"].T
    head = params["tok_embeddings.weight" if args.tie_embeddings else "output.weight"]
    return rms_norm64(h, params["norm.weight"], args.norm_eps) @ head.T


def build(**overrides) -> MLATransformer:
    model = MLATransformer(MLAModelArgs(**{**SMALL, **overrides}))
    with torch.no_grad():
        model.init_weights()
        # Random norm weights too, so a missing norm weight would show.
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"kernels": "torch"},
        {"q_lora_rank": 24},
        {"tie_embeddings": True},
        {"rope_factor": 4.0, "mscale": 0.7},
        {"attention": "mha"},
        {"attention": "gqa", "n_kv_heads": 2, "head_dim": 8},
        {"attention": "gqa", "n_kv_heads": 1, "rope_factor": 4.0, "mscale": 0.7},
    ],
    ids=["triton", "torch", "q_lora", "tied", "yarn", "mha", "gqa", "mqa_yarn"],
)
def test_forward_matches_float64_reference(overrides):
    torch.manual_seed(0)
    model = build(**overrides)
    tokens = torch.randint(0, SMALL["vocab_size"], (3, 24))
    logits = model(tokens)
    expected = reference_forward(model, tokens)
    rel_err = (logits.double() - expected).norm() / expected.norm()
    assert rel_err < 1e-5, rel_err


def test_explicit_positions_equal_default_and_shift_rope():
    torch.manual_seed(1)
    model = build()
    tokens = torch.randint(0, SMALL["vocab_size"], (2, 16))
    torch.testing.assert_close(
        model(tokens, positions=torch.arange(16)), model(tokens), rtol=0, atol=0
    )
    # Attention depends on relative positions only: shifting every position leaves logits unchanged.
    shifted = model(tokens, positions=torch.arange(16).expand(2, 16) + 5)
    torch.testing.assert_close(shifted, model(tokens), rtol=1e-5, atol=1e-5)


def deepseek_yarn_inv_freq(dim, base, factor, original_len, beta_fast, beta_slow):
    """DeepSeek-V3's inference/model.py formula, written out per index."""

    def correction_dim(rotations):
        return dim * math.log(original_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    out = []
    for i in range(dim // 2):
        freq = 1.0 / base ** (2 * i / dim)
        smooth = 1 - min(max((i - low) / (high - low), 0.0), 1.0)
        out.append(freq / factor * (1 - smooth) + freq * smooth)
    return out


@pytest.mark.parametrize("factor,original_len", [(40.0, 4096), (256.0, 4096), (4.0, 512)])
def test_yarn_frequencies_and_scale_match_deepseek_formulas(factor, original_len):
    args = MLAModelArgs(rope_factor=factor, original_seq_len=original_len, mscale=0.707)
    ours = rope_inv_freq(args).double()
    expected = deepseek_yarn_inv_freq(64, 10000.0, factor, original_len, 32, 1)
    for i in (0, 5, 10, 15, 20, 25, 31):
        assert ours[i].item() == pytest.approx(expected[i], rel=1e-6), i
    # High frequencies stay, the lowest is interpolated by the full factor.
    assert ours[0].item() == pytest.approx(1.0)
    assert ours[31].item() == pytest.approx(10000.0 ** (-62 / 64) / factor, rel=1e-6)
    mscale = 0.1 * 0.707 * math.log(factor) + 1.0
    assert args.softmax_scale == pytest.approx(192**-0.5 * mscale**2)


def test_no_yarn_without_rope_factor():
    args = MLAModelArgs()
    assert args.softmax_scale == pytest.approx(192**-0.5)
    torch.testing.assert_close(rope_inv_freq(args), 10000.0 ** (-torch.arange(0, 64, 2) / 64))


def parameter_table(flavor: str) -> str:
    with torch.device("meta"):
        model = MLATransformer(mla_flavors[flavor])
    groups: dict[str, int] = {}
    for name, p in model.named_parameters():
        key = (
            name
            if not name.startswith("layers.")
            else "layers.*." + name.split(".", 2)[2].rsplit(".", 1)[0]
        )
        groups[key] = groups.get(key, 0) + p.numel()
    total = sum(p.numel() for p in model.parameters())
    blocks = sum(v for k, v in groups.items() if k.startswith("layers."))
    rows = [f"{k:<32} {v:>14,}" for k, v in groups.items()]
    rows += [f"{'total':<32} {total:>14,}", f"{'blocks (non-embedding)':<32} {blocks:>14,}"]
    return "\n".join(rows)


def test_1b_parameter_count():
    assert_expected_inline(
        parameter_table("1B"),
        """\
tok_embeddings.weight                67,108,864
layers.*.attention_norm                  32,768
layers.*.attention.wq               100,663,296
layers.*.attention.wkv_a             18,874,368
layers.*.attention.kv_norm                8,192
layers.*.attention.wkv_b             33,554,432
layers.*.attention.wo                67,108,864
layers.*.ffn_norm                        32,768
layers.*.feed_forward.w1            268,435,456
layers.*.feed_forward.w3            268,435,456
layers.*.feed_forward.w2            268,435,456
norm.weight                               2,048
output.weight                        67,108,864
total                             1,159,800,832
blocks (non-embedding)            1,025,581,056""",
    )


def test_flops_include_attention_term():
    args = mla_flavors["1B"]
    with torch.device("meta"):
        model = MLATransformer(args)
    nparams, flops = args.get_nparams_and_flops(model, 4096)
    matmul_params = nparams - args.vocab_size * args.dim
    attention = 6 * 16 * 16 * (192 + 128) * 4096
    assert flops == 6 * matmul_params + attention
    assert attention / flops == pytest.approx(0.235, abs=0.01)


def test_unsupported_seq_len_names_the_limit():
    args = MLAModelArgs(original_seq_len=4096)

    class Cfg:
        class training:
            seq_len = 8192

    with pytest.raises(ValueError, match=r"training.seq_len=8192 exceeds the 4096 positions"):
        args.update_from_config(Cfg)


def test_gqa_parameters_and_flops():
    # dim 64, 4 query heads and 2 key/value heads of 8: wq 64x32, wk and wv 64x16 each, wo 32x64.
    args = MLAModelArgs(**{**SMALL, "attention": "gqa", "n_kv_heads": 2, "head_dim": 8})
    model = MLATransformer(args)
    attention = model.layers["0"].attention
    assert [attention.get_submodule(w).weight.shape for w in ("wq", "wk", "wv", "wo")] == [
        (32, 64),
        (16, 64),
        (16, 64),
        (64, 32),
    ]
    nparams, flops = args.get_nparams_and_flops(model, 24)
    blocks = 2 * (64 * 32 + 2 * 64 * 16 + 32 * 64 + 3 * 64 * 96 + 2 * 64)
    assert nparams == blocks + 2 * 97 * 64 + 64
    assert flops == 6 * (nparams - 97 * 64) + 6 * 2 * 4 * (8 + 8) * 24
    assert args.softmax_scale == pytest.approx(8**-0.5)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"attention": "gpa"}, "unknown attention 'gpa'; supported: mla, mha, gqa"),
        (
            {"attention": "mha", "n_kv_heads": 2},
            "attention 'mha' has n_kv_heads = n_heads = 4, not 2; use attention 'gqa' for fewer "
            "key/value heads",
        ),
        ({"attention": "gqa", "n_kv_heads": 3}, "n_kv_heads=3 does not divide n_heads=4"),
    ],
)
def test_bad_attention_config_is_refused(overrides, message):
    with pytest.raises(ValueError) as err:
        MLAModelArgs(**{**SMALL, **overrides})
    assert str(err.value) == message


def test_mla_only_features_refuse_baselines(tmp_path):
    from titan_mla.inference import MLAEngine, PagedLatentCache
    from titan_mla.interop.hf import save_hf_model

    model = build(attention="gqa", n_kv_heads=2)
    cache = PagedLatentCache.for_model(model.model_args, max_tokens=64)
    with pytest.raises(ValueError) as err:
        MLAEngine(model, cache)
    assert_expected_inline(
        str(err.value),
        """MLAEngine (the latent-cache inference engine) supports only attention 'mla' models, not 'gqa'""",
    )
    with pytest.raises(ValueError, match="export to Hugging Face DeepseekV3 supports only"):
        save_hf_model(model, tmp_path / "hf")
