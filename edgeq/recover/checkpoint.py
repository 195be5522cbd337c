"""Checkpoints of a recovery run: safetensors for every tensor, one small JSON for the rest, never a pickle.

A checkpoint at step k is three files in the checkpoint folder:
  state-<k>.safetensors      the trained module's tensors (its state_dict: parameters, LoRA adapters, QAT scales)
  optimizer-<k>.safetensors  AdamW's per-parameter moments and step counts ("<index>.exp_avg", ...), and the
                             torch RNG state ("rng.torch")
  checkpoint.json            step, the run's identity (spec text, seed, steps, batch size, parameter names and
                             shapes), AdamW's param_groups (hyperparameters), the loss history so far and the two
                             file names. Written last, by rename: a run killed mid-save leaves the previous
                             checkpoint whole, and the files of a newer step the JSON never names are ignored.
Older steps' tensor files are deleted once the JSON names the new ones.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

JSON_NAME = "checkpoint.json"
FORMAT = 1


@dataclass
class Checkpoint:
    step: int
    identity: dict  # what must match for a resume to continue the same run
    state: dict  # name -> tensor (the module's state_dict)
    optimizer: dict  # torch optimizer state_dict
    rng: object  # torch.ByteTensor (torch.get_rng_state())
    history: list = field(default_factory=list)  # (step, loss) pairs logged so far


def _atomic_save_tensors(tensors: dict, path: Path) -> None:
    from safetensors.torch import save_file

    temporary = path.with_name(path.name + ".tmp")
    # safetensors refuses shared or non-contiguous storage: store plain copies (a checkpoint is read back by name)
    save_file({name: t.detach().cpu().contiguous().clone() for name, t in tensors.items()}, str(temporary))
    os.replace(temporary, path)


def save_checkpoint(folder: Path, checkpoint: Checkpoint) -> Path:
    """Write `checkpoint` into `folder` (created if missing); returns the JSON's path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state_name, optimizer_name = f"state-{checkpoint.step:07d}.safetensors", f"optimizer-{checkpoint.step:07d}.safetensors"
    _atomic_save_tensors(checkpoint.state, folder / state_name)
    moments, groups = _flatten_optimizer(checkpoint.optimizer)
    _atomic_save_tensors(moments | {"rng.torch": checkpoint.rng}, folder / optimizer_name)
    document = {
        "format": FORMAT, "step": checkpoint.step, "identity": checkpoint.identity, "param_groups": groups,
        "history": checkpoint.history, "state_file": state_name, "optimizer_file": optimizer_name,
    }
    path = folder / JSON_NAME
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(document, indent=1) + "\n")
    os.replace(temporary, path)
    for old in list(folder.glob("state-*.safetensors")) + list(folder.glob("optimizer-*.safetensors")):
        if old.name not in (state_name, optimizer_name):
            old.unlink(missing_ok=True)
    return path


def load_checkpoint(folder: Path) -> Checkpoint | None:
    """The checkpoint in `folder`, or None when there is none. A JSON naming missing files is an error."""
    from safetensors.torch import load_file

    from edgeq.errors import UsageError

    path = Path(folder) / JSON_NAME
    if not path.is_file():
        return None
    document = json.loads(path.read_text())
    if document.get("format") != FORMAT:
        raise UsageError(f"{path}: checkpoint format {document.get('format')!r}, this edgeq reads format {FORMAT}")
    try:
        state = load_file(str(Path(folder) / document["state_file"]))
        tensors = load_file(str(Path(folder) / document["optimizer_file"]))
    except (FileNotFoundError, OSError) as error:
        raise UsageError(f"{path} names tensor files that cannot be read ({error}); delete the folder to start over") from None
    rng = tensors.pop("rng.torch")
    optimizer = _unflatten_optimizer(tensors, document["param_groups"])
    return Checkpoint(document["step"], document["identity"], state, optimizer, rng, document.get("history", []))


def _flatten_optimizer(state_dict: dict) -> tuple[dict, list]:
    """AdamW's state_dict as (tensors by "<param index>.<name>", JSON-able param_groups)."""
    import torch

    tensors = {}
    for index, entry in state_dict["state"].items():
        for name, value in entry.items():
            tensors[f"{index}.{name}"] = value if isinstance(value, torch.Tensor) else torch.tensor(value)
    return tensors, [dict(group) for group in state_dict["param_groups"]]


def _unflatten_optimizer(tensors: dict, groups: list) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        index, _, name = key.partition(".")
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": groups}
