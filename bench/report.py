"""Benchmarks write their results as sections of bench/RESULTS.md, replacing their own section."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


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
