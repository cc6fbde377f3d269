"""The offline corpora and the shipped tokenizer."""

import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from expecttest import assert_expected_inline

from titan_mla.data import BUILTIN_CORPUS, builtin_documents, load_corpus
from titan_mla.data.tokenizer import TOKENIZER_DIR, build_tokenizer


def test_builtin_corpus_splits_are_disjoint_and_real_text():
    train, validation = builtin_documents("train"), builtin_documents("validation")
    assert len(train) > 5 * len(validation) > 0
    assert not set(train) & set(validation)
    assert sum(map(len, train)) > 300_000
    assert load_corpus(BUILTIN_CORPUS)["text"] == train


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "txt", "folder", "save_to_disk"])
def test_local_corpus_kinds(tmp_path, kind):
    texts = ["first document about latent attention", "second one", "third text"]
    if kind == "jsonl":
        path = tmp_path / "data.jsonl"
        path.write_text(
            "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts))
        )
    elif kind == "parquet":
        path = tmp_path / "data.parquet"
        pq.write_table(pa.table({"text": texts}), path)
    elif kind == "txt":
        path = tmp_path / "data.txt"
        path.write_text("\n\n".join(texts) + "\n")
    elif kind == "folder":
        path = tmp_path / "docs"
        path.mkdir()
        for i, t in enumerate(texts):
            (path / f"{i}.md").write_text(t + "\n")
    else:
        path = tmp_path / "saved"
        datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts})}).save_to_disk(
            str(path)
        )
    loaded = [t.strip() for t in load_corpus(str(path))["text"]]
    assert loaded == texts


def error_of(path) -> str:
    with pytest.raises((FileNotFoundError, ValueError)) as info:
        load_corpus(str(path))
    return str(info.value).replace(str(path), "<path>")


def test_bad_corpora_name_the_problem(tmp_path):
    assert_expected_inline(
        error_of(tmp_path / "missing"), """dataset path '<path>' does not exist"""
    )
    (tmp_path / "empty").mkdir()
    assert_expected_inline(
        error_of(tmp_path / "empty"),
        """dataset path '<path>' holds no readable data: expected ['.json', '.jsonl', '.md', '.parquet', '.txt'] files or a folder saved by datasets' save_to_disk""",
    )
    (tmp_path / "blank.jsonl").write_text(json.dumps({"text": ""}) + "\n")
    assert_expected_inline(
        error_of(tmp_path / "blank.jsonl"), """dataset '<path>' is empty: it holds no text"""
    )
    (tmp_path / "other.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    assert_expected_inline(
        error_of(tmp_path / "other.jsonl"),
        """dataset '<path>' has no 'text' column (columns: ['body'])""",
    )


def test_shipped_tokenizer_round_trips_with_bos_eos():
    class JobConfig:
        class model:
            hf_assets_path = str(TOKENIZER_DIR)

    tokenizer = build_tokenizer(JobConfig)
    assert tokenizer.get_vocab_size() == 8192
    text = "def f(x):\n    return x ** 2  # latent caché"
    ids = tokenizer.encode(text, add_bos=True, add_eos=True)
    assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
    assert tokenizer.decode(ids[1:-1]) == text
    # Trained on English documentation: common words are single tokens.
    assert len(tokenizer.encode(" the function returns", add_bos=False, add_eos=False)) == 3


def test_missing_tokenizer_folder_is_a_clear_error(tmp_path):
    class JobConfig:
        class model:
            hf_assets_path = str(tmp_path)

    with pytest.raises(FileNotFoundError, match=r"holds no tokenizer\.json; the tokenizer shipped"):
        build_tokenizer(JobConfig)
