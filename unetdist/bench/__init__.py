"""Benchmarks that print figures: ``python -m unetdist.bench {train,data,predict,all} ...``.

Each subcommand is a module ``unetdist.bench.<name>`` with two functions::

    def add_arguments(parser: argparse.ArgumentParser) -> None: ...
    def run(args: argparse.Namespace) -> dict[str, float | int | str]: ...

and, optionally, ``SMALL_ARGS: list[str]``: the arguments ``bench all`` passes it (small,
quick settings; without it ``bench all`` uses the module's defaults).

Every command prints a table of its figures and the machine they were measured on, and
ends with exactly one line of ``key=value`` pairs for scripts to parse; nothing is printed
after it. Figures from different machines are never mixed: the machine description goes
into every table, JSON and markdown file.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Any

SUBCOMMANDS: tuple[str, ...] = ("train", "data", "predict", "quality")

Figures = dict[str, Any]


def machine_description() -> dict[str, str | int]:
    """CPU model, cores, torch version and CUDA device: where the figures came from."""
    import torch

    description: dict[str, str | int] = {
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count() or 0,
        "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
    }
    if torch.cuda.is_available():
        description["cuda_devices"] = torch.cuda.device_count()
        description["cuda"] = str(torch.version.cuda)
    return description


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e6 else f"{value:.4e}"
    return str(value)


def format_table(title: str, rows: dict[str, Any]) -> str:
    """A two-column plain-text table."""
    width = max((len(key) for key in rows), default=0)
    lines = [title, "-" * max(len(title), width + 12)]
    lines += [f"{key.ljust(width)}  {format_value(value)}" for key, value in rows.items()]
    return "\n".join(lines)


def key_value_line(figures: dict[str, Any]) -> str:
    """One line ``key=value key=value ...``; spaces inside values become underscores."""
    return " ".join(f"{key}={format_value(value).replace(' ', '_')}" for key, value in figures.items())


def markdown_table(sections: dict[str, Figures], machine: dict[str, Any]) -> str:
    lines = ["# unetdist bench", "", "| machine | |", "| --- | --- |"]
    lines += [f"| {key} | {format_value(value)} |" for key, value in machine.items()]
    for name, figures in sections.items():
        lines += ["", f"## {name}", "", "| figure | value |", "| --- | --- |"]
        lines += [f"| {key} | {format_value(value)} |" for key, value in figures.items()]
    return "\n".join(lines) + "\n"


def emit_final_line(figures: dict[str, Any]) -> None:
    """Print the machine-readable line last: flush everything else first."""
    sys.stderr.flush()
    sys.stdout.flush()
    print(key_value_line(figures), flush=True)
