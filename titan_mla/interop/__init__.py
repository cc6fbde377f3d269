"""Interop with other model formats: Hugging Face transformers' DeepseekV3 (``titan_mla.interop.hf``;
CLIs ``python -m titan_mla.export_hf`` and ``python -m titan_mla.import_hf``)."""
