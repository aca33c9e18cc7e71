"""Safe extraction of an uploaded adapter folder (tar, tar.gz/bz2/xz, or zip).

Nothing is extracted with `extractall`: every member is checked first (no absolute paths, no
'..', no links or devices, no pickle files, bounded count and size) and then written by hand
below the destination, so a hostile archive can never write outside it.
"""

from __future__ import annotations

import json
import shutil
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import IO

from ..io.files import MANIFEST, TENSORS
from ..io.storage import PICKLE_SUFFIXES
from .errors import BadUpload, PayloadTooLarge

MAX_FILES = 64
MAX_BYTES = 1 << 30
#: any member but the tensors (the manifest, a README, ...) is small; only these names are kept
MAX_SMALL_MEMBER = 1 << 20


def extract_adapter_archive(archive: Path, dest: Path, max_bytes: int = MAX_BYTES, max_files: int = MAX_FILES) -> Path:
    """Extract `archive` into the empty folder `dest`; returns the folder holding adapter.json."""
    dest.mkdir(parents=True, exist_ok=True)
    try:
        if zipfile.is_zipfile(archive):
            _extract_zip(archive, dest, max_bytes, max_files)
        else:
            _extract_tar(archive, dest, max_bytes, max_files)
    except (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, OSError) as err:
        raise BadUpload(f"the upload is truncated or not a tar/zip archive ({type(err).__name__}: {err})") from None
    return adapter_root(dest)


def adapter_root(folder: Path) -> Path:
    """The folder itself, or its single subfolder, whichever holds adapter.json."""
    if (folder / MANIFEST).is_file():
        return folder
    subdirs = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(("__MACOSX", "."))]
    if len(subdirs) == 1 and (subdirs[0] / MANIFEST).is_file():
        return subdirs[0]
    raise BadUpload(f"the archive holds no {MANIFEST} at its top level or in one top-level folder")


def safe_member_path(name: str, is_dir: bool = False) -> PurePosixPath:
    """A relative path with no '..', no absolute start and no drive; raise BadUpload otherwise."""
    if "\x00" in name or "\\" in name:
        raise BadUpload(f"archive member {name!r}: unsafe characters in its name")
    path = PurePosixPath(name)
    if path.is_absolute() or name.startswith("/") or (path.parts and ":" in path.parts[0]):
        raise BadUpload(f"archive member {name!r}: absolute paths are not allowed")
    if ".." in path.parts:
        raise BadUpload(f"archive member {name!r}: '..' (path traversal) is not allowed")
    parts = [p for p in path.parts if p not in ("", ".")]
    if not parts:
        if is_dir:
            return PurePosixPath(".")  # the archive's own top folder, "./"
        raise BadUpload(f"archive member {name!r}: empty name")
    if PurePosixPath(parts[-1]).suffix.lower() in PICKLE_SUFFIXES:
        raise BadUpload(f"archive member {name!r}: pickle files are refused; adapters are safetensors + JSON")
    return PurePosixPath(*parts)


def _extract_tar(archive: Path, dest: Path, max_bytes: int, max_files: int) -> None:
    with tarfile.open(archive, mode="r:*") as tar:
        members = []
        total = 0
        for member in tar:  # reading every header first also catches truncation early
            path = safe_member_path(member.name, member.isdir())
            if member.issym() or member.islnk():
                raise BadUpload(f"archive member {member.name!r}: links are not allowed")
            if not (member.isfile() or member.isdir()):
                raise BadUpload(f"archive member {member.name!r}: only regular files and folders are allowed")
            _check_member_size(member.name, path, member.size)
            total += member.size
            members.append((member, path))
            _check_limits(len(members), total, max_files, max_bytes)
        for member, path in members:
            if path.name == TENSORS and member.isfile():
                _check_tensor_size(tar.extractfile(member), member.size, member.name)
        for member, path in members:
            target = _target(dest, path)
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            source = tar.extractfile(member)
            if source is None:
                raise BadUpload(f"archive member {member.name!r}: cannot be read")
            _copy(source, target, member.size, member.name)


def _extract_zip(archive: Path, dest: Path, max_bytes: int, max_files: int) -> None:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        total = 0
        checked = []
        for count, info in enumerate(infos, 1):
            path = safe_member_path(info.filename, info.is_dir())
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise BadUpload(f"archive member {info.filename!r}: links are not allowed")
            # ZipFile.writestr and many Windows tools write no file-type bits at all (S_IFMT 0)
            if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise BadUpload(f"archive member {info.filename!r}: only regular files and folders are allowed")
            _check_member_size(info.filename, path, info.file_size)
            total += info.file_size
            _check_limits(count, total, max_files, max_bytes)
            checked.append((info, path))
        for info, path in checked:
            if path.name == TENSORS and not info.is_dir():
                with zf.open(info) as source:
                    _check_tensor_size(source, info.file_size, info.filename)
        for info, path in checked:
            target = _target(dest, path)
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            with zf.open(info) as source:
                _copy(source, target, info.file_size, info.filename)


def _check_member_size(name: str, path: PurePosixPath, size: int) -> None:
    if path.name != TENSORS and size > MAX_SMALL_MEMBER:
        raise PayloadTooLarge(
            f"archive member {name!r} is {size} bytes; only {TENSORS} may be larger than {MAX_SMALL_MEMBER}"
        )


def _check_tensor_size(source: IO[bytes] | None, size: int, name: str) -> None:
    """A safetensors member must be exactly as long as its own header says, read before extracting:
    the unpacked upload is then no bigger than the tensors it declares."""
    if source is None:
        raise BadUpload(f"archive member {name!r}: cannot be read")
    prefix = source.read(8)
    if len(prefix) < 8:
        raise BadUpload(f"archive member {name!r}: not a safetensors file")
    header_len = int.from_bytes(prefix, "little")
    if header_len > min(size, MAX_SMALL_MEMBER * 16):
        raise BadUpload(f"archive member {name!r}: a safetensors header of {header_len} bytes")
    try:
        header = json.loads(source.read(header_len))
        end = max([int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"] or [0])
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError, OverflowError) as err:
        raise BadUpload(f"archive member {name!r}: an unreadable safetensors header ({err})") from None
    if 8 + header_len + end != size:
        raise BadUpload(
            f"archive member {name!r} is {size} bytes but its header declares {8 + header_len + end}"
        )


def _check_limits(count: int, total: int, max_files: int, max_bytes: int) -> None:
    if count > max_files:
        raise PayloadTooLarge(f"the archive has more than {max_files} members; an adapter folder needs two files")
    if total > max_bytes:
        raise PayloadTooLarge(f"the archive unpacks to more than {max_bytes} bytes")


def _target(dest: Path, path: PurePosixPath) -> Path:
    target = dest.joinpath(*path.parts)
    if not target.resolve().is_relative_to(dest.resolve()):
        raise BadUpload(f"archive member {path}: resolves outside the upload folder")
    return target


def _copy(source: IO[bytes], target: Path, size: int, name: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        out = open(target, "xb")  # "x": a duplicate member name cannot overwrite a checked file
    except FileExistsError:
        raise BadUpload(f"archive member {name!r}: appears twice") from None
    with out:
        shutil.copyfileobj(_Bounded(source, size, name), out)


class _Bounded:
    """Reads at most the declared size: a member that claims 1 kB cannot unpack to 1 GB."""

    def __init__(self, source: IO[bytes], limit: int, name: str) -> None:
        self.source, self.left, self.name = source, limit, name

    def read(self, n: int = -1) -> bytes:
        want = self.left + 1 if n is None or n < 0 else min(n, self.left + 1)
        data = self.source.read(want)
        self.left -= len(data)
        if self.left < 0:
            raise BadUpload(f"archive member {self.name!r}: more data than its header declares")
        return data
