from .parallelize import apply_fsdp, parallelize_mla

__all__ = ["apply_fsdp", "parallelize_mla"]
