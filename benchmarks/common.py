"""What every benchmark shares: where results go, the machine description, writing results."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def machine_info(**extra: Any) -> dict[str, Any]:
    """torch and Python versions, platform, CPU model and count, plus ``extra`` fields."""
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
        **extra,
    }


def write_results(
    out: Path, name: str, report: dict[str, Any], save_plot: Callable[[dict[str, Any], Path], None]
) -> str:
    """Write ``NAME.json`` and ``NAME.png`` into ``out``; return both paths for printing."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2))
    save_plot(report, out / f"{name}.png")
    return f"{out / f'{name}.json'}, {out / f'{name}.png'}"
