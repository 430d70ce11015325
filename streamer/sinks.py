"""Event sinks (`add` then `flush`) and an exception-isolating fan-out over them."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Protocol, TextIO

from streamer.events import MatchEvent

log = logging.getLogger(__name__)


class Sink(Protocol):
    def add(self, event: MatchEvent) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class StdoutSink:
    """One JSON object per line on stdout (logs go to stderr, so the two never mix)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._out = stream or sys.stdout

    def add(self, event: MatchEvent) -> None:
        self._out.write(event.to_json() + "\n")

    def flush(self) -> None:
        self._out.flush()

    def close(self) -> None:
        self.flush()


class FileSink:
    """Appends JSON lines to a file; `flush` makes them durable (fsync)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._fh = path.open("a", encoding="utf-8")

    def add(self, event: MatchEvent) -> None:
        self._fh.write(event.to_json() + "\n")

    def flush(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self.flush()
        self._fh.close()


class FanOut:
    """Delivers each event to every sink; a failing sink is logged and counted, never fatal."""

    def __init__(self, sinks: list[Sink]) -> None:
        self.sinks = sinks
        self.failures = 0

    def _each(self, action: str, *args: object) -> bool:
        ok = True
        for sink in self.sinks:
            try:
                getattr(sink, action)(*args)
            except Exception:  # a broken sink must not stop the pipeline or the other sinks
                ok = False
                self.failures += 1
                log.exception("sink %s failed on %s", type(sink).__name__, action)
        return ok

    def add(self, event: MatchEvent) -> None:
        self._each("add", event)

    def flush(self) -> bool:
        """True when every sink took every event (a Kafka sink: acknowledged by the broker)."""
        return self._each("flush")

    def close(self) -> bool:
        return self._each("close")
