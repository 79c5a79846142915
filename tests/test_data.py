import pytest
import torch
from datasets import Dataset

from fedtune.data import (DataError, TokenizedDataset, eval_loader, load_glue, make_collate, make_loader,
                          split_public, tokenize)


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


class _Tokenizer:  # all the loaders need from a tokenizer
    pad_token_id = 0


def _rows(lengths):
    """Row i is `lengths[i]` copies of token i + 1, labelled i (so rows can be traced through batches)."""
    return TokenizedDataset([[i + 1] * n for i, n in enumerate(lengths)], list(range(len(lengths))))


def _padded_tokens(loader):
    return sum(batch["input_ids"].numel() for batch in loader)


def test_eval_batches_are_sorted_by_length_and_cover_every_row_once():
    lengths = [3, 9, 1, 7, 7, 2, 5]
    batches = list(eval_loader(_rows(lengths), _Tokenizer(), batch_size=3))
    labels = torch.cat([b["labels"] for b in batches]).tolist()
    assert sorted(labels) == list(range(len(lengths)))
    assert [lengths[i] for i in labels] == sorted(lengths, reverse=True)
    assert _padded_tokens(batches) == 3 * 9 + 3 * 5 + 1 * 1  # widths 9, 5 (rows 7, 7, 5) and 1


@pytest.mark.parametrize("seed", [0, 1])
def test_length_grouped_batches_are_a_seeded_permutation_with_less_padding(seed):
    lengths = torch.randint(1, 60, (640,), generator=torch.Generator().manual_seed(seed)).tolist()
    data = _rows(lengths)
    grouped = list(make_loader(data, _Tokenizer(), batch_size=8, shuffle=True, seed=seed, by_length=True))
    labels = torch.cat([b["labels"] for b in grouped]).tolist()
    assert sorted(labels) == list(range(len(lengths)))  # every row exactly once per epoch
    again = list(make_loader(data, _Tokenizer(), batch_size=8, shuffle=True, seed=seed, by_length=True))
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(grouped, again))
    random = make_loader(data, _Tokenizer(), batch_size=8, shuffle=True, seed=seed)
    # Sorted within mega-batches of 160 rows, a batch's rows differ by a few tokens at most, while
    # a random batch of 8 pads to roughly the 8/9 quantile of U(1, 59): ~2x the mean length.
    assert _padded_tokens(grouped) < 0.6 * _padded_tokens(random)
