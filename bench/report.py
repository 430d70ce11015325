"""Benchmarks write their results as sections of bench/RESULTS.md, replacing their own section."""

from __future__ import annotations

import datetime
import os
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def run_context(script: str, model_hash: str, wall0: float) -> dict:
    """What every results section states: date, model, machine, the command, wall time since wall0 (perf_counter)."""
    return {
        "date": datetime.date.today().isoformat(),
        "model_hash": model_hash,
        "machine": f"{os.uname().machine}, {os.cpu_count()} cores",
        "command": "python " + " ".join([f"bench/{script}", *sys.argv[1:]]),
        "wall_s": time.perf_counter() - wall0,
    }


def publish(section: str, markdown: str, write: bool) -> None:
    """Print a benchmark's markdown and, unless `write` is False (--no-write), record it."""
    print(markdown, flush=True)
    if write:
        write_section(section, markdown)


def write_section(section: str, markdown: str, results: Path = RESULTS) -> None:
    """Replace the section that starts with heading `section` (or append it)."""
    text = results.read_text() if results.exists() else "# Benchmark results\n"
    if section in text:
        head, rest = text.split(section, 1)
        tail = rest[rest.find("\n## ") :] if "\n## " in rest else ""
        text = head + markdown + tail
    else:
        text = text.rstrip() + "\n\n" + markdown
    results.write_text(text)
