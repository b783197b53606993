"""Packing a working directory (api.packing) and checking an upload (service.packages)."""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import pytest

from api.packing import PackingError, pack_directory, packed_files
from service.packages import BadPackage, PackageStore, UnknownPackage, inspect_archive


def make_tree(root: Path) -> Path:
    files = {
        "train.py": "print('hi')\n",
        "pkg/__init__.py": "",
        "pkg/model.py": "X = 1\n",
        "pkg/__pycache__/model.cpython-311.pyc": "junk",
        "data/big.csv": "1,2,3\n" * 100,
        "notes.log": "log\n",
        ".git/HEAD": "ref: refs/heads/main\n",
        ".venv/bin/python": "",
        ".gitignore": "*.log\n",
        ".hutchignore": "data/\n",
    }
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_ignore_files_and_the_always_excluded_are_left_out(tmp_path: Path) -> None:
    make_tree(tmp_path)
    assert [p.as_posix() for p in packed_files(tmp_path)] == [
        ".gitignore", "pkg/__init__.py", "pkg/model.py", "train.py"
    ]  # fmt: skip


def test_the_same_files_give_the_same_bytes_whatever_their_times(tmp_path: Path) -> None:
    make_tree(tmp_path)
    first = pack_directory(tmp_path)
    os.utime(tmp_path / "train.py", (0, 0))
    assert pack_directory(tmp_path) == first
    (tmp_path / "train.py").write_text("print('changed')\n")
    assert pack_directory(tmp_path) != first
    with zipfile.ZipFile(io.BytesIO(first)) as archive:
        assert archive.read("pkg/model.py") == b"X = 1\n"  # files at the top level, as Ray unpacks them


def test_directories_that_cannot_be_packed_say_why(tmp_path: Path) -> None:
    with pytest.raises(PackingError, match="not a directory"):
        pack_directory(tmp_path / "missing")
    (tmp_path / ".hutchignore").write_text("*\n")
    with pytest.raises(PackingError, match="no files to pack"):
        pack_directory(tmp_path)
    (tmp_path / ".hutchignore").unlink()
    (tmp_path / "weights.bin").write_bytes(os.urandom(20_000))  # does not compress
    with pytest.raises(PackingError, match="HUTCH_MAX_PACKAGE_BYTES"):
        pack_directory(tmp_path, max_bytes=10_000)


def test_a_kept_package_is_named_by_its_content_and_found_again(tmp_path: Path) -> None:
    source = make_tree(tmp_path / "src")
    store = PackageStore(tmp_path / "packages")
    uploads = []
    for _ in range(2):
        with store.spool() as spooled:
            spooled.write(pack_directory(source))
        uploads.append(store.adopt(Path(spooled.name)))
    (package, created), (again, created_again) = uploads
    assert created and not created_again and package == again
    assert store.path(package.uri).read_bytes() == pack_directory(source)
    assert sorted(p.name for p in store.root.iterdir()) == [f"{package.sha256}.zip"]  # no spool left
    with pytest.raises(UnknownPackage, match="no uploaded package"):
        store.path("hutch://packages/" + "f" * 64 + ".zip")


def test_a_refused_upload_leaves_nothing(tmp_path: Path) -> None:
    store = PackageStore(tmp_path / "packages")
    with store.spool() as spooled:
        spooled.write(b"PK\x03\x04 not really")
    with pytest.raises(BadPackage, match="not a readable zip"):
        store.adopt(Path(spooled.name))
    assert list(store.root.iterdir()) == []


def test_an_archive_that_unpacks_too_large_is_refused(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("zeros.bin", b"\0" * 2_000_000)  # a few KiB packed
    assert bomb.stat().st_size < 20_000
    with pytest.raises(BadPackage, match="unpacks to 2000000 bytes"):
        inspect_archive(bomb, max_unpacked=1_000_000)
