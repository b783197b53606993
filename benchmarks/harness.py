"""What every benchmark shares: its command line, progress lines, timing, results files and plots.

A benchmark script builds its parser with :func:`parser` (``--quick``, ``--out``, ``--seed``),
fills the settings a mode chooses with :func:`apply_mode`, reports progress with :func:`log`,
times work with :func:`timed` and :func:`interleaved`, prints :func:`table`\\ s, and ends with
:func:`finish`, which writes ``NAME.json`` and ``NAME.png`` (drawn inside :func:`figure`) by
:func:`write_results` and prints the report. A benchmark that starts servers gives them a
:func:`free_port` and polls them with :func:`wait_for`; the tests that drive real processes use
these two as well (:mod:`tests.support`), so the helpers exist once.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import socket
import statistics
import sys
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
_STARTED = time.perf_counter()


# -- command line ---------------------------------------------------------------------------


def parser(
    doc: str | None, quick_help: str = "small sizes and few steps (smoke test)"
) -> argparse.ArgumentParser:
    """An argument parser described by the first paragraph of ``doc``, with the shared options."""
    p = argparse.ArgumentParser(
        description=(doc or "").split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for the JSON and PNG results")
    p.add_argument("--seed", type=int, default=0, help="seed of models and data")
    return p


def apply_mode(
    args: argparse.Namespace, full: Mapping[str, Any], quick: Mapping[str, Any]
) -> argparse.Namespace:
    """Fill every option left at ``None`` with its value for the chosen mode (``--quick`` or not)."""
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed options as JSON-ready values (paths as strings), for the results file."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


# -- progress and machine -----------------------------------------------------------------------


def log(msg: str) -> None:
    """A progress line on stderr, prefixed with the seconds since the benchmark started."""
    print(f"[{time.perf_counter() - _STARTED:7.1f}s] {msg}", file=sys.stderr, flush=True)


def load_avg() -> list[float]:
    """The 1, 5 and 15-minute load averages (empty where the platform has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine_info(**extra: Any) -> dict[str, Any]:
    """torch and Python versions, platform, CPU model and count, load, plus ``extra`` fields."""
    import torch

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "load_avg": load_avg(),
        **extra,
    }


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll ``condition`` every ``interval`` seconds until it returns something truthy, and return
    that; raise :class:`TimeoutError` naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


# -- timing ---------------------------------------------------------------------------------------


def whole_periods(steps: int, freq: int) -> int:
    """The smallest multiple of ``freq`` that is at least ``steps`` (and at least one period)."""
    return freq * math.ceil(max(steps, 1) / freq)


def timed(step: Callable[[], Any], n: int, before: Callable[[], Any] | None = None) -> float:
    """Seconds ``n`` calls of ``step`` take, with the garbage collector run before and paused during;
    ``before`` (a barrier, say) is called after the collection, just before the clock starts."""
    gc.collect()
    gc.disable()
    try:
        if before is not None:
            before()
        start = time.perf_counter()
        for _ in range(n):
            step()
        return time.perf_counter() - start
    finally:
        gc.enable()


def interleaved(
    blocks: Sequence[Callable[[], float]], rounds: int, on_round: Callable[[int], None] | None = None
) -> list[list[float]]:
    """Run every block once per round, in an order rotated from round to round; each block's
    returned values, one per round. Interleaving spreads a noisy machine's slow spells over all
    blocks instead of charging them to whichever ran at the time."""
    values: list[list[float]] = [[] for _ in blocks]
    for r in range(rounds):
        for i in ((j + r) % len(blocks) for j in range(len(blocks))):
            values[i].append(blocks[i]())
        if on_round is not None:
            on_round(r)
    return values


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, minimum and interquartile range of ``values``."""
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {"median": statistics.median(values), "min": min(values), "q1": q[0], "q3": q[2]}


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    """p50, p99, max and mean of ``values`` (seconds) in milliseconds; None when empty."""
    import numpy as np

    if not values:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None, "mean_ms": None}
    ms = np.asarray(values) * 1e3
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "max_ms": float(ms.max()),
        "mean_ms": float(ms.mean()),
    }


# -- output ----------------------------------------------------------------------------------------


def console(width: int = 120) -> Any:
    """A rich console: the terminal's width, or ``width`` when the output is not a terminal."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else width)


def table(
    title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], left: Collection[str] | None = None
) -> Any:
    """A rich table, the columns named in ``left`` (default: the first one) left-aligned and the
    others right-aligned; cells as strings."""
    from rich.table import Table

    left = columns[:1] if left is None else left
    t = Table(title=title)
    for col in columns:
        t.add_column(col, justify="left" if col in left else "right")
    for row in rows:
        t.add_row(*("" if cell is None else str(cell) for cell in row))
    return t


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """The same rows as a Markdown table (first column left-aligned, the others right-aligned)."""
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join([":---"] + ["---:"] * (len(columns) - 1)) + "|",
    ]
    lines += ["| " + " | ".join("" if c is None else str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


@contextmanager
def figure(
    path: Path,
    nrows: int = 1,
    ncols: int = 1,
    size: tuple[float, float] = (6.0, 4.5),
    title: str | None = None,
) -> Iterator[Any]:
    """A grid of matplotlib axes (always 2-D, ``size`` per panel), saved to ``path`` on exit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False)
    try:
        yield axes
        if title:
            fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)


def write_results(
    out: Path, name: str, report: dict[str, Any], save_plot: Callable[[dict[str, Any], Path], None]
) -> str:
    """Write ``NAME.json`` and ``NAME.png`` into ``out``; return both paths for printing."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2))
    save_plot(report, out / f"{name}.png")
    return f"{out / f'{name}.json'}, {out / f'{name}.png'}"


def finish(
    out: Path,
    name: str,
    report: dict[str, Any],
    started: float,
    save_plot: Callable[[dict[str, Any], Path], None],
    print_report: Callable[[dict[str, Any]], None],
) -> dict[str, Any]:
    """Record ``wall_seconds`` since ``started`` (a ``perf_counter`` reading) in ``report``, write the
    results, print the report and where the files went; return ``report``."""
    report["wall_seconds"] = time.perf_counter() - started
    files = write_results(out, name, report, save_plot)
    print_report(report)
    print(f"results: {files} ({report['wall_seconds']:.0f} s)")
    return report
