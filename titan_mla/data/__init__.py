from .corpus import BUILTIN_CORPUS, builtin_documents, load_corpus, register_datasets

__all__ = ["BUILTIN_CORPUS", "builtin_documents", "load_corpus", "register_datasets"]
