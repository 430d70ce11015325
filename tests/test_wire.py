"""The Kafka wire format of audio chunks (streamer/sources/wire.py): round trips and every refusal reason."""

from __future__ import annotations

import numpy as np
import pytest

from coverwatch.streamer.sources.wire import (
    MAX_CHANNELS,
    MAX_SAMPLE_RATE,
    MAX_VALUE_BYTES,
    MIN_SAMPLE_RATE,
    REASONS,
    REQUIRED_HEADERS,
    MalformedChunk,
    decode_chunk,
    encode_chunk,
)

RATE = 44100
S16_STEP = 1.0 / 32768


def noise(frames: int, channels: int, seed: int = 0, peak: float = 0.5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (peak * rng.uniform(-1.0, 1.0, size=(frames, channels))).astype(np.float32)


def valid(channels: int = 1, frames: int = 4410, encoding: str = "s16le") -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    return encode_chunk("stream-1", noise(frames, channels), RATE, 7, 1_700_000_000_000, encoding)


def with_header(headers: list[tuple[str, bytes]], name: str, raw: bytes | None) -> list[tuple[str, bytes]]:
    """A copy of `headers` with `name` replaced by `raw`, or removed when raw is None."""
    out = [(n, v) for n, v in headers if n != name]
    return out if raw is None else out + [(name, raw)]


# --- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("encoding", ["s16le", "f32le"])
def test_round_trip(encoding: str, channels: int) -> None:
    samples = noise(4410, channels, seed=channels)
    key, value, headers = encode_chunk("room-3/mic:a", samples, RATE, 42, 1_700_000_000_123, encoding)
    assert key == b"room-3/mic:a"
    assert dict(headers) == {
        "encoding": encoding.encode(),
        "sample_rate": b"44100",
        "channels": str(channels).encode(),
        "seq": b"42",
        "capture_ts": b"1700000000123",
    }
    assert len(value) == 4410 * channels * (2 if encoding == "s16le" else 4)

    chunk = decode_chunk(key, value, headers, max_chunk_s=10.0)
    assert (chunk.stream_id, chunk.sample_rate, chunk.seq, chunk.capture_ts_ms) == ("room-3/mic:a", RATE, 42, 1_700_000_000_123)
    assert chunk.samples.shape == (4410, channels) and chunk.samples.dtype == np.float32
    assert chunk.duration_s == pytest.approx(0.1)
    if encoding == "f32le":
        np.testing.assert_array_equal(chunk.samples, samples)
    else:
        assert np.abs(chunk.samples - samples).max() <= S16_STEP


def test_round_trip_mono_vector_becomes_one_channel() -> None:
    samples = noise(1000, 1)[:, 0]
    chunk = decode_chunk(*encode_chunk("s", samples, RATE, 0, 0, "f32le"), max_chunk_s=1.0)
    assert chunk.samples.shape == (1000, 1)
    np.testing.assert_array_equal(chunk.samples[:, 0], samples)


def test_s16le_decodes_as_int_over_32768_and_clips_on_encode() -> None:
    pcm = np.array([-32768, -1, 0, 1, 32767], dtype="<i2")
    headers = [("encoding", b"s16le"), ("sample_rate", b"8000"), ("channels", b"1"), ("seq", b"0"), ("capture_ts", b"0")]
    chunk = decode_chunk(b"s", pcm.tobytes(), headers, max_chunk_s=1.0)
    np.testing.assert_array_equal(chunk.samples[:, 0], pcm / 32768.0)

    _, value, _ = encode_chunk("s", np.array([-2.0, 2.0], dtype=np.float32), 8000, 0, 0, "s16le")
    np.testing.assert_array_equal(np.frombuffer(value, "<i2"), [-32768, 32767])


def test_s16le_full_scale_round_trip_within_one_and_a_half_steps() -> None:
    """Encoding scales by 32767 and decoding by 1/32768, so near full scale the error reaches 1.5 steps."""
    samples = np.linspace(-1.0, 1.0, 20001, dtype=np.float32)
    chunk = decode_chunk(*encode_chunk("s", samples, RATE, 0, 0, "s16le"), max_chunk_s=1.0)
    assert np.abs(chunk.samples[:, 0] - samples).max() <= 1.5 * S16_STEP


def test_s16le_full_scale_round_trip_within_one_step() -> None:
    samples = np.linspace(-1.0, 1.0, 20001, dtype=np.float32)
    chunk = decode_chunk(*encode_chunk("s", samples, RATE, 0, 0, "s16le"), max_chunk_s=1.0)
    assert np.abs(chunk.samples[:, 0] - samples).max() <= S16_STEP


@pytest.mark.parametrize("rate", [MIN_SAMPLE_RATE, MAX_SAMPLE_RATE])
@pytest.mark.parametrize("channels", [1, MAX_CHANNELS])
def test_limits_are_inclusive(rate: int, channels: int) -> None:
    samples = noise(rate // 10, channels)
    chunk = decode_chunk(*encode_chunk("s", samples, rate, 0, 0, "s16le"), max_chunk_s=0.1)  # exactly max_chunk_s long
    assert (chunk.sample_rate, chunk.samples.shape) == (rate, (rate // 10, channels))


def test_encode_refuses_bad_stream_id_and_encoding() -> None:
    with pytest.raises(ValueError, match="stream id"):
        encode_chunk("has space", noise(10, 1), RATE, 0, 0)
    with pytest.raises(ValueError, match="encoding"):
        encode_chunk("s", noise(10, 1), RATE, 0, 0, "s24le")


# --- every refusal reason ---------------------------------------------------------------------


def _case(reason, key=None, value=None, headers=None, max_chunk_s=10.0, *, channels=1, frames=4410, encoding="s16le"):
    """(reason, key, value, headers, max_chunk_s): a valid message with some parts replaced."""
    k, v, h = valid(channels, frames, encoding)
    return (reason, k if key is None else key, v if value is None else value, h if headers is None else headers(h), max_chunk_s)


def _f32_with(bad: float) -> bytes:
    samples = noise(100, 2)
    samples[50, 1] = bad
    return samples.astype("<f4").tobytes()


MALFORMED = {
    "key not UTF-8": _case("bad_key", key=b"\xff\xfe\x00"),
    "empty key": _case("bad_key", key=b""),
    "no key": ("bad_key", None, *valid()[1:], 10.0),
    "key with a space": _case("bad_key", key=b"my stream"),
    "key starting with a dash": _case("bad_key", key=b"-stream"),
    "key too long": _case("bad_key", key=b"s" * 201),
    "no headers at all": ("missing_header", b"s", valid()[1], None, 10.0),
    **{f"missing {name}": _case("missing_header", headers=lambda h, n=name: with_header(h, n, None)) for name in REQUIRED_HEADERS},
    "non-integer seq": _case("bad_header", headers=lambda h: with_header(h, "seq", b"seven")),
    "negative seq": _case("bad_header", headers=lambda h: with_header(h, "seq", b"-1")),
    "empty capture_ts": _case("bad_header", headers=lambda h: with_header(h, "capture_ts", b"")),
    "None capture_ts": _case("bad_header", headers=lambda h: with_header(h, "capture_ts", None) + [("capture_ts", None)]),
    "float sample_rate": _case("bad_header", headers=lambda h: with_header(h, "sample_rate", b"44100.0")),
    "non-ASCII channels": _case("bad_header", headers=lambda h: with_header(h, "channels", "\u0661".encode())),
    "unknown encoding": _case("unknown_encoding", headers=lambda h: with_header(h, "encoding", b"s24le")),
    "upper-case encoding": _case("unknown_encoding", headers=lambda h: with_header(h, "encoding", b"S16LE")),
    "empty encoding": _case("unknown_encoding", headers=lambda h: with_header(h, "encoding", b"")),
    "sample rate too low": _case("bad_sample_rate", headers=lambda h: with_header(h, "sample_rate", b"7999")),
    "sample rate too high": _case("bad_sample_rate", headers=lambda h: with_header(h, "sample_rate", b"192001")),
    "absurd sample rate": _case("bad_sample_rate", headers=lambda h: with_header(h, "sample_rate", b"44100000000")),
    "zero sample rate": _case("bad_sample_rate", headers=lambda h: with_header(h, "sample_rate", b"0")),
    "zero channels": _case("bad_channels", headers=lambda h: with_header(h, "channels", b"0")),
    "nine channels": _case("bad_channels", headers=lambda h: with_header(h, "channels", b"9")),
    "negative channels": _case("bad_channels", headers=lambda h: with_header(h, "channels", b"-2")),
    "empty value": _case("empty", value=b""),
    "None value": ("empty", b"stream-1", None, valid()[2], 10.0),
    "odd byte count s16 mono": _case("odd_byte_count", value=b"\x00\x01\x02"),
    "odd byte count s16 stereo": _case("odd_byte_count", value=bytes(6), channels=2),
    "odd byte count f32": _case("odd_byte_count", value=bytes(6), encoding="f32le"),
    "longer than max_chunk_s": _case("too_large", max_chunk_s=0.05),
    "over the byte cap": _case(
        "too_large",
        value=bytes(MAX_VALUE_BYTES + 4 * 8),
        max_chunk_s=60.0,
        headers=lambda h: with_header(with_header(with_header(h, "encoding", b"f32le"), "channels", b"8"), "sample_rate", b"192000"),
    ),
    "NaN f32": _case("non_finite", value=_f32_with(np.nan), channels=2, encoding="f32le"),
    "inf f32": _case("non_finite", value=_f32_with(np.inf), channels=2, encoding="f32le"),
    "-inf f32": _case("non_finite", value=_f32_with(-np.inf), channels=2, encoding="f32le"),
}


@pytest.mark.parametrize("reason, key, value, headers, max_chunk_s", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed(reason: str, key, value, headers, max_chunk_s: float) -> None:
    with pytest.raises(MalformedChunk) as caught:
        decode_chunk(key, value, headers, max_chunk_s=max_chunk_s)
    assert caught.value.reason == reason, str(caught.value)
    assert caught.value.detail and str(caught.value).startswith(f"{reason}: ")
    assert isinstance(caught.value, ValueError)


def test_every_reason_is_exercised() -> None:
    assert {case[0] for case in MALFORMED.values()} == set(REASONS)


def test_malformed_details_are_short_even_for_huge_inputs() -> None:
    _, value, headers = valid()
    for key, hdrs in [
        (b"x" * 100_000, headers),
        (b"s", with_header(headers, "encoding", b"e" * 100_000)),
        (b"s", with_header(headers, "seq", b"z" * 100_000)),
    ]:
        with pytest.raises(MalformedChunk) as caught:
            decode_chunk(key, value, hdrs, max_chunk_s=10.0)
        assert len(caught.value.detail) < 300
