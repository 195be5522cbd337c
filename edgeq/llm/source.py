"""Where a decoder comes from for `--task text-generation`: a Hugging Face CausalLM folder or a GGUF file.

A GGUF file is read by transformers (`from_pretrained(folder, gguf_file=name)`), which dequantizes its
weights to float: those floats are the FP32 reference the exports are compared with. It needs the `gguf`
and `accelerate` packages (pip install 'edgeq[llm]'); without them the source is refused before loading.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from edgeq.errors import SourceError, UsageError

# Architectures this task takes: decoder-only LMs with a causal LM head (transformers' class-name endings).
CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


@dataclass
class DecoderSource:
    model: object          # a transformers CausalLM, float32, eval
    tokenizer: object | None
    name: str              # for the bundle folder
    origin: str            # what the manifest records: the folder or the .gguf path


def load_decoder(source: str, *, trust_remote_code: bool = False) -> DecoderSource:
    """Load `source` (a folder with config.json, or a .gguf file) as a float32 causal LM and its tokenizer."""
    path = Path(source)
    if not path.exists():
        raise SourceError(f"{source}: no such folder or .gguf file")
    if path.is_file() and path.suffix.lower() == ".gguf":
        missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
        if missing:
            raise UsageError(f"{source}: reading a GGUF file needs the {' and '.join(missing)} package(s): "
                             "pip install 'edgeq[llm]'")
        folder, kwargs = path.parent, {"gguf_file": path.name}
        name = path.stem.split(".")[0]
    elif path.is_dir():
        config = path / "config.json"
        if not config.exists():
            raise SourceError(f"{source}: not a Hugging Face model folder (no config.json)")
        _check_architecture(source, json.loads(config.read_text()))
        folder, kwargs, name = path, {}, path.name
    else:
        raise UsageError(f"{source}: --task text-generation takes a Hugging Face CausalLM folder or a .gguf file")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, dtype="float32",
                                                     trust_remote_code=trust_remote_code, **kwargs)
    except ValueError as exc:  # transformers: "Unrecognized configuration class ... for AutoModelForCausalLM"
        raise UsageError(f"{source}: not a decoder-only causal LM, which --task text-generation needs ({str(exc).splitlines()[0]})") from exc
    except (OSError, ImportError) as exc:
        raise SourceError(f"{source}: cannot load the model: {str(exc).splitlines()[0]}") from exc
    if getattr(model.config, "is_encoder_decoder", False):
        raise UsageError(f"{source}: {type(model).__name__} is an encoder-decoder; --task text-generation takes decoder-only LMs")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, **kwargs)
    except (OSError, ValueError, TypeError):
        tokenizer = None  # token-id data (.npy/.npz) still works; text data is refused later with the reason
    import torch

    # nn.Module.float: transformers flags a GGUF-read model as quantized and refuses its own .float()
    return DecoderSource(torch.nn.Module.float(model).eval(), tokenizer, name, str(path))


def _check_architecture(source: str, config: dict) -> None:
    architectures = config.get("architectures") or []
    if config.get("is_encoder_decoder"):
        raise UsageError(f"{source}: an encoder-decoder model; --task text-generation takes decoder-only causal LMs")
    if architectures and not any(a.endswith(CAUSAL_SUFFIXES) for a in architectures):
        raise UsageError(f"{source}: {', '.join(architectures)} is not a causal LM (…{' / …'.join(CAUSAL_SUFFIXES)}); "
                         "--task text-generation takes decoder-only causal LMs")
