"""The microphone path for real: PortAudio/sounddevice capturing from a JACK server.

No sound card is needed: a module-scoped fixture starts `jackd` with the dummy driver under a
unique server name (so parallel runs don't clash), waits until it answers, and only then
(re)initialises PortAudio so that its JACK host API sees the server. The dummy driver's
capture ports are silent; to get a known signal into the microphone, a sounddevice
OutputStream on the same JACK device plays it and its output port is wired to MicSource's
input port with `jack_connect`.

Skipped, with the reason, only where no JACK server can be started (jackd missing or failing,
or a PortAudio without JACK support).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coverwatch.streamer.config import Config, IndexBuildConfig, MicConfig, replace_section
from coverwatch.streamer.sources.local import MicSource

JACK_RATE = 22050  # the daemon's own rate, so PortAudio opens the streams without resampling
JACK_PERIOD = 1024
JACK_HOSTAPI = "JACK Audio Connection Kit"
JACK_TOOLS = ("jackd", "jack_lsp", "jack_connect")
START_TIMEOUT_S = 10.0
TOOL_TIMEOUT_S = 5.0


# --------------------------------------------------------------------------- the JACK server


@dataclass
class JackServer:
    """A running `jackd -d dummy` and the PortAudio device that reaches it."""

    name: str
    proc: subprocess.Popen
    log_path: Path
    env: dict[str, str]
    sd: Any = None  # the sounddevice module, initialised while this server is up
    device_index: int = -1
    device_name: str = ""

    def tool(self, *args: str) -> subprocess.CompletedProcess:
        """Run a JACK command-line tool against this server (`-s NAME`); bounded by TOOL_TIMEOUT_S."""
        command = [args[0], "-s", self.name, *args[1:]]
        return subprocess.run(command, check=False, env=self.env, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S)

    def ports(self) -> dict[str, set[str]]:
        """{port name: properties} from `jack_lsp -p` ("input" ports consume audio, "output" ports produce it)."""
        result = self.tool("jack_lsp", "-p")
        ports: dict[str, set[str]] = {}
        current = None
        for line in result.stdout.splitlines():
            if line.startswith(("\t", " ")) and current and "properties:" in line:
                ports[current] = {p for p in line.split(":", 1)[1].strip().split(",") if p}
            elif line.strip():
                current = line.strip()
                ports[current] = set()
        return ports

    def client_ports(self, direction: str) -> list[str]:
        """Ports of non-hardware clients (e.g. PortAudio's) in `direction` ("input" or "output")."""
        return sorted(p for p, props in self.ports().items() if direction in props and "physical" not in props)

    def connect(self, source: str, destination: str) -> None:
        result = self.tool("jack_connect", source, destination)
        assert result.returncode == 0, f"jack_connect {source} {destination} failed: {result.stderr.strip()}"

    def log_tail(self, chars: int = 800) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:].strip()
        except OSError:
            return "<no log>"


def _stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def _wait_until_ready(server: JackServer) -> str | None:
    """None once `jack_lsp` lists the dummy driver's ports; otherwise why the server is not up."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            return f"jackd exited with status {server.proc.returncode}: {server.log_tail()}"
        try:
            result = server.tool("jack_lsp")
        except subprocess.TimeoutExpired:
            result = None
        if result is not None and result.returncode == 0 and "system:capture_1" in result.stdout:
            return None
        time.sleep(0.05)
    return f"jackd did not answer jack_lsp within {START_TIMEOUT_S:.0f} s: {server.log_tail()}"


@pytest.fixture(scope="module")
def jack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JackServer]:
    """A dummy-driver JACK server for this module, with sounddevice (re)initialised against it."""
    missing = [tool for tool in JACK_TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"no JACK server can be started: {', '.join(missing)} not on PATH (Debian: apt-get install jackd2)")
    name = f"coverwatch-test-{os.getpid()}-{secrets.token_hex(3)}"
    # JACK_NO_START_SERVER: libjack must never auto-start some other server if ours is gone.
    env = {**os.environ, "JACK_DEFAULT_SERVER": name, "JACK_NO_START_SERVER": "1"}
    log_path = tmp_path_factory.mktemp("jackd") / "jackd.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            ["jackd", "-n", name, "--no-realtime", "-d", "dummy", "-r", str(JACK_RATE), "-p", str(JACK_PERIOD)],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, env=env,
        )
    server = JackServer(name, proc, log_path, env)
    with pytest.MonkeyPatch.context() as mp:
        try:
            problem = _wait_until_ready(server)
            if problem:
                pytest.skip(f"no JACK server can be started: {problem}")
            # libjack reads these in PortAudio's process when PortAudio opens its JACK client.
            mp.setenv("JACK_DEFAULT_SERVER", name)
            mp.setenv("JACK_NO_START_SERVER", "1")
            already_imported = "sounddevice" in sys.modules
            import sounddevice as sd  # PortAudio enumerates host APIs and devices at initialisation

            if already_imported:  # initialised before the server existed: enumerate again
                sd._terminate()
                sd._initialize()
            server.sd = sd
            for device in sd.query_devices():
                if sd.query_hostapis(device["hostapi"])["name"] == JACK_HOSTAPI and device["max_input_channels"] > 0:
                    server.device_index, server.device_name = device["index"], device["name"]
                    break
            else:
                apis = [api["name"] for api in sd.query_hostapis()]
                pytest.skip(f"no JACK server can be used: PortAudio lists no {JACK_HOSTAPI!r} input device (host APIs: {apis})")
            yield server
        finally:
            try:
                if server.sd is not None:
                    server.sd._terminate()  # close PortAudio's JACK client (and any stream left open) first
            finally:
                _stop_process(proc)
                if server.sd is not None:
                    mp.undo()
                    server.sd._initialize()  # leave sounddevice usable for later modules


# --------------------------------------------------------------------------- helpers


@dataclass
class Blocks:
    """A MicSource handler that keeps every block with its arrival time."""

    items: list[tuple[float, str, np.ndarray, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, stream_id: str, samples: np.ndarray, sample_rate: int) -> None:
        with self.lock:
            self.items.append((time.monotonic(), stream_id, samples, sample_rate))

    def __len__(self) -> int:
        with self.lock:
            return len(self.items)

    def audio(self, start: int = 0) -> np.ndarray:
        with self.lock:
            return np.concatenate([samples for _, _, samples, _ in self.items[start:]])


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.02)


def start_source(source: MicSource, handler: Blocks) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def target() -> None:
        try:
            source.run(handler)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    thread = threading.Thread(target=target, name="mic-source", daemon=True)
    thread.start()
    return thread, errors


def stop_source(source: MicSource, thread: threading.Thread, errors: list[BaseException]) -> float:
    """Stop the source, wait (bounded) for run() to return; seconds it took."""
    asked = time.monotonic()
    source.stop()
    thread.join(timeout=5)
    took = time.monotonic() - asked
    assert not thread.is_alive(), "MicSource.run did not return within 5 s of stop()"
    assert not errors, f"MicSource.run raised {errors[0]!r}"
    return took


class Player:
    """An OutputStream callback playing `signal` in a loop (float32, mono)."""

    def __init__(self, signal: np.ndarray) -> None:
        self.signal, self.position = signal, 0

    def __call__(self, outdata: np.ndarray, frames: int, time_info: object, status: object) -> None:
        idx = (self.position + np.arange(frames)) % len(self.signal)
        outdata[:, 0] = self.signal[idx]
        self.position += frames


def sine(freq: int, amplitude: float) -> np.ndarray:
    """One second of a sine; an integer frequency makes it loop seamlessly."""
    return (amplitude * np.sin(2 * np.pi * freq * np.arange(JACK_RATE) / JACK_RATE)).astype(np.float32)


def play_into(jack: JackServer, mic_port: str, signal: np.ndarray) -> Any:
    """Open an OutputStream on the JACK device and wire its port to `mic_port`; returns the open stream."""
    before = set(jack.client_ports("output"))
    stream = jack.sd.OutputStream(device=jack.device_index, channels=1, samplerate=JACK_RATE, dtype="float32", callback=Player(signal))
    stream.start()
    try:
        new = sorted(set(jack.client_ports("output")) - before)
        assert len(new) == 1, f"expected one new PortAudio output port, found {new}; ports: {jack.ports()}"
        jack.connect(new[0], mic_port)
    except BaseException:
        stream.close()
        raise
    return stream


def mic_input_port(jack: JackServer) -> str:
    ports = jack.client_ports("input")
    assert len(ports) == 1, f"expected MicSource's single JACK input port, found {ports}; ports: {jack.ports()}"
    return ports[0]


# --------------------------------------------------------------------------- tests


def test_mic_source_captures_real_blocks_from_jack(jack: JackServer) -> None:
    """MicSource opens the JACK device through PortAudio (device given as an index in MicConfig)
    and delivers (block, channels) float32 blocks at the configured rate, as fast as the server
    clock produces them, and stop() makes run() return promptly."""
    cfg = MicConfig(device=str(jack.device_index), sample_rate=JACK_RATE, channels=2, block_s=0.1)
    source = MicSource(cfg, "room")
    blocks = Blocks()
    started = time.monotonic()
    thread, errors = start_source(source, blocks)
    wait_for(lambda: len(blocks) > 0 or not thread.is_alive(), 5.0, "the first captured block")
    time.sleep(max(0.0, started + 2.0 - time.monotonic()))
    wall_s = time.monotonic() - started
    stop_s = stop_source(source, thread, errors)

    block_frames = round(cfg.block_s * cfg.sample_rate)
    items = list(blocks.items)
    assert len(items) >= 5, f"only {len(items)} blocks in {wall_s:.2f} s"
    for _, stream_id, samples, rate in items:
        assert (stream_id, rate) == ("room", JACK_RATE)
        assert samples.dtype == np.float32 and samples.shape == (block_frames, 2)
    audio_s = len(items) * cfg.block_s
    assert 0.5 * wall_s <= audio_s <= wall_s + 0.2, f"{audio_s:.2f} s of audio in {wall_s:.2f} s of wall time"
    # Steady state: audio between the first and the last block against the time between their arrivals.
    span_s = items[-1][0] - items[0][0]
    assert span_s > 0.5 and 0.7 <= (len(items) - 1) * cfg.block_s / span_s <= 1.3, f"{len(items) - 1} blocks in {span_s:.2f} s"
    assert stop_s < 1.5, f"run() took {stop_s:.2f} s to return after stop()"
    assert source.dropped_blocks == 0
    assert not source.running


def test_tone_played_into_the_capture_port_reaches_the_handler(jack: JackServer) -> None:
    """A 440 Hz sine played by a second PortAudio stream and wired to MicSource's JACK input port
    arrives in the handler unaltered (pitch and level), while what came before the connection is
    the dummy driver's silence. MicSource's device is given by name here."""
    cfg = MicConfig(device="", sample_rate=JACK_RATE, channels=1, block_s=0.05)
    source = MicSource(cfg, "mic", device=f"{jack.device_name} {JACK_HOSTAPI}")
    blocks = Blocks()
    thread, errors = start_source(source, blocks)
    try:
        wait_for(lambda: len(blocks) >= 2 or not thread.is_alive(), 5.0, "captured blocks")
        port = mic_input_port(jack)
        connected_at = len(blocks)  # every block handled so far was captured before the connection

        def tone_for_0_6_s() -> bool:
            after = blocks.audio(connected_at) if len(blocks) > connected_at else np.zeros((0, 1), np.float32)
            loud = np.flatnonzero(np.abs(after[:, 0]) > 0.05)
            return (loud.size > 0 and len(after) - loud[0] >= 0.6 * JACK_RATE) or not thread.is_alive()

        with play_into(jack, port, sine(440, 0.5)):
            wait_for(tone_for_0_6_s, 5.0, "0.6 s of the tone after the connection")
    finally:
        stop_source(source, thread, errors)

    before, after = np.concatenate([b for _, _, b, _ in blocks.items[:connected_at]]), blocks.audio(connected_at)
    assert before.shape[1] == 1 and np.abs(before).max() == 0.0, "the dummy driver's capture should be silent"
    loud = np.flatnonzero(np.abs(after[:, 0]) > 0.05)
    assert loud.size, f"no tone in {len(after) / JACK_RATE:.2f} s captured after connecting {port}"
    onset_s = loud[0] / JACK_RATE
    assert onset_s < 2.0, f"tone arrived {onset_s:.2f} s after the connection was being made"
    tone = after[loud[0] + JACK_RATE // 20 :, 0][: JACK_RATE // 2]  # 0.5 s, clear of the onset
    assert len(tone) == JACK_RATE // 2
    rms = float(np.sqrt(np.mean(tone.astype(np.float64) ** 2)))
    assert 0.3 < rms < 0.4, f"RMS {rms:.3f}, expected 0.5/sqrt(2)"
    spectrum = np.abs(np.fft.rfft(tone * np.hanning(len(tone))))
    peak_hz = float(np.fft.rfftfreq(len(tone), 1 / JACK_RATE)[spectrum.argmax()])
    assert abs(peak_hz - 440.0) <= 4.0, f"dominant frequency {peak_hz:.1f} Hz"


def test_daemon_serves_the_jack_microphone(jack: JackServer, random_model_dir: Path, refs_csv: Path, tmp_path: Path) -> None:
    """`Server(cfg, "mic:<index>")` captures from JACK, and a melody played into its input port
    is resampled, analysed and embedded (non-silent windows reach decisions); stopping the
    source drains the daemon to ExitCode.OK. run() is called on the main thread because it
    installs signal handlers; a helper thread wires the player in and stops the source."""
    from coverwatch.index_builder.build import build_index
    from coverwatch.index_builder.refs import read_refs
    from coverwatch.streamer.embed.embedder import Embedder
    from coverwatch.streamer.service.daemon import ExitCode, Server
    from tests.conftest import melody

    index_dir = tmp_path / "index"
    build_index(read_refs(refs_csv), index_dir, Embedder(random_model_dir, threads=1), IndexBuildConfig())
    cfg = Config()
    cfg = replace_section(cfg, "model", path=str(random_model_dir), threads=1)
    cfg = replace_section(cfg, "index", path=str(index_dir))
    cfg = replace_section(cfg, "mic", sample_rate=JACK_RATE, channels=1, block_s=0.1)
    cfg = replace_section(cfg, "stream", windows_s=[3.0], hop_s=0.5)  # the first decision comes after 3 s of audio
    cfg = replace_section(cfg, "sinks", stdout=False)
    server = Server(cfg, f"mic:{jack.device_index}", fast=False, stream_id="mic")
    assert isinstance(server.source, MicSource)

    problems: list[BaseException] = []
    streams: dict = {}

    def feed_then_stop() -> None:
        try:
            wait_for(lambda: server.monitor.counts["chunks"] > 0, 5.0, "the daemon's first chunk")
            streams.update(server.monitor.streams)  # end_stream() drops the state when run() ends
            with play_into(jack, mic_input_port(jack), melody(0, 10.0)):
                wait_for(lambda: server.monitor.counts["decisions"] >= 1, 8.0, "a decision")
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            problems.append(exc)
        finally:
            server.source.stop()

    helper = threading.Thread(target=feed_then_stop, name="feed-then-stop", daemon=True)
    helper.start()
    try:
        code = server.run()
    finally:
        server.source.stop()
        helper.join(timeout=10)
    assert not helper.is_alive()
    if problems:
        raise problems[0]

    counts = server.monitor.counts
    assert code == ExitCode.OK
    assert counts["chunks"] > 0 and counts["bad_chunks"] == 0
    assert server.audio_s > 0
    assert server.audio_s == pytest.approx(counts["chunks"] * cfg.mic.block_s)
    assert counts["decisions"] >= 1
    # The played melody, not the dummy driver's silence, filled the windows, so they were embedded.
    assert streams["mic"].counts["silent_windows"] == 0
    assert server.monitor.times.seconds.get("embed", 0.0) > 0.0, f"nothing embedded; stage times {dict(server.monitor.times.seconds)}"
    assert server.source.dropped_blocks == 0
