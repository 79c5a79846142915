import pytest
import torch
from datasets import Dataset

from fedtune.data import DataError, load_glue, make_collate, split_public, tokenize


def test_real_cola_is_read_with_quotes_intact(glue_dir):
    cola = load_glue("cola", str(glue_dir))
    assert (len(cola["train"]), len(cola["validation"])) == (8551, 1043)
    assert sum(cola["validation"]["label"]) == 721  # majority class count from the data README
    assert any('"' in s for s in cola["train"]["sentence"])  # QUOTE_NONE keeps quote characters


def test_real_sst2_has_header_and_labels(glue_dir):
    sst2 = load_glue("sst2", str(glue_dir))
    assert (len(sst2["train"]), len(sst2["validation"])) == (67349, 872)
    assert set(sst2["train"]["label"]) == {0, 1}


def test_missing_folder_says_where_it_looked_and_what_to_do(tmp_path):
    with pytest.raises(DataError, match=r"CoLA/train.tsv.*--glue-dir"):
        load_glue("cola", str(tmp_path))


def test_malformed_row_is_reported_with_its_line(tmp_path):
    (tmp_path / "SST-2").mkdir()
    (tmp_path / "SST-2" / "train.tsv").write_text("sentence\tlabel\ngood\t1\nbad row without label\n")
    (tmp_path / "SST-2" / "dev.tsv").write_text("sentence\tlabel\nfine\t1\n")
    with pytest.raises(DataError, match=r"train.tsv:3"):
        load_glue("sst2", str(tmp_path))


def test_unknown_task_lists_known_tasks():
    with pytest.raises(ValueError, match=r"unknown task 'mnli' \(known: cola, sst2\)"):
        load_glue("mnli", "/nonexistent")


def test_public_slice_is_disjoint_deterministic_and_sized():
    rows = Dataset.from_dict({"sentence": [f"s{i}" for i in range(100)], "label": [i % 2 for i in range(100)]})
    public, private = split_public(rows, 0.2, seed=7)
    again, _ = split_public(rows, 0.2, seed=7)
    other, _ = split_public(rows, 0.2, seed=8)
    assert len(public) == 20 and len(private) == 80
    assert set(public["sentence"]).isdisjoint(private["sentence"])
    assert list(public["sentence"]) == list(again["sentence"])
    assert list(public["sentence"]) != list(other["sentence"])


def test_collate_pads_each_batch_to_its_longest_row():
    batch = make_collate(pad_token_id=0)([([5, 6, 7], 1), ([8], 0)])
    assert torch.equal(batch["input_ids"], torch.tensor([[5, 6, 7], [8, 0, 0]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1], [1, 0, 0]]))
    assert torch.equal(batch["labels"], torch.tensor([1, 0]))


def test_tokenization_is_cached_per_tokenizer_and_length(tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    rows = Dataset.from_dict({"sentence": ["a short one", "a much longer sentence here"], "label": [0, 1]})
    first = tokenize(rows, tokenizer, max_length=4)
    assert tokenize(rows, tokenizer, max_length=4) is first
    assert max(len(ids) for ids in first.input_ids) == 4  # truncated
    assert tokenize(rows, tokenizer, max_length=16) is not first
