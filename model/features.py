"""Log-CQT features of a rendered dataset, computed once and cached as float16 .npy files.

Training augments on the CQT (see augment.py), so the front end runs once per file.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from coverwatch.model.frontend import CqtFrontEnd
from coverwatch.streamer.frontend.audio import cqt_in_pieces
from coverwatch.streamer.frontend.decode import load_audio

log = logging.getLogger(__name__)


@dataclass
class Track:
    group: str
    path: Path
    frames: np.ndarray  # (T, F) float16 log-CQT


def compute_frames(front_end: CqtFrontEnd, audio: np.ndarray) -> np.ndarray:
    """(N,) float32 mono at SAMPLE_RATE -> (T, F) float32 log-CQT."""

    def run(piece: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return front_end(torch.from_numpy(piece)[None])[0].numpy()

    return cqt_in_pieces(audio, front_end.kernel_length, run)


def _cache_path(cache_dir: Path, audio_path: Path) -> Path:
    stat = audio_path.stat()
    key = hashlib.sha1(f"{audio_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:20]
    return cache_dir / f"{key}.npy"


def load_tracks(items: list[tuple[str, Path]], cache_dir: Path, desc: str = "CQT") -> tuple[list[Track], int]:
    """Frames for (group, audio path) pairs, from the cache or computed now.

    Unreadable or silent files are skipped with a warning; returns (tracks, n_skipped).
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    front_end = CqtFrontEnd().eval()
    tracks, skipped = [], 0
    for group, path in tqdm(items, desc=desc, unit="file"):
        try:
            cached = _cache_path(cache_dir, path)
            if cached.exists():
                frames = np.load(cached)
            else:
                audio = load_audio(path)
                if np.sqrt(np.mean(audio**2)) < 1e-4:
                    raise ValueError("silent audio")
                frames = compute_frames(front_end, audio).astype(np.float16)
                tmp = cached.with_suffix(".tmp.npy")
                np.save(tmp, frames)
                tmp.replace(cached)
        except (OSError, ValueError) as exc:
            log.warning("skipping %s: %s", path, exc)
            skipped += 1
            continue
        tracks.append(Track(group, path, frames))
    return tracks, skipped
