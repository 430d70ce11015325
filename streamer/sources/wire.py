"""The Kafka wire format of audio chunks, shared by `coverwatch publish` and `serve --source kafka`.

One Kafka message = one chunk of one stream:

    key      stream id, UTF-8 (partitioning by key keeps a stream's chunks in order)
    value    interleaved little-endian PCM, `channels` samples per frame
    headers  encoding     "s16le" | "f32le"
             sample_rate  integer Hz, 8000..192000
             channels     integer, 1..8
             seq          per-stream sequence number: 0, 1, 2, ... (gaps and repeats are detected)
             capture_ts   capture time of the chunk's first sample, integer ms since the Unix epoch

Header values are ASCII text. Anything else is a `MalformedChunk` with a short machine
reason (the dead-letter header and the metric label) and a human detail.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

ENCODINGS = {"s16le": np.dtype("<i2"), "f32le": np.dtype("<f4")}
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 8000, 192000
MAX_CHANNELS = 8
MAX_VALUE_BYTES = 8 * 1024 * 1024  # hard cap whatever max_chunk_s says
STREAM_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/-]{0,199}")
MAX_CAPTURE_TS_MS = 10**13  # the year 2286: anything later is a unit mistake
INT_HEADER_PATTERN = re.compile(rb"-?[0-9]{1,19}")  # integer header values: decimal, int64-sized
REQUIRED_HEADERS = ("encoding", "sample_rate", "channels", "seq", "capture_ts")

# Every reason a chunk can be refused; bounded, so it can label a metric.
REASONS = (
    "bad_key",
    "missing_header",
    "bad_header",
    "unknown_encoding",
    "bad_sample_rate",
    "bad_channels",
    "empty",
    "odd_byte_count",
    "too_large",
    "non_finite",
)


class MalformedChunk(ValueError):
    """A message that is not a valid audio chunk; `reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class AudioChunk:
    stream_id: str
    samples: np.ndarray  # (N, channels) float32 in [-1, 1]
    sample_rate: int
    seq: int
    capture_ts_ms: int

    @property
    def duration_s(self) -> float:
        return len(self.samples) / self.sample_rate


Headers = list[tuple[str, bytes]]


def encode_chunk(
    stream_id: str, samples: np.ndarray, sample_rate: int, seq: int, capture_ts_ms: int, encoding: str = "s16le"
) -> tuple[bytes, bytes, Headers]:
    """(N,) or (N, C) float samples -> (key, value, headers) ready for KafkaProducer.send."""
    if not STREAM_ID_PATTERN.fullmatch(stream_id):
        raise ValueError(f"stream id {stream_id!r} must match {STREAM_ID_PATTERN.pattern}")
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {sorted(ENCODINGS)}, got {encoding!r}")
    if len(samples) == 0:
        raise ValueError(f"stream {stream_id}: empty chunk")
    frames = samples.reshape(len(samples), -1)
    if not np.isfinite(frames).all():
        raise ValueError(f"stream {stream_id}: chunk {seq} has NaN or infinite samples")
    if encoding == "s16le":  # the same scale as the decoder: x * 32768, clipped to the int16 range
        pcm = np.clip(np.round(frames * 32768.0), -32768, 32767).astype(ENCODINGS[encoding])
    else:
        pcm = frames.astype(ENCODINGS[encoding])
    headers = [
        ("encoding", encoding.encode()),
        ("sample_rate", str(int(sample_rate)).encode()),
        ("channels", str(frames.shape[1]).encode()),
        ("seq", str(int(seq)).encode()),
        ("capture_ts", str(int(capture_ts_ms)).encode()),
    ]
    return stream_id.encode(), pcm.tobytes(), headers


def _int_header(headers: dict[str, bytes], name: str) -> int:
    raw = headers[name]
    # Plain decimal digits only: Python's int() would also take " 7", "+7" and "1_000", which
    # other consumers of the topic would read differently or refuse.
    if not INT_HEADER_PATTERN.fullmatch(raw):
        raise MalformedChunk("bad_header", f"header {name}={raw[:32]!r} is not an integer")
    return int(raw)


def decode_chunk(key: bytes | None, value: bytes | None, headers: Headers | None, max_chunk_s: float) -> AudioChunk:
    """A Kafka message -> AudioChunk, or MalformedChunk naming what is wrong."""
    try:
        stream_id = (key or b"").decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedChunk("bad_key", "the key (stream id) is not UTF-8") from None
    if not STREAM_ID_PATTERN.fullmatch(stream_id):
        raise MalformedChunk("bad_key", f"stream id {stream_id[:60]!r} must match {STREAM_ID_PATTERN.pattern}")
    table = {name: raw or b"" for name, raw in (headers or [])}
    missing = [name for name in REQUIRED_HEADERS if name not in table]
    if missing:
        raise MalformedChunk("missing_header", f"stream {stream_id}: missing header(s) {', '.join(missing)}")
    encoding = table["encoding"].decode("ascii", "replace")
    if encoding not in ENCODINGS:
        raise MalformedChunk("unknown_encoding", f"stream {stream_id}: encoding {encoding[:20]!r}, expected one of {sorted(ENCODINGS)}")
    rate = _int_header(table, "sample_rate")
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise MalformedChunk("bad_sample_rate", f"stream {stream_id}: sample rate {rate} Hz outside [{MIN_SAMPLE_RATE}, {MAX_SAMPLE_RATE}]")
    channels = _int_header(table, "channels")
    if not 1 <= channels <= MAX_CHANNELS:
        raise MalformedChunk("bad_channels", f"stream {stream_id}: {channels} channels, expected 1..{MAX_CHANNELS}")
    seq, capture_ts = _int_header(table, "seq"), _int_header(table, "capture_ts")
    if seq < 0:
        raise MalformedChunk("bad_header", f"stream {stream_id}: negative seq {seq}")
    if not 0 <= capture_ts <= MAX_CAPTURE_TS_MS:
        raise MalformedChunk("bad_header", f"stream {stream_id}: capture_ts {capture_ts} is not a time in ms since 1970")
    dtype = ENCODINGS[encoding]
    value = value or b""
    frame_bytes = dtype.itemsize * channels
    if not value:
        raise MalformedChunk("empty", f"stream {stream_id}: chunk {seq} has no audio")
    if len(value) % frame_bytes:
        raise MalformedChunk("odd_byte_count", f"stream {stream_id}: {len(value)} bytes is not a whole number of {frame_bytes}-byte frames")
    n_frames = len(value) // frame_bytes
    if n_frames > max_chunk_s * rate:
        raise MalformedChunk("too_large", f"stream {stream_id}: {n_frames / rate:.1f} s chunk exceeds {max_chunk_s:g} s")
    if len(value) > MAX_VALUE_BYTES:
        raise MalformedChunk("too_large", f"stream {stream_id}: {len(value)} bytes exceeds {MAX_VALUE_BYTES}")
    pcm = np.frombuffer(value, dtype=dtype).reshape(n_frames, channels)
    samples = pcm.astype(np.float32) / 32768.0 if encoding == "s16le" else pcm.astype(np.float32)
    if not np.isfinite(samples).all():
        raise MalformedChunk("non_finite", f"stream {stream_id}: chunk {seq} has NaN or infinite samples")
    return AudioChunk(stream_id, samples, rate, seq, capture_ts)
