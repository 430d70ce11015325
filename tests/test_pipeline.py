"""The daemon's per-chunk path on real audio through the real ONNX graphs and FAISS."""

import json

import numpy as np
import pytest

from coverwatch.index_builder.build import build_index
from coverwatch.index_builder.refs import read_refs
from coverwatch.streamer.config import DecisionConfig, IndexBuildConfig, StreamConfig
from coverwatch.streamer.embed.artifacts import DEFAULT_MODEL_DIR
from coverwatch.streamer.embed.embedder import Embedder
from coverwatch.streamer.frontend.audio import SAMPLE_RATE
from coverwatch.streamer.search.store import load_index
from coverwatch.streamer.service.pipeline import ChunkError, Monitor, resolve_thresholds
from tests.conftest import melody

FIXED = DecisionConfig(start_threshold=0.5, end_threshold=0.4, start_hops=1, end_hops=1)


@pytest.fixture()
def random_monitor(random_model_dir, refs_csv, tmp_path):
    embedder = Embedder(random_model_dir, threads=1)
    store, _ = build_index(read_refs(refs_csv), tmp_path / "idx", embedder, IndexBuildConfig())
    return Monitor(embedder, store, StreamConfig(windows_s=[5.0, 10.0], hop_s=2.5), FIXED)


def feed(monitor, stream, audio, rate, chunk):
    events = []
    for start in range(0, len(audio), chunk):
        events += monitor.process_chunk(stream, audio[start : start + chunk], rate)
    return events


def ended(monitor, stream):
    return [event for _, event in monitor.end_stream(stream)]


@pytest.mark.parametrize(
    "chunk, message",
    [
        (np.array([0.1, np.nan, 0.2], np.float32), "NaN"),
        (np.array([0.1, np.inf], np.float32), "NaN or infinite"),
        (np.zeros(0, np.float32), "empty"),
        (np.zeros((2, 2, 2), np.float32), "mis-shaped"),
        (np.full(100, 32767.0, np.float32), "wrong encoding"),
    ],
)
def test_bad_chunks_raise_and_leave_stream_state_untouched(random_monitor, chunk, message):
    audio = melody(1, 6.0)
    feed(random_monitor, "s", audio[: SAMPLE_RATE * 3], SAMPLE_RATE, 4410)
    state = random_monitor.streams["s"]
    before = (state.samples_in, state.cqt.frames_done, state.ring.filled)
    with pytest.raises(ChunkError, match=message):
        random_monitor.process_chunk("s", chunk, SAMPLE_RATE)
    assert (state.samples_in, state.cqt.frames_done, state.ring.filled) == before
    feed(random_monitor, "s", audio[SAMPLE_RATE * 3 :], SAMPLE_RATE, 4410)  # the stream goes on
    assert state.samples_in == len(audio)


def test_absurd_sample_rate_is_a_chunk_error(random_monitor):
    with pytest.raises(ChunkError, match="sample rate"):
        random_monitor.process_chunk("s", np.zeros(100, np.float32), 1_000_000)
    assert "s" not in random_monitor.streams


def test_silence_is_never_embedded_and_never_matches(random_monitor):
    events = feed(random_monitor, "quiet", np.zeros(SAMPLE_RATE * 20, np.float32), SAMPLE_RATE, 22050)
    events += feed(
        random_monitor, "hiss", (np.random.default_rng(0).standard_normal(SAMPLE_RATE * 20) * 1e-4).astype(np.float32), SAMPLE_RATE, 22050
    )
    assert events == []
    assert random_monitor.times.seconds["embed"] == 0.0
    assert random_monitor.streams["quiet"].counts["silent_windows"] > 0


def test_decisions_do_not_depend_on_chunking_or_input_format(random_monitor, random_model_dir, refs_csv, tmp_path):
    audio = np.concatenate([melody(2, 20.0), np.zeros(SAMPLE_RATE * 8, np.float32)])
    small = feed(random_monitor, "a", audio, SAMPLE_RATE, 1000)
    small += ended(random_monitor, "a")
    other = Monitor(random_monitor.embedder, random_monitor.index, random_monitor.stream_cfg, FIXED)
    big = feed(other, "a", audio, SAMPLE_RATE, SAMPLE_RATE * 7)
    big += ended(other, "a")
    key = [(e.event, e.song_id, e.stream_time_s, e.event_id) for e in small]
    assert key and key == [(e.event, e.song_id, e.stream_time_s, e.event_id) for e in big]
    # stereo 44.1 kHz input of the same audio gives the same decisions (up to resampling)
    import soxr

    stereo = np.stack([soxr.resample(audio, SAMPLE_RATE, 44100)] * 2, axis=1).astype(np.float32)
    third = Monitor(random_monitor.embedder, random_monitor.index, random_monitor.stream_cfg, FIXED)
    converted = feed(third, "a", stereo, 44100, 8820) + ended(third, "a")
    assert [(e.event, e.song_id) for e in converted] == [(e.event, e.song_id) for e in small]


def test_batching_across_streams_gives_the_events_of_one_chunk_at_a_time(random_monitor):
    """Interleaved chunks of four streams, decisions taken once per round of chunks (as a
    Kafka poll batch does) or right after each chunk: the same events, in each stream's order."""
    audio = {f"s{i}": np.concatenate([melody(1 + i % 3, 14.0 + i), np.zeros(SAMPLE_RATE * 6, np.float32)]) for i in range(4)}
    sequential = Monitor(random_monitor.embedder, random_monitor.index, random_monitor.stream_cfg, FIXED)
    batched = random_monitor
    batched.batch_size = 3  # several encoder calls per length and round
    chunk = SAMPLE_RATE  # one second
    one_by_one, in_batches = [], []
    longest = max(len(a) for a in audio.values())
    for start in range(0, longest, chunk):
        for sid, samples in audio.items():
            if start < len(samples):
                one_by_one += sequential.process_chunk(sid, samples[start : start + chunk], SAMPLE_RATE)
                batched.submit(sid, samples[start : start + chunk], SAMPLE_RATE, tag=(sid, start))
        if (start // chunk) % 4 == 3:  # four rounds of chunks per batch
            in_batches += batched.flush()
    in_batches += batched.flush()
    for sid in audio:
        one_by_one += ended(sequential, sid)
        in_batches += batched.end_stream(sid, tag=(sid, None))
    assert all(tag[0] == event.stream for tag, event in in_batches)  # tags follow their chunk's events
    key = sorted((e.stream, e.stream_time_s, e.event, e.song_id, e.event_id, round(e.score, 5)) for e in one_by_one)
    assert len(key) >= 8
    assert key == sorted((e.stream, e.stream_time_s, e.event, e.song_id, e.event_id, round(e.score, 5)) for _, e in in_batches)
    assert sequential.counts["decisions"] == batched.counts["decisions"]


def test_max_pending_windows_bounds_the_queue(random_monitor):
    small = Monitor(random_monitor.embedder, random_monitor.index, StreamConfig(windows_s=[5.0, 10.0], hop_s=2.5, max_pending_windows=4), FIXED)
    small.submit("long", melody(2, 40.0), SAMPLE_RATE)  # one 40-s chunk: 14 decisions due
    assert small.counts["decisions"] >= 12
    assert small._pending_windows < 4
    reference = feed(Monitor(random_monitor.embedder, random_monitor.index, small.stream_cfg, FIXED), "long", melody(2, 40.0), SAMPLE_RATE, 2205)
    assert [e.event_id for _, e in small.flush()] == [e.event_id for e in reference]


def test_thresholds_from_calibration_unless_configured():
    calibration = {"start_threshold": 0.7, "end_threshold": 0.6}
    assert resolve_thresholds(DecisionConfig(), calibration).start == 0.7
    assert resolve_thresholds(DecisionConfig(), calibration).source == "index calibration"
    assert resolve_thresholds(FIXED, calibration).start == 0.5
    with pytest.raises(ValueError, match="no calibration"):
        resolve_thresholds(DecisionConfig(), {})


def test_default_model_finds_a_synthetic_cover(refs_csv, tmp_path):
    """Shipped model: a transposed, faster, differently voiced rendition of song1 is matched."""
    embedder = Embedder(DEFAULT_MODEL_DIR, threads=2)
    build_index(read_refs(refs_csv), tmp_path / "idx", embedder, IndexBuildConfig())
    store = load_index(tmp_path / "idx", expected_model_hash=embedder.info.model_hash)
    monitor = Monitor(embedder, store, StreamConfig(), DecisionConfig())
    cover = melody(1, 30.0, transpose=3, tempo=1.1, harmonics=6)
    stream = np.concatenate([np.zeros(SAMPLE_RATE * 5, np.float32), cover, melody(42, 30.0)])
    events = feed(monitor, "radio", stream, SAMPLE_RATE, 11025) + ended(monitor, "radio")
    starts = [(e.song_id, e.stream_time_s) for e in events if e.event == "match_start"]
    assert starts and starts[0][0] == "song1" and 5.0 <= starts[0][1] <= 40.0
    assert all(song == "song1" for song, _ in starts)
    # the cover plays the reference from its beginning at 1.1x: at the decision, this far in
    first = next(e for e in events if e.event == "match_start")
    expected = min(30.0, 1.1 * (first.stream_time_s - 5.0))
    assert first.reference_offset_s is not None and abs(first.reference_offset_s - expected) < 3.0, (first.reference_offset_s, expected)


def test_a_play_joined_mid_song_starts_at_its_reference_offset(refs_csv, tmp_path):
    """A stream that joins song2 12 s in: the match_start says where in the reference it is."""
    embedder = Embedder(DEFAULT_MODEL_DIR, threads=2)
    build_index(read_refs(refs_csv), tmp_path / "idx", embedder, IndexBuildConfig())
    store = load_index(tmp_path / "idx", expected_model_hash=embedder.info.model_hash)
    monitor = Monitor(embedder, store, StreamConfig(), DecisionConfig())
    joined = melody(2, 30.0, transpose=-2, harmonics=5)[12 * SAMPLE_RATE :]
    stream = np.concatenate([melody(42, 20.0), joined, np.zeros(SAMPLE_RATE * 10, np.float32)])
    events = feed(monitor, "radio", stream, SAMPLE_RATE, 11025) + ended(monitor, "radio")
    first = next(e for e in events if e.event == "match_start")
    assert first.song_id == "song2"
    expected = 12.0 + (first.stream_time_s - 20.0)
    # None where the decision's window followed no part of the reference to its end (a wrong key guess, say)
    assert first.reference_offset_s is None or abs(first.reference_offset_s - expected) < 3.0, (first.reference_offset_s, expected)
    assert json.loads(first.to_json())["reference_offset_s"] == (None if first.reference_offset_s is None else round(first.reference_offset_s, 3))
