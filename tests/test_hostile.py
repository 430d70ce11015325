"""Numeric hostility: the shipped model and a small real index over hostile audio.

Every input goes through the real `Monitor` (soxr resampling, incremental ONNX CQT,
ONNX encoder, FAISS, hysteresis). What must hold for all of them: only `ChunkError`
leaves `process_chunk`, and a refused chunk leaves its stream untouched; every embedding
the monitor computes (and the embedding of every window in a stream's ring) is finite and
unit-norm; silence, near-silence and DC offset never produce a match.

Windows are 5/10 s with 2.5-s hops, so 12 s of audio holds several decisions.
"""

from __future__ import annotations

import numpy as np
import pytest
import soundfile

from coverwatch.index_builder.build import build_index
from coverwatch.index_builder.refs import read_refs
from coverwatch.streamer.config import DecisionConfig, IndexBuildConfig, StreamConfig
from coverwatch.streamer.embed.artifacts import DEFAULT_MODEL_DIR
from coverwatch.streamer.embed.embedder import Embedder
from coverwatch.streamer.frontend.audio import N_BINS, SAMPLE_RATE
from coverwatch.streamer.service.pipeline import ChunkError, Monitor
from coverwatch.streamer.sinks.events import MatchEvent, make_event_id
from tests.conftest import tune

STREAM = StreamConfig(windows_s=[5.0, 10.0], hop_s=2.5)
# Any retrieved song starts a match at once: what reaches the index at all is visible.
PERMISSIVE = DecisionConfig(start_threshold=-1.0, end_threshold=-1.0, start_hops=1, end_hops=1)
SECONDS = 12.0  # length of each hostile input
CHUNK_S = 0.5
MATCHED_SEED = 1  # tune seed of the indexed song "s1"


class RecordingEmbedder(Embedder):
    """The real embedder; it also keeps every batch of vectors it returned."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.vectors: list[np.ndarray] = []

    def embed(self, frames: np.ndarray) -> np.ndarray:
        out = super().embed(frames)
        self.vectors.append(out)
        return out


@pytest.fixture(scope="module")
def embedder() -> RecordingEmbedder:
    return RecordingEmbedder(DEFAULT_MODEL_DIR, threads=1)


@pytest.fixture(scope="module")
def index(embedder, tmp_path_factory):
    """Three 30-s tunes (s0, s1, s2) indexed with the shipped model; thresholds from its calibration."""
    folder = tmp_path_factory.mktemp("hostile-refs")
    rows = ["song_id,title,path"]
    for i in range(3):
        soundfile.write(folder / f"s{i}.wav", tune(i, 30.0), SAMPLE_RATE)
        rows.append(f"s{i},Song {i},s{i}.wav")
    (folder / "refs.csv").write_text("\n".join(rows) + "\n")
    store, skipped = build_index(read_refs(folder / "refs.csv"), folder / "idx", embedder, IndexBuildConfig())
    assert not skipped
    return store


def unwrap(items: list) -> list[MatchEvent]:
    """Events from `process_chunk` / `end_stream`, whether plain or (tag, event) pairs."""
    return [item[1] if isinstance(item, tuple) else item for item in items]


def feed(monitor: Monitor, stream: str, audio: np.ndarray, rate: int, chunk: int) -> list[MatchEvent]:
    """Feed audio ((N,) or (N, C)) in chunks of `chunk` frames; the events it caused (stream not ended)."""
    events: list[MatchEvent] = []
    for start in range(0, len(audio), chunk):
        events += unwrap(monitor.process_chunk(stream, audio[start : start + chunk], rate))
    return events


def finish(monitor: Monitor, stream: str, embedder: RecordingEmbedder) -> list[MatchEvent]:
    """Check the stream's ring windows embed to finite unit vectors, then end the stream."""
    state = monitor.streams[stream]
    for n in monitor.window_frames:
        if n <= state.ring.filled:
            frames, _ = state.ring.latest(n)
            assert frames.shape == (n, N_BINS) and np.isfinite(frames).all()
            check_vectors(embedder.embed(frames[None].copy()))
    return unwrap(monitor.end_stream(stream))


def check_vectors(vectors: np.ndarray) -> None:
    assert np.isfinite(vectors).all()
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)


def recorded(embedder: RecordingEmbedder) -> int:
    """Check every vector embedded since the last call; how many there were."""
    n = 0
    for batch in embedder.vectors:
        check_vectors(batch)
        n += len(batch)
    embedder.vectors.clear()
    return n


def frames_of(seconds: float, rate: int) -> int:
    return int(seconds * rate)


def noise(seconds: float, rate: int, rms: float, seed: int = 0) -> np.ndarray:
    return (rms * np.random.default_rng(seed).standard_normal(frames_of(seconds, rate))).astype(np.float32)


# name -> (N,) or (N, C) float32 at SAMPLE_RATE. Silence-like inputs never reach the encoder.
GATED = {
    "digital silence": lambda: np.zeros(frames_of(SECONDS, SAMPLE_RATE), np.float32),
    "white noise at -80 dBFS": lambda: noise(SECONDS, SAMPLE_RATE, 1e-4),
    "white noise at -60 dBFS (just under the -55 dBFS gate)": lambda: noise(SECONDS, SAMPLE_RATE, 1e-3),
    "1-LSB s16 dither": lambda: (np.random.default_rng(1).integers(-1, 2, frames_of(SECONDS, SAMPLE_RATE)) / 32768).astype(np.float32),
    "denormals (+-1e-40)": lambda: (np.sign(noise(SECONDS, SAMPLE_RATE, 1.0)) * np.float32(1e-40)).astype(np.float32),
    "anti-phase stereo (mono mix is zero)": lambda: np.stack([tune(MATCHED_SEED, SECONDS), -tune(MATCHED_SEED, SECONDS)], axis=1),
}
# DC is audible to the energy gate but not to the CQT (its lowest bin is 32.7 Hz).
DC = {
    "DC offset +0.5": lambda: np.full(frames_of(SECONDS, SAMPLE_RATE), 0.5, np.float32),
    "full-scale DC -1.0": lambda: np.full(frames_of(SECONDS, SAMPLE_RATE), -1.0, np.float32),
    "DC +0.5 with -80 dBFS noise": lambda: 0.5 + noise(SECONDS, SAMPLE_RATE, 1e-4),
}
LOUD = {
    "song with DC offset +0.5": lambda: tune(MATCHED_SEED, SECONDS) + np.float32(0.5),
    "song clipped at full scale (x30)": lambda: np.clip(30 * tune(MATCHED_SEED, SECONDS), -1.0, 1.0),
    "full-scale 1 kHz square": lambda: np.sign(np.sin(2 * np.pi * 1000 * np.arange(frames_of(SECONDS, SAMPLE_RATE)) / SAMPLE_RATE)).astype(
        np.float32
    ),
    "full-scale Nyquist (+1, -1, ...)": lambda: np.resize(np.array([1.0, -1.0], np.float32), frames_of(SECONDS, SAMPLE_RATE)),
    "impulse train (one full-scale sample every 0.5 s)": lambda: np.where(
        np.arange(frames_of(SECONDS, SAMPLE_RATE)) % 11025 == 0, 1.0, 0.0
    ).astype(np.float32),
    "song at +60 dB (peak 1000, the accepted maximum)": lambda: (
        tune(MATCHED_SEED, SECONDS) * np.float32(1000 / np.abs(tune(MATCHED_SEED, SECONDS)).max())
    ),
    "uniform noise at +-1000": lambda: np.random.default_rng(2).uniform(-1000, 1000, frames_of(SECONDS, SAMPLE_RATE)).astype(np.float32),
    "song plus denormals": lambda: tune(MATCHED_SEED, SECONDS) + np.float32(1e-40),
}


@pytest.mark.parametrize("name", list(GATED))
def test_silence_like_input_is_never_embedded_and_never_matches(embedder, index, name):
    audio = GATED[name]()
    recorded(embedder)
    monitor = Monitor(embedder, index, STREAM, PERMISSIVE)  # even a threshold of -1 finds nothing
    events = feed(monitor, "s", audio, SAMPLE_RATE, int(CHUNK_S * SAMPLE_RATE))
    assert recorded(embedder) == 0, f"{name}: a silent window reached the encoder"
    assert monitor.streams["s"].counts["silent_windows"] > 0
    events += finish(monitor, "s", embedder)
    assert events == []


@pytest.mark.parametrize("name", list(DC))
def test_dc_offset_never_matches(embedder, index, name):
    audio = DC[name]()
    recorded(embedder)
    monitor = Monitor(embedder, index, STREAM, DecisionConfig())  # the daemon's calibrated thresholds
    events = feed(monitor, "s", audio, SAMPLE_RATE, int(CHUNK_S * SAMPLE_RATE))
    assert recorded(embedder) == 0  # the gate measures each hop's variance: DC (plus quiet noise) is silence
    events += finish(monitor, "s", embedder)
    assert events == []
    scores = index.best_per_song(embedder.embed(embedder.cqt_whole(np.ascontiguousarray(audio, np.float32))[None]), 3)
    assert max(scores.values(), default=0.0) < monitor.thresholds.end, scores


@pytest.mark.parametrize("name", list(LOUD))
def test_loud_clipped_and_odd_input_is_processed_with_finite_embeddings(embedder, index, name):
    audio = LOUD[name]()
    recorded(embedder)
    monitor = Monitor(embedder, index, STREAM, DecisionConfig())
    events = feed(monitor, "s", audio, SAMPLE_RATE, int(CHUNK_S * SAMPLE_RATE))
    assert recorded(embedder) > 0
    events += finish(monitor, "s", embedder)
    assert all(e.song_id in {"s0", "s1", "s2"} and np.isfinite(e.score) for e in events)


@pytest.mark.parametrize("rate", [8000, 11025, 16000, 22050, 44100, 48000, 96000, 192000])
def test_sample_rates_8k_to_192k_find_the_song(embedder, index, rate):
    audio = tune(MATCHED_SEED, SECONDS, rate=rate)
    recorded(embedder)
    monitor = Monitor(embedder, index, STREAM, DecisionConfig())
    events = feed(monitor, "s", audio, rate, int(CHUNK_S * rate))
    held_back = SECONDS * SAMPLE_RATE - monitor.streams["s"].samples_in  # the streaming resampler's delay
    assert 0 <= held_back < 0.25 * SAMPLE_RATE
    assert recorded(embedder) > 0
    events += finish(monitor, "s", embedder)
    assert [e.event for e in events] == ["match_start", "match_end"] and {e.song_id for e in events} == {"s1"}


@pytest.mark.parametrize(
    "layout",
    [
        "(N,) vector",
        "(N, 1)",
        "stereo",
        "5.1 (6 channels)",
        "8 channels, song in one",
        "float64",
        "float16",
        "Fortran-ordered stereo",
        "strided view",
    ],
)
def test_channel_layouts_and_dtypes(embedder, index, layout):
    rate = 48000
    song = tune(MATCHED_SEED, SECONDS, rate=rate)
    audio = {
        "(N,) vector": song,
        "(N, 1)": song[:, None],
        "stereo": np.stack([song, 0.5 * song], axis=1),
        "5.1 (6 channels)": np.stack([song] * 5 + [np.zeros_like(song)], axis=1),
        "8 channels, song in one": np.stack([song] + [np.zeros_like(song)] * 7, axis=1),
        "float64": song.astype(np.float64),
        "float16": song.astype(np.float16),
        "Fortran-ordered stereo": np.asfortranarray(np.stack([song, song], axis=1)),
        "strided view": np.repeat(song, 2)[::2],
    }[layout]
    recorded(embedder)
    monitor = Monitor(embedder, index, STREAM, DecisionConfig())
    events = feed(monitor, "s", audio, rate, int(CHUNK_S * rate))
    assert recorded(embedder) > 0
    events += finish(monitor, "s", embedder)
    assert {e.song_id for e in events} == {"s1"}


def test_chunks_of_one_sample_to_three_minutes_decide_alike(embedder, index):
    """The same audio in 1-sample chunks, random chunks (1..9000 samples) and one 3-minute
    chunk gives the events of 0.5-s chunks."""
    rate = 8000
    audio = tune(MATCHED_SEED, 6.0, rate=rate)  # its match opens at a hop and closes when the stream ends
    short = StreamConfig(windows_s=[4.0], hop_s=1.0)  # 48000 one-sample chunks are enough for two decisions

    def run(chunks: list[int]) -> list[tuple]:
        monitor = Monitor(embedder, index, short, DecisionConfig(start_hops=1))
        events, start = [], 0
        for size in chunks:
            if start < len(audio):
                events += unwrap(monitor.process_chunk("s", audio[start : start + size], rate))
            start += size
        assert start >= len(audio)
        events += finish(monitor, "s", embedder)
        return [(e.event, e.song_id, e.stream_time_s, e.event_id) for e in events]

    recorded(embedder)
    reference = run([rate // 2] * (len(audio) // (rate // 2) + 1))
    assert [kind for kind, *_ in reference] == ["match_start", "match_end"]
    assert run([1] * len(audio)) == reference
    sizes = np.random.default_rng(3).integers(1, 9001, size=len(audio))
    assert run(list(sizes[: int(np.searchsorted(np.cumsum(sizes), len(audio))) + 1])) == reference
    assert run([len(audio)]) == reference
    recorded(embedder)

    minutes = np.tile(tune(MATCHED_SEED, 30.0), 6)  # 3 minutes at 22050 Hz in one chunk
    monitor = Monitor(embedder, index, STREAM, DecisionConfig())
    events = unwrap(monitor.process_chunk("long", minutes, SAMPLE_RATE)) + finish(monitor, "long", embedder)
    assert recorded(embedder) > 0
    assert [e.event for e in events] == ["match_start", "match_end"] and events[0].song_id == "s1"
    assert monitor.counts["decisions"] > 60  # one per 2.5-s hop once the first window is full


BAD_CHUNKS = {
    "NaN": (np.array([0.1, np.nan, 0.2], np.float32), SAMPLE_RATE),
    "+Inf": (np.full(500, np.inf, np.float32), SAMPLE_RATE),
    "-Inf in one channel": (np.stack([np.zeros(500), np.r_[np.zeros(499), -np.inf]], axis=1).astype(np.float32), SAMPLE_RATE),
    "1001 (beyond the accepted peak)": (np.full(500, 1001.0, np.float32), SAMPLE_RATE),
    "1e30": (np.full(500, 1e30, np.float32), SAMPLE_RATE),
    "-3e38 (float32 limit)": (np.full(500, -3e38, np.float32), SAMPLE_RATE),
    "raw int16 full scale": (np.full(500, 32767, np.int16), SAMPLE_RATE),
    "empty": (np.zeros(0, np.float32), SAMPLE_RATE),
    "empty stereo": (np.zeros((0, 2), np.float32), SAMPLE_RATE),
    "3-D": (np.zeros((10, 2, 2), np.float32), SAMPLE_RATE),
    "sample rate 0": (np.zeros(500, np.float32), 0),
    "negative sample rate": (np.zeros(500, np.float32), -44100),
    "sample rate 3999 Hz": (np.zeros(500, np.float32), 3999),
    "sample rate 1 GHz": (np.zeros(500, np.float32), 10**9),
}


def test_refused_chunks_change_nothing_and_other_streams_go_on(embedder, index):
    """Every bad chunk interleaved into a matching stream is a ChunkError; the stream's events
    equal those of a clean run, and a second stream fed alongside is unaffected."""
    chunk = int(CHUNK_S * SAMPLE_RATE)
    audio = np.concatenate([tune(MATCHED_SEED, SECONDS), np.zeros(6 * SAMPLE_RATE, np.float32)])
    clean = Monitor(embedder, index, STREAM, DecisionConfig())
    expected = feed(clean, "a", audio, SAMPLE_RATE, chunk) + unwrap(clean.end_stream("a"))
    assert [e.event for e in expected] == ["match_start", "match_end"]

    monitor = Monitor(embedder, index, STREAM, DecisionConfig())
    events = {"a": [], "b": []}
    refused: dict[str, int] = {}
    bad = list(BAD_CHUNKS.items())
    for i, start in enumerate(range(0, len(audio), chunk)):
        for stream in ("a", "b"):
            events[stream] += unwrap(monitor.process_chunk(stream, audio[start : start + chunk], SAMPLE_RATE))
        name, (samples, rate) = bad[i % len(bad)]
        with pytest.raises(ChunkError):
            monitor.process_chunk("a", samples, rate)
        refused[name] = refused.get(name, 0) + 1
    assert set(refused) == set(BAD_CHUNKS)
    for stream in ("a", "b"):
        events[stream] += unwrap(monitor.end_stream(stream))
        assert [(e.event, e.song_id, e.stream_time_s) for e in events[stream]] == [(e.event, e.song_id, e.stream_time_s) for e in expected]
    assert [e.event_id for e in events["a"]] == [e.event_id for e in expected]


def test_a_new_stream_may_start_with_a_bad_chunk(embedder, index):
    monitor = Monitor(embedder, index, STREAM, DecisionConfig())
    for samples, rate in BAD_CHUNKS.values():
        with pytest.raises(ChunkError):
            monitor.process_chunk("fresh", samples, rate)
    assert "fresh" not in monitor.streams


def test_sample_rate_changes_mid_stream(embedder, index):
    monitor = Monitor(embedder, index, STREAM, DecisionConfig())
    recorded(embedder)
    for rate in (44100, 8000, 192000, 4000, 22050, 96000):
        feed(monitor, "s", tune(MATCHED_SEED, 6.0, rate=rate), rate, int(CHUNK_S * rate))
    recorded(embedder)
    finish(monitor, "s", embedder)


def test_undecodable_file_name_as_stream_id_still_gives_valid_events(embedder, index):
    """A file source names its stream after the file; a non-UTF-8 name arrives as lone surrogates."""
    stream = b"radio-\xff\xfe".decode("utf-8", "surrogateescape")
    monitor = Monitor(embedder, index, STREAM, DecisionConfig())
    events = feed(monitor, stream, tune(MATCHED_SEED, SECONDS), SAMPLE_RATE, int(CHUNK_S * SAMPLE_RATE))
    events += unwrap(monitor.end_stream(stream))
    assert [e.event for e in events] == ["match_start", "match_end"]
    for event in events:
        line = event.to_json()
        line.encode("utf-8")  # strict: every sink can write it
        assert event.stream == "radio-\ufffd\ufffd"
        assert event.event_id == make_event_id(stream, "s1", event.match_start_s, event.event)
