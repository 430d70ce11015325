"""The daemon on Kafka, against a real broker (Tansu) and real subprocess daemons.

Every test sends synthetic tunes (tests/conftest.py) as chunks in the wire format, with a
fixed capture clock, and reads what the daemon wrote back from the broker and from its
/metrics endpoint. Windows are 10/20 s with 1-s hops (tests/daemon.py), so the replay
horizon is 25 s and a minute of audio exercises warm-up, matches, crashes and takeovers.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import soundfile
from kafka import KafkaProducer, TopicPartition

from coverwatch.streamer.config import KafkaConfig
from coverwatch.streamer.embed.artifacts import resolve_model_dir
from coverwatch.streamer.embed.embedder import Embedder
from coverwatch.streamer.frontend.audio import SAMPLE_RATE
from coverwatch.streamer.search.store import load_index
from coverwatch.streamer.service.checkpoints import CheckpointTopic
from tests.broker import MotoS3, TansuBroker, read_messages, unique_topic
from tests.conftest import coverwatch, tune
from tests.daemon import Daemon, free_port, send_stream, wait_for, write_config

CHUNK_S = 0.5
SONG_S = 60.0  # length of the indexed songs; streams play their beginnings


def song_then_silence(seed: int, song_s: float, silence_s: float) -> np.ndarray:
    return np.concatenate([tune(seed, song_s), np.zeros(int(silence_s * SAMPLE_RATE), np.float32)])


def events_of(bootstrap: str, topic: str) -> list[dict]:
    return [json.loads(r.value) for r in read_messages(bootstrap, topic)]


def unique_events(bootstrap: str, topic: str) -> list[dict]:
    """Events de-duplicated by event_id, first occurrence kept, as a consumer would."""
    return list({e["event_id"]: e for e in reversed(events_of(bootstrap, topic))}.values())[::-1]


def n_chunks(audio: np.ndarray) -> int:
    return -(-len(audio) // int(CHUNK_S * SAMPLE_RATE))


@pytest.fixture(scope="module")
def shipped_model_index(tmp_path_factory) -> tuple[Path, Path, str]:
    """(model dir, index dir, [decision] table): the shipped model, an index of three
    synthetic songs, and thresholds set between measured true and impostor scores.

    A random model cannot tell songs apart, and these tests need real matches. The
    thresholds come from this model's own scores on 10-s windows of the indexed songs; if it
    cannot separate exact copies of its references, the fixture fails and says so.
    """
    folder = tmp_path_factory.mktemp("shipped")
    rows = []
    for i in range(3):
        soundfile.write(folder / f"song{i}.wav", tune(i, SONG_S), SAMPLE_RATE)
        rows.append(f"song{i},Song {i},song{i}.wav")
    (folder / "refs.csv").write_text("song_id,title,path\n" + "\n".join(rows) + "\n")
    model_dir = resolve_model_dir("")
    coverwatch("index", "build", "--refs", folder / "refs.csv", "--out", folder / "idx", check=True)
    embedder = Embedder(model_dir, threads=2)
    index = load_index(folder / "idx", expected_model_hash=embedder.info.model_hash)
    true, impostor = [], []
    for i in range(3):
        audio = tune(i, SONG_S)
        for start_s in (0.0, 12.0, 23.5, 37.0, 50.0):
            window = audio[int(start_s * SAMPLE_RATE) : int((start_s + 10.0) * SAMPLE_RATE)]
            best = index.best_per_song(embedder.embed(embedder.cqt_whole(window)[None]), 10)
            scores = {index.songs[row].song_id: score for row, score in best.items()}
            true.append(scores.get(f"song{i}", 0.0))
            impostor.append(max((v for k, v in scores.items() if k != f"song{i}"), default=0.0))
    low, high = max(impostor), min(true)
    assert high > low + 0.02, f"the shipped model does not separate exact copies: true >= {high:.3f}, impostors <= {low:.3f}"
    decision = f"start_threshold = {low + 0.6 * (high - low):.4f}\nend_threshold = {low + 0.4 * (high - low):.4f}\n"
    return model_dir, folder / "idx", decision


@pytest.fixture()
def setup(kafka_broker, make_topic, tmp_path, shipped_model_index):
    """(make_daemon(name, group=..., events=..., topic=...), audio topic) on a 1-partition topic."""
    model_dir, index_dir, decision = shipped_model_index
    audio_topic = make_topic(1)

    def make_daemon(
        name: str, group: str | None = None, events: str | None = None, topic: str | None = None, index: Path | None = None,
        env: dict | None = None, kafka_extra: str = "",
    ) -> Daemon:  # fmt: skip
        config = write_config(
            tmp_path / f"{name}.toml", kafka_broker.bootstrap, topic or audio_topic, events or f"{audio_topic}.events",
            group or f"g-{uuid.uuid4().hex[:8]}", free_port(), decision, kafka_extra,
        )  # fmt: skip
        daemon = Daemon(tmp_path, name, config, model_dir, index or index_dir, env)
        started.append(daemon)
        return daemon

    started: list[Daemon] = []
    yield make_daemon, audio_topic
    for daemon in started:  # a failed test must not leave daemons behind
        daemon.close()


def test_publish_serve_events_and_metrics(kafka_broker, setup):
    """A song in a stream -> match_start then match_end on the events topic; metrics add up."""
    make_daemon, topic = setup
    audio = song_then_silence(0, 25.0, 12.0)
    with make_daemon("d") as daemon:
        send_stream(kafka_broker.bootstrap, topic, "radio-1", audio, SAMPLE_RATE, CHUNK_S)
        wait_for(lambda: daemon.chunks() >= n_chunks(audio), 60, "chunks not processed", daemon)
        events = wait_for(lambda: len(e := events_of(kafka_broker.bootstrap, f"{topic}.events")) >= 2 and e, 20, "no events", daemon)
        metrics = daemon.metrics()
        assert daemon.stop() == 0, daemon.logs()
    assert [e["event"] for e in events] == ["match_start", "match_end"]
    assert {e["song_id"] for e in events} == {"song0"} and {e["stream"] for e in events} == {"radio-1"}
    # Stream time is the capture clock: the match starts on the whole-second hop grid.
    assert events[0]["match_start_s"] == round(events[0]["match_start_s"]) and events[0]["match_start_s"] > 1.7e9
    assert metrics["coverwatch_chunks_total{outcome=processed}"] == n_chunks(audio)
    assert metrics["coverwatch_audio_seconds_total"] == pytest.approx(len(audio) / SAMPLE_RATE, abs=1e-3)
    assert metrics["coverwatch_match_events_total{event=match_start}"] == 1
    assert metrics["coverwatch_index_songs"] == 3
    assert metrics["coverwatch_active_streams"] == 1
    assert metrics["coverwatch_stage_seconds_count{stage=embed}"] > 0
    assert metrics["coverwatch_chunk_to_decision_seconds_count"] == n_chunks(audio)
    assert any(k.startswith("coverwatch_model_info{") for k in metrics)
    assert "process_resident_memory_bytes" in metrics


def test_idle_stream_is_closed_and_its_match_ended(kafka_broker, setup):
    """A stream that stops mid-song (no silence, no more chunks) is closed after stream_idle_s."""
    make_daemon, topic = setup
    audio = tune(1, 20.0)
    with make_daemon("d", kafka_extra="stream_idle_s = 3.0") as daemon:
        send_stream(kafka_broker.bootstrap, topic, "cut", audio, SAMPLE_RATE, CHUNK_S)
        events = wait_for(lambda: len(e := events_of(kafka_broker.bootstrap, f"{topic}.events")) >= 2 and e, 60, "no match_end", daemon)
        assert daemon.metric("coverwatch_active_streams") == 0
        assert daemon.stop() == 0
    assert [(e["event"], e["song_id"]) for e in events] == [("match_start", "song1"), ("match_end", "song1")]
    assert "stream cut idle" in daemon.stderr_path.read_text()


def test_malformed_chunks_go_to_the_dead_letter_topic(kafka_broker, setup):
    make_daemon, topic = setup
    good = tune(1, 3.0)
    pcm = (good * 32767).astype("<i2").tobytes()

    def headers(**override):
        base = {"encoding": b"s16le", "sample_rate": b"22050", "channels": b"1", "seq": b"0", "capture_ts": b"1700000000000"}
        base.update({k: v for k, v in override.items() if v is not None})
        return [(k, v) for k, v in base.items() if override.get(k, b"") is not None or k not in override]

    bad = {
        "missing_header": (b"s", pcm, [h for h in headers() if h[0] != "seq"]),
        "unknown_encoding": (b"s", pcm, headers(encoding=b"mp3")),
        "odd_byte_count": (b"s", pcm[:-1], headers()),
        "bad_sample_rate": (b"s", pcm, headers(sample_rate=b"1")),
        "bad_channels": (b"s", pcm, headers(channels=b"0")),
        "empty": (b"s", b"", headers()),
        "too_large": (b"s", np.zeros(SAMPLE_RATE * 11, "<i2").tobytes(), headers()),
        "non_finite": (b"s", np.full(100, np.nan, "<f4").tobytes(), headers(encoding=b"f32le")),
        "bad_key": (b"\xff\xfe", pcm, headers()),
        "bad_header": (b"s", pcm, headers(seq=b"x")),
    }
    with make_daemon("d") as daemon:
        producer = KafkaProducer(bootstrap_servers=kafka_broker.bootstrap, acks="all")
        for key, value, hdrs in bad.values():
            producer.send(topic, key=key, value=value, headers=hdrs)
        producer.flush()
        send_stream(kafka_broker.bootstrap, topic, "after", good, SAMPLE_RATE, CHUNK_S)  # the consumer goes on
        wait_for(lambda: daemon.chunks() >= n_chunks(good), 60, "good chunks after bad ones not processed", daemon)
        metrics = daemon.metrics()
        assert daemon.stop() == 0
    letters = read_messages(kafka_broker.bootstrap, f"{topic}.dlq")
    reasons = sorted(dict(r.headers)["dead_letter_reason"].decode() for r in letters)
    assert reasons == sorted(bad)
    assert all(dict(r.headers)["source"].decode().startswith(f"{topic}/0/") for r in letters)
    for reason in bad:
        assert metrics[f"coverwatch_dead_letters_total{{reason={reason}}}"] == 1


def test_sequence_gaps_and_repeats_are_counted_and_skipped(kafka_broker, setup):
    make_daemon, topic = setup
    audio = tune(2, 6.0)
    with make_daemon("d") as daemon:
        nxt = send_stream(kafka_broker.bootstrap, topic, "s", audio, SAMPLE_RATE, CHUNK_S, skip=frozenset({3, 4}))
        send_stream(kafka_broker.bootstrap, topic, "s", audio[: SAMPLE_RATE], SAMPLE_RATE, CHUNK_S, first_seq=5)  # repeats 5, 6
        expected = nxt - 2
        wait_for(lambda: daemon.chunks() >= expected, 60, "chunks not processed", daemon)
        wait_for(lambda: daemon.chunks("duplicate") >= 2, 20, "repeats not counted", daemon)
        assert daemon.metric("coverwatch_sequence_gaps_total") == 2
        assert daemon.chunks() == expected
        assert daemon.stop() == 0
    assert "2 chunk(s) missing before 5: restarting its window" in daemon.stderr_path.read_text()


def test_crash_restart_loses_nothing_and_keeps_event_ids(kafka_broker, setup):
    """SIGKILL mid-stream, restart: every chunk is processed and the events (ids included)
    are exactly those of an uninterrupted run; the match open at the crash, older than the
    replay horizon, keeps its start."""
    make_daemon, topic = setup
    audio = song_then_silence(0, 50.0, 12.0)
    split = 40 * int(1 / CHUNK_S)  # the crash comes 40 s into the stream, ~30 s into the match
    part1, part2 = audio[: split * int(CHUNK_S * SAMPLE_RATE)], audio[split * int(CHUNK_S * SAMPLE_RATE) :]
    group = f"crash-{uuid.uuid4().hex[:6]}"
    reference = make_daemon("ref", events=f"{topic}.ref").start()
    first = make_daemon("first", group=group, events=f"{topic}.crash").start()
    send_stream(kafka_broker.bootstrap, topic, "radio", part1, SAMPLE_RATE, CHUNK_S)
    wait_for(lambda: first.chunks() >= split, 60, "first instance did not process part 1", first)
    wait_for(lambda: events_of(kafka_broker.bootstrap, f"{topic}.crash"), 20, "no match_start before the crash", first)
    first.kill()
    send_stream(kafka_broker.bootstrap, topic, "radio", part2, SAMPLE_RATE, CHUNK_S, first_seq=split)
    with make_daemon("second", group=group, events=f"{topic}.crash") as second:
        total = n_chunks(audio)
        wait_for(lambda: second.chunks() >= total - split, 60, "restarted instance did not finish", second)
        wait_for(lambda: reference.chunks() >= total, 60, "reference did not finish", reference)
        wait_for(lambda: len(events_of(kafka_broker.bootstrap, f"{topic}.crash")) >= 2, 20, "no match_end after restart", second)
        replayed = second.chunks("replayed")
        assert second.stop() == 0
    assert reference.stop() == 0
    expected = events_of(kafka_broker.bootstrap, f"{topic}.ref")
    got = {e["event_id"]: e for e in events_of(kafka_broker.bootstrap, f"{topic}.crash")}
    assert [e["event"] for e in expected] == ["match_start", "match_end"]
    assert sorted(got) == sorted(e["event_id"] for e in expected)
    assert {(e["event"], e["match_start_s"], e["stream_time_s"]) for e in got.values()} == {
        (e["event"], e["match_start_s"], e["stream_time_s"]) for e in expected
    }
    # The restart re-read the replay horizon (25 s of 0.5-s chunks) silently, no more.
    assert 45 <= replayed <= 60


def test_two_instances_share_streams_and_one_takes_over(kafka_broker, make_topic, setup):
    """Four streams on four partitions, two instances in one group; one stops mid-run and the
    other finishes every stream: all chunks processed, every partition delivered to its end."""
    make_daemon, _ = setup
    topic = make_topic(4)
    group = f"pair-{uuid.uuid4().hex[:6]}"
    streams = {f"station-{i}": song_then_silence(i % 3, 16.0, 4.0) for i in range(4)}
    a = make_daemon("a", group=group, topic=topic).start()
    b = make_daemon("b", group=group, topic=topic).start()
    half = {sid: audio[: len(audio) // 2] for sid, audio in streams.items()}
    for sid, audio in half.items():
        send_stream(kafka_broker.bootstrap, topic, sid, audio, SAMPLE_RATE, CHUNK_S)
    sent_first = sum(n_chunks(x) for x in half.values())
    wait_for(lambda: a.chunks() + b.chunks() >= sent_first, 60, "first halves not processed", a)
    assert a.chunks() > 0 and b.chunks() > 0, "both instances should own partitions"
    assert a.stop() == 0, a.logs()  # graceful: finishes, delivers, commits, leaves the group
    for sid, audio in streams.items():
        send_stream(kafka_broker.bootstrap, topic, sid, audio[len(audio) // 2 :], SAMPLE_RATE, CHUNK_S, first_seq=n_chunks(half[sid]))
    ends = wait_for(lambda: _partition_ends(kafka_broker.bootstrap, topic, sum(n_chunks(x) for x in streams.values())), 30, "messages missing")
    store = CheckpointTopic(KafkaConfig(bootstrap_servers=kafka_broker.bootstrap, group_id=group, checkpoint_topic=f"{topic}.checkpoints"))

    def all_delivered() -> bool:
        checkpoints = store.load([TopicPartition(topic, p) for p in ends])
        return len(checkpoints) == len(ends) and all(checkpoints[TopicPartition(topic, p)]["delivered"] == end - 1 for p, end in ends.items())

    wait_for(all_delivered, 90, "the remaining instance did not process every partition to its end", b)
    assert b.stop() == 0, b.logs()
    assert "appeared" in a.stderr_path.read_text() and "checkpoints read for" in b.stderr_path.read_text()


def _partition_ends(bootstrap: str, topic: str, expected: int) -> dict[int, int] | None:
    """{partition: one past its last offset} once all `expected` messages are readable."""
    records = read_messages(bootstrap, topic)
    if len(records) < expected:
        return None
    ends: dict[int, int] = {}
    for record in records:
        ends[record.partition] = max(ends.get(record.partition, 0), record.offset + 1)
    return ends


def test_broker_outage_daemon_waits_and_loses_nothing(kafka_broker, setup):
    """The broker stops answering for a while (SIGSTOP): the daemon stays up, reconnects,
    and processes and delivers everything."""
    make_daemon, topic = setup
    audio = song_then_silence(1, 25.0, 12.0)
    split = n_chunks(audio) // 2
    step = int(CHUNK_S * SAMPLE_RATE)
    with make_daemon("d") as daemon:
        send_stream(kafka_broker.bootstrap, topic, "s", audio[: split * step], SAMPLE_RATE, CHUNK_S)
        wait_for(lambda: daemon.chunks() >= split, 60, "part 1 not processed", daemon)
        kafka_broker.pause()
        try:
            time.sleep(8)  # longer than the group's session timeout (6 s)
            assert daemon.proc.poll() is None, daemon.logs()
        finally:
            kafka_broker.resume()
        send_stream(kafka_broker.bootstrap, topic, "s", audio[split * step :], SAMPLE_RATE, CHUNK_S, first_seq=split)
        wait_for(lambda: daemon.chunks() >= n_chunks(audio), 90, "part 2 not processed after the outage", daemon)
        events = wait_for(lambda: len(e := unique_events(kafka_broker.bootstrap, f"{topic}.events")) >= 2 and e, 30, "events lost", daemon)
        assert daemon.stop() == 0
    # A send retried across the outage may land twice (the frozen broker still queues it):
    # at least once, with the same id, which is what consumers de-duplicate on.
    assert [e["event"] for e in events] == ["match_start", "match_end"]


def test_systemd_protocol_sighup_reload_and_sigterm_drain(kafka_broker, setup, shipped_model_index, tmp_path):
    """The real daemon under a fake systemd: READY once loaded, WATCHDOG pings from the loop,
    RELOADING/READY around a SIGHUP index reload (a broken index is refused and the loaded one
    kept), STOPPING and exit 0 on SIGTERM."""
    make_daemon, topic = setup
    index_dir = tmp_path / "idx"
    shutil.copytree(shipped_model_index[1], index_dir)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(0.2)
    messages: list[str] = []

    def received(prefix: str) -> bool:
        with contextlib.suppress(TimeoutError):
            while True:
                messages.append(notify.recv(4096).decode())
        return any(m.startswith(prefix) for m in messages)

    env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "1000000"}
    with make_daemon("d", index=index_dir, env=env) as daemon:
        wait_for(lambda: received("READY=1"), 10, "no READY=1", daemon)
        wait_for(lambda: received("WATCHDOG=1") and sum(m == "WATCHDOG=1" for m in messages) >= 2, 10, "no watchdog pings", daemon)
        assert daemon.metric("coverwatch_index_songs") == 3
        soundfile.write(tmp_path / "extra.wav", tune(9, 20.0), SAMPLE_RATE)
        (tmp_path / "more.csv").write_text("song_id,title,path\nextra,Extra,extra.wav\n")
        coverwatch("index", "add", index_dir, "--refs", tmp_path / "more.csv", check=True)
        messages.clear()
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: daemon.metric("coverwatch_index_songs") == 4, 30, "SIGHUP did not reload the index", daemon)
        wait_for(lambda: received("READY=1"), 10, "no READY=1 after the reload", daemon)
        assert any(m.startswith("RELOADING=1") for m in messages)
        assert daemon.metric("coverwatch_index_reloads_total{outcome=ok}") == 1
        (index_dir / "manifest.json").write_text("{broken")
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: daemon.metric("coverwatch_index_reloads_total{outcome=failed}") == 1, 30, "broken reload not refused", daemon)
        assert daemon.metric("coverwatch_index_songs") == 4  # the loaded index stays
        audio = tune(0, 8.0)
        send_stream(kafka_broker.bootstrap, topic, "s", audio, SAMPLE_RATE, CHUNK_S)
        wait_for(lambda: daemon.chunks() >= n_chunks(audio), 60, "chunks after the reloads not processed", daemon)
        messages.clear()
        assert daemon.stop(timeout=30) == 0
        assert received("STOPPING=1")
    assert "draining" in daemon.stderr_path.read_text()


@pytest.mark.skipif(not MotoS3.available(), reason="moto is not installed: this Tansu build persists only to S3")
def test_broker_restart_daemon_reconnects_and_loses_nothing(shipped_model_index, tmp_path):
    """A broker with persistent (S3) storage is stopped and started again mid-stream: the
    daemon keeps running, reconnects, and every chunk and event gets through."""
    model_dir, index_dir, decision = shipped_model_index
    audio = song_then_silence(2, 25.0, 12.0)
    split, step = n_chunks(audio) // 2, int(CHUNK_S * SAMPLE_RATE)
    with MotoS3() as s3, TansuBroker(storage_engine=s3.storage_engine, env=s3.env) as broker:
        topic = broker.create_topic(unique_topic("restart"), 1)
        config = write_config(tmp_path / "d.toml", broker.bootstrap, topic, f"{topic}.events", f"g-{uuid.uuid4().hex[:8]}", free_port(), decision)
        with Daemon(tmp_path, "d", config, model_dir, index_dir) as daemon:
            send_stream(broker.bootstrap, topic, "s", audio[: split * step], SAMPLE_RATE, CHUNK_S)
            wait_for(lambda: daemon.chunks() >= split, 60, "part 1 not processed", daemon)
            broker.restart()
            assert daemon.proc.poll() is None, daemon.logs()
            send_stream(broker.bootstrap, topic, "s", audio[split * step :], SAMPLE_RATE, CHUNK_S, first_seq=split)
            wait_for(lambda: daemon.chunks() >= n_chunks(audio), 120, "part 2 not processed after the restart", daemon)
            events = wait_for(lambda: len(e := unique_events(broker.bootstrap, f"{topic}.events")) >= 2 and e, 30, "events lost", daemon)
            assert daemon.stop() == 0
    assert [(e["event"], e["song_id"]) for e in events] == [("match_start", "song2"), ("match_end", "song2")]
