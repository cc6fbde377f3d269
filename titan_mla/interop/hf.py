"""Hugging Face interop: our MLATransformer as a transformers ``DeepseekV3ForCausalLM``.

An MLATransformer is a DeepSeek-V3 whose layers are all dense (``first_k_dense_replace`` =
``num_hidden_layers``, so no MoE weights exist) and that has no multi-token-prediction layers. The
two differ only in names, in ``q_lora_rank`` (0 here, ``None`` there for a full-rank ``q_proj``)
and in how the rotary settings are spelled:

- RoPE layout: we rotate consecutive pairs (x[2i], x[2i+1]); ``rope_interleave = true`` makes
  transformers do the same, so no weight rows are permuted.
- YaRN: transformers multiplies its softmax scale by mscale(factor, ``mscale_all_dim``)^2 and its
  cos/sin by ``attention_factor``. We scale the softmax by mscale(factor, ``mscale``)^2 and never
  cos/sin, so ``mscale_all_dim`` = ``mscale`` = ours and ``attention_factor`` = 1.
- transformers' q/kv latent norms always use eps 1e-6 (whatever ``rms_norm_eps`` says), so only
  models with ``norm_eps`` = 1e-6 export.

The directory format is the one ``save_pretrained`` writes: ``config.json``, ``model.safetensors``
(or ``model-0000i-of-0000n.safetensors`` shards and ``model.safetensors.index.json``),
``generation_config.json`` and the tokenizer files. Writing and reading it needs safetensors (which
transformers installs), not transformers itself.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import shutil
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torchtitan.protocols.state_dict_adapter import StateDictAdapter

from ..data.tokenizer import TOKENIZER_DIR
from ..inference.checkpoint import find_model_weights, load_model_weights
from ..inference.generator import parse_job_config
from ..models import MLAModelArgs, MLATransformer, mla_flavors
from ..models.rope import rope_cos_sin

try:
    from safetensors import safe_open
    from safetensors.torch import save_file
except ModuleNotFoundError as error:  # pragma: no cover - depends on the environment
    raise ModuleNotFoundError(
        "titan_mla.interop needs safetensors: pip install 'transformers>=5.17'"
    ) from error

HF_MODEL_TYPE = "deepseek_v3"
HF_ARCHITECTURE = "DeepseekV3ForCausalLM"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
# transformers' DeepseekV3RMSNorm default, which its q/kv latent norms use whatever the config says.
HF_LATENT_NORM_EPS = 1e-6

# Our parameter names (layer index as {}) -> transformers DeepseekV3ForCausalLM's.
_TO_HF_LAYER = {
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wq_a.weight": "self_attn.q_a_proj.weight",
    "attention.q_norm.weight": "self_attn.q_a_layernorm.weight",
    "attention.wq_b.weight": "self_attn.q_b_proj.weight",
    "attention.wkv_a.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attention.kv_norm.weight": "self_attn.kv_a_layernorm.weight",
    "attention.wkv_b.weight": "self_attn.kv_b_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}
_TO_HF_TOP = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_FROM_HF_LAYER = {hf: ours for ours, hf in _TO_HF_LAYER.items()}
_FROM_HF_TOP = {hf: ours for ours, hf in _TO_HF_TOP.items()}
_OUR_LAYER_NAME = re.compile(r"layers\.(\d+)\.(.+)")
_HF_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)")

# The MLAModelArgs fields that define the weights and the function (not kernels or max_seq_len).
ARCHITECTURE_FIELDS = (
    "dim",
    "n_layers",
    "n_heads",
    "vocab_size",
    "ffn_hidden_dim",
    "norm_eps",
    "tie_embeddings",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "rope_theta",
    "rope_factor",
    "original_seq_len",
    "beta_fast",
    "beta_slow",
    "mscale",
)


class MLAStateDictAdapter(StateDictAdapter):
    """Renames MLATransformer weights to transformers DeepseekV3ForCausalLM's and back.

    Tensors pass through unchanged (no permutation: the config sets ``rope_interleave``). With tied
    embeddings the HF side holds no ``lm_head.weight``; ``from_hf`` points ``output.weight`` at the
    embedding tensor.
    """

    def __init__(self, model_args: MLAModelArgs, hf_assets_path: str | None = None):
        super().__init__(model_args, hf_assets_path)
        self.model_args = model_args

    def to_hf(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        hf_state_dict = {}
        for name, tensor in state_dict.items():
            if name == "output.weight" and self.model_args.tie_embeddings:
                continue
            hf_state_dict[_rename(name, _TO_HF_TOP, _OUR_LAYER_NAME, _TO_HF_LAYER, "model.")] = (
                tensor
            )
        return hf_state_dict

    def from_hf(self, hf_state_dict: dict[str, Any]) -> dict[str, Any]:
        state_dict = {
            _rename(name, _FROM_HF_TOP, _HF_LAYER_NAME, _FROM_HF_LAYER, ""): tensor
            for name, tensor in hf_state_dict.items()
        }
        if self.model_args.tie_embeddings:
            state_dict.pop("output.weight", None)  # a tied copy some writers keep
            state_dict["output.weight"] = state_dict["tok_embeddings.weight"]
        return state_dict


def _rename(
    name: str,
    top_level: dict[str, str],
    layer_pattern: re.Pattern,
    layer_names: dict[str, str],
    layer_prefix: str,
) -> str:
    if name in top_level:
        return top_level[name]
    match = layer_pattern.fullmatch(name)
    if match is None or match[2] not in layer_names:
        raise KeyError(f"no Hugging Face DeepseekV3 counterpart is known for weight '{name}'")
    return f"{layer_prefix}layers.{match[1]}.{layer_names[match[2]]}"


# config.json


def hf_config(args: MLAModelArgs, bos_token_id: int | None, eos_token_id: int | None) -> dict:
    """The DeepseekV3Config (as config.json content) of a model with these arguments."""
    args.require_mla("export to Hugging Face DeepseekV3")
    if args.norm_eps != HF_LATENT_NORM_EPS:
        raise ValueError(
            f"norm_eps={args.norm_eps} cannot be exported: transformers' DeepseekV3 normalizes the "
            f"q/kv latents with eps {HF_LATENT_NORM_EPS} whatever rms_norm_eps says"
        )
    config = {
        "architectures": [HF_ARCHITECTURE],
        "model_type": HF_MODEL_TYPE,
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_heads,
        "q_lora_rank": args.q_lora_rank or None,
        "kv_lora_rank": args.kv_lora_rank,
        "qk_nope_head_dim": args.qk_nope_head_dim,
        "qk_rope_head_dim": args.qk_rope_head_dim,
        "v_head_dim": args.v_head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": args.norm_eps,
        "tie_word_embeddings": args.tie_embeddings,
        "attention_bias": False,
        "rope_theta": args.rope_theta,
        "rope_interleave": True,
        "max_position_embeddings": int(args.original_seq_len * max(args.rope_factor, 1.0)),
        # Every layer dense: no MoE layer (and no MoE weight) exists. The MoE sizes only have to
        # form a valid config.
        "first_k_dense_replace": args.n_layers,
        "n_routed_experts": 1,
        "n_shared_experts": 1,
        "num_experts_per_tok": 1,
        "n_group": 1,
        "topk_group": 1,
        "moe_intermediate_size": args.ffn_hidden_dim,
        "num_nextn_predict_layers": 0,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "torch_dtype": "float32",
    }
    if args.yarn_enabled:
        config["rope_scaling"] = {
            "type": "yarn",
            "rope_type": "yarn",
            "factor": args.rope_factor,
            "original_max_position_embeddings": args.original_seq_len,
            "beta_fast": args.beta_fast,
            "beta_slow": args.beta_slow,
            "mscale": args.mscale,
            "mscale_all_dim": args.mscale,
            "attention_factor": 1.0,
        }
    return config


def model_args_from_hf_config(config: dict) -> MLAModelArgs:
    """MLAModelArgs of a DeepseekV3 config.json; ValueError when it is not one we can run (MoE
    layers, grouped kv heads, non-interleaved RoPE, another RoPE scaling, ...)."""
    problems = []
    if config.get("model_type") != HF_MODEL_TYPE:
        problems.append(f"model_type is '{config.get('model_type')}', not '{HF_MODEL_TYPE}'")
    n_layers = config["num_hidden_layers"]
    if (config.get("first_k_dense_replace") or 0) < n_layers:
        problems.append(
            f"first_k_dense_replace={config.get('first_k_dense_replace')} < "
            f"num_hidden_layers={n_layers} (MoE layers)"
        )
    if (
        config.get("num_key_value_heads", config["num_attention_heads"])
        != config["num_attention_heads"]
    ):
        problems.append("num_key_value_heads differs from num_attention_heads")
    if not config.get("rope_interleave", True):
        problems.append("rope_interleave is false")
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act is '{config['hidden_act']}', not 'silu'")
    if config.get("attention_bias", False):
        problems.append("attention_bias is true")
    # transformers 5 writes rope_parameters (with rope_theta inside), older versions rope_scaling.
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "yarn"):
        problems.append(f"rope type '{rope_type}' (titan_mla has default and yarn)")
    yarn = rope_type == "yarn"
    if yarn and rope.get("attention_factor", 1.0) != 1.0:
        problems.append(f"YaRN attention_factor {rope['attention_factor']} (titan_mla has 1.0)")
    if yarn and rope.get("mscale_all_dim") != rope.get("mscale"):
        problems.append(
            f"YaRN mscale_all_dim={rope.get('mscale_all_dim')} differs from "
            f"mscale={rope.get('mscale')}"
        )
    if problems:
        raise ValueError("config.json is not a titan_mla model: " + "; ".join(problems))

    defaults = MLAModelArgs()
    # Without YaRN the context length only sizes the rope table: take max_position_embeddings.
    yarn_args = (
        dict(
            rope_factor=rope["factor"],
            original_seq_len=rope["original_max_position_embeddings"],
            beta_fast=rope.get("beta_fast") or defaults.beta_fast,
            beta_slow=rope.get("beta_slow") or defaults.beta_slow,
            mscale=rope.get("mscale", defaults.mscale),
        )
        if yarn
        else dict(original_seq_len=config.get("max_position_embeddings", defaults.original_seq_len))
    )
    return MLAModelArgs(
        dim=config["hidden_size"],
        n_layers=n_layers,
        n_heads=config["num_attention_heads"],
        vocab_size=config["vocab_size"],
        ffn_hidden_dim=config["intermediate_size"],
        norm_eps=config["rms_norm_eps"],
        tie_embeddings=config.get("tie_word_embeddings", False),
        q_lora_rank=config.get("q_lora_rank") or 0,
        kv_lora_rank=config["kv_lora_rank"],
        qk_nope_head_dim=config["qk_nope_head_dim"],
        qk_rope_head_dim=config["qk_rope_head_dim"],
        v_head_dim=config["v_head_dim"],
        rope_theta=rope.get("rope_theta", config.get("rope_theta", defaults.rope_theta)),
        **yarn_args,
        max_seq_len=config.get("max_position_embeddings", defaults.max_seq_len),
    )


def check_same_architecture(found: MLAModelArgs, expected: MLAModelArgs, flavor: str) -> None:
    """ValueError naming every architecture field in which ``found`` differs from ``expected``.
    Without YaRN the context length is no architecture field: it only sizes the rope table."""
    fields = [
        name
        for name in ARCHITECTURE_FIELDS
        if not (name == "original_seq_len" and not expected.yarn_enabled)
    ]
    differences = [
        f"{name} {getattr(found, name)} vs {getattr(expected, name)}"
        for name in fields
        if getattr(found, name) != getattr(expected, name)
    ]
    if differences:
        raise ValueError(
            f"the Hugging Face model does not match flavor '{flavor}' (config.json vs flavor): "
            + ", ".join(differences)
        )


# Writing and reading the directory.


def _token_ids(tokenizer_dir: Path) -> tuple[int | None, int | None]:
    """bos and eos ids named by tokenizer_config.json, looked up in tokenizer.json."""
    tokenizer_path, config_path = (tokenizer_dir / name for name in TOKENIZER_FILES)
    if not tokenizer_path.is_file():
        raise FileNotFoundError(
            f"tokenizer folder '{tokenizer_dir}' holds no tokenizer.json (model.hf_assets_path)"
        )
    special = json.loads(config_path.read_text()) if config_path.is_file() else {}
    vocab = {
        token["content"]: token["id"]
        for token in json.loads(tokenizer_path.read_text()).get("added_tokens", [])
    }
    return vocab.get(special.get("bos_token")), vocab.get(special.get("eos_token"))


def _prepare_output_dir(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"output '{out_dir}' exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not force:
            raise FileExistsError(f"output folder '{out_dir}' is not empty (--force replaces it)")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)


def _shards(hf_state_dict: dict[str, torch.Tensor], max_shard_bytes: int) -> list[list[str]]:
    """Weight names grouped, in order, into shards of at most max_shard_bytes (a larger tensor is
    a shard of its own)."""
    shards: list[list[str]] = [[]]
    shard_bytes = 0
    for name, tensor in hf_state_dict.items():
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(name)
        shard_bytes += size
    return shards


def save_hf_model(
    model: MLATransformer,
    out_dir: str | Path,
    *,
    tokenizer_dir: str | Path | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    dtype: torch.dtype | None = None,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Write ``model`` as a transformers DeepseekV3ForCausalLM directory: safetensors (in ``dtype``,
    default the model's), config.json, generation_config.json and the tokenizer files of
    ``tokenizer_dir`` (default: titan_mla's shipped tokenizer)."""
    out_dir = Path(out_dir)
    tokenizer_dir = Path(tokenizer_dir or TOKENIZER_DIR)
    args = model.model_args
    bos_token_id, eos_token_id = _token_ids(tokenizer_dir)
    config = hf_config(args, bos_token_id, eos_token_id)
    _prepare_output_dir(out_dir, force)

    adapter = MLAStateDictAdapter(args)
    # safetensors wants contiguous tensors that share no memory (to_hf drops a tied lm_head).
    hf_state_dict = {
        name: tensor.detach().to(dtype or tensor.dtype).contiguous().cpu()
        for name, tensor in adapter.to_hf(model.state_dict()).items()
    }
    config["torch_dtype"] = str(next(iter(hf_state_dict.values())).dtype).removeprefix("torch.")
    shards = _shards(hf_state_dict, max_shard_bytes)
    metadata = {"format": "pt"}
    if len(shards) == 1:
        log(f"writing {out_dir / SINGLE_FILE}")
        save_file(hf_state_dict, out_dir / SINGLE_FILE, metadata=metadata)
    else:
        weight_map = {}
        for index, names in enumerate(shards, start=1):
            file_name = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
            log(f"writing {out_dir / file_name} ({len(names)} tensors)")
            save_file({name: hf_state_dict[name] for name in names}, out_dir / file_name, metadata)
            weight_map.update(dict.fromkeys(names, file_name))
        total_size = sum(t.numel() * t.element_size() for t in hf_state_dict.values())
        index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")

    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation_config = {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id}
    (out_dir / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")
    for file_name in TOKENIZER_FILES:
        if (tokenizer_dir / file_name).is_file():
            shutil.copyfile(tokenizer_dir / file_name, out_dir / file_name)
    log(f"wrote {out_dir} ({len(hf_state_dict)} tensors in {len(shards)} file(s))")
    return out_dir


def read_hf_config(hf_dir: str | Path) -> dict:
    config_path = Path(hf_dir) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"'{hf_dir}' holds no config.json (not a Hugging Face model)")
    return json.loads(config_path.read_text())


def read_hf_state_dict(hf_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors file(s) of a Hugging Face model directory."""
    hf_dir = Path(hf_dir)
    if (hf_dir / INDEX_FILE).is_file():
        weight_map = json.loads((hf_dir / INDEX_FILE).read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    elif (hf_dir / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    else:
        raise FileNotFoundError(f"'{hf_dir}' holds neither {SINGLE_FILE} nor {INDEX_FILE}")
    state_dict = {}
    for file_name in files:
        with safe_open(hf_dir / file_name, framework="pt") as shard:
            state_dict.update({name: shard.get_tensor(name) for name in shard.keys()})  # noqa: SIM118
    return state_dict


def load_hf_model(
    hf_dir: str | Path, expected_args: MLAModelArgs | None = None, flavor: str = "expected"
) -> MLATransformer:
    """An MLATransformer (CPU, in the stored dtype) with the weights of a Hugging Face DeepseekV3
    directory. With ``expected_args`` the config must describe the same architecture (ValueError
    naming the differences); the model then takes their kernels and max_seq_len."""
    args = model_args_from_hf_config(read_hf_config(hf_dir))
    if expected_args is not None:
        check_same_architecture(args, expected_args, flavor)
        args = dataclasses.replace(
            args, kernels=expected_args.kernels, max_seq_len=expected_args.max_seq_len
        )
    state_dict = MLAStateDictAdapter(args).from_hf(read_hf_state_dict(hf_dir))
    with torch.device("meta"):
        model = MLATransformer(args)
    expected_shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    missing = [name for name in expected_shapes if name not in state_dict]
    unexpected = [name for name in state_dict if name not in expected_shapes]
    mismatched = [
        f"{name} {tuple(state_dict[name].shape)} vs {shape}"
        for name, shape in expected_shapes.items()
        if name in state_dict and tuple(state_dict[name].shape) != shape
    ]
    problems = [
        f"{label}: {', '.join(names[:3])}"
        for label, names in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("of another shape (stored vs config)", mismatched),
        )
        if names
    ]
    if problems:
        raise ValueError(
            f"the weights in '{hf_dir}' do not match its config.json: " + "; ".join(problems)
        )
    model.load_state_dict(state_dict, assign=True)
    if args.tie_embeddings:  # assign replaced the shared Parameter by two
        model.output.weight = model.tok_embeddings.weight
    model.rope_cache = rope_cos_sin(args)
    return model.eval()


# From and to torchtitan DCP checkpoints, as the CLIs use them.


def _flavor_args(job_config) -> tuple[str, MLAModelArgs]:
    flavor = job_config.model.flavor
    if flavor not in mla_flavors:
        raise ValueError(f"unknown model.flavor '{flavor}'; titan_mla has {sorted(mla_flavors)}")
    args = copy.deepcopy(mla_flavors[flavor])
    args.update_from_config(job_config)
    return flavor, args


def _stored_dtype(folder: Path, name: str) -> torch.dtype:
    return FileSystemReader(folder).read_metadata().state_dict_metadata[name].properties.dtype


def export_checkpoint(
    config_file: str | Path,
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    overrides: Sequence[str] = (),
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Export the model weights of a torchtitan DCP checkpoint (step folder, or the checkpoint
    folder for its latest step) of the job config's flavor as a Hugging Face directory, in
    ``dtype`` (default: as stored)."""
    job_config = parse_job_config(config_file, overrides)
    flavor, args = _flavor_args(job_config)
    with torch.device("meta"):
        model = MLATransformer(args)
    folder, prefix = find_model_weights(checkpoint, model, flavor)
    stored_dtype = _stored_dtype(folder, prefix + "tok_embeddings.weight")
    log(f"loading {folder} (flavor '{flavor}', {stored_dtype})")
    model = model.to(stored_dtype).to_empty(device="cpu")
    load_model_weights(model, folder, prefix)
    return save_hf_model(
        model,
        out_dir,
        tokenizer_dir=job_config.model.hf_assets_path or None,
        max_shard_bytes=max_shard_bytes,
        dtype=dtype,
        force=force,
        log=log,
    )


def import_checkpoint(
    config_file: str | Path,
    hf_dir: str | Path,
    out_checkpoint: str | Path,
    *,
    overrides: Sequence[str] = (),
    dtype: torch.dtype | None = None,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Save the weights of a Hugging Face DeepseekV3 directory, which must match the job config's
    flavor, as a torchtitan DCP checkpoint of the model alone (our names, ``dtype`` default as
    stored): what ``--checkpoint.initial_load_path`` loads."""
    job_config = parse_job_config(config_file, overrides)
    flavor, args = _flavor_args(job_config)
    log(f"reading {hf_dir}")
    model = load_hf_model(hf_dir, args, flavor)
    out_checkpoint = Path(out_checkpoint)
    _prepare_output_dir(out_checkpoint, force)
    state_dict = {
        name: tensor.to(dtype or tensor.dtype) for name, tensor in model.state_dict().items()
    }
    log(f"writing {out_checkpoint} ({len(state_dict)} tensors, flavor '{flavor}')")
    with warnings.catch_warnings():
        # One process and no process group is the intended use here.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state_dict, checkpoint_id=out_checkpoint)
    return out_checkpoint
