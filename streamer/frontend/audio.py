"""Audio constants and small pure helpers shared by every part of coverwatch.

All timing in coverwatch derives from these constants. Config states durations in
seconds; `seconds_to_frames` is the single place where seconds become CQT frames.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

log = logging.getLogger(__name__)

SAMPLE_RATE = 22050  # Hz, every stream is resampled to this
HOP_LENGTH = 512  # samples between CQT frames
FRAME_RATE = SAMPLE_RATE / HOP_LENGTH  # ~43.07 CQT frames per second
BINS_PER_OCTAVE = 12  # one bin per semitone: a key change is a whole-bin roll
N_OCTAVES = 7
N_BINS = BINS_PER_OCTAVE * N_OCTAVES  # 84 bins, C1 .. B7
FMIN = 32.703195662574764  # Hz, C1 (MIDI note 24)


def seconds_to_frames(seconds: float) -> int:
    """Number of whole CQT frames in `seconds` of audio (rounded to nearest, at least 1)."""
    return max(1, int(round(seconds * FRAME_RATE)))


def frames_to_seconds(frames: int) -> float:
    """Duration in seconds of `frames` CQT frames."""
    return frames / FRAME_RATE


def seconds_to_samples(seconds: float, sample_rate: int = SAMPLE_RATE) -> int:
    """Number of samples in `seconds` at `sample_rate` (rounded to nearest)."""
    return int(round(seconds * sample_rate))


class AudioError(ValueError):
    """Audio that cannot be used: unreadable, empty, or with an impossible format."""


PIECE_FRAMES = 256  # frames per front-end call (~6 s): the block-matmul CQT costs least per frame at 128-1024 (14-17 us/frame)


def cqt_in_pieces(
    audio: np.ndarray, kernel_length: int, cqt: Callable[[np.ndarray], np.ndarray], piece_frames: int = PIECE_FRAMES
) -> np.ndarray:
    """(N,) float32 -> (T, F): run a "valid" CQT `cqt` ((n,) -> (t, F)) over overlapping pieces.

    Pieces overlap by kernel_length - HOP_LENGTH samples, so the result equals one call on
    the whole signal. Audio shorter than one kernel is zero-padded to give one frame.
    """
    assert audio.ndim == 1
    if len(audio) < kernel_length:
        audio = np.pad(audio, (0, kernel_length - len(audio)))
    n_frames = (len(audio) - kernel_length) // HOP_LENGTH + 1
    pieces = []
    for first in range(0, n_frames, piece_frames):
        count = min(piece_frames, n_frames - first)
        start = first * HOP_LENGTH
        pieces.append(cqt(np.ascontiguousarray(audio[start : start + (count - 1) * HOP_LENGTH + kernel_length])))
    return np.concatenate(pieces)
