"""Sample sources for validation and calibration, and their seeded disjoint split.

A sample is one model call: a dict input name -> numpy array of the input's example shape.
`--data` may be:
  (nothing)      made from the model's example inputs: floats get seeded noise at the example's scale,
                 integers (token ids) are the example's values shuffled, so they stay valid ids
  .npz           one array per input name, of the input's shape (one sample) or with a leading sample axis
  .npy           a single-input model's input, of its shape or with a leading sample axis
  a folder       of .npz, .npy, images (.png/.jpg/.jpeg, with --preprocess) or .wav (with --sample-rate)
                 files, searched recursively, read in sorted order; one kind of file per folder
  .png/.jpg/.wav a single image or WAV file
  .txt           one text per line, through the model's tokenizer
  .csv/.tsv      one column of texts (--text-column: index or header name), through the tokenizer
  mod:function   a Python callable (or path/to/file.py:function) returning an iterable of samples
Every source holding more samples than asked for gives a seeded choice of them, kept in source order.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from edgeq.calibration.sources.arrays import npy_samples, npz_samples
from edgeq.calibration.sources.audio import WAV_SUFFIXES, wav_samples
from edgeq.calibration.sources.common import Sample, SampleSet, SourceKind, select
from edgeq.calibration.sources.function import function_samples, is_function_reference
from edgeq.calibration.sources.images import IMAGE_SUFFIXES, ImagePreprocess, image_samples, parse_preprocess
from edgeq.errors import SourceError, UsageError
from edgeq.signature import TensorSpec

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

# File suffix -> the source that reads it, for folders and single files alike.
_FILE_KINDS = {
    ".npz": SourceKind.NPZ,
    ".npy": SourceKind.NPY,
    **{suffix: SourceKind.IMAGES for suffix in IMAGE_SUFFIXES},
    **{suffix: SourceKind.WAV for suffix in WAV_SUFFIXES},
}
_TEXT_SUFFIXES = (".txt", ".csv", ".tsv")


def load_samples(
    inputs: list[TensorSpec],
    example: Sample,
    *,
    data: Path | str | None = None,
    tokenizer=None,
    text_column: str | None = None,
    preprocess: str | ImagePreprocess | None = None,
    sample_rate: int | None = None,
    count: int = 32,
    seed: int = 0,
) -> SampleSet:
    """Up to `count` samples from `data` (see the module docstring), or made from the example when no data is
    given; with a record of where they came from. `preprocess` applies to images, `sample_rate` (Hz) to WAV."""
    if isinstance(preprocess, str):
        preprocess = parse_preprocess(preprocess)
    if data is None:
        _refuse_options(None, preprocess, sample_rate, None)
        if tokenizer is not None:
            sentences = list(BUILTIN_SENTENCES)[:count]
            return SampleSet(
                tokenize(sentences, inputs, tokenizer), SourceKind.SENTENCES, None, len(BUILTIN_SENTENCES),
                _text_record(inputs, None), (f"the first {len(sentences)} of edgeq's built-in sentences",),
            )
        return SampleSet(
            synthesize(inputs, example, count, seed), SourceKind.SYNTHETIC, None, count, None,
            ("floats: seeded noise at the example's mean and scale; integers: the example's values shuffled",),
        )
    if not Path(data).exists() and is_function_reference(str(data)):
        _refuse_options(SourceKind.CALLABLE, preprocess, sample_rate, data)
        return function_samples(str(data), inputs, count, seed)
    data = Path(data)
    if not data.exists():
        raise SourceError(f"--data {data}: no such file or folder (nor a module:function reference)")
    if data.is_dir():
        kind, files, ignored = _folder_files(data)
    elif data.suffix.lower() in _TEXT_SUFFIXES:
        _refuse_options(SourceKind.TEXT, preprocess, sample_rate, data)
        return _text_samples(data, inputs, tokenizer, text_column, count, seed)
    elif data.suffix.lower() in _FILE_KINDS:
        kind, files, ignored = _FILE_KINDS[data.suffix.lower()], [data], 0
    else:
        raise UsageError(
            f"--data {data}: expected a folder, .npz, .npy, .png/.jpg/.jpeg, .wav, .txt, .csv or .tsv, "
            "or package.module:function"
        )
    _refuse_options(kind, preprocess, sample_rate, data)
    if kind == SourceKind.NPZ:
        loaded = npz_samples(files, inputs, data, count, seed)
    elif kind == SourceKind.NPY:
        loaded = npy_samples(files, inputs, data, count, seed)
    elif kind == SourceKind.IMAGES:
        loaded = image_samples(files, inputs, data, preprocess, count, seed)
    else:
        loaded = wav_samples(files, inputs, data, sample_rate, count, seed)
    if ignored:
        loaded = SampleSet(
            loaded.samples, loaded.kind, loaded.path, loaded.found, loaded.preprocess,
            loaded.notes + (f"{ignored} file(s) of other kinds in the folder were ignored",),
        )
    return loaded


def _refuse_options(kind: SourceKind | None, preprocess, sample_rate, data) -> None:
    """--preprocess and --sample-rate mean something only for images and WAV; elsewhere they are mistakes."""
    given = "no --data was given" if data is None else f"--data {data} is {kind}"
    if preprocess is not None and kind != SourceKind.IMAGES:
        raise UsageError(f"--preprocess applies to images, and {given}; drop it or point --data at images")
    if sample_rate is not None and kind != SourceKind.WAV:
        raise UsageError(f"--sample-rate applies to WAV audio, and {given}; drop it or point --data at .wav files")


def _folder_files(folder: Path) -> tuple[SourceKind, list[Path], int]:
    """(kind, its files in sorted relative-path order, count of other files) of a data folder, searched
    recursively; hidden files and folders are skipped."""
    files = sorted(
        (p for p in folder.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)),
        key=lambda p: p.relative_to(folder).as_posix(),
    )
    by_kind: dict[SourceKind, list[Path]] = {}
    for path in files:
        if path.suffix.lower() in _FILE_KINDS:
            by_kind.setdefault(_FILE_KINDS[path.suffix.lower()], []).append(path)
    ignored = len(files) - sum(len(paths) for paths in by_kind.values())
    if not by_kind:
        others = f" (it has {ignored} other file(s))" if ignored else " (it is empty)"
        raise SourceError(f"--data {folder}: holds no .npz, .npy, .png/.jpg/.jpeg or .wav files{others}")
    if len(by_kind) > 1:
        mixed = "; ".join(f"{len(paths)} {kind} file(s), e.g. {paths[0].relative_to(folder)}" for kind, paths in by_kind.items())
        raise SourceError(f"--data {folder}: mixes kinds of data ({mixed}); a data folder holds one kind: split it")
    (kind, paths), = by_kind.items()
    return kind, paths, ignored


def _text_samples(data: Path, inputs, tokenizer, text_column, count: int, seed: int) -> SampleSet:
    if tokenizer is None:
        raise UsageError(f"--data {data}: text data needs a model with a tokenizer (a Hugging Face text model)")
    texts = read_texts(data, text_column)
    chosen = [texts[i] for i in select(len(texts), count, seed)]
    return SampleSet(tokenize(chosen, inputs, tokenizer), SourceKind.TEXT, str(data), len(texts), _text_record(inputs, text_column))


def _text_record(inputs: list[TensorSpec], column: str | None) -> dict:
    length = {spec.name: spec for spec in inputs}["input_ids"].shape[-1]
    return {"tokenizer": "the model's", "max_length": length, "padding": "max_length", "truncation": True, "text_column": column}


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


def read_texts(path: Path, column: str | None) -> list[str]:
    text = read_utf8(path)
    if path.suffix.lower() == ".txt":
        texts = [t for t in (line.strip() for line in text.splitlines()) if t]
        if not texts:
            raise SourceError(f"--data {path}: holds no text (one text per line)")
        return texts
    delimiter = "\t" if path.suffix.lower() == ".tsv" or "\t" in text[:4096] else ","
    try:
        rows = list(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=csv.QUOTE_NONE))
    except csv.Error as exc:
        raise SourceError(f"--data {path}: not a readable {'TSV' if delimiter == chr(9) else 'CSV'} file ({exc})") from exc
    rows = [row for row in rows if any(cell.strip() for cell in row)]
    if not rows:
        raise SourceError(f"--data {path}: holds no rows")
    if column is None:
        raise UsageError(f"--data {path}: say which column holds the text with --text-column (index or header)")
    if column.isdigit():
        index = int(column)
        widest = max(len(row) for row in rows)
        if index >= widest:
            raise UsageError(
                f"--text-column {column}: {path} has {widest} column(s), numbered from 0; header: {', '.join(rows[0])}"
            )
    else:
        header = [cell.strip() for cell in rows[0]]
        if column not in header:
            raise UsageError(f"--text-column {column!r}: not in the header of {path} ({', '.join(header)})")
        index, rows = header.index(column), rows[1:]
    texts = [row[index].strip() for row in rows if len(row) > index and row[index].strip()]
    if not texts:
        raise SourceError(f"--data {path}: column {column} holds no text")
    return texts


# Encodings text files often come in, tried (in this order) only to say which one a non-UTF-8 file is.
_LIKELY_ENCODINGS = ("cp1252", "latin-1")


def read_utf8(path: Path) -> str:
    """A text file as UTF-8 (a BOM is fine); otherwise a SourceError with the byte offset and a working encoding."""
    raw = path.read_bytes()
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise SourceError(f"--data {path}: is UTF-16 text; edgeq reads UTF-8: re-save it as UTF-8 (e.g. iconv -f UTF-16 -t UTF-8)")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        guess = next((e for e in _LIKELY_ENCODINGS if _decodes(raw, e)), None)
        hint = f"it decodes as {guess}: re-save it as UTF-8 (e.g. iconv -f {guess} -t UTF-8)" if guess else "re-save it as UTF-8"
        raise SourceError(
            f"--data {path}: not UTF-8 text (byte {exc.start}, line {line}: {raw[exc.start:exc.start + 4]!r}); {hint}"
        ) from exc


def _decodes(raw: bytes, encoding: str) -> bool:
    try:
        raw.decode(encoding)
    except UnicodeDecodeError:
        return False
    return True


def tokenize(texts: list[str], inputs: list[TensorSpec], tokenizer) -> list[Sample]:
    """Tokenize each text to the model's input shapes (padded/truncated to the sequence length)."""
    by_name = {spec.name: spec for spec in inputs}
    length = by_name["input_ids"].shape[-1]
    # lists, not arrays: a length shorter than the special tokens (1 for one-token latency) is not truncated by
    # the tokenizer and rows can come back longer than asked; each row is cut to the length here
    encoded = tokenizer(texts, padding="max_length", max_length=length, truncation=True)
    samples = []
    for i in range(len(texts)):
        sample = {}
        for spec in inputs:
            values = np.asarray(encoded[spec.name][i])[:length] if spec.name in encoded else np.zeros(spec.shape[-1:], dtype=np.int64)
            sample[spec.name] = np.broadcast_to(values, spec.shape).astype(spec.dtype)
        samples.append(sample)
    return samples


def split(samples: list[Sample], calibration_count: int, seed: int) -> tuple[list[Sample], list[Sample]]:
    """A seeded split into (calibration, validation) that never shares a sample."""
    order = np.random.default_rng(seed).permutation(len(samples))
    calibration = [samples[i] for i in sorted(order[:calibration_count])]
    validation = [samples[i] for i in sorted(order[calibration_count:])]
    return calibration, validation
