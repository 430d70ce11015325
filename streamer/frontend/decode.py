"""Decoding and conversion of audio to SAMPLE_RATE mono float32.

Files are read with soundfile (libsndfile: wav, flac, ogg/vorbis, opus, mp3 and more);
anything it cannot open is an `AudioError` naming the file and the reason. Live blocks
go through `StreamResampler`, a stateful soxr resampler, so chunk boundaries leave no
clicks and the output equals resampling the concatenated input.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import soundfile
import soxr

from coverwatch.streamer.frontend.audio import SAMPLE_RATE, AudioError

log = logging.getLogger(__name__)

MIN_INPUT_RATE = 4000  # Hz; below this there is no music left to match
MAX_INPUT_RATE = 768000  # Hz; above this the header is more likely wrong than the audio
# Float samples beyond this are a broken file or producer, not loud audio; from about 1e19 up
# the CQT's squared magnitudes overflow float32 and the embeddings become NaN.
MAX_ABS_SAMPLE = 1e3


def to_mono(block: np.ndarray) -> np.ndarray:
    """(N,) or (N, C) samples -> (N,) float32 mean over channels."""
    if block.ndim == 1:
        return block.astype(np.float32, copy=False)
    if block.ndim != 2:
        raise AudioError(f"audio block must be (samples,) or (samples, channels), got shape {block.shape}")
    return block.mean(axis=1, dtype=np.float32)


def check_rate(sample_rate: int) -> None:
    if not MIN_INPUT_RATE <= sample_rate <= MAX_INPUT_RATE:
        raise AudioError(f"sample rate {sample_rate} Hz is outside [{MIN_INPUT_RATE}, {MAX_INPUT_RATE}]")


class StreamResampler:
    """Stateful conversion of blocks at `input_rate` to SAMPLE_RATE; (N,) float32 in and out."""

    def __init__(self, input_rate: int) -> None:
        check_rate(input_rate)
        self.input_rate = input_rate
        self._stream = None if input_rate == SAMPLE_RATE else soxr.ResampleStream(input_rate, SAMPLE_RATE, 1, dtype="float32")

    def process(self, mono: np.ndarray, last: bool = False) -> np.ndarray:
        if self._stream is None:
            return mono
        return self._stream.resample_chunk(np.ascontiguousarray(mono, dtype=np.float32), last=last)


def _open(path: Path) -> soundfile.SoundFile:
    if not path.is_file():
        raise AudioError(f"{path}: no such audio file")
    if path.stat().st_size == 0:
        raise AudioError(f"{path}: empty file")
    try:
        # bytes: soundfile encodes a str name strictly as UTF-8, which fails for names that are not
        handle = soundfile.SoundFile(os.fsencode(path))
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as exc:
        raise AudioError(f"{path}: cannot decode audio ({exc})") from None
    if handle.frames == 0:
        handle.close()
        raise AudioError(f"{path}: contains no audio samples")
    return handle


def iter_audio_blocks(path: str | Path, block_s: float) -> Iterator[tuple[np.ndarray, int]]:
    """Yield (samples (N, C) float32, sample_rate) blocks of about `block_s` seconds from a file."""
    path = Path(path)
    with _open(path) as handle:
        try:
            check_rate(handle.samplerate)
        except AudioError as exc:  # a broken header: the message must name the file
            raise AudioError(f"{path}: {exc}") from None
        block = max(1, int(round(block_s * handle.samplerate)))
        try:
            for data in handle.blocks(blocksize=block, dtype="float32", always_2d=True):
                yield data, handle.samplerate
        except (soundfile.LibsndfileError, RuntimeError) as exc:
            raise AudioError(f"{path}: decoding failed part-way ({exc})") from None


def _check_samples(path: str | Path, block: np.ndarray) -> None:
    """Refuse NaN, infinite and absurdly large samples (before mixing: a mean of huge values overflows)."""
    if not np.isfinite(block).all():
        raise AudioError(f"{path}: contains NaN or infinite samples")
    if block.size and np.abs(block).max() > MAX_ABS_SAMPLE:
        raise AudioError(f"{path}: sample values beyond +-{MAX_ABS_SAMPLE:g}; a broken float file?")


def load_audio(path: str | Path) -> np.ndarray:
    """Whole file -> (N,) float32 mono at SAMPLE_RATE. Raises AudioError on unusable input."""
    pieces, rate = [], SAMPLE_RATE
    for block, rate in iter_audio_blocks(path, block_s=60.0):
        _check_samples(path, block)
        pieces.append(to_mono(block))
    if not pieces:  # the header promised frames that the data does not hold
        raise AudioError(f"{path}: contains no audio samples")
    mono = np.concatenate(pieces)
    if rate != SAMPLE_RATE:
        mono = soxr.resample(mono, rate, SAMPLE_RATE).astype(np.float32)
    if len(mono) == 0:  # a single frame at a higher rate resamples to nothing
        raise AudioError(f"{path}: shorter than one sample at {SAMPLE_RATE} Hz")
    return mono
