"""Sample sources for validation (and, later, calibration), and their seeded disjoint split.

A sample is one model call: a dict input name -> numpy array of the input's example shape.
Sources:
  none       made from the model's example inputs: floats get seeded noise at the example's scale,
             integers (token ids) are the example's values shuffled, so they stay valid ids
  .npz       one array per input name, either of the input's shape (one sample) or with a leading
             sample axis
  .txt       one text per line, through the model's tokenizer
  .csv/.tsv  one column of texts (--text-column: index or header name), through the tokenizer
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from edgeq.errors import SourceError, UsageError
from edgeq.signature import TensorSpec

Sample = dict[str, np.ndarray]

# Varied everyday sentences for text models when no data is given (validation still needs real text).
BUILTIN_SENTENCES = (
    "A man is playing a guitar on the street.",
    "The quarterly report shows revenue grew by twelve percent.",
    "Two dogs are running through a snowy field.",
    "Please restart the router and try connecting again.",
    "The committee postponed its decision until next week.",
    "She poured a cup of coffee and opened the window.",
    "Heavy rain is expected across the northern region tonight.",
    "How do I convert a PyTorch model for a mobile phone?",
    "The museum's new exhibit features ancient pottery.",
    "A child is riding a bicycle in the park.",
    "Stock markets fell sharply after the announcement.",
    "He forgot his umbrella at the train station.",
    "The recipe calls for two eggs and a cup of flour.",
    "Scientists discovered a new species of frog in the rainforest.",
    "Our flight was delayed because of a technical problem.",
    "The orchestra played Beethoven's ninth symphony.",
)


def load_samples(
    inputs: list[TensorSpec],
    example: Sample,
    *,
    data: Path | None = None,
    tokenizer=None,
    text_column: str | None = None,
    count: int = 32,
    seed: int = 0,
) -> list[Sample]:
    """Up to `count` samples from `data`, or made from the example when no data is given."""
    if data is None:
        if tokenizer is not None:
            return tokenize(list(BUILTIN_SENTENCES)[:count], inputs, tokenizer)
        return synthesize(inputs, example, count, seed)
    data = Path(data)
    if not data.exists():
        raise SourceError(f"--data {data}: no such file")
    if data.suffix == ".npz":
        return from_npz(data, inputs)[:count]
    if data.suffix in (".txt", ".csv", ".tsv"):
        if tokenizer is None:
            raise UsageError(f"--data {data}: text data needs a model with a tokenizer (a Hugging Face text model)")
        texts = read_texts(data, text_column)
        chosen = np.random.default_rng(seed).permutation(len(texts))[:count]
        return tokenize([texts[i] for i in sorted(chosen)], inputs, tokenizer)
    raise UsageError(f"--data {data}: expected .npz, .txt, .csv or .tsv")


def synthesize(inputs: list[TensorSpec], example: Sample, count: int, seed: int) -> list[Sample]:
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(count):
        sample = {}
        for spec in inputs:
            base = example[spec.name]
            if np.issubdtype(base.dtype, np.floating):
                scale = float(base.std()) or 1.0
                sample[spec.name] = (rng.standard_normal(base.shape) * scale + float(base.mean())).astype(base.dtype)
            else:
                sample[spec.name] = rng.permutation(base.ravel()).reshape(base.shape)
        samples.append(sample)
    return samples


def from_npz(path: Path, inputs: list[TensorSpec]) -> list[Sample]:
    with np.load(path, allow_pickle=False) as archive:
        arrays = {key: archive[key] for key in archive.files}
    missing = [spec.name for spec in inputs if spec.name not in arrays]
    if missing:
        raise SourceError(f"--data {path}: no array for input(s) {', '.join(missing)}; it has {', '.join(arrays)}")
    stacked = {}
    for spec in inputs:
        array = arrays[spec.name]
        if tuple(array.shape) == spec.shape:
            array = array[None]
        elif tuple(array.shape[1:]) != spec.shape:
            raise SourceError(
                f"--data {path}: array {spec.name!r} has shape {array.shape}; expected {spec.shape} or "
                f"(samples, {', '.join(map(str, spec.shape))})"
            )
        stacked[spec.name] = array.astype(spec.dtype)
    counts = {len(a) for a in stacked.values()}
    if len(counts) != 1:
        raise SourceError(f"--data {path}: arrays have different sample counts {sorted(counts)}")
    return [{name: array[i] for name, array in stacked.items()} for i in range(counts.pop())]


def read_texts(path: Path, column: str | None) -> list[str]:
    if path.suffix == ".txt":
        texts = [line.strip() for line in path.read_text().splitlines()]
        return [t for t in texts if t]
    delimiter = "\t" if path.suffix == ".tsv" or "\t" in path.read_text()[:4096] else ","
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle, delimiter=delimiter, quoting=csv.QUOTE_NONE))
    if column is None:
        raise UsageError(f"--data {path}: say which column holds the text with --text-column (index or header)")
    if column.isdigit():
        index = int(column)
    else:
        header = rows[0] if rows else []
        if column not in header:
            raise UsageError(f"--text-column {column!r}: not in the header of {path} ({', '.join(header)})")
        index, rows = header.index(column), rows[1:]
    texts = [row[index].strip() for row in rows if len(row) > index and row[index].strip()]
    if not texts:
        raise SourceError(f"--data {path}: column {column} holds no text")
    return texts


def tokenize(texts: list[str], inputs: list[TensorSpec], tokenizer) -> list[Sample]:
    """Tokenize each text to the model's input shapes (padded/truncated to the sequence length)."""
    by_name = {spec.name: spec for spec in inputs}
    length = by_name["input_ids"].shape[-1]
    encoded = tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_tensors="np")
    samples = []
    for i in range(len(texts)):
        sample = {}
        for spec in inputs:
            values = encoded[spec.name][i] if spec.name in encoded else np.zeros(spec.shape[-1:], dtype=np.int64)
            sample[spec.name] = np.broadcast_to(values, spec.shape).astype(spec.dtype)
        samples.append(sample)
    return samples


def split(samples: list[Sample], calibration_count: int, seed: int) -> tuple[list[Sample], list[Sample]]:
    """A seeded split into (calibration, validation) that never shares a sample."""
    order = np.random.default_rng(seed).permutation(len(samples))
    calibration = [samples[i] for i in sorted(order[:calibration_count])]
    validation = [samples[i] for i in sorted(order[calibration_count:])]
    return calibration, validation
