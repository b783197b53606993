"""Packing a job's working directory into the zip archive the control plane keeps.

The archive holds the directory's files at its top level (Ray unpacks a working directory
package as it is), in sorted order with fixed timestamps, so the same files always give the
same bytes and so the same package: uploading unchanged code again stores nothing new.

Left out: what ``.hutchignore`` and ``.gitignore`` at the directory's top list (gitignore
syntax, through ``pathspec``), and ``.git/``, ``.venv/``, ``venv/``, ``__pycache__/`` and
``*.pyc`` always. Symbolic links to files are packed as the file they point to; links to
directories are not followed.
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import pathspec

from service.packages import MAX_UNPACKED_BYTES

DEFAULT_MAX_PACKAGE_BYTES = 100 * 1024 * 1024
"""The control plane's default limit (HUTCH_MAX_PACKAGE_BYTES): what Ray's job API accepts."""

ALWAYS_EXCLUDED = (".git/", ".venv/", "venv/", "__pycache__/", "*.pyc", ".hutchignore")
IGNORE_FILES = (".hutchignore", ".gitignore")
_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip entry can carry


class PackingError(ValueError):
    """The directory cannot be packed (missing, empty, too large); the message says which."""


def packed_files(directory: Path) -> list[Path]:
    """The files of ``directory`` that go into its package, relative to it, sorted."""
    lines = list(ALWAYS_EXCLUDED)
    for name in IGNORE_FILES:
        ignore_file = directory / name
        if ignore_file.is_file():
            lines += ignore_file.read_text(encoding="utf-8", errors="replace").splitlines()
    excluded = pathspec.GitIgnoreSpec.from_lines(lines)
    found = []
    for root, dirs, files in os.walk(directory):
        here = Path(root).relative_to(directory)
        dirs[:] = sorted(d for d in dirs if not excluded.match_file(f"{(here / d).as_posix()}/"))
        for name in files:
            relative = here / name
            if (directory / relative).is_file() and not excluded.match_file(relative.as_posix()):
                found.append(relative)
    return sorted(found)


def pack_directory(directory: str | Path, max_bytes: int = DEFAULT_MAX_PACKAGE_BYTES) -> bytes:
    """The zip archive of a working directory; raises :class:`PackingError` if it cannot be one."""
    directory = Path(directory)
    if not directory.is_dir():
        raise PackingError(f"--working-dir {directory}: not a directory")
    files = packed_files(directory)
    if not files:
        raise PackingError(f"--working-dir {directory}: no files to pack (all excluded?)")
    total = sum((directory / f).stat().st_size for f in files)
    if total > MAX_UNPACKED_BYTES:
        raise PackingError(
            f"--working-dir {directory}: its files take {total} bytes, more than a package may unpack "
            f"to ({MAX_UNPACKED_BYTES}); list data and outputs in .hutchignore, load data from storage"
        )
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for relative in files:
            entry = zipfile.ZipInfo(relative.as_posix(), date_time=_EPOCH)
            entry.external_attr = 0o644 << 16
            entry.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(entry, (directory / relative).read_bytes())
    if buffer.tell() > max_bytes:
        raise PackingError(
            f"--working-dir {directory}: the package is {buffer.tell()} bytes, more than {max_bytes} "
            "(HUTCH_MAX_PACKAGE_BYTES); list data and outputs in .hutchignore, load data from storage"
        )
    return buffer.getvalue()
