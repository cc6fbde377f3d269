"""The anchor a user would pick instead of titan_mla: torchtitan's own deepseek_v3 modules configured as
the same dense model as titan_mla's 1B flavor (every layer dense, no low-rank query, SDPA).

    ./run_train.sh --job.config_file train_configs/mla_1b.toml --model.name deepseek_v3 \
        --model.flavor dense_1B --experimental.custom_import benchmarks.torchtitan_baseline
"""

from torchtitan.models.deepseek_v3 import DeepSeekV3ModelArgs, deepseekv3_args

import titan_mla  # noqa: F401  (the same corpus and tokenizer)
from titan_mla.models import mla_flavors

_ours = mla_flavors["1B"]
deepseekv3_args["dense_1B"] = DeepSeekV3ModelArgs(
    vocab_size=_ours.vocab_size,
    dim=_ours.dim,
    inter_dim=_ours.ffn_hidden_dim,
    n_layers=_ours.n_layers,
    n_dense_layers=_ours.n_layers,
    n_heads=_ours.n_heads,
    q_lora_rank=_ours.q_lora_rank,
    kv_lora_rank=_ours.kv_lora_rank,
    qk_nope_head_dim=_ours.qk_nope_head_dim,
    qk_rope_head_dim=_ours.qk_rope_head_dim,
    v_head_dim=_ours.v_head_dim,
    max_seq_len=_ours.original_seq_len,
    original_seq_len=_ours.original_seq_len,
    attn_type="sdpa",
    attn_mask_type="causal",
)
