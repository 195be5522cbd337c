"""What a SOURCE file or folder is, told from its bytes (not its suffix), so a wrong file gets a message that
says what it is and what edgeq takes, before any loader meets bytes it was not written for.
"""

from __future__ import annotations

import json
import struct
import zipfile
from enum import StrEnum
from pathlib import Path

from edgeq.errors import SourceError

ACCEPTED_SOURCES = (
    "SOURCE may be: package.module:callable (or path/to/file.py:callable) returning an nn.Module; "
    "a torch.export program (.pt2, from torch.export.save); a TorchScript archive (torch.jit.save) with --input; "
    "a state dict (.pt/.pth/.bin/.ckpt from torch.save, or .safetensors) with --factory package.module:callable; "
    "a Hugging Face model folder (config.json + model.safetensors) with --task; "
    "or a pickled whole model (torch.save(model)) with --trust-pickle"
)


class FileKind(StrEnum):
    EXPORT = "a torch.export program"
    TORCHSCRIPT = "a TorchScript archive"
    TORCH_SAVE = "a torch.save file"  # zip layout (torch >= 1.6): a state dict or a pickled object
    PICKLE = "a Python pickle"  # torch.save's legacy layout, or pickle.dump
    SAFETENSORS = "a safetensors file"
    EMPTY = "an empty file"
    ZIP = "a zip archive"
    BROKEN_ZIP = "a damaged or truncated zip archive"  # torch's formats are zips: a cut-off copy lands here
    BROKEN_SAFETENSORS = "a truncated safetensors file"  # its header is longer than the file
    NUMPY = "a numpy array file (.npy)"
    ONNX = "an ONNX model"
    TFLITE = "a TFLite model"
    HDF5 = "an HDF5 file (e.g. a Keras model)"
    GGUF = "a GGUF file (llama.cpp weights)"
    TEXT = "a text file"
    UNKNOWN = "a file of a kind edgeq does not know"


MODEL_KINDS = {FileKind.EXPORT, FileKind.TORCHSCRIPT, FileKind.TORCH_SAVE, FileKind.PICKLE, FileKind.SAFETENSORS}


def archive_members(archive: zipfile.ZipFile) -> list[str]:
    """Member names without the archive's top folder (torch writes every member under `<name>/`)."""
    return [name.split("/", 1)[1] if "/" in name else name for name in archive.namelist()]


def file_kind(path: Path) -> FileKind:
    """Sniff `path`'s bytes: a zip's member names tell torch's formats apart; magic numbers the rest."""
    with open(path, "rb") as handle:
        head = handle.read(4096)
    if not head:
        return FileKind.EMPTY
    if head.startswith(b"PK\x03\x04"):
        return _zip_kind(path) if zipfile.is_zipfile(path) else FileKind.BROKEN_ZIP
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return FileKind.PICKLE
    if head.startswith(b"\x93NUMPY"):
        return FileKind.NUMPY
    if head[4:8] == b"TFL3":
        return FileKind.TFLITE
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        return FileKind.HDF5
    if head.startswith(b"GGUF"):
        return FileKind.GGUF
    if _is_safetensors(head, path.stat().st_size):
        return FileKind.SAFETENSORS
    if path.suffix.lower() == ".safetensors" and head[8:9] == b"{":
        return FileKind.BROKEN_SAFETENSORS
    if path.suffix.lower() == ".onnx":
        return FileKind.ONNX  # protobuf has no magic number; the suffix is all there is
    if b"\0" not in head and _decodes(head):
        return FileKind.TEXT
    return FileKind.UNKNOWN


def _zip_kind(path: Path) -> FileKind:
    try:
        with zipfile.ZipFile(path) as archive:
            members = set(archive_members(archive))
    except (zipfile.BadZipFile, OSError):
        return FileKind.ZIP
    if "archive_format" in members or "serialized_exported_program.json" in members:
        return FileKind.EXPORT
    if any(name.startswith("code/") for name in members) and "data.pkl" in members:
        return FileKind.TORCHSCRIPT
    if "data.pkl" in members:
        return FileKind.TORCH_SAVE
    return FileKind.ZIP


def _is_safetensors(head: bytes, size: int) -> bool:
    """8 bytes of little-endian header length, then the JSON header itself."""
    if len(head) < 10:
        return False
    (length,) = struct.unpack("<Q", head[:8])
    return 0 < length <= size - 8 and head[8:9] == b"{"


def _decodes(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start > len(head) - 4  # a character cut off by the 4 KiB window is still text
    return True


def describe_file(path: Path, kind: FileKind) -> tuple[str, str]:
    """(what `path` is, what to do instead) for a file that is no model source edgeq reads."""
    if kind == FileKind.ZIP:
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError):
            names = []
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        return f"a zip archive of {len(names)} file(s) ({shown or 'unreadable'})", "torch's files are zips of another layout"
    if kind == FileKind.BROKEN_SAFETENSORS:
        return str(kind), "copy or save it again"
    if kind == FileKind.BROKEN_ZIP:
        return str(kind), "torch.save, torch.export and TorchScript files are zips: copy or save it again"
    if kind == FileKind.ONNX:
        return str(kind), "edgeq converts from PyTorch (it writes the .onnx itself): give the PyTorch model it came from"
    if kind in (FileKind.TFLITE, FileKind.HDF5, FileKind.GGUF):
        return str(kind), "edgeq converts from PyTorch models"
    if kind == FileKind.NUMPY:
        return str(kind), "data goes to --data; SOURCE is the model"
    if kind == FileKind.TEXT:
        first = path.read_text(errors="replace").strip().splitlines()[:1]
        return (f"a text file (it begins {first[0][:60]!r})" if first else "a text file holding only blank lines"), ""
    return str(kind), ""


def refuse_file(path: Path, kind: FileKind) -> SourceError:
    """The error for a SOURCE file that is no model edgeq reads."""
    what, advice = describe_file(path, kind)
    expected = ", not a torch.export program (torch.export.save writes those)" if path.suffix == ".pt2" else ", not a model source"
    return SourceError(f"{path} is {what}{expected}{'; ' + advice if advice else ''}. {ACCEPTED_SOURCES}")


def refuse_folder(folder: Path) -> SourceError:
    """The error for a folder that is not a Hugging Face model folder."""
    names = sorted(p.name for p in folder.iterdir())
    if "saved_model.pb" in names:
        what = "a TensorFlow SavedModel; edgeq converts from PyTorch models"
    elif folder.suffix == ".mlpackage" or "Manifest.json" in names:
        what = "a Core ML package; edgeq converts from PyTorch models"
    elif names:
        what = f"a folder without config.json ({', '.join(names[:6])}{', ...' if len(names) > 6 else ''})"
    else:
        what = "an empty folder"
    return SourceError(f"{folder} is {what}, so not a Hugging Face model folder. {ACCEPTED_SOURCES}")


def read_json_file(path: Path, what: str) -> object:
    """A JSON file of a model folder, or a SourceError naming the file, line and column."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise SourceError(f"{path}: {what} is not UTF-8 text (byte {exc.start})") from exc
    except json.JSONDecodeError as exc:
        raise SourceError(f"{path}: {what} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from exc
    except OSError as exc:
        raise SourceError(f"{path}: cannot read {what} ({exc.strerror})") from exc
