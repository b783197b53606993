"""Reading run files without loading them whole: tails of big logs, half-written lines, following."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

from trainer.rundir import BLOCK, follow_lines, last_record, records_after, tail_lines


def test_tail_of_a_log_bigger_than_many_blocks(tmp_path: Path) -> None:
    log = tmp_path / "big.log"
    lines = [f"line {i} " + "x" * (i % 300) + "\n" for i in range(20_000)]
    log.write_text("".join(lines))
    assert log.stat().st_size > 20 * BLOCK
    for count in (0, 1, 7, 500):
        got, offset = tail_lines(log, count)
        assert got == (lines[-count:] if count else [])
        assert offset == log.stat().st_size
    assert tail_lines(tmp_path / "missing.log", 5) == ([], 0)
    short = tmp_path / "short.log"
    short.write_text("a\nb\n")
    assert tail_lines(short, 10)[0] == ["a\n", "b\n"]


def test_metric_records_skip_a_half_written_last_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    assert last_record(path) is None and records_after(path, None) == []
    records = [{"step": s, "loss": 1.0 / s} for s in range(10, 60, 10)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 60, "lo')
    assert last_record(path) == records[-1]
    assert records_after(path, None) == records
    assert [r["step"] for r in records_after(path, 30)] == [40, 50]


def test_follow_streams_new_lines_until_finished_and_drops_none(tmp_path: Path) -> None:
    log = tmp_path / "attempt-1.log"
    log.write_text("old 1\nold 2\n")
    _, offset = tail_lines(log, 0)
    finished = threading.Event()

    def writer() -> None:
        with log.open("a") as out:
            for i in range(50):
                out.write(f"new {i}\n")
                out.flush()
            out.write("partial")  # no newline: still sent once the job has ended
        finished.set()

    async def collect() -> list[str]:
        got = []
        async for line in follow_lines(log, offset, finished.is_set, poll_s=0.01):
            got.append(line)
            if len(got) == 1:
                threading.Thread(target=writer).start()
        return got

    log.write_text("old 1\nold 2\nfirst\n")
    got = asyncio.run(asyncio.wait_for(collect(), timeout=30))
    assert got == ["first\n", *[f"new {i}\n" for i in range(50)], "partial"]
