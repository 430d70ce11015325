"""Models side by side on several evaluation sets: mAP by query length, one table and one plot.

Input: the JSON line that `coverwatch evaluate --report ...` prints (saved to a file), one per
(model, set). Each table row is one model on one set, for the encoder alone and with the
alignment re-ranking of `coverwatch identify`; the chroma baseline of each set is a row of its
own. The plot draws mAP against query length, one panel per set.

Usage: python bench/compare_models.py --result LABEL SET FILE.json [--result ...] \
    --out bench/MODEL_RESULTS.md --section "## Stage 6 comparison" --plot bench/MODEL_RESULTS_stage6.png
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from report import write_section  # bench/report.py, beside this script

LENGTHS = ("5s", "10s", "20s", "30s", "60s")
METHODS = {"model": "encoder", "model + alignment (identify)": "+ alignment"}
BASELINE = "chroma_2dftm"


def curve(method: dict) -> list[float]:
    """mAP at each excerpt length, then on whole tracks."""
    return [method["excerpts"][length]["mAP"] for length in LENGTHS] + [method["whole_track"]["mAP"]]


def rows(results: list[tuple[str, str, dict]]) -> list[tuple[str, str, str, list[float]]]:
    """(set, model label, method, curve) rows; one baseline row per set (it does not depend on the model)."""
    out, baselines = [], set()
    for label, set_name, report in results:
        for key, method_name in METHODS.items():
            if key in report["methods"]:
                out.append((set_name, f"{label} ({report['model_hash'][:8]})", method_name, curve(report["methods"][key])))
        if BASELINE in report["methods"] and set_name not in baselines:
            baselines.add(set_name)
            out.append((set_name, "chroma 2D-FTM baseline", "", curve(report["methods"][BASELINE])))
    return sorted(out, key=lambda row: (row[0], row[1] == "chroma 2D-FTM baseline"))  # stable: models in input order, baseline last


def markdown(section: str, table: list[tuple[str, str, str, list[float]]], sizes: dict[str, str], plot: Path | None) -> str:
    lines = [
        section,
        "",
        f"Date: {datetime.date.today().isoformat()} · command: `python {shlex.join(['bench/compare_models.py', *sys.argv[1:]])}`",
        "",
        "Sets: " + "; ".join(f"{name} ({size})" for name, size in sizes.items()) + ".",
    ]
    if plot is not None:
        lines += ["", f"Plot: [{plot.name}]({plot.name})."]
    lines += ["", "| set | model | method | " + " | ".join(LENGTHS) + " | whole |", "|---|---|---|" + "---|" * (len(LENGTHS) + 1)]
    lines += [f"| {s} | {m} | {method} | " + " | ".join(f"{v:.3f}" for v in values) + " |" for s, m, method, values in table]
    return "\n".join(lines) + "\n"


def draw(table: list[tuple[str, str, str, list[float]]], path: Path) -> None:
    sets = sorted({row[0] for row in table})
    fig, axes = plt.subplots(1, len(sets), figsize=(5 * len(sets), 4), sharey=True, squeeze=False)
    ticks = [*LENGTHS, "whole"]
    for ax, set_name in zip(axes[0], sets):
        for s, model, method, values in table:
            if s == set_name and method != "+ alignment":
                ax.plot(ticks, values, marker="o", linestyle="--" if not method else "-", label=model)
        ax.set_title(set_name)
        ax.set_xlabel("query length")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mAP (encoder alone)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--result", nargs=3, action="append", metavar=("LABEL", "SET", "JSON"), required=True)
    parser.add_argument("--out", type=Path, required=True, help="markdown file whose section is replaced")
    parser.add_argument("--section", default="## Model comparison")
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args()
    results = [(label, set_name, json.loads(Path(path).read_text().strip().splitlines()[-1])) for label, set_name, path in args.result]
    sizes = {set_name: f"{report['tracks']} tracks, {report['groups']} groups" for _, set_name, report in results}
    table = rows(results)
    if args.plot is not None:
        draw(table, args.plot)
    text = markdown(args.section, table, sizes, args.plot)
    print(text)
    write_section(args.section, text, args.out)


if __name__ == "__main__":
    main()
