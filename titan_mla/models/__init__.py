"""The MLA transformer, its flavors, and the torchtitan TrainSpec that trains it."""

from torchtitan.components.loss import build_cross_entropy_loss
from torchtitan.components.lr_scheduler import build_lr_schedulers
from torchtitan.components.optimizer import build_optimizers
from torchtitan.components.validate import build_validator
from torchtitan.hf_datasets.text_datasets import build_text_dataloader
from torchtitan.protocols.train_spec import TrainSpec

from ..data.tokenizer import build_tokenizer
from ..parallelisms import parallelize_mla
from ..tracking import build_metrics_processor
from .args import MLAModelArgs
from .model import MLATransformer

_1B = dict(
    dim=2048,
    n_layers=16,
    n_heads=16,
    vocab_size=32768,
    ffn_hidden_dim=8192,
    kv_lora_rank=512,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
)

mla_flavors: dict[str, MLAModelArgs] = {
    # Small enough to train on a 2-core CPU in seconds; vocab = the shipped tokenizer's.
    "debugmodel": MLAModelArgs(
        dim=256,
        n_layers=4,
        n_heads=8,
        vocab_size=8192,
        ffn_hidden_dim=768,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        max_seq_len=512,
        original_seq_len=512,
    ),
    # InfiniteContext-1B: ~1.03B non-embedding parameters.
    "1B": MLAModelArgs(**_1B),
    # The same model with YaRN from 4096 to 1,048,576 positions (rope_factor 256).
    "1B_long": MLAModelArgs(**_1B, original_seq_len=4096, rope_factor=256.0, mscale=1.0),
}


def get_train_spec() -> TrainSpec:
    return TrainSpec(
        model_cls=MLATransformer,
        model_args=mla_flavors,
        parallelize_fn=parallelize_mla,
        pipelining_fn=None,
        build_optimizers_fn=build_optimizers,
        build_lr_schedulers_fn=build_lr_schedulers,
        build_dataloader_fn=build_text_dataloader,
        build_tokenizer_fn=build_tokenizer,
        build_loss_fn=build_cross_entropy_loss,
        build_validator_fn=build_validator,
        build_metrics_processor_fn=build_metrics_processor,
    )


__all__ = ["MLAModelArgs", "MLATransformer", "get_train_spec", "mla_flavors"]
