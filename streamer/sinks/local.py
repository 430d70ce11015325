"""Event sinks (`add` then `flush`) and an exception-isolating fan-out over them."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, TextIO

from coverwatch.streamer.sinks.events import MatchEvent

log = logging.getLogger(__name__)


class Sink(Protocol):
    def add(self, event: MatchEvent) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class StdoutSink:
    """One JSON object per line on stdout (logs go to stderr, so the two never mix)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._out = stream or sys.stdout
        # A stdout that is not UTF-8 (LANG=C, a pipe opened as ASCII) would refuse some titles:
        # escape non-ASCII text there (still the same JSON) rather than lose the event.
        self._ascii = "utf" not in (getattr(self._out, "encoding", None) or "utf-8").lower()

    def add(self, event: MatchEvent) -> None:
        self._out.write(event.to_json(ascii_only=self._ascii) + "\n")

    def flush(self) -> None:
        self._out.flush()

    def close(self) -> None:
        self.flush()


class FileSink:
    """Appends JSON lines to a file; `flush` writes them and makes them durable (fsync).

    A write that fails (disk full, I/O error) is cut back to the last whole line, so the file
    never holds half an event, and its lines stay pending for the next flush; at most
    MAX_PENDING lines are kept (the oldest are dropped and counted), so a file that stays
    unwritable cannot grow the daemon's memory.
    """

    MAX_PENDING = 10_000  # event lines, ~4 MB

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._pending: list[bytes] = []
        self.dropped = 0

    def add(self, event: MatchEvent) -> None:
        self._pending.append((event.to_json() + "\n").encode())
        excess = len(self._pending) - self.MAX_PENDING
        if excess > 0:
            del self._pending[:excess]
            self.dropped += excess
            log.error("%s: %d event line(s) dropped, the file has not been writable for %d events", self.path, excess, self.MAX_PENDING)

    def flush(self) -> None:
        if not self._pending:
            return
        data = b"".join(self._pending)
        size = os.fstat(self._fd).st_size
        try:
            written = 0
            while written < len(data):
                written += os.write(self._fd, data[written:])
            os.fsync(self._fd)
        except OSError:
            with contextlib.suppress(OSError):  # best effort: no half line left behind
                os.ftruncate(self._fd, size)
            raise
        self._pending.clear()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            os.close(self._fd)


class FanOut:
    """Delivers each event to every sink; a failing sink is logged and counted, never fatal.

    `on_failure(sink class name, action)` is told of every failure (the daemon counts them
    in a metric)."""

    def __init__(self, sinks: list[Sink], on_failure: Callable[[str, str], None] = lambda sink, action: None) -> None:
        self.sinks = sinks
        self.failures = 0
        self.on_failure = on_failure

    def _each(self, action: str, *args: object) -> bool:
        ok = True
        for sink in self.sinks:
            try:
                getattr(sink, action)(*args)
            except Exception:  # a broken sink must not stop the pipeline or the other sinks
                ok = False
                self.failures += 1
                log.exception("sink %s failed on %s", type(sink).__name__, action)
                self.on_failure(type(sink).__name__, action)
        return ok

    def add(self, event: MatchEvent) -> None:
        self._each("add", event)

    def flush(self) -> bool:
        """True when every sink took every event (a Kafka sink: acknowledged by the broker)."""
        return self._each("flush")

    def close(self) -> bool:
        return self._each("close")
