"""GLUE tasks (CoLA, SST-2): loading, the public slice, tokenization and batching."""

from __future__ import annotations

import csv
import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, DatasetDict
from transformers.trainer_pt_utils import LengthGroupedSampler

from fedtune.config import Settings
from fedtune.tasks import TASK_SPECS, TaskSpec, task_spec  # noqa: F401  (re-exported)


class DataError(RuntimeError):
    """Missing or malformed data; the message says where we looked and what to do."""


# ---- reading ---------------------------------------------------------------------------
def _utf8(read):
    """A reader whose text decoding errors name the file."""
    @functools.wraps(read)
    def reader(path: Path) -> dict[str, list]:
        try:
            return read(path)
        except UnicodeDecodeError as err:
            raise DataError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); is it a GLUE TSV?") from None
        except csv.Error as err:
            raise DataError(f"{path}: not a tab-separated file ({err})") from None
    return reader


@_utf8
def _read_cola(path: Path) -> dict[str, list]:
    # No header: source, label, original mark, sentence. Sentences contain quotes.
    sentences, labels = [], []
    with path.open(newline="", encoding="utf-8") as f:
        for line_no, row in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), 1):
            if len(row) != 4 or row[1] not in ("0", "1"):
                raise DataError(f"{path}:{line_no}: expected 4 tab-separated columns "
                                f"(source, label 0/1, mark, sentence), got {row[:4]!r}")
            labels.append(int(row[1]))
            sentences.append(row[3])
    return {"sentence": sentences, "label": labels}


@_utf8
def _read_sst2(path: Path) -> dict[str, list]:
    # Header `sentence<TAB>label`.
    sentences, labels = [], []
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header != ["sentence", "label"]:
            raise DataError(f"{path}: expected the header 'sentence<TAB>label', got {header!r}")
        for line_no, row in enumerate(reader, 2):
            if len(row) != 2 or row[1] not in ("0", "1"):
                raise DataError(f"{path}:{line_no}: expected 'sentence<TAB>0|1', got {row!r}")
            sentences.append(row[0])
            labels.append(int(row[1]))
    return {"sentence": sentences, "label": labels}


_READERS = {"cola": _read_cola, "sst2": _read_sst2}


def load_glue(task: str, glue_dir: str = "") -> DatasetDict:
    """Train and validation (the GLUE dev set) as `datasets` with `sentence` and `label`.

    Reads `<glue_dir>/<Task>/{train,dev}.tsv` when a folder is given, else the HF hub.
    """
    spec = task_spec(task)
    if not glue_dir:
        return _load_from_hub(spec)
    folder = Path(glue_dir).expanduser() / spec.folder
    splits = {}
    for split, filename in (("train", "train.tsv"), ("validation", "dev.tsv")):
        path = folder / filename
        if not path.is_file():
            raise DataError(
                f"GLUE file not found: {path}. Point --glue-dir (or GLUE_DIR) at a folder in GLUE "
                f"layout containing {spec.folder}/train.tsv and {spec.folder}/dev.tsv.")
        columns = _READERS[task](path)
        if not columns["label"]:
            raise DataError(f"{path} has no rows")
        splits[split] = Dataset.from_dict(columns)
    return DatasetDict(splits)


def _load_from_hub(spec: TaskSpec) -> DatasetDict:
    from datasets import load_dataset

    try:
        raw = load_dataset("nyu-mll/glue", spec.hub_config)
    except Exception as err:  # network, auth or hub errors all mean the same to a user
        raise DataError(
            f"no --glue-dir/GLUE_DIR given and the Hugging Face hub (nyu-mll/glue, {spec.hub_config}) "
            f"could not be reached ({type(err).__name__}: {err}). Download GLUE and pass "
            f"--glue-dir <folder containing {spec.folder}/>.") from err
    return DatasetDict({s: raw[s].select_columns(["sentence", "label"]) for s in ("train", "validation")})


# ---- splitting -------------------------------------------------------------------------
def split_public(train: Dataset, public_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Split train into (public slice, private rows): disjoint, deterministic by seed."""
    order = np.random.default_rng(seed).permutation(len(train))
    n_public = int(round(public_fraction * len(train)))
    return train.select(np.sort(order[:n_public])), train.select(np.sort(order[n_public:]))


@dataclass
class TaskData:
    """What a run needs: the public slice, the private train rows and the evaluation set."""

    public: Dataset
    private: Dataset
    validation: Dataset


def prepare_task_data(settings: Settings) -> TaskData:
    """Load, split off the public slice, and apply `train-limit` / `eval-limit`.

    With `holdout-fraction` > 0 the evaluation set is that share of the private rows (taken
    after `train-limit`, and no longer trained on) instead of GLUE dev.
    """
    raw = load_glue(settings.task, settings.resolved_glue_dir)
    public, private = split_public(raw["train"], settings.public_fraction, settings.seed)
    if settings.train_limit:
        private = private.shuffle(seed=settings.seed).select(range(min(settings.train_limit, len(private))))
    validation = raw["validation"]
    if settings.holdout_fraction:
        validation, private = split_public(private, settings.holdout_fraction, settings.seed)
    if settings.eval_limit:
        validation = validation.select(range(min(settings.eval_limit, len(validation))))
    return TaskData(public=public, private=private, validation=validation)


@functools.lru_cache(maxsize=4)
def cached_task_data(settings: Settings) -> TaskData:
    """`prepare_task_data`, once per process for a given data configuration."""
    return prepare_task_data(settings)


# ---- tokenization and batching ---------------------------------------------------------
class TokenizedDataset(torch.utils.data.Dataset):
    """Token ids per row, unpadded; `collate` pads each batch to its longest row."""

    def __init__(self, input_ids: list[list[int]], labels: list[int]):
        self.input_ids = input_ids
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[list[int], int]:
        return self.input_ids[i], self.labels[i]


class PairedDataset(TokenizedDataset):
    """The same rows read by two tokenizers (distillation between models that do not share one):
    items are (student ids, label, teacher ids)."""

    def __init__(self, student: TokenizedDataset, teacher: TokenizedDataset):
        if student.labels != teacher.labels:
            raise ValueError("paired tokenizations must be of the same rows")
        super().__init__(student.input_ids, student.labels)
        self.teacher_input_ids = teacher.input_ids

    def __getitem__(self, i: int) -> tuple[list[int], int, list[int]]:
        return self.input_ids[i], self.labels[i], self.teacher_input_ids[i]


_TOKEN_CACHE: dict[tuple, TokenizedDataset] = {}


def tokenize(dataset: Dataset, tokenizer, max_length: int) -> TokenizedDataset:
    """Tokenize once per (rows, tokenizer, max length); later calls hit the cache."""
    key = (dataset._fingerprint, tokenizer.name_or_path, len(tokenizer), max_length)
    if key not in _TOKEN_CACHE:
        encoded = tokenizer(list(dataset["sentence"]), truncation=True, max_length=max_length)
        _TOKEN_CACHE[key] = TokenizedDataset(encoded["input_ids"], list(dataset["label"]))
    return _TOKEN_CACHE[key]


def pad(rows: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask) of `rows` padded on the right to the longest."""
    longest = max(len(ids) for ids in rows)
    input_ids = torch.full((len(rows), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for row, ids in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask


def make_collate(pad_token_id: int, teacher_pad_token_id: int | None = None):
    """Pad a batch to its longest row (right padding) and build the attention mask. Items of a
    `PairedDataset` also give `teacher_input_ids` and `teacher_attention_mask` (padded with
    `teacher_pad_token_id`)."""

    def collate(batch: list[tuple]) -> dict[str, torch.Tensor]:
        input_ids, attention_mask = pad([item[0] for item in batch], pad_token_id)
        labels = torch.tensor([item[1] for item in batch], dtype=torch.long)
        out = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if teacher_pad_token_id is not None:
            out["teacher_input_ids"], out["teacher_attention_mask"] = pad([item[2] for item in batch],
                                                                          teacher_pad_token_id)
        return out

    return collate


def make_loader(data: TokenizedDataset, tokenizer, batch_size: int, shuffle: bool, seed: int = 0,
                by_length: bool = False, teacher_tokenizer=None) -> torch.utils.data.DataLoader:
    """Batches of `data`, shuffled with `seed`; with `by_length`, rows of similar length are batched
    together (transformers' length-grouped sampler: random mega-batches of up to 50 batches, each
    sorted by length), which cuts padding. A `PairedDataset` needs its `teacher_tokenizer`."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    collate = make_collate(tokenizer.pad_token_id, teacher_tokenizer.pad_token_id if teacher_tokenizer else None)
    if shuffle and by_length:
        sampler = LengthGroupedSampler(batch_size, lengths=[len(ids) for ids in data.input_ids], generator=generator)
        return torch.utils.data.DataLoader(data, batch_size=batch_size, sampler=sampler, collate_fn=collate)
    return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=generator,
                                       collate_fn=collate)


def train_loader(rows: Dataset, tokenizer, settings: Settings, seed: int,
                 teacher_tokenizer=None) -> torch.utils.data.DataLoader:
    """Shuffled training batches of `rows`, formed as `settings.batching` says. With a
    `teacher_tokenizer` (a teacher that reads other token ids), each batch also carries the
    teacher's reading of the same rows (`teacher_input_ids`, `teacher_attention_mask`)."""
    data = tokenize(rows, tokenizer, settings.max_length)
    if teacher_tokenizer is not None:
        data = PairedDataset(data, tokenize(rows, teacher_tokenizer, settings.max_length))
    return make_loader(data, tokenizer, settings.batch_size, shuffle=True, seed=seed,
                       by_length=settings.batching == "by-length", teacher_tokenizer=teacher_tokenizer)


def eval_loader(data: TokenizedDataset, tokenizer, batch_size: int) -> torch.utils.data.DataLoader:
    """Evaluation batches of rows sorted by length (longest first): little padding, and the
    metrics (accuracy, MCC, mean loss) do not depend on the order."""
    order = sorted(range(len(data)), key=lambda i: -len(data.input_ids[i]))
    return torch.utils.data.DataLoader(torch.utils.data.Subset(data, order), batch_size=batch_size,
                                       collate_fn=make_collate(tokenizer.pad_token_id))
