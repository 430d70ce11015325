"""Fuzzing (hypothesis) of every parser and boundary of coverwatch.

Each boundary either accepts its input, and then what it returns satisfies the invariants
the rest of the daemon relies on, or refuses it with its own error type and a message:

    config.toml        load_config / parse_config   -> Config | ConfigError
    refs CSV           read_refs_csv                 -> [Reference] | RefsError
    Kafka audio chunk  decode_chunk                  -> AudioChunk | MalformedChunk(reason in REASONS)
    audio files        load_audio, iter_audio_blocks -> finite float32 | AudioError
    match events       MatchEvent.to_json, sinks     -> one valid UTF-8 JSON line per event

Inputs are random bytes, structured hostile values, and mutations (bit flips, overwrites,
insertions, deletions, truncation) of real files: the shipped config.toml, a refs CSV, and
wav/flac/ogg/mp3 files written here with libsndfile. The example count comes from the
hypothesis profile (tests/conftest.py: "ci" by default, HYPOTHESIS_PROFILE=deep for more).
The last test sends hostile messages through a real broker to a real daemon and checks that
every one is counted under its outcome and that a good stream behind them is processed.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import typing
from pathlib import Path

import numpy as np
import pytest
import soundfile
from hypothesis import given, settings
from hypothesis import strategies as st

from coverwatch.index_builder.refs import RefsError, read_refs_csv
from coverwatch.streamer.config import Config, ConfigError, load_config, parse_config
from coverwatch.streamer.frontend.audio import SAMPLE_RATE, AudioError
from coverwatch.streamer.frontend.decode import MAX_ABS_SAMPLE, iter_audio_blocks, load_audio
from coverwatch.streamer.sinks.events import SCHEMA_VERSION, MatchEvent, make_event_id
from coverwatch.streamer.sinks.local import FanOut, FileSink, StdoutSink
from coverwatch.streamer.sources.wire import (
    MAX_CHANNELS,
    MAX_SAMPLE_RATE,
    MIN_SAMPLE_RATE,
    REASONS,
    REQUIRED_HEADERS,
    STREAM_ID_PATTERN,
    MalformedChunk,
    decode_chunk,
    encode_chunk,
)
from tests.conftest import tune

ROOT = Path(__file__).resolve().parents[1]


def scaled(fraction: float) -> settings:
    """The profile's example count times `fraction` (for the costlier properties), at least 5."""
    return settings(max_examples=max(5, int(settings.default.max_examples * fraction)))


# --- mutations of real bytes -------------------------------------------------------------------

POSITION = st.one_of(st.integers(0, 63), st.integers(0, 2**31))  # headers live in the first bytes
MUTATION = st.one_of(
    st.tuples(st.just("flip"), POSITION, st.integers(1, 255)),
    st.tuples(st.just("overwrite"), POSITION, st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("insert"), POSITION, st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("delete"), POSITION, st.integers(1, 512)),
    st.tuples(st.just("truncate"), POSITION, st.just(0)),
)
MUTATIONS = st.lists(MUTATION, min_size=1, max_size=6)


def mutate(data: bytes, mutations: list[tuple]) -> bytes:
    """Apply (kind, position, argument) edits in order; positions wrap around the current length."""
    out = bytearray(data)
    for kind, position, arg in mutations:
        i = position % max(1, len(out))
        if kind == "flip" and out:
            out[i] ^= arg
        elif kind == "overwrite":
            out[i : i + len(arg)] = arg
        elif kind == "insert":
            out[i:i] = arg
        elif kind == "delete":
            del out[i : i + arg]
        elif kind == "truncate":
            del out[i:]
    return bytes(out)


# --- config.toml -------------------------------------------------------------------------------


def expect_config(path: Path) -> Config | None:
    """load_config's only outcomes: a Config, or a ConfigError that names the file."""
    try:
        return load_config(path)
    except ConfigError as exc:
        assert str(exc).startswith(f"{path}:"), exc
        return None


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """A folder for the files the examples write (hypothesis runs many examples per test call)."""
    return tmp_path_factory.mktemp("fuzz")


@given(data=st.one_of(st.binary(max_size=500), st.text(max_size=500).map(str.encode)))
def test_config_from_arbitrary_bytes(scratch, data):
    path = scratch / "arbitrary.toml"
    path.write_bytes(data)
    expect_config(path)


@given(mutations=MUTATIONS)
def test_config_mutations_of_the_shipped_file(scratch, mutations):
    path = scratch / "mutated.toml"
    path.write_bytes(mutate((ROOT / "config.toml").read_bytes(), mutations))
    cfg = expect_config(path)
    if cfg is not None:
        check_config_invariants(cfg)


def config_keys() -> list[tuple[str, str, type, dict]]:
    """(section, key, type, range metadata) of every setting."""
    out = []
    hints = typing.get_type_hints(Config)
    for section in dataclasses.fields(Config):
        cls = hints[section.name]
        for f, tp in zip(dataclasses.fields(cls), typing.get_type_hints(cls).values()):
            out.append((section.name, f.name, tp, dict(f.metadata)))
    return out


CONFIG_KEYS = config_keys()
TOML_SCALARS = st.one_of(
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(),  # NaN and +-inf included: TOML has nan and inf
    st.text(max_size=40),
    st.datetimes(),
)
TOML_VALUES = st.recursive(
    TOML_SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=8,
)


def check_config_invariants(cfg: Config) -> None:
    """Every accepted setting has its declared type, is finite and lies in its declared range."""
    for section, key, tp, meta in CONFIG_KEYS:
        value = getattr(getattr(cfg, section), key)
        items = value if typing.get_origin(tp) is list else [value]
        for item in items:
            if isinstance(item, float):
                assert math.isfinite(item), (section, key, item)
            if meta.get("min") is not None:
                assert item >= meta["min"], (section, key, item)
            if meta.get("max") is not None:
                assert item <= meta["max"], (section, key, item)
            if meta.get("choices"):
                assert item in meta["choices"], (section, key, item)


@given(target=st.sampled_from(CONFIG_KEYS), value=TOML_VALUES)
def test_config_any_value_for_any_key(target, value):
    section, key, _tp, _meta = target
    try:
        cfg = parse_config({section: {key: value}})
    except ConfigError as exc:
        assert f"{section}.{key}" in str(exc), exc  # the message names the offending key
        return
    check_config_invariants(cfg)


@given(table=st.dictionaries(st.text(max_size=12), TOML_VALUES, max_size=4))
def test_config_unknown_sections_and_keys(table):
    try:
        cfg = parse_config(table)
    except ConfigError:
        return
    assert not set(table) - {f.name for f in dataclasses.fields(Config)}
    check_config_invariants(cfg)


# --- refs CSV ----------------------------------------------------------------------------------

HOSTILE_CHARS = st.sampled_from(["\x00", "\n", "\r", '"', ",", "\ufeff", "\u2028", "\x85", "\\", " ", "/"])
HOSTILE_TEXT = st.one_of(
    st.lists(st.one_of(st.characters(), HOSTILE_CHARS, st.sampled_from(["a.wav", "../a.wav", "refs/"])), max_size=20).map("".join),
    st.integers(200, 5000).map(lambda n: "x" * n),  # longer than a file name may be
)


def expect_refs(path: Path) -> list | None:
    try:
        refs = read_refs_csv(path)
    except RefsError as exc:
        assert str(exc).startswith(str(path)), exc
        return None
    ids = [r.song_id for r in refs]
    assert refs and len(set(ids)) == len(ids) and all(i and i == i.strip() for i in ids)
    assert all(r.path.is_file() for r in refs)
    return refs


@pytest.fixture(scope="module")
def refs_folder(scratch) -> Path:
    folder = scratch / "refs"
    folder.mkdir()
    soundfile.write(folder / "a.wav", tune(0, 0.5), SAMPLE_RATE)
    return folder


@given(data=st.binary(max_size=1000))
def test_refs_csv_from_arbitrary_bytes(refs_folder, data):
    path = refs_folder / "arbitrary.csv"
    path.write_bytes(data)
    expect_refs(path)


@given(
    rows=st.lists(st.tuples(HOSTILE_TEXT, HOSTILE_TEXT, st.one_of(st.just("a.wav"), HOSTILE_TEXT)), min_size=0, max_size=5),
    bom=st.booleans(),
)
def test_refs_csv_with_hostile_fields(refs_folder, rows, bom):
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["song_id", "title", "path", "artist"])
    writer.writerows(rows)
    path = refs_folder / "hostile.csv"
    path.write_text(("\ufeff" if bom else "") + buffer.getvalue(), encoding="utf-8", errors="surrogatepass")
    refs = expect_refs(path)
    if refs is not None:  # each accepted row is one the writer wrote
        assert {r.song_id for r in refs} <= {row[0].strip() for row in rows}


@given(mutations=MUTATIONS)
def test_refs_csv_mutations(refs_folder, mutations):
    valid = b'song_id,title,path,artist\nsong-1,First,a.wav,A\nsong-2,"Second, live",a.wav,B\n'
    path = refs_folder / "mutated.csv"
    path.write_bytes(mutate(valid, mutations))
    expect_refs(path)


# --- Kafka audio chunks (wire format) -------------------------------------------------------------

MAX_CHUNK_S = 2.0
INT_TEXT = st.one_of(
    st.integers(-(10**15), 10**15).map(lambda i: str(i).encode()),
    st.sampled_from([b"", b" 7", b"+7", b"1_0", b"0x10", b"7.0", b"1e3", b"\xff", "٣".encode(), b"9" * 5000, b"-0", b"nan"]),
    st.binary(max_size=12),
)
HEADER_VALUES = {
    "encoding": st.one_of(st.sampled_from([b"s16le", b"f32le", b"S16LE", b"f32le ", b"mp3", b""]), st.binary(max_size=8)),
    "sample_rate": st.one_of(st.sampled_from([b"8000", b"22050", b"192000", b"7999", b"192001", b"0"]), INT_TEXT),
    "channels": st.one_of(st.sampled_from([b"1", b"2", b"8", b"9", b"0"]), INT_TEXT),
    "seq": INT_TEXT,
    "capture_ts": st.one_of(st.sampled_from([b"0", b"1700000000000", b"10000000000001"]), INT_TEXT),
}


@st.composite
def kafka_messages(draw) -> tuple[bytes | None, bytes | None, list | None]:
    """A valid chunk with some of its key, headers and value replaced by hostile ones."""
    channels = draw(st.integers(1, 3))
    frames = draw(st.integers(1, 600))
    samples = np.random.default_rng(draw(st.integers(0, 1000))).uniform(-1, 1, (frames, channels)).astype(np.float32)
    key, value, headers = encode_chunk("s-1", samples, 8000, 3, 1_700_000_000_000, draw(st.sampled_from(["s16le", "f32le"])))
    if draw(st.booleans()):
        key = draw(st.one_of(st.none(), st.binary(max_size=40), st.text(max_size=210).map(lambda t: t.encode("utf-8", "surrogatepass"))))
    table = dict(headers)
    for name in draw(st.lists(st.sampled_from(REQUIRED_HEADERS), unique=True, max_size=3)):
        table[name] = draw(HEADER_VALUES[name])
    for name in draw(st.lists(st.sampled_from(REQUIRED_HEADERS), unique=True, max_size=2)):
        del table[name]
    headers = [(name, raw) for name, raw in table.items()] + draw(
        st.lists(st.tuples(st.text(max_size=10), st.binary(max_size=10)), max_size=2)
    )
    if draw(st.booleans()):
        value = draw(
            st.one_of(
                st.none(),
                st.binary(max_size=200),
                st.builds(mutate, st.just(value), MUTATIONS),
                st.sampled_from(
                    [np.full(8, np.nan, "<f4").tobytes(), np.full(8, -np.inf, "<f4").tobytes(), np.zeros(8 * 3 * 20001, "<i2").tobytes()]
                ),
            )
        )
    return key, value, draw(st.one_of(st.just(headers), st.just(None), st.just([])))


@given(message=kafka_messages())
def test_kafka_chunk_decode(message):
    key, value, headers = message
    try:
        chunk = decode_chunk(key, value, headers, MAX_CHUNK_S)
    except MalformedChunk as exc:
        assert exc.reason in REASONS and exc.detail
        return
    assert STREAM_ID_PATTERN.fullmatch(chunk.stream_id)
    assert chunk.samples.dtype == np.float32 and chunk.samples.ndim == 2 and len(chunk.samples) > 0
    assert 1 <= chunk.samples.shape[1] <= MAX_CHANNELS and MIN_SAMPLE_RATE <= chunk.sample_rate <= MAX_SAMPLE_RATE
    assert np.isfinite(chunk.samples).all() and chunk.duration_s <= MAX_CHUNK_S
    assert chunk.seq >= 0 and chunk.capture_ts_ms >= 0
    table = dict(headers)
    assert all(table[name].isdigit() for name in ("sample_rate", "channels", "seq", "capture_ts"))  # plain decimal only


@given(data=st.binary(min_size=4, max_size=400).map(lambda b: b[: len(b) // 4 * 4]))
def test_kafka_f32_payload_of_random_bits(data):
    """Random float32 bit patterns: refused as non_finite exactly when one is NaN or infinite."""
    headers = [("encoding", b"f32le"), ("sample_rate", b"8000"), ("channels", b"1"), ("seq", b"0"), ("capture_ts", b"0")]
    finite = bool(np.isfinite(np.frombuffer(data, "<f4")).all())
    try:
        chunk = decode_chunk(b"s", data, headers, MAX_CHUNK_S)
    except MalformedChunk as exc:
        assert not finite and exc.reason == "non_finite"
        return
    assert finite
    np.testing.assert_array_equal(chunk.samples[:, 0], np.frombuffer(data, "<f4"))


# --- audio files ---------------------------------------------------------------------------------

FORMATS = {  # name -> (format, subtype, sample rate)
    "wav-pcm16": ("WAV", "PCM_16", 44100),
    "wav-float": ("WAV", "FLOAT", 48000),
    "flac": ("FLAC", "PCM_24", 44100),
    "ogg-vorbis": ("OGG", "VORBIS", 44100),
    "mp3": ("MP3", "MPEG_LAYER_III", 44100),
}


@pytest.fixture(scope="module")
def encoded(scratch) -> dict[str, bytes]:
    """1.5 s of a stereo tune in every format, encoded by libsndfile (mp3 via LAME)."""
    out = {}
    for name, (fmt, subtype, rate) in FORMATS.items():
        song = tune(4, 1.5, rate=rate)
        buffer = io.BytesIO()
        soundfile.write(buffer, np.stack([song, 0.5 * song], axis=1), rate, format=fmt, subtype=subtype)
        out[name] = buffer.getvalue()
    return out


def expect_audio(path: Path) -> np.ndarray | None:
    """load_audio's only outcomes: finite bounded (N,) float32, or an AudioError naming the file."""
    try:
        audio = load_audio(path)
    except AudioError as exc:
        assert str(path) in str(exc), exc
        return None
    assert audio.ndim == 1 and audio.dtype == np.float32 and len(audio) > 0
    assert np.isfinite(audio).all() and np.abs(audio).max() <= 2 * MAX_ABS_SAMPLE  # resampling may overshoot a little
    try:
        for block, rate in iter_audio_blocks(path, 0.25):
            assert block.ndim == 2 and block.dtype == np.float32 and block.shape[1] >= 1 and rate > 0
    except AudioError:
        pass
    return audio


def test_real_files_decode(scratch, encoded):
    for name, data in encoded.items():
        path = scratch / f"real.{name}"
        path.write_bytes(data)
        audio = expect_audio(path)
        assert audio is not None and abs(len(audio) / SAMPLE_RATE - 1.5) < 0.1, name


@scaled(2.0)
@given(name=st.sampled_from(sorted(FORMATS)), mutations=MUTATIONS)
def test_audio_decoders_on_mutated_files(scratch, encoded, name, mutations):
    path = scratch / f"mutated.{name}"
    path.write_bytes(mutate(encoded[name], mutations))
    expect_audio(path)


MAGIC = st.sampled_from(
    [b"", b"RIFF\x24\x00\x00\x00WAVEfmt ", b"fLaC", b"OggS\x00\x02", b"ID3\x04\x00", b"\xff\xfb\x90\x64", b"FORM\x00\x00\x00\x00AIFF"]
)


@given(magic=MAGIC, body=st.binary(max_size=3000))
def test_audio_decoders_on_random_bytes(scratch, magic, body):
    path = scratch / "random.bin"
    path.write_bytes(magic + body)
    expect_audio(path)


@given(
    channels=st.integers(0, 65535), rate=st.integers(0, 2**32 - 1), bits=st.sampled_from([0, 1, 8, 16, 24, 32, 64, 65535]),
    tag=st.sampled_from([0, 1, 3, 6, 7, 0xFFFE, 0xFFFF]), data_size=st.integers(0, 2**32 - 1),
)  # fmt: skip
def test_wav_header_fields(scratch, encoded, channels, rate, bits, tag, data_size):
    """Every field of a WAV fmt chunk set to hostile values (a header bomb claims 65535 channels)."""
    data = bytearray(encoded["wav-pcm16"])
    assert data[12:16] == b"fmt " and data[36:40] == b"data"
    data[20:22] = tag.to_bytes(2, "little")
    data[22:24] = channels.to_bytes(2, "little")
    data[24:28] = rate.to_bytes(4, "little")
    data[34:36] = bits.to_bytes(2, "little")
    data[40:44] = data_size.to_bytes(4, "little")
    path = scratch / "header.wav"
    path.write_bytes(bytes(data))
    expect_audio(path)


def test_an_mp3_whose_header_claims_millions_of_frames_is_refused(scratch, encoded):
    """Found by the fuzzer: an MP3 whose Xing header claims 2^24 frames made libsndfile
    invent silence without end (hours from 13 kB, until memory ran out). The decoded length
    is now capped by what the file's size can hold."""
    data = bytearray(encoded["mp3"])
    xing = data.index(b"Xing")
    assert int.from_bytes(data[xing + 4 : xing + 8], "big") & 1  # the frame-count field is present
    data[xing + 8 : xing + 12] = (2**24 + 59).to_bytes(4, "big")
    path = scratch / "endless.mp3"
    path.write_bytes(bytes(data))
    with pytest.raises(AudioError, match="more than .* bytes can hold"):
        load_audio(path)


@pytest.mark.parametrize("rate", [8000, 44101, 192000])
def test_a_one_frame_file_is_refused_or_one_sample_long(scratch, rate):
    """Found by the fuzzer: one frame at 44101 Hz resampled to nothing, and load_audio returned an empty array."""
    path = scratch / "one-frame.wav"
    soundfile.write(path, np.array([0.5], np.float32), rate)
    audio = expect_audio(path)
    assert audio is None or len(audio) >= 1


@pytest.mark.parametrize("value", [np.nan, np.inf, 1e30, 3e38])
def test_float_files_with_non_finite_or_absurd_samples_are_refused(scratch, value):
    """Finite but absurd float samples are refused too: from about 1e19 the CQT overflows to NaN."""
    song = tune(4, 1.0)
    song[100] = value
    path = scratch / "absurd.wav"
    soundfile.write(path, song, SAMPLE_RATE, subtype="FLOAT")
    with pytest.raises(AudioError, match="NaN or infinite|beyond"):
        load_audio(path)


# --- match events ----------------------------------------------------------------------------------

EVENT_TEXT = st.one_of(
    st.text(
        alphabet=st.one_of(
            st.characters(exclude_categories=()), HOSTILE_CHARS, st.sampled_from(["\ud800", "\udcff", "\u2029", "\x1e", "\x0b"])
        )
    ),
    st.integers(5_000, 50_000).map(lambda n: "é" * n),  # very long: 10-100 kB of UTF-8
)
NUMBERS = st.floats(allow_nan=True, allow_infinity=True)
P_VALUES = st.one_of(st.none(), NUMBERS)


def scalar(text: str) -> str:
    return "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in text)


@st.composite
def events(draw) -> MatchEvent:
    stream, song_id = draw(EVENT_TEXT), draw(EVENT_TEXT)
    start = draw(st.floats(-1e9, 1e9))
    kind = draw(st.sampled_from(["match_start", "match_end"]))
    return MatchEvent(
        kind,
        make_event_id(stream, song_id, start, kind),
        stream,
        song_id,
        draw(EVENT_TEXT),
        draw(NUMBERS),
        draw(NUMBERS),
        start,
        "2026-11-29T01:02:03.456Z",
        p_value=draw(P_VALUES),
    )


def check_line(line: str, event: MatchEvent) -> None:
    """One line of valid UTF-8 JSON that gives back the event's fields."""
    assert len(line.splitlines()) == 1 and "\n" not in line and "\r" not in line
    line.encode("utf-8")  # strict
    record = json.loads(line)
    assert set(record) == {"schema_version"} | {f.name for f in dataclasses.fields(MatchEvent)}
    assert record["schema_version"] == SCHEMA_VERSION and next(iter(record)) == "schema_version"
    assert (record["stream"], record["song_id"], record["title"]) == (event.stream, event.song_id, event.title)
    for name, digits in (("score", 4), ("stream_time_s", 3), ("match_start_s", 3)):
        value = getattr(event, name)
        assert record[name] == (round(value, digits) if math.isfinite(value) else None)
    p_value = None if event.p_value is None else float(f"{event.p_value:.3g}")
    assert record["p_value"] == (p_value if p_value is not None and math.isfinite(p_value) else None)


@given(
    stream=EVENT_TEXT, song_id=EVENT_TEXT, title=EVENT_TEXT, score=NUMBERS, time_s=NUMBERS, start_s=st.floats(-1e9, 1e9), p_value=P_VALUES
)
def test_event_json_is_one_valid_line(stream, song_id, title, score, time_s, start_s, p_value):
    event_id = make_event_id(stream, song_id, start_s, "match_start")  # never raises, stable for valid text
    assert event_id == make_event_id(stream, song_id, start_s, "match_start") and len(event_id) == 20
    event = MatchEvent("match_start", event_id, stream, song_id, title, score, time_s, start_s, "2026-11-29T01:02:03.456Z", p_value=p_value)
    assert (event.stream, event.song_id, event.title) == (scalar(stream), scalar(song_id), scalar(title))  # lone surrogates -> U+FFFD
    check_line(event.to_json(), event)


@scaled(0.5)
@given(batch=st.lists(events(), min_size=1, max_size=6))
def test_event_sinks_write_one_valid_line_per_event(scratch, batch):
    path = scratch / "events.jsonl"
    path.unlink(missing_ok=True)
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", newline="\n")  # strict, like a UTF-8 stdout
    fan = FanOut([FileSink(path), StdoutSink(stdout)])
    for event in batch:
        fan.add(event)
    assert fan.flush() and fan.close() and fan.failures == 0
    stdout.flush()
    for raw in (path.read_bytes(), stdout.buffer.getvalue()):
        lines = raw.split(b"\n")
        assert lines[-1] == b"" and len(lines) == len(batch) + 1
        for line, event in zip(lines, batch):
            check_line(line.decode("utf-8"), event)


# --- hostile Kafka messages through a real broker to a real daemon ---------------------------------


def outcome(key: bytes | None, value: bytes | None, headers: list) -> str:
    """What the daemon must count for one message: its dead-letter reason, bad_chunk or processed."""
    try:
        chunk = decode_chunk(key, value, headers, max_chunk_s=10.0)  # the daemon's default kafka.max_chunk_s
    except MalformedChunk as exc:
        return exc.reason
    return "bad_chunk" if np.abs(chunk.samples).max() > MAX_ABS_SAMPLE else "processed"


def hostile_messages(seed: int = 0, n_random: int = 24) -> list[tuple[bytes | None, bytes, list, str]]:
    """(key, value, headers, expected outcome): hand-picked hostile messages, then seeded mutations.

    Messages that decode get a stream id of their own, so sequence checks never skip them."""

    def chunk(stream: str, samples: np.ndarray, rate: int = 8000, encoding: str = "s16le", set_headers: dict | None = None) -> tuple:
        """A valid chunk, with `set_headers` values replacing its headers (None: left out)."""
        key, value, headers = encode_chunk(stream, samples, rate, 0, 1_700_000_000_000, encoding)
        changes = set_headers or {}
        return key, value, [(n, changes.get(n, v)) for n, v in headers if changes.get(n, v) is not None]

    def f32(values: list) -> np.ndarray:
        return np.asarray(values, np.float32)

    song = tune(2, 0.25, rate=8000)
    picked = {
        "bad_key": [(None, *chunk("k", song)[1:]), (b"", *chunk("k", song)[1:]), (b"a b", *chunk("k", song)[1:]), (b"x" * 201, *chunk("k", song)[1:]),
                    (b"\xff\xfe", *chunk("k", song)[1:])],
        "missing_header": [chunk("m", song, set_headers={"capture_ts": None}), chunk("m", song, set_headers={"encoding": None})],
        "unknown_encoding": [chunk("u", song, set_headers={"encoding": b"S16LE"})],
        "bad_sample_rate": [chunk("r", song, set_headers={"sample_rate": b"192001"}), chunk("r", song, set_headers={"sample_rate": b"0"})],
        "bad_channels": [chunk("c", song, set_headers={"channels": b"9"})],
        "bad_header": [chunk("h", song, set_headers={"seq": b"-1"}), chunk("h", song, set_headers={"seq": b"9" * 5000}), chunk("h", song, set_headers={"capture_ts": b"10000000000001"}),
                       chunk("h", song, set_headers={"sample_rate": b"\xff"})],
        "empty": [(b"e", b"", chunk("e", song)[2])],
        "odd_byte_count": [(b"o", chunk("o", song)[1][:-1], chunk("o", song)[2])],
        "too_large": [chunk("t", np.zeros(8000 * 11, np.float32))],
        "non_finite": [(b"n", np.array(bad, "<f4").tobytes(), chunk("n", f32([0.0] * len(bad)), encoding="f32le")[2]) for bad in ([0.1, np.nan], [np.inf] * 4)],
        "bad_chunk": [chunk("loud-1e30", f32([1e30] * 800), encoding="f32le"), chunk("loud-1001", f32([1001.0] * 800), encoding="f32le")],
        "processed": [chunk("denormals", f32([1e-40, -1e-40] * 400), encoding="f32le"), chunk("one-frame", f32([0.5])),
                      chunk("octo-192k", np.tile(tune(2, 0.1, rate=192000)[:, None], (1, 8)), rate=192000),
                      chunk("full-scale", np.sign(song) * 1.0), chunk("quiet", song * 1e-4, encoding="f32le")],
    }  # fmt: skip
    messages = [(key, value, headers, reason) for reason, items in picked.items() for key, value, headers in items]
    rng = np.random.default_rng(seed)
    for i in range(n_random):
        key, value, headers = chunk(f"rand-{i}", song, encoding=str(rng.choice(["s16le", "f32le"])))
        edits = [(str(rng.choice(["flip", "overwrite", "insert", "delete", "truncate"])), int(rng.integers(0, 2**31)), int(rng.integers(1, 255)))
                 for _ in range(int(rng.integers(1, 4)))]  # fmt: skip
        edits = [(kind, pos, bytes(rng.integers(0, 256, arg % 16 + 1, dtype=np.uint8)) if kind in ("overwrite", "insert") else arg)
                 for kind, pos, arg in edits]  # fmt: skip
        target = rng.integers(0, 3)
        if target == 0:
            value = mutate(value, edits)
        elif target == 1:
            name = str(rng.choice(REQUIRED_HEADERS))
            headers = [(n, mutate(v, edits) if n == name else v) for n, v in headers]
        else:
            key = mutate(key, edits)
        messages.append((key, value, headers, outcome(key, value, headers)))
    for key, value, headers, expected in messages:  # the hand-picked expectations agree with the parser
        assert outcome(key, value, headers) == expected, (key, headers, expected)
    return messages


@pytest.fixture(scope="module")
def shipped_index(scratch) -> Path:
    """An index of three tunes built with the shipped model (thresholds from its calibration)."""
    from coverwatch.index_builder.build import build_index
    from coverwatch.index_builder.refs import read_refs
    from coverwatch.streamer.config import IndexBuildConfig
    from coverwatch.streamer.embed.artifacts import DEFAULT_MODEL_DIR
    from coverwatch.streamer.embed.embedder import Embedder

    folder = scratch / "shipped"
    folder.mkdir()
    for i in range(3):
        soundfile.write(folder / f"s{i}.wav", tune(i, 30.0), SAMPLE_RATE)
    (folder / "refs.csv").write_text("song_id,title,path\n" + "".join(f"s{i},Song {i},s{i}.wav\n" for i in range(3)))
    build_index(read_refs(folder / "refs.csv"), folder / "idx", Embedder(DEFAULT_MODEL_DIR, threads=1), IndexBuildConfig())
    return folder / "idx"


HOSTILE_CHECKPOINTS = [b'{"delivered": 1e400, "open": {}}', b'{"delivered": 3, "open": []}', b"\xff", b"[" * 50000, b"[]"]


def read_checkpoint_as_the_source_does(checkpoint: dict) -> tuple[int, dict]:
    """What KafkaSource._read_checkpoints takes from a checkpoint (it must not raise)."""
    opened = {sid: (m[0], float(m[1])) if m else None for sid, m in checkpoint.get("open", {}).items()}
    return int(checkpoint["delivered"]), opened


CHECKPOINT_JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=8)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(["delivered", "open", "committed", "s1", ""]), inner, max_size=3)
    ),
    max_leaves=8,
)


@given(raw=st.one_of(
    st.binary(max_size=200),
    CHECKPOINT_JSON.map(lambda v: json.dumps(v).encode()),
    st.builds(mutate, st.just(b'{"committed": 10, "delivered": 12, "open": {"radio": ["s1", 61.5], "tv": null}}'), MUTATIONS),
    st.sampled_from(HOSTILE_CHECKPOINTS),
))  # fmt: skip
def test_checkpoint_records(raw):
    from coverwatch.streamer.service.checkpoints import parse_checkpoint

    checkpoint = parse_checkpoint(raw)
    if checkpoint is not None:
        delivered, opened = read_checkpoint_as_the_source_does(checkpoint)
        assert delivered >= -1 and all(m is None or math.isfinite(m[1]) for m in opened.values())


def test_hostile_kafka_messages_are_counted_and_the_daemon_goes_on(kafka_broker, make_topic, shipped_index, tmp_path):
    from kafka import KafkaProducer, TopicPartition

    from coverwatch.streamer.embed.artifacts import DEFAULT_MODEL_DIR
    from coverwatch.streamer.service.checkpoints import checkpoint_key
    from tests.broker import read_messages
    from tests.daemon import Daemon, free_port, send_stream, wait_for, write_config

    topic = make_topic(1)
    messages = hostile_messages()
    expected: dict[str, int] = {}
    for *_, reason in messages:
        expected[reason] = expected.get(reason, 0) + 1
    assert set(REASONS) | {"bad_chunk", "processed"} == set(expected)  # every outcome is exercised
    good = tune(1, 3.0)
    good_chunks = -(-len(good) // int(0.5 * SAMPLE_RATE))
    group = f"g-{topic}"
    config = write_config(tmp_path / "d.toml", kafka_broker.bootstrap, topic, f"{topic}.events", group, free_port())
    producer = KafkaProducer(bootstrap_servers=kafka_broker.bootstrap, acks="all")
    for raw in HOSTILE_CHECKPOINTS:  # the newest record of the key wins: the daemon finds a foreign one
        producer.send(f"{topic}.checkpoints", key=checkpoint_key(group, TopicPartition(topic, 0)), value=raw)
    producer.flush()
    with Daemon(tmp_path, "d", config, DEFAULT_MODEL_DIR, shipped_index) as daemon:
        for key, value, headers, _ in messages:
            producer.send(topic, key=key, value=value, headers=headers)
        producer.flush()
        producer.close()
        send_stream(kafka_broker.bootstrap, topic, "after", good, SAMPLE_RATE, 0.5)  # a good stream behind them
        want = expected["processed"] + good_chunks
        wait_for(lambda: daemon.chunks() >= want, 60, "the good stream after hostile messages was not processed", daemon)
        metrics = daemon.metrics()
        assert daemon.stop() == 0, daemon.logs()
    assert daemon.stderr_path.read_text().count("unreadable checkpoint") == len(HOSTILE_CHECKPOINTS)
    assert metrics["coverwatch_chunks_total{outcome=processed}"] == want
    assert metrics["coverwatch_chunks_total{outcome=bad_chunk}"] == expected["bad_chunk"]
    dead = sum(n for reason, n in expected.items() if reason in REASONS)
    assert metrics["coverwatch_chunks_total{outcome=dead_letter}"] == dead
    for reason in REASONS:
        assert metrics[f"coverwatch_dead_letters_total{{reason={reason}}}"] == expected[reason], reason
    letters = read_messages(kafka_broker.bootstrap, f"{topic}.dlq", count=dead)
    assert sorted(dict(r.headers)["dead_letter_reason"].decode() for r in letters) == sorted(r for *_, r in messages if r in REASONS)


def test_file_source_daemon_skips_bad_blocks_and_names_a_broken_file(shipped_index, scratch):
    """`coverwatch serve --source file:` on a float file with a NaN block and an absurd block,
    named with bytes that are not UTF-8: the two blocks are skipped and counted, the song is
    still found, and every event is one valid JSON line. A file of random bytes ends the
    daemon with an error that names it, never a traceback."""
    from tests.conftest import coverwatch

    rate = 44100
    song = np.stack([tune(1, 14.0, rate=rate)] * 2, axis=1)
    song[int(4.0 * rate) : int(4.5 * rate)] = np.nan  # exactly the 9th 0.5-s block
    song[int(9.0 * rate) : int(9.5 * rate), 1] = 1e30  # the 19th, one channel
    folder = scratch / "serve"
    folder.mkdir()
    name = Path(b"radio-\xff.wav".decode("utf-8", "surrogateescape"))
    soundfile.write(folder / "song.wav", song, rate, subtype="FLOAT")  # libsndfile takes UTF-8 names only
    (folder / "song.wav").rename(folder / name)
    (folder / "junk.wav").write_bytes(np.random.default_rng(5).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    config = folder / "serve.toml"
    config.write_text("[stream]\nwindows_s = [5.0, 10.0]\nhop_s = 2.5\n[decision]\nstart_hops = 1\n[metrics]\nport = 0\n")

    run = coverwatch("--config", config, "serve", "--index", shipped_index, "--fast", "--source", f"file:{folder / name}", timeout=120)
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert run.stderr.count("skipped chunk") == 2 and "bad_chunks=2" in run.stderr, run.stderr[-3000:]
    events = [json.loads(line) for line in run.stdout.splitlines()]
    assert [e["event"] for e in events] == ["match_start", "match_end"] and {e["song_id"] for e in events} == {"s1"}
    assert {e["stream"] for e in events} == {"radio-\ufffd"}

    run = coverwatch(
        "--config", config, "serve", "--index", shipped_index, "--fast", "--source", f"file:{folder / 'junk.wav'}", timeout=120
    )
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert "junk.wav" in run.stderr.splitlines()[-1] and run.stdout == ""


def test_stdout_that_is_not_utf8_gets_ascii_escaped_events():
    """LANG=C or an ASCII pipe: the event is written with \\u escapes (the same JSON), not lost."""
    import io

    from coverwatch.streamer.sinks.events import MatchEvent
    from coverwatch.streamer.sinks.local import StdoutSink

    event = MatchEvent("match_start", "id", "radio-\u00e9", "s1", "Caf\u00e9 \u2615 \ud800", 0.5, 1.0, 1.0, "t")
    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding="ascii")
    sink = StdoutSink(out)
    sink.add(event)
    sink.flush()
    line = raw.getvalue().decode("ascii")
    assert line.count("\n") == 1 and json.loads(line)["title"] == "Caf\u00e9 \u2615 \ufffd"
