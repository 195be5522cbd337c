"""Lab archives: bundles packed into one zip for a device lab, with an index of every file and its sha256.

`pack` (the host side, `edgeq bundle`) checks each bundle against its manifest before anything is written,
and writes the archive atomically: a temporary file beside the destination, renamed into place once
complete, so a failure never leaves half an archive and never replaces a good one.

`unpack` (the device side) extracts member by member into a folder of its own: it refuses absolute paths,
`..`, links, members the index does not list and bytes that do not match the index, so an archive can
never write outside that folder.

The standard library, plus edgeq.hashing and edgeq.validate.bundle_check (numpy): no torch, no click.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from edgeq.bundle import REJECTED_SUFFIX
from edgeq.device.generate import as_bundle_files, is_generation_bundle, read_generation_bundle
from edgeq.errors import SourceError, UsageError
from edgeq.hashing import sha256_file
from edgeq.validate.bundle_check import BundleFiles, read_bundle, verify_checksums

INDEX = "edgeq-lab.json"  # at the archive's root
FORMAT = "edgeq-lab"
SCHEMA = 1
# packed when the bundle has them (genai_config.json, kv_scales.npz: beside a text-generation bundle's ONNX decoder)
OPTIONAL_FILES = ("report.json", "sensitivity.json", "genai_config.json", "kv_scales.npz")
_FIXED_TIME = (1980, 1, 1, 0, 0, 0)  # zip timestamps: the same bundles give the same archive bytes
_SAFE = re.compile(r"[^A-Za-z0-9._+-]")


def bundle_name(files: BundleFiles) -> str:
    """`<model>/<target id>/<folder>`, e.g. `tiny_mlp/onnx/fp32` or `tiny_mlp/onnx/fp16.rejected`."""
    manifest = files.manifest
    parts = [str(manifest.get("model", {}).get("name", "model")), str(manifest["target"].get("id", files.runtime)), files.path.name]
    return "/".join(_SAFE.sub("_", part).strip(".") or "_" for part in parts)


def bundle_members(files: BundleFiles) -> list[str]:
    """What a lab needs of a bundle, as paths relative to its folder: the manifest, the artifact (every file
    of an .mlpackage folder), the golden inputs and outputs, the plan files the manifest lists, and the
    reports when present. The budget is in the manifest."""
    folder = files.path
    members = ["manifest.json"]
    if files.artifact.is_dir():
        members += [p.relative_to(folder).as_posix() for p in sorted(files.artifact.rglob("*")) if p.is_file()]
    else:
        members.append(files.artifact.name)
    members.append(files.golden.name)
    plan = files.manifest.get("plan") or {}
    for name in plan.get("files", []):
        if not (folder / name).is_file():
            raise SourceError(f"{folder / name}: missing from the bundle (its manifest's plan lists it)")
        members.append(name)
    members += [name for name in OPTIONAL_FILES if (folder / name).is_file()]
    return list(dict.fromkeys(members))


def pack(bundles: list[Path], dest: Path, allow_rejected: bool = False) -> dict:
    """Write the lab archive `dest` holding `bundles`; returns its index. Nothing is written unless every
    bundle is whole and matches its manifest's checksums."""
    if not bundles:
        raise UsageError("no bundle folders given")
    dest = Path(dest)
    checked: list[tuple[str, BundleFiles, list[str]]] = []
    for folder in map(Path, bundles):
        if not folder.is_dir():
            raise SourceError(f"{folder}: not a bundle folder")
        if folder.name.endswith(REJECTED_SUFFIX) and not allow_rejected:
            raise SourceError(
                f"{folder}: a rejected bundle (over budget, or its runtime could not run it); "
                "pass --allow-rejected to pack it anyway"
            )
        if is_generation_bundle(folder):  # checked against its manifest as it is read
            files = as_bundle_files(read_generation_bundle(folder))
        else:
            files = read_bundle(folder)
            verify_checksums(files)
        name = bundle_name(files)
        if any(name == other for other, _, _ in checked):
            raise UsageError(f"two bundles would both be packed as {name}: give each model/target/precision once")
        checked.append((name, files, bundle_members(files)))

    dest.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent)
    try:
        entries = []
        with os.fdopen(handle, "wb") as raw:
            with zipfile.ZipFile(raw, "w", compression=zipfile.ZIP_DEFLATED) as archive:
                for name, files, members in checked:
                    listed = [{"path": m, **_add(archive, files.path / m, f"{name}/{m}")} for m in members]
                    _check_packed(files, listed)
                    entries.append(_index_entry(name, files, listed))
                index = {"format": FORMAT, "schema": SCHEMA, "edgeq": _edgeq_version(), "bundles": entries}
                _add_bytes(archive, INDEX, (json.dumps(index, indent=2) + "\n").encode())
            raw.flush()
            os.fsync(raw.fileno())
        os.chmod(temp, 0o666 & ~_umask())
        os.replace(temp, dest)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return index


def _check_packed(files: BundleFiles, listed: list[dict]) -> None:
    """The bytes packed are the bytes the manifest's checksums describe (a file changed while packing is caught)."""
    digests = {entry["path"]: entry["sha256"] for entry in listed}
    for path, expected in files.checksums.items():
        name = path.name
        if name in digests:
            actual = digests[name]
        else:  # a folder artifact (.mlpackage): edgeq.hashing.sha256_path's digest over its files
            inside = sorted((PurePosixPath(p).relative_to(name), d) for p, d in digests.items() if p.startswith(f"{name}/"))
            tree = hashlib.sha256()
            for relative, digest in inside:
                tree.update(relative.as_posix().encode() + b"\0" + bytes.fromhex(digest))
            actual = tree.hexdigest()
        if actual != expected:
            raise SourceError(f"{path}: changed while it was being packed (sha256 no longer matches the manifest)")


def _index_entry(name: str, files: BundleFiles, listed: list[dict]) -> dict:
    manifest = files.manifest
    return {
        "name": name,
        "path": name,
        "model": manifest.get("model", {}).get("name"),
        "target": manifest["target"].get("id"),
        "runtime": files.runtime,
        "precision": manifest.get("precision"),
        "verdict": (manifest.get("budget") or {}).get("verdict"),
        "rejected": files.path.name.endswith(REJECTED_SUFFIX),
        "artifact": {"file": files.artifact.name, "sha256": manifest["artifact"]["sha256"]},
        "golden": {"file": files.golden.name, "sha256": manifest["golden"]["sha256"]},
        "files": listed,
    }


def _add(archive: zipfile.ZipFile, source: Path, member: str) -> dict:
    """Stream `source` into the archive as `member`; the sha256 and size of exactly the bytes written."""
    digest, size = hashlib.sha256(), 0
    with open(source, "rb") as reader, archive.open(_info(member), "w") as writer:
        for block in iter(lambda: reader.read(1 << 20), b""):
            digest.update(block)
            writer.write(block)
            size += len(block)
    return {"sha256": digest.hexdigest(), "size": size}


def _add_bytes(archive: zipfile.ZipFile, member: str, data: bytes) -> None:
    archive.writestr(_info(member), data)


def _info(member: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(member, date_time=_FIXED_TIME)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = (stat.S_IFREG | 0o644) << 16
    return info


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _edgeq_version() -> str:
    import edgeq

    return edgeq.__version__


# -- the device side ---------------------------------------------------------------------------------------


def unpack(archive_path: Path, dest: Path) -> list[Path]:
    """Extract a lab archive into the existing folder `dest`, checking every file against the index;
    returns the bundle folders in index order. Anything unexpected is refused (SourceError, exit 3)."""
    archive_path = Path(archive_path)
    try:
        archive = zipfile.ZipFile(archive_path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise SourceError(f"{archive_path}: not a lab archive made by `edgeq bundle` ({exc})") from exc
    with archive:
        infos = archive.infolist()
        seen = set()
        for info in infos:
            _safe_member(archive_path, info.filename)
            if stat.S_ISLNK(info.external_attr >> 16):
                raise SourceError(f"{archive_path}: member {info.filename!r} is a link; a lab archive holds only files")
            if info.filename in seen:
                raise SourceError(f"{archive_path}: member {info.filename!r} appears twice")
            seen.add(info.filename)
        if INDEX not in seen:
            raise SourceError(f"{archive_path}: no {INDEX}; not a lab archive made by `edgeq bundle`")
        index = _read_index(archive_path, archive.read(INDEX))
        listed = _listed_files(archive_path, index)
        files = {info.filename for info in infos if not info.is_dir()} - {INDEX}
        unlisted = sorted(files - set(listed))
        if unlisted:
            raise SourceError(f"{archive_path}: member {unlisted[0]!r} is not in {INDEX}; refusing the archive")
        missing = sorted(set(listed) - files)
        if missing:
            raise SourceError(f"{archive_path}: {missing[0]} is listed in {INDEX} but not in the archive")
        root = Path(dest).resolve()
        for member, entry in listed.items():
            target = root.joinpath(*PurePosixPath(member).parts)
            if root not in target.resolve().parents:
                raise SourceError(f"{archive_path}: member {member!r} would be written outside {root}")
            target.parent.mkdir(parents=True, exist_ok=True)
            _extract(archive_path, archive, member, entry, target)
    return [root.joinpath(*PurePosixPath(bundle["path"]).parts) for bundle in index["bundles"]]


def open_lab_folder(folder: Path) -> list[Path]:
    """The bundles of an already extracted lab archive (a folder holding the index), each file checked."""
    folder = Path(folder)
    index = _read_index(folder / INDEX, (folder / INDEX).read_bytes())
    for member, entry in _listed_files(folder / INDEX, index).items():
        path = folder.joinpath(*PurePosixPath(member).parts)
        if not path.is_file():
            raise SourceError(f"{path}: listed in {INDEX} but missing")
        actual = sha256_file(path)
        if actual != entry["sha256"]:
            raise SourceError(f"{path}: sha256 {actual[:16]}... does not match {INDEX}'s {entry['sha256'][:16]}...")
    return [folder.joinpath(*PurePosixPath(bundle["path"]).parts) for bundle in index["bundles"]]


def _read_index(where: Path, data: bytes) -> dict:
    try:
        index = json.loads(data)
        if index.get("format") != FORMAT or not isinstance(index.get("bundles"), list) or not index["bundles"]:
            raise ValueError(f"not an {FORMAT} index with at least one bundle")
        if index.get("schema", SCHEMA) > SCHEMA:
            raise ValueError(f"schema {index['schema']} is newer than this edgeq reads ({SCHEMA}); upgrade edgeq")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, TypeError, ValueError) as exc:
        raise SourceError(f"{where}: {INDEX} is malformed ({exc})") from exc
    return index


def _listed_files(where: Path, index: dict) -> dict[str, dict]:
    """Archive member -> its index entry ({path, sha256, size}), every path checked."""
    listed = {}
    try:
        for bundle in index["bundles"]:
            _safe_member(where, bundle["path"])
            for entry in bundle["files"]:
                member = _safe_member(where, f"{bundle['path']}/{entry['path']}")
                if not isinstance(entry["sha256"], str) or not isinstance(entry["size"], int):
                    raise TypeError(f"{member}: sha256 and size expected")
                listed[member] = entry
    except (KeyError, TypeError) as exc:
        raise SourceError(f"{where}: {INDEX} is malformed ({exc})") from exc
    return listed


def _safe_member(where: Path, name) -> str:
    """A relative POSIX path with no `..`, no empty part, no backslash and no drive: it stays in its folder."""
    plain = isinstance(name, str) and bool(name) and "\\" not in name and "\0" not in name
    parts = (name[:-1] if name.endswith("/") else name).split("/") if plain else []  # "x/": a folder entry
    if not plain or any(part in ("", ".", "..") for part in parts) or ":" in parts[0]:
        raise SourceError(f"{where}: member {name!r} is not a plain relative path (path traversal?); refusing the archive")
    return name


def _extract(where: Path, archive: zipfile.ZipFile, member: str, entry: dict, target: Path) -> None:
    """Copy one member to `target`, never more bytes than the index says, and check its sha256."""
    digest, size, limit = hashlib.sha256(), 0, entry["size"]
    with archive.open(member) as reader, open(target, "xb") as writer:
        for block in iter(lambda: reader.read(1 << 20), b""):
            size += len(block)
            if size > limit:
                raise SourceError(f"{where}: {member} is larger than {INDEX} says ({limit} bytes)")
            digest.update(block)
            writer.write(block)
    if size != limit or digest.hexdigest() != entry["sha256"]:
        raise SourceError(
            f"{where}: {member}: sha256 {digest.hexdigest()[:16]}... ({size} bytes) does not match {INDEX}'s "
            f"{entry['sha256'][:16]}... ({limit} bytes): the archive was changed after `edgeq bundle` wrote it"
        )
