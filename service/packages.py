"""Uploaded working directories: zip archives kept on the shared storage by content hash.

``hutch submit --working-dir DIR`` packs the directory into a zip and uploads it
(``POST /v1/packages``); the job's ``runtime_env.working_dir`` then names it
``hutch://packages/<sha256>.zip``. At each submission to Ray the launcher hands Ray the file
(Ray's job client uploads a local ``.zip`` working directory to the cluster's GCS, where the
job's driver and workers unpack it). Kept on the shared storage rather than only in the GCS,
the package outlives a restart of the control plane or of the Ray cluster, and every retry of
the job runs the same code.

An upload is checked before it is kept: a readable zip whose entries pass their CRC check, no
absolute paths, ``..`` or links, and an unpacked size within bounds (a "zip bomb" is refused).
It becomes visible under its final name only once complete (written aside, then renamed), so a
failed or interrupted upload leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from trainer.spec import PACKAGE_URI

MAX_UNPACKED_BYTES = 1 << 30
"""Largest unpacked size of a package (1 GiB): every job's workers unpack it."""

MAX_ENTRIES = 100_000


@dataclass(frozen=True)
class Package:
    sha256: str
    size_bytes: int
    files: int

    @property
    def uri(self) -> str:
        return f"hutch://packages/{self.sha256}.zip"


class BadPackage(ValueError):
    """The upload is not a usable package; the message says why."""


class UnknownPackage(LookupError):
    """A spec names an uploaded package that this control plane does not have."""

    def __init__(self, uri: str) -> None:
        super().__init__(f"no uploaded package {uri}; upload it first (hutch submit --working-dir)")


class PackageStore:
    """Packages under ``root`` (``STORAGE/packages``), one ``<sha256>.zip`` file each."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, uri: str) -> Path:
        """The file of a ``hutch://packages/…`` URI; raises :class:`UnknownPackage` if absent."""
        match = PACKAGE_URI.fullmatch(uri)
        path = self.root / f"{match['sha256']}.zip" if match else None
        if path is None or not path.is_file():
            raise UnknownPackage(uri)
        return path

    def spool(self) -> BinaryIO:
        """A temporary file beside the packages (same file system, so the final rename is atomic)."""
        self.root.mkdir(parents=True, exist_ok=True)
        return tempfile.NamedTemporaryFile(dir=self.root, prefix=".upload-", suffix=".zip", delete=False)

    def adopt(self, spooled: Path) -> tuple[Package, bool]:
        """Check a complete upload and keep it under its hash; ``(package, created)``.

        The spooled file is always gone afterwards: renamed into place, or removed (a refused
        upload, or one whose content is already kept)."""
        try:
            package = inspect_archive(spooled)
            final = self.root / f"{package.sha256}.zip"
            if final.exists():
                return package, False
            with spooled.open("rb") as handle:
                os.fsync(handle.fileno())
            os.replace(spooled, final)
            return package, True
        finally:
            with contextlib.suppress(FileNotFoundError):
                spooled.unlink()


def inspect_archive(path: Path, max_unpacked: int = MAX_UNPACKED_BYTES) -> Package:
    """Validate a zip archive and describe it; raises :class:`BadPackage` with the reason."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
            files = [entry for entry in entries if not entry.is_dir()]
            if not files:
                raise BadPackage("the archive holds no files")
            if len(entries) > MAX_ENTRIES:
                raise BadPackage(f"the archive holds {len(entries)} entries; at most {MAX_ENTRIES}")
            unpacked = sum(entry.file_size for entry in files)
            if unpacked > max_unpacked:
                raise BadPackage(f"the archive unpacks to {unpacked} bytes; at most {max_unpacked}")
            for entry in entries:
                _check_entry(entry)
            broken = archive.testzip()
            if broken is not None:
                raise BadPackage(f"the archive is corrupt: {broken!r} fails its CRC check")
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, NotImplementedError) as error:
        if isinstance(error, BadPackage):
            raise
        raise BadPackage(f"not a readable zip archive: {error}") from None
    return Package(digest.hexdigest(), path.stat().st_size, len(files))


def _check_entry(entry: zipfile.ZipInfo) -> None:
    name = PurePosixPath(entry.filename)
    if name.is_absolute() or ".." in name.parts or "\\" in entry.filename or ":" in name.parts[0]:
        raise BadPackage(f"entry {entry.filename!r} would unpack outside the working directory")
    mode = entry.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise BadPackage(f"entry {entry.filename!r} is a symbolic link; packages hold plain files only")
