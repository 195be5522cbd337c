"""Model source: a Hugging Face model folder (config.json + safetensors), loaded offline.

Nothing in the folder runs as code unless the user passes --trust-pickle: a config (or tokenizer config) with
`auto_map` names Python files transformers would import (trust_remote_code), and is refused; `pytorch_model.bin`
weights are pickles, loaded weights-only, trusted or not (safetensors are preferred when both are there);
tokenizers load from tokenizer.json, vocabulary files or sentencepiece models, none of which transformers 5
unpickles. Loading stays offline either way: the folder is the whole source.

`--task` picks the head: feature-extraction (last_hidden_state), sentence-embedding (attention-masked mean
pooling + L2 normalisation, as sentence-transformers does), text-classification (logits) and
image-classification (logits). Text models get tokenizer-made example inputs.
"""

from __future__ import annotations

import inspect
import os
from enum import StrEnum
from pathlib import Path

import torch

from edgeq.errors import SourceError, UsageError
from edgeq.load.examples import torch_dtype
from edgeq.load.kinds import read_json_file
from edgeq.signature import Dim, TensorSpec

DEFAULT_SEQUENCE_LENGTH = 128  # fits STS-style sentences; override with --input input_ids:1xN:int64
EXAMPLE_SENTENCE = "edgeq proves every artifact against the PyTorch model it came from."


class Task(StrEnum):
    FEATURE_EXTRACTION = "feature-extraction"
    SENTENCE_EMBEDDING = "sentence-embedding"
    TEXT_CLASSIFICATION = "text-classification"
    IMAGE_CLASSIFICATION = "image-classification"


TEXT_TASKS = {Task.FEATURE_EXTRACTION, Task.SENTENCE_EMBEDDING, Task.TEXT_CLASSIFICATION}


class HiddenState(torch.nn.Module):
    """Feature extraction: only last_hidden_state (a pooler head may be untrained in embedding checkpoints)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, **inputs):
        return {"last_hidden_state": self.model(**inputs).last_hidden_state}


class MeanPooledEmbedding(torch.nn.Module):
    """Sentence embedding: mean of token states weighted by the attention mask, then L2-normalised."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, **inputs):
        states = self.model(**inputs).last_hidden_state
        mask = inputs["attention_mask"].unsqueeze(-1).to(states.dtype)
        pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return {"sentence_embedding": torch.nn.functional.normalize(pooled, p=2, dim=-1)}


class Logits(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, **inputs):
        return {"logits": self.model(**inputs).logits}


def load_huggingface(folder: Path, task: str | None, declared: list[TensorSpec], *, trust_pickle: bool = False):
    """Return (module taking keyword inputs, input specs, example tensors, tokenizer)."""
    if not (folder / "config.json").is_file():
        raise SourceError(f"{folder}: a Hugging Face model folder needs config.json")
    config = read_json_file(folder / "config.json", "the model config")
    if not isinstance(config, dict):
        raise SourceError(f"{folder / 'config.json'}: expected a JSON object (the model config), found {type(config).__name__}")
    if task is None:
        raise UsageError(
            f"{folder} is a Hugging Face model folder: say what to export with --task "
            f"({', '.join(t.value for t in Task)})"
        )
    try:
        task = Task(task)
    except ValueError:
        raise UsageError(f"--task {task!r} is not one of {', '.join(t.value for t in Task)}") from None

    if not trust_pickle:
        _refuse_remote_code(folder)
    _check_weights(folder)
    os.environ["HF_HUB_OFFLINE"] = "1"  # never reach for a hub: the folder is the source
    import transformers

    transformers.utils.logging.disable_progress_bar()  # edgeq prints its own steps
    auto, head = {
        Task.FEATURE_EXTRACTION: (transformers.AutoModel, HiddenState),
        Task.SENTENCE_EMBEDDING: (transformers.AutoModel, MeanPooledEmbedding),
        Task.TEXT_CLASSIFICATION: (transformers.AutoModelForSequenceClassification, Logits),
        Task.IMAGE_CLASSIFICATION: (transformers.AutoModelForImageClassification, Logits),
    }[task]
    try:
        # Eager attention exports to every runtime the same way; SDPA's fused kernel is a torch detail.
        model = auto.from_pretrained(
            folder, local_files_only=True, attn_implementation="eager", trust_remote_code=trust_pickle,
            weights_only=True, **({"use_safetensors": True} if _safetensors(folder) else {}),
        ).eval()
    except Exception as exc:
        raise SourceError(f"{folder}: transformers could not load it for {task}: {exc}") from exc

    declared_by_name = {spec.name: spec for spec in declared}
    if task in TEXT_TASKS:
        tokenizer = _load_tokenizer(folder, trust_pickle)
        accepted = set(inspect.signature(model.forward).parameters)
        names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in accepted]
        declared_text = [declared_by_name[n] for n in names if n in declared_by_name]
        # Position tables bound the sequence: 128 fits STS-style sentences, unless the model is shorter.
        longest = getattr(model.config, "max_position_embeddings", DEFAULT_SEQUENCE_LENGTH)
        length = declared_text[0].shape[-1] if declared_text else min(DEFAULT_SEQUENCE_LENGTH, longest)
        encoded = tokenizer(
            [EXAMPLE_SENTENCE], padding="max_length", max_length=length, truncation=True, return_tensors="pt"
        )
        specs, examples = [], []
        for name in names:
            spec = declared_by_name.get(name) or TensorSpec(name, (Dim(1), Dim(length)), "int64")
            if spec.shape[-1] != length:
                raise UsageError(
                    f"--input {spec}: every text input needs the same sequence length ({length} from {declared_text[0].name})"
                )
            tensor = encoded[name] if name in encoded else torch.zeros((1, length), dtype=torch.int64)
            # a length shorter than the tokenizer's special tokens (1 or 2) is not truncated by it: cut it here
            tensor = tensor[:, :length]
            specs.append(spec)
            examples.append(tensor.to(torch_dtype(spec.dtype)).expand(spec.shape).contiguous())
    else:
        tokenizer = None
        size = getattr(model.config, "image_size", 224)
        size = size if isinstance(size, int) else size[0]
        channels = getattr(model.config, "num_channels", 3)
        spec = declared_by_name.get("pixel_values") or TensorSpec(
            "pixel_values", (Dim(1), Dim(channels), Dim(size), Dim(size)), "float32"
        )
        specs = [spec]
        examples = [torch.randn(spec.shape, generator=torch.Generator().manual_seed(0))]
    unknown = sorted(set(declared_by_name) - {s.name for s in specs})
    if unknown:
        raise UsageError(f"--input names {', '.join(unknown)}, which this {task} model does not take")
    return head(model).eval(), specs, tuple(examples), tokenizer


def _load_tokenizer(folder: Path, trust_pickle: bool):
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_pickle)
    except Exception as exc:
        raise SourceError(f"{folder}: a text model needs its tokenizer files in the folder: {exc}") from exc


# Configs whose `auto_map` makes transformers import Python files (remote code) from the folder.
_CODE_CONFIGS = (
    "config.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json",
    "image_processor_config.json", "feature_extractor_config.json",
)


def _refuse_remote_code(folder: Path) -> None:
    for name in _CODE_CONFIGS:
        path = folder / name
        if not path.is_file():
            continue
        values = read_json_file(path, name)
        auto_map = values.get("auto_map") if isinstance(values, dict) else None
        if auto_map:
            code = sorted({str(v) for v in (auto_map.values() if isinstance(auto_map, dict) else [auto_map])})
            raise SourceError(
                f"{path}: its auto_map names Python code ({', '.join(code[:4])}) that transformers would import and "
                "run (trust_remote_code); edgeq runs no code from a model folder unless you pass --trust-pickle "
                "(then the code must be in the folder: nothing is downloaded)"
            )


def _safetensors(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").is_file()


def _check_weights(folder: Path) -> None:
    """Refuse a folder without weights, or whose pickled .bin weights hold more than tensors.

    transformers 5 reads pytorch_model.bin with torch.load(weights_only=True) whatever from_pretrained is told
    (modeling_utils.load_state_dict), so such a file cannot load even with --trust-pickle: say so up front."""
    if _safetensors(folder):
        return  # transformers reads safetensors (use_safetensors=True), never the .bin next to them
    shards = sorted(folder.glob("pytorch_model*.bin"))
    if not shards:
        found = ", ".join(sorted(p.name for p in folder.iterdir())[:8])
        raise SourceError(
            f"{folder}: holds no weights (model.safetensors or pytorch_model.bin); it has {found}. Save the model "
            "with model.save_pretrained(folder)"
        )
    import pickle

    import torch

    for shard in shards:
        try:  # mmap: only the pickle's structure is read, not the tensors
            torch.load(str(shard), map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as exc:
            raise SourceError(
                f"{shard} holds pickled Python objects, not just tensors: loading it would run code from the file, "
                "and transformers reads .bin weights weights-only even with --trust-pickle. Re-save the model as "
                "safetensors (model.save_pretrained(folder, safe_serialization=True)) from where you trust it."
            ) from exc
        except Exception as exc:
            raise SourceError(
                f"{shard}: torch.load could not read it ({type(exc).__name__}: {exc}); the file may be truncated or damaged"
            ) from exc
