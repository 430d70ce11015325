"""Per-stream rolling state: an incremental CQT and a ring buffer of CQT frames.

The CQT is "valid"-framed: frame t needs samples [t*HOP, t*HOP + K) with K the kernel
length. `IncrementalCqt` keeps the samples that later frames still need (fewer than
K + HOP) and runs the front end only over new audio plus that left context, so every
sample's frames are computed once and streaming output equals the offline CQT.

Letters: N samples, T frames, F CQT bins.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from coverwatch.streamer.frontend.audio import HOP_LENGTH, N_BINS, cqt_in_pieces

MIN_FRAMES_PER_CALL = 8  # batch at least this many new frames per front-end call


def hop_energy(samples: np.ndarray) -> np.ndarray:
    """(n * HOP_LENGTH,) samples -> (n,) variance of each hop-long block: its mean square about
    its own mean, so a DC offset counts as silence, not sound (the silence gate's measure)."""
    return np.var(samples.reshape(-1, HOP_LENGTH), axis=1).astype(np.float32)


class IncrementalCqt:
    """push((N,) float32 at SAMPLE_RATE) -> (frames (T, F), energy (T,)) for whatever became complete.

    `energy` is the variance of the newest HOP samples of each frame, for silence gating:
    the mean square about the block's mean, so a DC offset counts as silence, not sound.
    """

    def __init__(self, cqt: Callable[[np.ndarray], np.ndarray], kernel_length: int) -> None:
        self._cqt = cqt
        self.kernel_length = kernel_length
        self._pending = np.zeros(0, dtype=np.float32)  # samples from the next frame's start on
        self.frames_done = 0

    def push(self, samples: np.ndarray, min_frames: int = MIN_FRAMES_PER_CALL) -> tuple[np.ndarray, np.ndarray]:
        """Frames are computed once at least `min_frames` are complete (the daemon asks for the
        frames up to its next decision: fewer, longer front-end calls, each cheaper per frame)."""
        assert samples.ndim == 1
        self._pending = np.concatenate([self._pending, samples.astype(np.float32, copy=False)])
        available = len(self._pending) - self.kernel_length
        n_frames = available // HOP_LENGTH + 1 if available >= 0 else 0
        if n_frames < max(1, min_frames):
            return np.zeros((0, N_BINS), np.float32), np.zeros(0, np.float32)
        span = self._pending[: (n_frames - 1) * HOP_LENGTH + self.kernel_length]
        frames = cqt_in_pieces(span, self.kernel_length, self._cqt)  # a long chunk in fast-sized calls
        tail = span[self.kernel_length - HOP_LENGTH :]
        energy = hop_energy(tail[: n_frames * HOP_LENGTH])
        self._pending = self._pending[n_frames * HOP_LENGTH :]
        self.frames_done += n_frames
        return frames, energy


class FrameRing:
    """The last `capacity` frames (and their energies) of a stream, in a circular buffer.

    Reads return copies (a window is embedded after later chunks have moved the ring on),
    so the ring itself holds each frame once: capacity x F x 4 bytes per stream.
    """

    def __init__(self, capacity: int, n_bins: int = N_BINS) -> None:
        self.capacity = capacity
        self._frames = np.zeros((capacity, n_bins), dtype=np.float32)
        self._energy = np.zeros(capacity, dtype=np.float32)
        self._pos = 0  # where the next frame goes
        self.filled = 0  # frames held, up to capacity

    def append(self, frames: np.ndarray, energy: np.ndarray) -> None:
        """frames (T, F), energy (T,)."""
        if len(frames) > self.capacity:
            frames, energy = frames[-self.capacity :], energy[-self.capacity :]
        n, i = len(frames), self._pos
        head = min(n, self.capacity - i)  # frames that fit before the wrap
        self._frames[i : i + head], self._frames[: n - head] = frames[:head], frames[head:]
        self._energy[i : i + head], self._energy[: n - head] = energy[:head], energy[head:]
        self._pos = (i + n) % self.capacity
        self.filled = min(self.capacity, self.filled + n)

    def _newest(self, n: int) -> np.ndarray:
        assert 0 < n <= self.filled, (n, self.filled)
        return (self._pos - n + np.arange(n)) % self.capacity

    def latest(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Copies of the newest n frames (n, F) and energies (n,), oldest first; n <= filled."""
        rows = self._newest(n)
        return self._frames[rows], self._energy[rows]

    def mean_energy(self, n: int) -> float:
        """Mean of the newest n frames' energies (silence gating without copying frames)."""
        return float(self._energy[self._newest(n)].mean())

    def clear(self) -> None:
        self.filled = 0
