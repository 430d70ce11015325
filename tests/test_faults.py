"""Resource faults: a full disk under the event file, the metrics port already taken, a broker
that stops answering the event producer. The daemon keeps serving (or fails its start with a
clear message), counts what failed, and its memory stays bounded.

The disk is made full for real: the file sink writes to /dev/full (every write fails with
ENOSPC), or, where the file must recover, a file-size limit (RLIMIT_FSIZE) cuts a write
half-way as a filling disk does.
"""

from __future__ import annotations

import json
import os
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import soundfile

from coverwatch.streamer.frontend.audio import SAMPLE_RATE
from coverwatch.streamer.sinks.events import MatchEvent, make_event_id
from coverwatch.streamer.sinks.local import FanOut, FileSink
from tests.broker import read_messages
from tests.conftest import coverwatch, melody
from tests.daemon import Daemon, free_port, send_stream, wait_for, write_config

CHUNK_S = 0.5
# Any leading song starts a match: a random model's scores are all far above these.
EAGER_DECISION = "start_threshold = -0.5\nend_threshold = -0.9\n"


def event(i: int) -> MatchEvent:
    return MatchEvent(
        "match_start",
        make_event_id("s", f"song{i}", float(i), "match_start"),
        "s",
        f"song{i}",
        f"Song {i}",
        0.9,
        float(i),
        float(i),
        "2026-01-01T00:00:00.000Z",
    )


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def n_chunks(audio) -> int:
    return -(-len(audio) // int(CHUNK_S * SAMPLE_RATE))


@pytest.fixture()
def fsize_limit():
    """set(limit_bytes) lowers the soft file-size limit of this process; restored afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    yield lambda limit: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, previous)


def test_file_sink_on_a_filling_disk_keeps_whole_lines_and_catches_up(tmp_path, fsize_limit):
    """Writes that hit the limit half-way are cut back to the last whole line and retried on
    the next flush; once there is room again every event is in the file exactly once."""
    path = tmp_path / "events.jsonl"
    sink = FileSink(path)
    failures: list[tuple[str, str]] = []
    fan = FanOut([sink], on_failure=lambda name, action: failures.append((name, action)))
    line_bytes = len(event(0).to_json()) + 1
    fsize_limit(int(2.5 * line_bytes))  # room for two and a half lines
    for i in range(5):
        fan.add(event(i))
        fan.flush()
    assert failures == [("FileSink", "flush")] * 3
    lines = path.read_text().splitlines(keepends=True)
    assert [json.loads(line)["song_id"] for line in lines] == ["song0", "song1"]
    assert all(line.endswith("\n") for line in lines)  # the half line the limit let through was cut back
    fsize_limit(resource.RLIM_INFINITY)
    assert fan.flush()
    assert [json.loads(line)["song_id"] for line in path.read_text().splitlines()] == [f"song{i}" for i in range(5)]
    fan.close()


def test_file_sink_pending_lines_are_bounded(tmp_path, monkeypatch):
    """An event file that stays unwritable keeps at most MAX_PENDING lines in memory."""
    monkeypatch.setattr(FileSink, "MAX_PENDING", 3)
    sink = FileSink(Path("/dev/full"))
    fan = FanOut([sink])
    for i in range(10):
        fan.add(event(i))
        assert not fan.flush()
    assert sink.dropped == 7 and len(sink._pending) == 3
    assert not fan.close()


def test_disk_full_event_file_daemon_keeps_serving(kafka_broker, make_topic, random_model_dir, index_dir, tmp_path):
    """[sinks] file = /dev/full: every flush of the file sink fails with ENOSPC. The daemon
    keeps processing, counts the failures in coverwatch_sink_failures_total, and the same
    events still reach stdout and the Kafka events topic; SIGTERM still exits 0."""
    topic = make_topic(1)
    config = write_config(
        tmp_path / "d.toml", kafka_broker.bootstrap, topic, f"{topic}.events", f"g-{uuid.uuid4().hex[:8]}", free_port(), EAGER_DECISION
    )
    config.write_text(config.read_text().replace("[sinks]\n", '[sinks]\nfile = "/dev/full"\n'))
    audio = melody(1, 30.0)
    with Daemon(tmp_path, "d", config, random_model_dir, index_dir) as daemon:
        send_stream(kafka_broker.bootstrap, topic, "s", audio, SAMPLE_RATE, CHUNK_S)
        wait_for(lambda: daemon.chunks() >= n_chunks(audio), 90, "chunks not processed", daemon)
        wait_for(
            lambda: daemon.metric("coverwatch_sink_failures_total{action=flush,sink=FileSink}") >= 1,
            30,
            "file sink failure not counted",
            daemon,
        )
        assert daemon.metric("coverwatch_match_events_total{event=match_start}") >= 1
        assert daemon.proc.poll() is None
        assert daemon.stop() == 0
    stdout_events = [json.loads(line) for line in daemon.stdout_path.read_text().splitlines()]
    kafka_events = {json.loads(r.value)["event_id"] for r in read_messages(kafka_broker.bootstrap, f"{topic}.events")}
    assert stdout_events and {e["event_id"] for e in stdout_events} <= kafka_events
    assert "No space left on device" in daemon.stderr_path.read_text()


def test_metrics_port_taken_fails_the_start_clearly(random_model_dir, index_dir, tmp_path):
    """Another process listens on the metrics port: `serve` exits 1 at once with one line
    naming the address, not a traceback."""
    soundfile.write(tmp_path / "a.wav", melody(0, 5.0), SAMPLE_RATE)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        proc = coverwatch(
            "serve",
            "--model",
            random_model_dir,
            "--index",
            index_dir,
            "--source",
            f"file:{tmp_path / 'a.wav'}",
            "--metrics-port",
            port,
            timeout=120,
        )
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("coverwatch: error: ") and f"cannot serve metrics on 127.0.0.1:{port}: Address already in use" in last
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""  # nothing was processed


def test_stalled_broker_holds_back_events_without_memory_growth(kafka_broker, make_topic, random_model_dir, index_dir, tmp_path):
    """The broker stops answering (SIGSTOP) while events are due: the daemon's event sink keeps
    them pending and stops consuming (back-pressure), its RSS stays flat over the stall, and
    after the broker resumes every event is delivered."""
    topic = make_topic(1)
    config = write_config(
        tmp_path / "d.toml", kafka_broker.bootstrap, topic, f"{topic}.events", f"g-{uuid.uuid4().hex[:8]}", free_port(), EAGER_DECISION
    )
    # 30 s of silence first, so the first event falls due after the broker is paused however
    # fast the daemon works through its prefetched chunks (an event delivered before the
    # pause would leave nothing to hold back).
    audio = np.concatenate([np.zeros(30 * SAMPLE_RATE, np.float32), melody(2, 90.0)])
    with Daemon(tmp_path, "d", config, random_model_dir, index_dir) as daemon:
        send_stream(kafka_broker.bootstrap, topic, "s", audio, SAMPLE_RATE, CHUNK_S)
        wait_for(lambda: daemon.chunks() >= 1, 60, "no chunk processed", daemon)
        kafka_broker.pause()
        try:
            wait_for(lambda: daemon.metric("coverwatch_events_pending") >= 1, 90, "no event fell due during the stall", daemon)
            time.sleep(3)  # in-flight requests time out; the loop is now waiting on the broker
            stalled_at, rss_before = daemon.chunks(), rss_mb(daemon.proc.pid)
            samples = []
            for _ in range(12):
                time.sleep(1)
                samples.append(rss_mb(daemon.proc.pid))
            assert daemon.proc.poll() is None, daemon.logs()
            assert daemon.chunks() == stalled_at < n_chunks(audio), "the daemon kept consuming during the stall"
            assert max(samples) - rss_before < 20, f"RSS grew from {rss_before:.0f} to {max(samples):.0f} MiB while stalled"
        finally:
            kafka_broker.resume()
        wait_for(lambda: daemon.chunks() >= n_chunks(audio), 120, "not all chunks processed after the stall", daemon)
        started = daemon.metric("coverwatch_match_events_total{event=match_start}")
        wait_for(lambda: daemon.metric("coverwatch_events_pending") == 0, 60, "events still pending", daemon)
        assert daemon.stop() == 0
    delivered = {json.loads(r.value)["event_id"] for r in read_messages(kafka_broker.bootstrap, f"{topic}.events")}
    stdout_ids = {json.loads(line)["event_id"] for line in daemon.stdout_path.read_text().splitlines()}
    assert started >= 1 and stdout_ids and stdout_ids <= delivered


def test_microphone_lost_is_marked_down_and_reconnected(random_model_dir, index_dir, tmp_path):
    """`serve --source mic` capturing from a JACK server (dummy driver) that is then killed:
    the daemon stays up, coverwatch_mic_up drops to 0 and it keeps trying to re-open the
    device (coverwatch_mic_reconnects_total grows), also after the server is back.

    What this backend cannot do: PortAudio's JACK host API keeps its dead client, so every
    re-open fails ("Insufficient memory", -9992) even once jackd is back, and closing the
    dead stream blocks forever (tried: close, abort, Pa_Terminate). Capture resumes only in
    a new process: under systemd, the watchdog (no pings while no audio arrives) restarts
    the daemon. The test therefore ends with SIGKILL."""
    from tests.test_mic import JACK_HOSTAPI, JACK_RATE, JackServer, _stop_process, _wait_until_ready

    if not all(shutil.which(tool) for tool in ("jackd", "jack_lsp")):
        pytest.skip("jackd is not installed (Debian: apt-get install jackd2)")
    name = f"coverwatch-lost-{os.getpid()}-{secrets.token_hex(3)}"
    env = {**os.environ, "JACK_DEFAULT_SERVER": name, "JACK_NO_START_SERVER": "1"}

    def start_jackd() -> JackServer:
        log = tmp_path / f"jackd-{secrets.token_hex(2)}.log"
        with log.open("wb") as fh:
            proc = subprocess.Popen(
                ["jackd", "-n", name, "--no-realtime", "-d", "dummy", "-r", str(JACK_RATE), "-p", "1024"],
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=env,
            )
        server = JackServer(name, proc, log, env)
        problem = _wait_until_ready(server)
        if problem:
            _stop_process(proc)
            pytest.skip(f"no JACK server can be started: {problem}")
        return server

    config = tmp_path / "mic.toml"
    config.write_text(
        f"""[mic]
sample_rate = {JACK_RATE}
channels = 1
block_s = 0.1
[stream]
windows_s = [3.0]
hop_s = 0.5
[sinks]
stdout = false
[metrics]
port = {free_port()}
"""
    )
    server = start_jackd()
    daemon = Daemon(tmp_path, "mic", config, random_model_dir, index_dir, env)
    daemon.args[daemon.args.index("kafka")] = f"mic:system {JACK_HOSTAPI}"
    try:
        daemon.start()
        wait_for(lambda: daemon.metric("coverwatch_mic_up") == 1 and daemon.chunks() >= 10, 30, "no audio from the JACK microphone", daemon)
        server.proc.kill()
        server.proc.wait(timeout=10)
        lost_at = time.monotonic()
        wait_for(lambda: daemon.metric("coverwatch_mic_up") == 0, 15, "the lost microphone is not marked down", daemon)
        detected_s = time.monotonic() - lost_at
        wait_for(lambda: daemon.metric("coverwatch_mic_reconnects_total") >= 2, 15, "no reconnect attempts", daemon)
        assert "microphone system JACK Audio Connection Kit lost" in daemon.stderr_path.read_text()
        chunks = daemon.chunks()
        server = start_jackd()
        attempts = daemon.metric("coverwatch_mic_reconnects_total")
        wait_for(lambda: daemon.metric("coverwatch_mic_reconnects_total") > attempts, 30, "reconnect attempts stopped", daemon)
        assert daemon.proc.poll() is None
        assert detected_s < 5.0
        assert daemon.chunks() >= chunks
    finally:
        daemon.close()  # SIGKILL (see the docstring)
        _stop_process(server.proc)
