"""Decoding and conversion of audio to SAMPLE_RATE mono float32.

Files are read with soundfile (libsndfile: wav, flac, ogg/vorbis, opus, mp3 and more) and,
for what libsndfile does not know (M4A/AAC, WMA, MP4/MKV soundtracks, ...), with PyAV (the
FFmpeg libraries in a wheel); anything neither can open is an `AudioError` naming the file
and both reasons. Live blocks
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
# More channels than this is a broken or hostile header (a WAV field claims up to 65535):
# FFmpeg would allocate and convert for all of them.
MAX_FILE_CHANNELS = 64
BYTES_PER_FLOAT = 4
# No codec stores music in fewer bits per second than this (FLAC of digital silence needs
# ~1.4 kbit/s, MP3 at least 8): a file that decodes to more seconds than its size allows at
# this rate is a broken header the decoder keeps inventing samples for (seen: an MP3 with a
# mutated frame count decoding to hours of audio from 13 kB).
MIN_CODED_BITS_PER_S = 500
MIN_PLAUSIBLE_S = 60.0  # tiny files may hold a few seconds in any format


def plausible_seconds(file_bytes: int) -> float:
    """The most audio a file of `file_bytes` can hold, in seconds."""
    return max(MIN_PLAUSIBLE_S, 8 * file_bytes / MIN_CODED_BITS_PER_S)


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


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise AudioError(f"{path}: no such audio file")
    if path.stat().st_size == 0:
        raise AudioError(f"{path}: empty file")


def _open_soundfile(path: Path) -> soundfile.SoundFile:
    """libsndfile's handle; its own errors (unknown format, broken header) pass through."""
    # bytes: soundfile encodes a str name strictly as UTF-8, which fails for names that are not
    return soundfile.SoundFile(os.fsencode(path))


def _checked_rate(path: Path, rate: int) -> int:
    try:
        check_rate(rate)
    except AudioError as exc:  # a broken header: the message must name the file
        raise AudioError(f"{path}: {exc}") from None
    return rate


def _check_plausible_length(path: Path, seconds: float, file_bytes: int) -> None:
    if seconds > plausible_seconds(file_bytes):
        raise AudioError(f"{path}: decodes to more than {plausible_seconds(file_bytes):.0f} s, more than {file_bytes} bytes can hold; a broken header?")


def _soundfile_blocks(path: Path, handle: soundfile.SoundFile, block_s: float, file_bytes: int) -> Iterator[tuple[np.ndarray, int]]:
    with handle:
        if handle.frames == 0:
            raise AudioError(f"{path}: contains no audio samples")
        rate = _checked_rate(path, handle.samplerate)
        # Refuse before reading: past the real data some libsndfile builds return whatever
        # memory holds (NaN, 1e17) rather than silence, so the length check must not wait
        # for the samples.
        _check_plausible_length(path, handle.frames / rate, file_bytes)
        try:
            for data in handle.blocks(blocksize=max(1, int(round(block_s * rate))), dtype="float32", always_2d=True):
                yield data, rate
        except (soundfile.LibsndfileError, RuntimeError) as exc:
            raise AudioError(f"{path}: decoding failed part-way ({exc})") from None


def _frame_samples(path: Path, frame, channels: int) -> np.ndarray:
    """A converted (planar float) frame as an owned (n, C) float32 array.

    PyAV's to_ndarray() trusts the frame's sample count and layout; on a hostile header
    they can exceed the planes actually allocated, and reading the view then crashes the
    process. So the planes are checked first, and the array is copied out of the frame."""
    planes = frame.planes
    if frame.samples < 0 or len(planes) != channels or any(p.buffer_size < frame.samples * BYTES_PER_FLOAT for p in planes):
        raise AudioError(f"{path}: decoding failed part-way (a frame does not hold the samples its header claims)")
    return np.array(frame.to_ndarray().T, dtype=np.float32, copy=True)


def _pyav_blocks(path: Path, block_s: float, soundfile_reason: str) -> Iterator[tuple[np.ndarray, int]]:
    """The first audio stream of anything FFmpeg reads, as (N, C) float32 blocks."""
    try:
        import av
    except ImportError:
        raise AudioError(f"{path}: cannot decode audio ({soundfile_reason}; PyAV, for other formats, is not installed: pip install av)") from None
    try:
        container = av.open(os.fsdecode(path), metadata_errors="replace")
    except (av.FFmpegError, OSError, UnicodeError, ValueError) as exc:
        # libsndfile's own reason is mostly "unknown format"; FFmpeg's says what is wrong
        reason = getattr(exc, "strerror", None) or str(exc)
        raise AudioError(f"{path}: cannot decode audio (neither libsndfile nor FFmpeg reads it: {reason})") from None
    with container:
        if not container.streams.audio:
            raise AudioError(f"{path}: no audio stream in the file")
        stream = container.streams.audio[0]
        try:
            # A header FFmpeg half-understands (0 channels, say) leaves the stream without a
            # decoder; PyAV then raises AttributeError for its rate or layout.
            rate = _checked_rate(path, stream.rate or stream.codec_context.sample_rate or 0)
            channels = stream.layout.nb_channels
            if not 1 <= channels <= MAX_FILE_CHANNELS:
                raise AudioError(f"{path}: the header claims {channels} channels (at most {MAX_FILE_CHANNELS}); a broken file?")
            # Planar float at the stream's own rate and layout: to_ndarray() is then (C, n).
            to_float = av.AudioResampler(format="fltp", layout=stream.layout, rate=rate)
        except (av.FFmpegError, AttributeError, ValueError) as exc:
            raise AudioError(f"{path}: cannot decode audio (FFmpeg finds no usable audio stream: {exc})") from None
        block, pending, held = max(1, int(round(block_s * rate))), [], 0
        try:
            for packet in container.demux(stream):
                for frame in packet.decode():
                    for converted in to_float.resample(frame):
                        pending.append(_frame_samples(path, converted, channels))
                        held += converted.samples
                while held >= block:
                    data = np.concatenate(pending)
                    yield np.ascontiguousarray(data[:block], dtype=np.float32), rate
                    pending, held = [data[block:]], len(data) - block
            for converted in to_float.resample(None):  # what the converter still holds
                pending.append(_frame_samples(path, converted, channels))
        except (av.FFmpegError, AttributeError, ValueError) as exc:
            raise AudioError(f"{path}: decoding failed part-way ({exc})") from None
    if pending and sum(len(p) for p in pending):
        yield np.ascontiguousarray(np.concatenate(pending), dtype=np.float32), rate


def iter_audio_blocks(path: str | Path, block_s: float) -> Iterator[tuple[np.ndarray, int]]:
    """Yield (samples (N, C) float32, sample_rate) blocks of about `block_s` seconds from a file."""
    path = Path(path)
    _check_file(path)
    file_bytes = path.stat().st_size
    try:
        handle = _open_soundfile(path)
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as exc:
        blocks = _pyav_blocks(path, block_s, str(exc))
    else:
        blocks = _soundfile_blocks(path, handle, block_s, file_bytes)
    decoded_s = 0.0
    for block, rate in blocks:
        decoded_s += len(block) / rate
        try:
            _check_plausible_length(path, decoded_s, file_bytes)
        except AudioError:
            blocks.close()
            raise
        yield block, rate


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
