"""Held-out retrieval evaluation of an exported model, beside a non-learned chroma baseline.

Runs the runtime path (onnxruntime front end and encoder, the index builder's segmenting)
on the tracks of one split of a dataset manifest:
  * whole tracks: every track queries all others (mAP, MR1, top-1, HR@10);
  * excerpts: an excerpt of L seconds from the middle of each track queries the other
    tracks, each represented as the index represents a reference (segments + whole track,
    song score = best segment), which is what the live daemon does.
The baseline is the classical key- and shift-invariant chroma 2D-Fourier-magnitude
descriptor (Bertin-Mahieux & Ellis 2012) computed from the same CQT frames.
"""

from __future__ import annotations

import datetime
import logging
import platform
from pathlib import Path

import numpy as np
from tqdm import tqdm

from coverwatch.index_builder.build import embed_reference
from coverwatch.model.retrieval_metrics import evaluate_similarity
from coverwatch.model.train import read_split
from coverwatch.streamer.config import IndexBuildConfig, StreamConfig
from coverwatch.streamer.decide.alignment import chroma, fuse_scores
from coverwatch.streamer.search.identify import ALIGN_KEYS, ALIGN_RERANK, identify_stream, middle
from coverwatch.streamer.embed.embedder import Embedder
from coverwatch.streamer.frontend.audio import BINS_PER_OCTAVE, seconds_to_frames
from coverwatch.streamer.frontend.decode import load_audio

log = logging.getLogger(__name__)

# Query lengths. A track no longer than an excerpt is used whole (`_excerpt`): cover-dataset
# versions last at most 40 s, so there 60 s (and 30 s for short ones) means the whole track;
# the real-variant renders of `coverwatch.model.variants` last 60-75 s.
EXCERPT_SECONDS = (5.0, 10.0, 20.0, 30.0, 60.0)
CHROMA_POOL = 20  # CQT frames averaged per chroma frame (~0.46 s)
PATCH = 32  # chroma frames per 2D-FFT patch (~15 s)
PATCH_HOP = 8


def chroma_2dftm(frames: np.ndarray) -> np.ndarray:
    """(T, F) log-CQT -> (PATCH * 12,) unit vector: median 2D-FFT magnitude of chroma patches."""
    assert frames.ndim == 2 and frames.shape[1] % BINS_PER_OCTAVE == 0
    magnitude = np.exp(frames.astype(np.float64))
    chroma = magnitude.reshape(len(frames), -1, BINS_PER_OCTAVE).sum(axis=1)  # (T, 12)
    n = max(1, len(chroma) // CHROMA_POOL)
    chroma = (
        chroma[: n * CHROMA_POOL].reshape(n, CHROMA_POOL, BINS_PER_OCTAVE).mean(axis=1)
        if len(chroma) >= CHROMA_POOL
        else chroma.mean(0, keepdims=True)
    )
    chroma = chroma / (chroma.max(axis=1, keepdims=True) + 1e-9)
    if len(chroma) < PATCH:
        chroma = np.resize(chroma, (PATCH, BINS_PER_OCTAVE))
    patches = np.stack([chroma[s : s + PATCH] for s in range(0, len(chroma) - PATCH + 1, PATCH_HOP)])
    spectra = np.abs(np.fft.fft2(patches**2, axes=(1, 2)))  # power-law, then 2D-FFT magnitude
    vector = np.median(spectra, axis=0).ravel()
    vector = vector - vector.mean()
    return (vector / (np.linalg.norm(vector) + 1e-9)).astype(np.float32)


def _excerpt(frames: np.ndarray, seconds: float) -> np.ndarray:
    """(T, F) -> (min(T, n), F): the middle `seconds` of a track, or all of it if shorter."""
    return middle(frames, seconds_to_frames(seconds))


def _best_per_track(vector_sim: np.ndarray, owners: np.ndarray, n_tracks: int) -> np.ndarray:
    """(Q, V) query-vs-segment similarities -> (Q, n_tracks): best segment of each track."""
    track_sim = np.full((len(vector_sim), n_tracks), -np.inf, dtype=np.float32)
    for track in range(n_tracks):
        track_sim[:, track] = vector_sim[:, owners == track].max(axis=1)
    return track_sim


def model_figures(embedder: Embedder, frames: list[np.ndarray], groups: np.ndarray, name: str, stream: StreamConfig | None = None) -> dict:
    """Whole-track and excerpt figures of one model over the same CQT frames; with `stream`
    (align_weight > 0) also those after identify's alignment re-ranking, under "aligned"."""
    whole = np.concatenate([embedder.embed(f[None].astype(np.float32)) for f in tqdm(frames, desc=f"{name}: whole", unit="track")])
    build_cfg = IndexBuildConfig()
    ref_vectors = [embed_reference(embedder, f, build_cfg)[0] for f in tqdm(frames, desc=f"{name}: references", unit="track")]
    owners = np.concatenate([np.full(len(v), i) for i, v in enumerate(ref_vectors)])
    stacked = np.concatenate(ref_vectors)
    align = stream is not None and stream.align_weight > 0
    chromas = [chroma(f) for f in frames] if align else []

    def figures_of(similarity: np.ndarray, queries: list[np.ndarray]) -> tuple[dict, dict | None]:
        plain = evaluate_similarity(similarity, groups, groups, exclude_self=True).as_dict()
        if not align:
            return plain, None
        similarity = similarity.copy()
        np.fill_diagonal(similarity, -np.inf)  # a track is not its own candidate
        fused = realign(similarity, [chroma(q) for q in queries], chromas, stream)
        return plain, evaluate_similarity(fused, groups, groups, exclude_self=True).as_dict()

    plain, aligned = figures_of(whole @ whole.T, frames)
    figures = {"whole_track": plain, "excerpts": {}}
    with_alignment = {"whole_track": aligned, "excerpts": {}}
    for seconds in tqdm(EXCERPT_SECONDS, desc=f"{name}: excerpts", unit="length"):
        excerpts = [_excerpt(f, seconds) for f in frames]
        queries = np.concatenate([embedder.embed(e[None].astype(np.float32)) for e in excerpts])
        label = f"{seconds:g}s"
        figures["excerpts"][label], with_alignment["excerpts"][label] = figures_of(_best_per_track(queries @ stacked.T, owners, len(frames)), excerpts)
    if align:
        figures["aligned"] = with_alignment
    return figures


def realign(similarity: np.ndarray, query_chroma: list[np.ndarray], reference_chroma: list[np.ndarray], stream: StreamConfig) -> np.ndarray:
    """(Q, C) embedding similarities -> the same with each query's `ALIGN_RERANK` best
    candidates raised by the alignment term, as `coverwatch identify` scores them
    (streamer/decide/alignment.py `fuse_scores`). Self-matches (-inf) stay out."""
    fused = similarity.copy()
    for q, row in enumerate(similarity):
        finite = {int(c): float(row[c]) for c in np.argsort(-row)[:ALIGN_RERANK] if np.isfinite(row[c])}
        for c, score in fuse_scores(finite, query_chroma[q], reference_chroma.__getitem__, identify_stream(stream), keys=ALIGN_KEYS).items():
            fused[q, c] = score
    return fused


def chroma_figures(frames: list[np.ndarray], groups: np.ndarray) -> dict:
    """The same figures for the chroma 2D-FFT baseline (excerpts against whole references)."""
    chroma = np.stack([chroma_2dftm(f) for f in frames])
    figures = {"whole_track": evaluate_similarity(chroma @ chroma.T, groups, groups, exclude_self=True).as_dict(), "excerpts": {}}
    for seconds in EXCERPT_SECONDS:
        queries = np.stack([chroma_2dftm(_excerpt(f, seconds)) for f in frames])
        figures["excerpts"][f"{seconds:g}s"] = evaluate_similarity(queries @ chroma.T, groups, groups, exclude_self=True).as_dict()
    return figures


def evaluate_heldout(
    manifest: Path, model_dir: Path, report: Path | None, threads: int, split: str = "val", previous_model_dir: Path | None = None
) -> dict:
    """Compute all figures (the model, optionally a previous model, chroma, random), write a
    Markdown report and a plot of mAP against excerpt length when `report` is given, return
    the figures."""
    embedder = Embedder(model_dir, threads)
    train_items, val_items = read_split(manifest)
    items = val_items if split == "val" else train_items
    frames, groups = [], []
    for group, path in tqdm(items, desc="CQT", unit="file"):
        try:
            frames.append(embedder.cqt_whole(load_audio(path)))
            groups.append(group)
        except (OSError, ValueError) as exc:
            log.warning("skipping %s: %s", path, exc)
    groups_arr = np.array(groups)
    model = model_figures(embedder, frames, groups_arr, "model", StreamConfig())
    methods = {"model": model}
    if "aligned" in model:
        methods["model + alignment (identify)"] = model.pop("aligned")
    if previous_model_dir is not None:
        previous = Embedder(previous_model_dir, threads)
        if previous.info.cqt_sha256 != embedder.info.cqt_sha256:
            raise ValueError("the previous model has another CQT front end; compare models that share one")
        methods[f"previous model {previous.info.model_hash}"] = model_figures(previous, frames, groups_arr, "previous")
    methods["chroma_2dftm"] = chroma_figures(frames, groups_arr)
    random_sim = np.random.default_rng(0).random((len(frames), len(frames)))
    methods["random"] = {"whole_track": evaluate_similarity(random_sim, groups_arr, groups_arr, exclude_self=True).as_dict(), "excerpts": {}}
    results = {"tracks": len(frames), "groups": len(set(groups)), "model_hash": embedder.info.model_hash, "methods": methods}
    if report is not None:  # without one the figures are only returned (a one-off check writes nothing into the repo)
        write_report(report, results, manifest, split)
        plot_excerpts(report.with_name(report.stem + "_excerpts.png"), results)
    return results


def _row(name: str, scores: dict) -> str:
    return f"| {name} | {scores['mAP']:.3f} | {scores['top1']:.3f} | {scores['HR10']:.3f} | {scores['MR1']:.2f} |"


def _table(title: str, rows: dict[str, dict]) -> list[str]:
    lines = ["", f"## {title}", "", "| method | mAP | top-1 | HR@10 | MR1 |", "|---|---|---|---|---|"]
    return lines + [_row(name, scores) for name, scores in rows.items()]


def write_report(path: Path, results: dict, manifest: Path, split: str) -> None:
    methods = results["methods"]
    lines = [
        "# Held-out retrieval figures",
        "",
        f"Date: {datetime.date.today().isoformat()} · machine: {platform.machine()}, {platform.processor() or 'cpu'} · model {results['model_hash']}",
        f"Command: `coverwatch evaluate --manifest {manifest} --split {split} --report {path}` (+ `--previous-model DIR` for the comparison row)",
        f"Data: {results['tracks']} tracks in {results['groups']} cover groups of the `{split}` split (groups never seen in training).",
        f"Plot: mAP against excerpt length, [{path.stem}_excerpts.png]({path.stem}_excerpts.png).",
    ]
    lines += _table("Whole tracks (each track queries all others)", {name: m["whole_track"] for name, m in methods.items()})
    for seconds in EXCERPT_SECONDS:
        label = f"{seconds:g}s"
        rows = {name: m["excerpts"][label] for name, m in methods.items() if label in m["excerpts"]}
        lines += _table(f"{label} excerpts (middle of each track) against full references", rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def plot_excerpts(path: Path, results: dict) -> None:
    """mAP against query length, one line per method (whole tracks at the right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [*EXCERPT_SECONDS, max(EXCERPT_SECONDS) * 1.5]
    for name, m in results["methods"].items():
        if not m["excerpts"]:
            ax.axhline(m["whole_track"]["mAP"], linestyle=":", color="grey", label=name)
            continue
        ys = [m["excerpts"][f"{s:g}s"]["mAP"] for s in EXCERPT_SECONDS] + [m["whole_track"]["mAP"]]
        ax.plot(xs, ys, "o-", label=name)
    ax.set_xticks(xs, [f"{s:g}" for s in EXCERPT_SECONDS] + ["whole"])
    ax.set(xlabel="query length (s)", ylabel="mAP", ylim=(0, 1), title=f"held-out mAP, {results['tracks']} tracks")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
