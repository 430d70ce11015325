"""`coverwatch publish` (streamer/sources/publish.py) against a real Kafka-compatible broker (Tansu)."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile

from coverwatch.streamer.config import KafkaConfig, MicConfig
from coverwatch.streamer.kafka_client import producer_settings
from coverwatch.streamer.sources.local import MicSource, parse_source
from coverwatch.streamer.sources.publish import PublishError, publish
from coverwatch.streamer.sources.wire import AudioChunk, decode_chunk
from tests.broker import free_port, read_messages
from tests.conftest import coverwatch

FILE_RATE = 44100
FILE_SECONDS = 3.0
CHUNK_S = 0.1
S16_STEP = 1.0 / 32768

# kafka-python 3.0 loads its protocol schemas with the deprecated importlib.resources.read_text/open_text.
pytestmark = pytest.mark.filterwarnings("ignore:(read|open)_text is deprecated:DeprecationWarning")


@pytest.fixture()
def stereo_wav(tmp_path) -> tuple[Path, np.ndarray]:
    """3 s of 44.1 kHz stereo (two tones plus noise, peak 0.5) as 16-bit WAV, and its samples as read back."""
    t = np.arange(int(FILE_SECONDS * FILE_RATE)) / FILE_RATE
    rng = np.random.default_rng(1)
    left = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.1 * rng.uniform(-1, 1, t.size)
    right = 0.3 * np.sin(2 * np.pi * 660 * t) + 0.1 * rng.uniform(-1, 1, t.size)
    path = tmp_path / "stereo.wav"
    soundfile.write(path, np.stack([left, right], axis=1), FILE_RATE, subtype="PCM_16")
    audio, rate = soundfile.read(path, dtype="float32", always_2d=True)
    assert rate == FILE_RATE
    return path, audio


def kafka_config(bootstrap: str, **changes) -> KafkaConfig:
    return dataclasses.replace(KafkaConfig(), bootstrap_servers=bootstrap, **changes)


def decoded(messages: list) -> list[AudioChunk]:
    chunks = [decode_chunk(m.key, m.value, m.headers, max_chunk_s=10.0) for m in messages]
    return sorted(chunks, key=lambda c: c.seq)


@pytest.mark.parametrize("encoding", ["s16le", "f32le"])
def test_publish_file_round_trips_through_the_broker(kafka_broker, make_topic, stereo_wav, encoding: str) -> None:
    path, audio = stereo_wav
    topic = make_topic(partitions=2)
    source = parse_source(f"file:{path}", mic=MicConfig(), block_s=CHUNK_S, fast=True, stream_id="ignored-source-id")
    before_ms = time.time() * 1000
    stats = publish(source, "studio-a/take:1", topic, kafka_config(kafka_broker.bootstrap), encoding=encoding)
    after_ms = time.time() * 1000

    n_chunks = int(np.ceil(len(audio) / round(CHUNK_S * FILE_RATE)))
    assert (stats.chunks, stats.frames, stats.first_seq, stats.next_seq) == (n_chunks, len(audio), 0, n_chunks)
    assert stats.audio_s == pytest.approx(FILE_SECONDS)
    assert stats.bytes == len(audio) * 2 * (2 if encoding == "s16le" else 4)
    assert not stats.interrupted and stats.elapsed_s < FILE_SECONDS  # --fast: not paced at real time

    messages = read_messages(kafka_broker.bootstrap, topic, n_chunks)
    assert len(messages) == n_chunks
    assert {m.key for m in messages} == {b"studio-a/take:1"}
    assert len({m.partition for m in messages}) == 1  # keyed: one stream stays on one partition, in order
    assert [m.offset for m in messages] == list(range(n_chunks))

    chunks = decoded(messages)
    assert [c.seq for c in chunks] == list(range(n_chunks))
    assert all(c.sample_rate == FILE_RATE and c.samples.shape[1] == 2 for c in chunks)
    assert sum(len(c.samples) for c in chunks) == len(audio)

    stamps = np.array([c.capture_ts_ms for c in chunks])
    starts_s = np.cumsum([0.0] + [c.duration_s for c in chunks[:-1]])
    assert before_ms - 1 <= stamps[0] <= after_ms
    assert np.all(np.diff(stamps) > 0)
    assert np.abs(stamps - (stamps[0] + 1000 * starts_s)).max() <= 1.0  # start + audio sent so far

    received = np.concatenate([c.samples for c in chunks])
    if encoding == "f32le":
        np.testing.assert_array_equal(received, audio)
    else:
        assert np.abs(received - audio).max() <= S16_STEP


def test_start_seq_and_mono_chunks(kafka_broker, make_topic, tmp_path) -> None:
    path = tmp_path / "mono.flac"
    soundfile.write(path, 0.25 * np.sin(np.linspace(0, 300, 16000)), 16000)
    topic = make_topic()
    source = parse_source(f"file:{path}", mic=MicConfig(), block_s=0.25, fast=True)
    stats = publish(source, "mono", topic, kafka_config(kafka_broker.bootstrap), start_seq=100)
    assert (stats.chunks, stats.first_seq, stats.next_seq) == (4, 100, 104)
    chunks = decoded(read_messages(kafka_broker.bootstrap, topic, 4))
    assert [c.seq for c in chunks] == [100, 101, 102, 103]
    assert all(c.samples.shape == (4000, 1) for c in chunks)


class FakeMic(MicSource):
    """A MicSource that 'captures' blocks of zeros at real-time pace without PortAudio."""

    def __init__(self, blocks: int, block_s: float, rate: int = 16000) -> None:
        super().__init__(MicConfig(sample_rate=rate, channels=1, block_s=block_s), "mic")
        self.blocks = blocks
        self.arrivals_ms: list[float] = []

    def run(self, handler) -> None:
        frames = int(self.cfg.block_s * self.cfg.sample_rate)
        for _ in range(self.blocks):
            time.sleep(self.cfg.block_s)
            self.arrivals_ms.append(time.time() * 1000)
            handler(self.stream_id, np.zeros((frames, 1), np.float32), self.cfg.sample_rate)


def test_mic_capture_ts_is_arrival_minus_block_duration(kafka_broker, make_topic) -> None:
    topic = make_topic()
    mic = FakeMic(blocks=4, block_s=0.05)
    stats = publish(mic, "mic-1", topic, kafka_config(kafka_broker.bootstrap))
    chunks = decoded(read_messages(kafka_broker.bootstrap, topic, stats.chunks))
    assert len(chunks) == 4
    for chunk, arrival in zip(chunks, mic.arrivals_ms):
        assert arrival - 50 - 1 <= chunk.capture_ts_ms <= arrival - 50 + 20  # stamped right after arrival


class OutageSource:
    """Blocks of 0.05 s at real-time pace; the broker is paused (SIGSTOP) from block `at` for `outage_s`."""

    def __init__(self, broker, blocks: int, at: int, outage_s: float, block_s: float = 0.05, rate: int = 16000) -> None:
        self.broker, self.blocks, self.at, self.outage_s, self.block_s, self.rate = broker, blocks, at, outage_s, block_s, rate
        self.running = False

    def run(self, handler) -> None:
        self.running = True
        paused_at = None
        try:
            for i in range(self.blocks):
                if not self.running:
                    break
                if i == self.at:
                    self.broker.pause()
                    paused_at = time.monotonic()
                if paused_at is not None and time.monotonic() - paused_at >= self.outage_s:
                    self.broker.resume()
                handler("x", np.full((int(self.block_s * self.rate), 1), i / 100, np.float32), self.rate)
                time.sleep(self.block_s)
        finally:
            self.broker.resume()

    def stop(self) -> None:
        self.running = False


def test_short_outage_delays_but_loses_and_reorders_nothing(kafka_broker, make_topic) -> None:
    topic = make_topic()
    source = OutageSource(kafka_broker, blocks=24, at=4, outage_s=0.6)
    stats = publish(source, "s", topic, kafka_config(kafka_broker.bootstrap, send_timeout_s=2.0, retry_backoff_max_s=0.2))
    assert stats.chunks == 24
    chunks = decoded(read_messages(kafka_broker.bootstrap, topic, 24))
    assert [c.seq for c in chunks] == list(range(24))
    assert [round(float(c.samples[0, 0]) * 100) for c in chunks] == list(range(24))


def test_outage_longer_than_the_delivery_timeout_raises_publish_error(kafka_broker, make_topic) -> None:
    topic = make_topic()
    source = OutageSource(kafka_broker, blocks=60, at=2, outage_s=60.0)
    started = time.monotonic()
    with pytest.raises(PublishError, match="delivery failed|flush failed") as caught:
        publish(source, "s", topic, kafka_config(kafka_broker.bootstrap, send_timeout_s=0.3, retry_backoff_max_s=0.1))
    assert time.monotonic() - started < 2.5  # ~0.1 s before the outage + 3 x 0.3 s delivery timeout + slack
    assert topic in str(caught.value) and not kafka_broker.paused
    assert topic in kafka_broker.list_topics(timeout_ms=3000)  # the broker answers again for the next tests


def test_unreachable_broker_raises_publish_error_quickly(stereo_wav) -> None:
    path, _ = stereo_wav
    closed = f"127.0.0.1:{free_port()}"
    source = parse_source(f"file:{path}", mic=MicConfig(), block_s=CHUNK_S, fast=True)
    started = time.monotonic()
    with pytest.raises(PublishError) as caught:
        publish(source, "s", "audio", kafka_config(closed, send_timeout_s=0.5, retry_backoff_max_s=0.2))
    assert time.monotonic() - started < 5.0
    message = str(caught.value)
    assert closed in message and "audio" in message and "\n" not in message
    assert caught.value.__cause__ is not None


def test_chunks_longer_than_max_chunk_s_are_refused(kafka_broker, make_topic, stereo_wav) -> None:
    path, _ = stereo_wav
    source = parse_source(f"file:{path}", mic=MicConfig(), block_s=1.0, fast=True)
    with pytest.raises(PublishError, match="max_chunk_s"):
        publish(source, "s", make_topic(), kafka_config(kafka_broker.bootstrap, max_chunk_s=0.5))


def test_bad_arguments_fail_before_connecting(stereo_wav) -> None:
    path, _ = stereo_wav
    source = parse_source(f"file:{path}", mic=MicConfig(), block_s=CHUNK_S, fast=True)
    unused = kafka_config("127.0.0.1:1")
    with pytest.raises(ValueError, match="stream id"):
        publish(source, "bad id", "t", unused)
    with pytest.raises(ValueError, match="encoding"):
        publish(source, "s", "t", unused, encoding="mp3")
    with pytest.raises(ValueError, match="start_seq"):
        publish(source, "s", "t", unused, start_seq=-1)


def test_producer_settings_keep_order_under_retries() -> None:
    settings = producer_settings(kafka_config("a:1, b:2", send_timeout_s=2.0), "publish")
    assert settings["bootstrap_servers"] == ["a:1", "b:2"]
    assert settings["acks"] == "all" and settings["max_in_flight_requests_per_connection"] == 1
    assert settings["retries"] > 0 and settings["linger_ms"] <= 10
    assert settings["request_timeout_ms"] == settings["max_block_ms"] == 2000
    assert settings["delivery_timeout_ms"] >= settings["linger_ms"] + settings["request_timeout_ms"]


class ListSource:
    """Hands fixed blocks to the handler at once."""

    def __init__(self, blocks: list[np.ndarray], rate: int = 16000) -> None:
        self.blocks, self.rate = blocks, rate

    def run(self, handler) -> None:
        for block in self.blocks:
            handler("x", block, self.rate)

    def stop(self) -> None:
        pass


def test_empty_blocks_are_skipped_and_non_finite_samples_replaced(kafka_broker, make_topic) -> None:
    topic = make_topic()
    bad = np.array([[np.nan], [np.inf], [-np.inf], [0.25]], np.float32)
    source = ListSource([np.zeros((0, 1), np.float32), bad, np.full((4, 1), 0.5, np.float32)])
    stats = publish(source, "s", topic, kafka_config(kafka_broker.bootstrap), encoding="f32le")
    assert (stats.chunks, stats.frames) == (2, 8)
    chunks = decoded(read_messages(kafka_broker.bootstrap, topic, 2))  # the consumer would refuse non-finite f32
    assert [c.seq for c in chunks] == [0, 1]
    np.testing.assert_array_equal(chunks[0].samples[:, 0], [0.0, 1.0, -1.0, 0.25])


def test_publish_command_line(kafka_broker, make_topic, stereo_wav, tmp_path) -> None:
    """`coverwatch publish` as a subprocess: JSON stats on stdout, every chunk on the topic;
    an unreachable broker is one line on stderr and exit 1."""
    path, audio = stereo_wav
    topic = make_topic()
    config = tmp_path / "cw.toml"
    config.write_text(f'[kafka]\nbootstrap_servers = "{kafka_broker.bootstrap}"\n')
    proc = coverwatch("--config", config, "publish", "--source", f"file:{path}", "--stream", "box-1", "--topic", topic, "--fast", check=True)
    stats = json.loads(proc.stdout)
    assert stats["chunks"] == len(read_messages(kafka_broker.bootstrap, topic, stats["chunks"]))
    assert stats["frames"] == len(audio)
    config.write_text('[kafka]\nbootstrap_servers = "127.0.0.1:1"\nsend_timeout_s = 1.0\n')
    failed = coverwatch("--config", config, "publish", "--source", f"file:{path}", "--stream", "box-1", "--topic", topic, "--fast")
    assert failed.returncode == 1 and failed.stderr.strip().splitlines()[-1].startswith("coverwatch: error:"), failed.stderr
