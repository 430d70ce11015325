"""Cover retrieval through the product's own path: `coverwatch index build` + `coverwatch identify`.

For each evaluation manifest (cover-dataset format, e.g. `coverwatch data leaveout` or
`coverwatch data variants --which heldout`), the first version of every group becomes the
catalog's reference and every other version a query, whole and as its middle 20 s. Each
query ranks all catalog songs; one reference is relevant, so AP = 1 / its rank (mAP =
mean reciprocal rank). Run with the alignment re-ranking (`[stream] align_weight`, the
default) and without it (align_weight = 0: the embedding alone). Writes a Markdown table.

Usage: python bench/bench_identify.py --set NAME=MANIFEST ... --out bench/IDENTIFY_RESULTS.md [--model DIR]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import logging
import platform
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import soundfile

from coverwatch.streamer.frontend.audio import SAMPLE_RATE
from coverwatch.streamer.frontend.decode import load_audio

log = logging.getLogger("bench_identify")

EXCERPT_S = 20.0
SETTINGS = {"model + alignment": 0.5, "model alone": 0.0}  # label -> [stream] align_weight


def coverwatch(*args: object) -> str:
    proc = subprocess.run([sys.executable, "-m", "coverwatch", *map(str, args)], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"coverwatch {' '.join(map(str, args[:3]))} failed: {proc.stderr[-2000:]}")
    return proc.stdout


def split_set(manifest: Path) -> tuple[list[tuple[str, Path]], list[tuple[str, Path]]]:
    """manifest -> ([(group, reference path)], [(group, query path)]): first version of each group is its reference."""
    groups: dict[str, list[Path]] = defaultdict(list)
    with manifest.open() as f:
        for row in csv.DictReader(f):
            path = Path(row["path"]) if Path(row["path"]).is_absolute() else manifest.parent / row["path"]
            groups[row["group_id"]].append(path)
    refs = [(g, paths[0]) for g, paths in groups.items() if len(paths) >= 2]
    queries = [(g, p) for g, paths in groups.items() if len(paths) >= 2 for p in paths[1:]]
    return refs, queries


def excerpts(queries: list[tuple[str, Path]], folder: Path) -> list[tuple[str, Path]]:
    """The middle EXCERPT_S of each query, written as WAV (whole if shorter)."""
    out = []
    for i, (group, path) in enumerate(queries):
        audio = load_audio(path)
        n = int(EXCERPT_S * SAMPLE_RATE)
        start = max(0, (len(audio) - n) // 2)
        out.append((group, folder / f"q{i}.wav"))
        soundfile.write(out[-1][1], audio[start : start + n], SAMPLE_RATE)
    return out


def ranks(index: Path, queries: list[tuple[str, Path]], n_songs: int, config: Path, model: list[str]) -> tuple[np.ndarray, float]:
    """Rank of each query's own group among the catalog's songs (n_songs + 1 if absent), seconds per query."""
    started = time.perf_counter()
    out = coverwatch("--config", config, "identify", "--json", "--top-k", n_songs, "--index", index, *model, *[p for _, p in queries])
    seconds = (time.perf_counter() - started) / len(queries)
    found = []
    for (group, _), line in zip(queries, out.splitlines()):
        songs = [m["song_id"] for m in json.loads(line)["matches"]]
        found.append(songs.index(group) + 1 if group in songs else n_songs + 1)
    return np.asarray(found), seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--set", action="append", required=True, metavar="NAME=MANIFEST")
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    model = ["--model", args.model] if args.model else []
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp_dir = Path(tmp)
        for spec in args.set:
            name, manifest = spec.split("=", 1)
            refs, queries = split_set(Path(manifest))
            folder = tmp_dir / name
            (folder / "excerpts").mkdir(parents=True)
            with (folder / "refs.csv").open("w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["song_id", "title", "path"])
                writer.writerows([g, g, str(p)] for g, p in refs)
            coverwatch("index", "build", "--refs", folder / "refs.csv", "--out", folder / "index", *model)
            short = excerpts(queries, folder / "excerpts")
            for label, weight in SETTINGS.items():
                config = folder / f"{weight}.toml"
                config.write_text(f"[stream]\nalign_weight = {weight}\n")
                for length, qs in (("whole", queries), (f"{EXCERPT_S:g} s", short)):
                    found, seconds = ranks(folder / "index", qs, len(refs), config, model)
                    rows.append((name, len(refs), len(qs), label, length, float(np.mean(1.0 / found)), float(np.mean(found == 1)), seconds))
                    log.info("%s %s %s: mAP %.3f", name, label, length, rows[-1][5])
    lines = [
        "# Cover retrieval through `coverwatch index build` + `coverwatch identify`",
        "",
        f"Date: {datetime.date.today().isoformat()} · machine: {platform.machine()}, 2 cores · model {args.model or 'bundled default'}",
        f"Command: `python bench/bench_identify.py {' '.join('--set ' + s for s in args.set)} --out {args.out}`",
        "First version of each group = the catalog reference, the others query (one relevant song each: AP = 1/rank).",
        "",
        "| set | songs | queries | scoring | query | mAP | top-1 | s / query |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} | {r[5]:.3f} | {r[6]:.3f} | {r[7]:.2f} |" for r in rows]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
