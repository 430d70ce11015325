"""How compactly the index can store reference chroma without moving the alignment check.

The daemon aligns each hop's last `align_window_s` of chroma with the stored chroma of its
best candidate songs (streamer/decide/alignment.py). At 1M 4-min songs the stored chroma is
the largest part of an index (float16: 26 GiB), so this measures what each storage form
does to the alignment scores of real (play, reference) pairs and of impostor pairs, against
float32 chroma computed afresh from the reference audio:

    float16        format 3 (each song scaled to a maximum of 1)
    u8 sqrt        format 4, shipped (streamer/search/store.py, `encode_chroma`)
    u8 linear      the same 8 bits without the square root
    4-bit sqrt     half the bytes again

Queries: for every catalog play in the given simulated broadcast streams (sim-*.flac with
their sim-*.json truth), windows of `align_window_s` of stream audio from 10 s into the play,
every 10 s while it lasts;
impostors: the same query against `--impostors` other catalog songs.

Prints and records in bench/RESULTS.md (section "Reference chroma").

Usage: python bench/bench_chroma.py --index /work/sim/SIM/index --streams /work/sim/SIM/streams/sim-{1,2}-20m.flac
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from report import publish, run_context  # bench/report.py, beside this script

from coverwatch.streamer.config import StreamConfig
from coverwatch.streamer.decide.alignment import STEP_RATE, alignment_matches, chroma
from coverwatch.streamer.embed.artifacts import DEFAULT_MODEL_DIR
from coverwatch.streamer.embed.embedder import Embedder
from coverwatch.streamer.frontend.audio import SAMPLE_RATE
from coverwatch.streamer.frontend.decode import load_audio
from coverwatch.streamer.search.store import decode_chroma, encode_chroma, read_manifest

log = logging.getLogger("bench_chroma")
SECTION = "## Reference chroma (bench/bench_chroma.py)"
PLAY_OFFSET_S = 10.0  # the first query window starts this far into a play (past a talk-over intro's start)
QUERY_HOP_S = 10.0  # further windows every this many seconds while the play lasts
SONG_S = 240.0  # the "4-min song" of the bytes-per-song column
GIB = 2**30


def _unit_max(steps: np.ndarray) -> np.ndarray:
    top = float(steps.max()) if len(steps) else 0.0
    return steps / top if top > 0 else steps


def _levels(steps: np.ndarray, levels: int, sqrt: bool) -> np.ndarray:
    unit = _unit_max(steps)
    if sqrt:
        return (np.rint(np.sqrt(unit) * levels) / levels) ** 2
    return np.rint(unit * levels) / levels


# name -> (bytes a chroma step, stored form -> float32 as the daemon reads it)
STORAGE: dict[str, tuple[float, Callable[[np.ndarray], np.ndarray]]] = {
    "float16 (format 3)": (24, lambda c: _unit_max(c).astype(np.float16).astype(np.float32)),
    "**u8 sqrt (format 4, shipped)**": (12, lambda c: decode_chroma(encode_chroma(c))),
    "u8 linear": (12, lambda c: _levels(c, 255, sqrt=False).astype(np.float32)),
    "4-bit sqrt": (6, lambda c: _levels(c, 15, sqrt=True).astype(np.float32)),
}


def plays_queries(streams: list[Path], song_rows: dict[str, int], window_s: float, embedder: Embedder) -> list[tuple[int, np.ndarray]]:
    """(song row, (S, 12) float32 query chroma) for every window of every catalog play."""
    out = []
    for stream in streams:
        truth = json.loads(stream.with_suffix(".json").read_text())
        audio = load_audio(stream)
        for play in truth["plays"]:
            if play["song_id"] not in song_rows:
                continue
            for start in np.arange(play["start_s"] + PLAY_OFFSET_S, play["end_s"] - window_s, QUERY_HOP_S):
                piece = audio[int(start * SAMPLE_RATE) : int((start + window_s) * SAMPLE_RATE)]
                out.append((song_rows[play["song_id"]], chroma(embedder.cqt_whole(piece))))
    return out


def auc(true: np.ndarray, impostor: np.ndarray) -> float:
    """P(true pair scores above an impostor pair), ties counted half."""
    greater = (true[:, None] > impostor[None, :]).mean()
    ties = (true[:, None] == impostor[None, :]).mean()
    return float(greater + 0.5 * ties)


def measure(references: list[np.ndarray], queries: list[tuple[int, np.ndarray]], impostors: int, cfg: StreamConfig) -> list[dict]:
    rng = np.random.default_rng(0)
    pairs = []  # (query chroma, [true row, impostor rows...])
    for row, query in queries:
        others = rng.choice([r for r in range(len(references)) if r != row], impostors, replace=False)
        pairs.append((query, [row, *others.tolist()]))

    def scores(stored: list[np.ndarray]) -> np.ndarray:
        """(pairs, 1 + impostors) alignment scores; column 0 the true reference."""
        return np.array([[s for s, _ in alignment_matches(q, [stored[r] for r in rows], cfg.align_delay, cfg.align_neighbours)] for q, rows in pairs])

    exact = scores(references)
    results = [{"storage": "float32 (baseline)", "bytes_per_step": 48, "diff": np.zeros(1), "scores": exact}]
    for name, (step_bytes, stored_form) in STORAGE.items():
        t0 = time.perf_counter()
        got = scores([stored_form(c) for c in references])
        log.info("%s: %.1f s", name, time.perf_counter() - t0)
        results.append({"storage": name, "bytes_per_step": step_bytes, "diff": np.abs(got - exact), "scores": got})
    return results


def to_markdown(ctx: dict, results: list[dict]) -> str:
    lines = [
        SECTION,
        "",
        f"Date: {ctx['date']} · model {ctx['model_hash']} · {ctx['machine']} · command: `{ctx['command']}` · {ctx['wall_s']:.0f} s wall",
        "",
        f"{ctx['catalog_songs']} catalog songs (reference chroma computed from their audio), {ctx['pairs']} query windows from the catalog plays of "
        f"{ctx['streams']} ({ctx['window_s']:.0f} s of stream audio, from {PLAY_OFFSET_S:.0f} s into a play every {QUERY_HOP_S:.0f} s), "
        f"each against its own reference and {ctx['impostors']} other songs. |Δ| = change of the alignment score "
        "(a fraction in [0, 1]; the daemon adds 0.5 x it to the embedding score) against float32 chroma. "
        f"Bytes: per {SONG_S / 60:.0f}-min song ({STEP_RATE:.2f} chroma steps a second) and for 1M such songs.",
        "",
        "| stored as | kB a song | GiB per 1M songs | mean abs Δ | p99 abs Δ | max abs Δ | true pairs mean | impostors mean | AUC true vs impostor |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    steps = SONG_S * STEP_RATE
    for r in results:
        s, d = r["scores"], r["diff"]
        lines.append(
            f"| {r['storage']} | {r['bytes_per_step'] * steps / 1000:.1f} | {r['bytes_per_step'] * steps * 1e6 / GIB:.1f} "
            f"| {d.mean():.4f} | {np.percentile(d, 99):.4f} | {d.max():.4f} | {s[:, 0].mean():.3f} | {s[:, 1:].mean():.3f} "
            f"| {auc(s[:, 0], s[:, 1:].ravel()):.3f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--index", type=Path, required=True, help="an index whose songs' source audio is readable")
    parser.add_argument("--streams", type=Path, nargs="+", required=True, help="simulated streams (sim-*.flac beside sim-*.json)")
    parser.add_argument("--impostors", type=int, default=4)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    wall0 = time.perf_counter()
    cfg = StreamConfig()
    window_s = min(cfg.align_window_s, max(cfg.windows_s))
    embedder = Embedder(DEFAULT_MODEL_DIR, 2)
    songs = read_manifest(args.index)["songs"]
    references = [chroma(embedder.cqt_whole(load_audio(Path(s["source"])))) for s in songs]
    queries = plays_queries(args.streams, {s["song_id"]: r for r, s in enumerate(songs)}, window_s, embedder)
    results = measure(references, queries, args.impostors, cfg)
    ctx = {
        **run_context("bench_chroma.py", embedder.info.model_hash, wall0),
        "catalog_songs": len(songs),
        "pairs": len(queries),
        "streams": ", ".join(p.name for p in args.streams),
        "window_s": window_s,
        "impostors": args.impostors,
    }
    markdown = to_markdown(ctx, results)
    publish(SECTION, markdown, write=not args.no_write)


if __name__ == "__main__":
    main()
