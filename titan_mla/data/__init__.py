from .corpus import (
    BUILTIN_CORPORA,
    BUILTIN_CORPUS,
    STDLIB_CORPUS,
    builtin_documents,
    load_corpus,
    register_datasets,
    stdlib_documents,
)

__all__ = [
    "BUILTIN_CORPORA",
    "BUILTIN_CORPUS",
    "STDLIB_CORPUS",
    "builtin_documents",
    "load_corpus",
    "register_datasets",
    "stdlib_documents",
]
