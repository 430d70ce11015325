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

import numpy as np

from streamer.config import MicConfig
from streamer.decode import iter_audio_blocks

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
    """

    QUEUE_BLOCKS = 600  # ~1 minute at 0.1 s blocks

    def __init__(self, cfg: MicConfig, stream_id: str, device: str | None = None) -> None:
        self.cfg, self.stream_id = cfg, stream_id
        spec = device if device is not None else cfg.device
        self.device: int | str | None = int(spec) if spec.isdigit() else (spec or None)
        self.running = False
        self.overflows = 0
        self.dropped_blocks = 0
        self._queue: queue.Queue[np.ndarray] = queue.Queue(maxsize=self.QUEUE_BLOCKS)

    def _callback(self, indata: np.ndarray, frames: int, time_info: object, status: object) -> None:
        if status and getattr(status, "input_overflow", False):
            self.overflows += 1
        try:
            self._queue.put_nowait(indata.copy())
        except queue.Full:
            self.dropped_blocks += 1

    def run(self, handler: Handler) -> None:
        import sounddevice  # imported here: needs PortAudio, which only mic users must have

        self.running = True
        block = max(1, int(round(self.cfg.block_s * self.cfg.sample_rate)))
        with sounddevice.InputStream(
            device=self.device,
            channels=self.cfg.channels,
            samplerate=self.cfg.sample_rate,
            blocksize=block,
            dtype="float32",
            callback=self._callback,
        ):
            log.info("capturing from %s at %d Hz, %d channel(s)", self.device or "default device", self.cfg.sample_rate, self.cfg.channels)
            while self.running:
                try:
                    data = self._queue.get(timeout=0.2)
                except queue.Empty:
                    continue
                handler(self.stream_id, data, self.cfg.sample_rate)

    def stop(self) -> None:
        self.running = False


def parse_source(spec: str, *, mic: MicConfig, block_s: float, fast: bool, stream_id: str | None = None) -> FileSource | MicSource:
    """`file:PATH`, `mic` or `mic:DEVICE` -> a source. Raises ValueError for anything else."""
    if spec.startswith("file:"):
        path = Path(spec[5:])
        return FileSource(path, stream_id or path.stem, block_s, fast)
    if spec == "mic" or spec.startswith("mic:"):
        return MicSource(mic, stream_id or "mic", spec[4:] if spec.startswith("mic:") else None)
    raise ValueError(f"unknown source {spec!r}: expected file:PATH, mic or mic:DEVICE")
