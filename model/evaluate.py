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

from index_builder.build import embed_reference
from model.retrieval_metrics import RetrievalScores, evaluate_similarity
from model.train import read_split
from streamer.audio import BINS_PER_OCTAVE, seconds_to_frames
from streamer.config import IndexBuildConfig
from streamer.decode import load_audio
from streamer.embedder import Embedder

log = logging.getLogger(__name__)

EXCERPT_SECONDS = (10.0, 20.0)
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
    n = seconds_to_frames(seconds)
    if len(frames) <= n:
        return frames
    start = (len(frames) - n) // 2
    return frames[start : start + n]


def excerpt_scores(
    embedder: Embedder, all_frames: list[np.ndarray], groups: np.ndarray, seconds: float, build_cfg: IndexBuildConfig
) -> RetrievalScores:
    """Excerpt queries vs references represented by segments (best segment per track)."""
    ref_vectors = [embed_reference(embedder, f, build_cfg)[0] for f in all_frames]
    owners = np.concatenate([np.full(len(v), i) for i, v in enumerate(ref_vectors)])
    stacked = np.concatenate(ref_vectors)
    queries = np.concatenate([embedder.embed(_excerpt(f, seconds)[None].astype(np.float32)) for f in all_frames])
    vector_sim = queries @ stacked.T  # (Q, V)
    track_sim = np.full((len(all_frames), len(all_frames)), -np.inf, dtype=np.float32)
    for track in range(len(all_frames)):
        track_sim[:, track] = vector_sim[:, owners == track].max(axis=1)
    return evaluate_similarity(track_sim, groups, groups, exclude_self=True)


def evaluate_heldout(manifest: Path, model_dir: Path, report: Path, threads: int, split: str = "val") -> dict:
    """Compute all figures, write a Markdown report, return them as a dict."""
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
    whole = np.concatenate([embedder.embed(f[None].astype(np.float32)) for f in tqdm(frames, desc="embed", unit="track")])
    chroma = np.stack([chroma_2dftm(f) for f in frames])
    results = {
        "tracks": len(frames),
        "groups": len(set(groups)),
        "model_hash": embedder.info.model_hash,
        "whole_track": {
            "model": evaluate_similarity(whole @ whole.T, groups_arr, groups_arr, exclude_self=True).as_dict(),
            "chroma_2dftm": evaluate_similarity(chroma @ chroma.T, groups_arr, groups_arr, exclude_self=True).as_dict(),
            "random": evaluate_similarity(
                np.random.default_rng(0).random((len(frames), len(frames))), groups_arr, groups_arr, exclude_self=True
            ).as_dict(),
        },
        "excerpts": {},
    }
    build_cfg = IndexBuildConfig()
    for seconds in EXCERPT_SECONDS:
        model_scores = excerpt_scores(embedder, frames, groups_arr, seconds, build_cfg)
        chroma_q = np.stack([chroma_2dftm(_excerpt(f, seconds)) for f in frames])
        results["excerpts"][f"{seconds:g}s"] = {
            "model": model_scores.as_dict(),
            "chroma_2dftm": evaluate_similarity(chroma_q @ chroma.T, groups_arr, groups_arr, exclude_self=True).as_dict(),
        }
    write_report(report, results, manifest, split)
    return results


def _row(name: str, scores: dict) -> str:
    return f"| {name} | {scores['mAP']:.3f} | {scores['top1']:.3f} | {scores['HR10']:.3f} | {scores['MR1']:.2f} |"


def write_report(path: Path, results: dict, manifest: Path, split: str) -> None:
    lines = [
        "# Held-out retrieval figures",
        "",
        f"Date: {datetime.date.today().isoformat()} · machine: {platform.machine()}, {platform.processor() or 'cpu'} · model {results['model_hash']}",
        f"Command: `coverwatch evaluate --manifest {manifest} --split {split} --report {path}`",
        f"Data: {results['tracks']} tracks in {results['groups']} cover groups of the `{split}` split (groups never seen in training).",
        "",
        "## Whole tracks (each track queries all others)",
        "",
        "| method | mAP | top-1 | HR@10 | MR1 |",
        "|---|---|---|---|---|",
    ]
    for name, scores in results["whole_track"].items():
        lines.append(_row(name, scores))
    for label, block in results["excerpts"].items():
        lines += [
            "",
            f"## {label} excerpts (middle of each track) against full references",
            "",
            "| method | mAP | top-1 | HR@10 | MR1 |",
            "|---|---|---|---|---|",
        ]
        for name, scores in block.items():
            lines.append(_row(name, scores))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
