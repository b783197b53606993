"""Reading a run's files on the shared storage without loading them whole: the newest metric
record, metric records past a step, the last lines of a log, and new log lines as they come."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

BLOCK = 64 * 1024


def _backwards_blocks(path: Path) -> Iterator[bytes]:
    """The file's bytes in blocks from the end towards the start."""
    with path.open("rb") as handle:
        position = handle.seek(0, os.SEEK_END)
        while position > 0:
            size = min(BLOCK, position)
            position -= size
            handle.seek(position)
            yield handle.read(size)


def tail_lines(path: Path, count: int) -> tuple[list[str], int]:
    """The last ``count`` complete lines of a text file and the offset just past them (its size).

    Reads blocks from the end until enough newlines are found, so the cost follows ``count``,
    not the file's size.
    """
    if not path.exists():
        return [], 0
    size = path.stat().st_size
    if count <= 0:
        return [], size
    data = b""
    for block in _backwards_blocks(path):
        data = block + data
        if data.count(b"\n") > count:
            break
    lines = data.decode("utf-8", errors="replace").splitlines(keepends=True)
    return lines[-count:], size


def last_record(path: Path) -> dict[str, Any] | None:
    """The newest record of a ``metrics.jsonl`` (None before the first)."""
    lines, _ = tail_lines(path, 2)
    for line in reversed(lines):
        if line.strip() and line.endswith("\n"):  # a half-written last line is skipped
            return json.loads(line)
    return None


def records_after(path: Path, since: int | None) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` with ``step > since``, in order, read line by line."""
    if not path.exists():
        return []
    records = []
    with path.open() as handle:
        for line in handle:
            if not line.strip() or not line.endswith("\n"):
                continue
            record = json.loads(line)
            if since is None or record.get("step", 0) > since:
                records.append(record)
    return records


async def follow_lines(
    path: Path, offset: int, finished: Callable[[], bool], poll_s: float = 0.5
) -> AsyncIterator[str]:
    """Lines appended to ``path`` after ``offset``, as they are written, until ``finished()``
    is true and everything written before that has been sent."""
    pending = b""
    while True:
        # Checked before reading, so lines written before the end are never cut off.
        done = await asyncio.to_thread(finished)
        if path.exists():
            with path.open("rb") as handle:
                handle.seek(offset)
                while chunk := handle.read(BLOCK):
                    offset += len(chunk)
                    *complete, pending = (pending + chunk).split(b"\n")
                    for line in complete:
                        yield line.decode("utf-8", errors="replace") + "\n"
        if done:
            if pending:
                yield pending.decode("utf-8", errors="replace")
            return
        await asyncio.sleep(poll_s)
