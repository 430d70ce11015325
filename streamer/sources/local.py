"""Audio sources behind one interface: `run(handler)` until exhausted or `stop()`.

A source calls handler(stream_id, samples (N, C) float32, sample_rate) for each block.
Sources are named on the command line as `file:PATH` or `mic` / `mic:DEVICE`.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from coverwatch.streamer.config import MicConfig
from coverwatch.streamer.frontend.decode import iter_audio_blocks
from coverwatch.streamer.service.metrics import Metrics

log = logging.getLogger(__name__)

Handler = Callable[[str, np.ndarray, int], None]


class FileSource:
    """Decodes a file and feeds it in blocks of `block_s`, at real-time pace unless `fast`."""

    def __init__(self, path: Path, stream_id: str, block_s: float, fast: bool) -> None:
        self.path, self.stream_id, self.block_s, self.fast = path, stream_id, block_s, fast
        self.running = False

    def run(self, handler: Handler) -> None:
        self.running = True
        started, fed_s = time.monotonic(), 0.0
        for block, rate in iter_audio_blocks(self.path, self.block_s):
            if not self.running:
                break
            handler(self.stream_id, block, rate)
            fed_s += len(block) / rate
            if not self.fast:
                delay = started + fed_s - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
        self.running = False

    def stop(self) -> None:
        self.running = False


class MicSource:
    """Captures from a PortAudio input device through sounddevice.

    The PortAudio callback only copies the block into a bounded queue; processing happens in
    `run`. Input overflows (reported by PortAudio) and blocks dropped because the queue was
    full are counted in `overflows` and `dropped_blocks`.

    A device that stops delivering (unplugged, sound server gone: the stream turns inactive,
    or no block for `stall_s`) is marked down (`up`, metric `coverwatch_mic_up`) and
    re-opened with doubling back-off (`reconnect_attempts`, `coverwatch_mic_reconnects_total`)
    until it delivers again or `stop()`. The dead stream is left unclosed: PortAudio's JACK
    backend blocks forever closing a stream whose server has died. A failure to open the
    device at the start is not retried: it is a configuration error.
    """

    QUEUE_BLOCKS = 600  # ~1 minute at 0.1 s blocks
    STALL_S = 2.0  # seconds without a block (at least 10 blocks) before the device counts as lost
    RECONNECT_FIRST_S = 0.5  # first pause before re-opening, doubled after each failure
    RECONNECT_MAX_S = 30.0

    def __init__(self, cfg: MicConfig, stream_id: str, device: str | None = None, metrics: Metrics | None = None) -> None:
        self.cfg, self.stream_id, self.metrics = cfg, stream_id, metrics
        spec = device if device is not None else cfg.device
        self.device: int | str | None = int(spec) if spec.isdigit() else (spec or None)
        self.running = False
        self.up = False
        self.overflows = 0
        self.dropped_blocks = 0
        self.reconnect_attempts = 0
        self.stall_s = max(self.STALL_S, 10 * cfg.block_s)
        self._queue: queue.Queue[np.ndarray] = queue.Queue(maxsize=self.QUEUE_BLOCKS)
        self._lost: list[object] = []  # dead streams, kept referenced but never closed (see above)

    def _callback(self, indata: np.ndarray, frames: int, time_info: object, status: object) -> None:
        if status and getattr(status, "input_overflow", False):
            self.overflows += 1
        try:
            self._queue.put_nowait(indata.copy())
        except queue.Full:
            self.dropped_blocks += 1

    def _set_up(self, up: bool) -> None:
        self.up = up
        if self.metrics:
            self.metrics.mic_up.set(1 if up else 0)

    def _open(self, sounddevice: Any) -> Any:
        stream = sounddevice.InputStream(
            device=self.device,
            channels=self.cfg.channels,
            samplerate=self.cfg.sample_rate,
            blocksize=max(1, round(self.cfg.block_s * self.cfg.sample_rate)),
            dtype="float32",
            callback=self._callback,
        )
        stream.start()
        self._set_up(True)
        log.info("capturing from %s at %d Hz, %d channel(s)", self.device or "default device", self.cfg.sample_rate, self.cfg.channels)
        return stream

    def _pump(self, stream: Any, handler: Handler) -> None:
        """Hand blocks to `handler` until stop() or the stream is lost."""
        last_block = time.monotonic()
        while self.running:
            try:
                data = self._queue.get(timeout=0.2)
            except queue.Empty:
                if not stream.active or time.monotonic() - last_block > self.stall_s:
                    return
                continue
            last_block = time.monotonic()
            handler(self.stream_id, data, self.cfg.sample_rate)

    def _reopen(self, sounddevice: Any) -> Any | None:
        """Re-open the device with back-off until it opens (the stream) or stop() (None)."""
        backoff = self.RECONNECT_FIRST_S
        while self.running:
            deadline = time.monotonic() + backoff
            while self.running and time.monotonic() < deadline:
                time.sleep(0.1)
            if not self.running:
                return None
            self.reconnect_attempts += 1
            if self.metrics:
                self.metrics.mic_reconnects.inc()
            try:
                return self._open(sounddevice)
            except sounddevice.PortAudioError as exc:
                log.warning(
                    "microphone %s: reconnect attempt %d failed (next in %.1f s): %s",
                    self.device or "default",
                    self.reconnect_attempts,
                    min(2 * backoff, self.RECONNECT_MAX_S),
                    exc,
                )
                backoff = min(2 * backoff, self.RECONNECT_MAX_S)
        return None

    def _first_open(self) -> tuple[Any, Any]:
        """(sounddevice module, open stream), or MicError saying what to do instead."""
        try:
            import sounddevice  # imported here: needs PortAudio, which only mic users must have
        except OSError as exc:
            raise MicError(f"cannot use a microphone: the PortAudio library is missing ({exc}); install it (Debian: apt-get install libportaudio2), or serve --source file:PATH or --source kafka") from None
        try:
            return sounddevice, self._open(sounddevice)
        except (sounddevice.PortAudioError, ValueError) as exc:  # ValueError: no device of that name
            devices = [d["name"] for d in sounddevice.query_devices() if d["max_input_channels"] > 0] if _can_list(sounddevice) else []
            found = f"input devices: {', '.join(devices)}" if devices else "no input device found"
            raise MicError(
                f"cannot open microphone {self.device or '(default device)'}: {exc}; {found}. "
                "Choose one with --source mic:DEVICE ([mic] in the config), or serve --source file:PATH or --source kafka"
            ) from None

    def run(self, handler: Handler) -> None:
        self.running = True
        sounddevice, stream = self._first_open()
        while stream is not None:
            self._pump(stream, handler)
            if not self.running:
                stream.close()
                break
            self._set_up(False)
            self._lost.append(stream)
            log.error(
                "microphone %s lost: no audio for %.1f s (stream active: %s); reconnecting",
                self.device or "default",
                self.stall_s,
                stream.active,
            )
            stream = self._reopen(sounddevice)
        self._set_up(False)

    def stop(self) -> None:
        self.running = False


class MicError(OSError):
    """The microphone cannot be opened at start-up (no PortAudio, no such device, no device)."""


def _can_list(sounddevice: Any) -> bool:
    try:
        sounddevice.query_devices()
        return True
    except Exception:  # noqa: BLE001 - PortAudio without a host API answers with errors of its own
        return False


def parse_source(
    spec: str, *, mic: MicConfig, block_s: float, fast: bool, stream_id: str | None = None, metrics: Metrics | None = None
) -> FileSource | MicSource:
    """`file:PATH`, `mic` or `mic:DEVICE` -> a source. Raises ValueError for anything else."""
    if spec.startswith("file:"):
        path = Path(spec[5:])
        return FileSource(path, stream_id or path.stem, block_s, fast)
    if spec == "mic" or spec.startswith("mic:"):
        return MicSource(mic, stream_id or "mic", spec[4:] if spec.startswith("mic:") else None, metrics)
    raise ValueError(f"unknown source {spec!r}: expected file:PATH, mic or mic:DEVICE")
