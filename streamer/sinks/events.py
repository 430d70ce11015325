"""Match events: the JSON-lines schema written to stdout, files and (later) Kafka.

    {"event": "match_start" | "match_end", "event_id": "...", "stream": "...",
     "song_id": "...", "title": "...", "score": 0.83, "stream_time_s": 61.3,
     "match_start_s": 61.3, "wall_time": "2026-11-29T01:02:03.456Z", "p_value": 2.1e-06}

`score` is the fused score that decided: embedding cosine + `[stream] align_weight` x the
alignment score (streamer/decide/alignment.py), so up to 1 + align_weight.
`p_value` is the calibrated confidence beside the raw score (index_builder/calibrate.py):
the chance that one block of non-catalog audio reaches this score; null when the index
has no stream calibration.

`event_id` is derived from (stream, song, match start time, event kind) only, so replaying
the same audio yields the same ids and consumers can de-duplicate.

Each event is exactly one line of valid UTF-8 JSON whatever its text holds: lone
surrogates become U+FFFD, line separators are escaped, and a non-finite number is null.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

EVENT_KINDS = ("match_start", "match_end")
_SURROGATES = re.compile("[\ud800-\udfff]")
# json.dumps escapes C0 controls but leaves these raw; str.splitlines (and pre-2019 JavaScript) breaks lines at them.
_LINE_BREAK_ESCAPES = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}


def make_event_id(stream: str, song_id: str, match_start_s: float, kind: str) -> str:
    """Deterministic id: sha1 of stream, song, start time (ms) and kind, 20 hex digits."""
    key = f"{stream}\x1f{song_id}\x1f{round(match_start_s * 1000)}\x1f{kind}"
    # surrogatepass: a stream named after a non-UTF-8 file name holds lone surrogates; the
    # bytes of every valid string are unchanged, so ids stay what they were.
    return hashlib.sha1(key.encode("utf-8", "surrogatepass")).hexdigest()[:20]


def _scalar_text(text: str) -> str:
    """`text` with lone surrogates (undecodable file-name bytes) replaced by U+FFFD, so it encodes as UTF-8."""
    return _SURROGATES.sub("\ufffd", text)


def _finite_or_none(value: float | None) -> float | None:
    """`value` if it is a finite number, else None: JSON has no NaN or Infinity."""
    return value if value is not None and math.isfinite(value) else None


def utc_now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class MatchEvent:
    event: str
    event_id: str
    stream: str
    song_id: str
    title: str
    score: float
    stream_time_s: float  # stream time at which the decision was taken
    match_start_s: float  # stream time at which the match started
    wall_time: str
    p_value: float | None = None  # chance that unrelated audio scores this high in a calibration block (None: index not stream-calibrated)

    def __post_init__(self) -> None:
        for name in ("stream", "song_id", "title"):  # what sinks encode (JSON lines, Kafka keys) must be valid UTF-8
            object.__setattr__(self, name, _scalar_text(getattr(self, name)))

    def to_json(self, ascii_only: bool = False) -> str:
        """One line of JSON: every line break a splitter could see (NEL, U+2028, U+2029 too) is
        escaped; `ascii_only` escapes all non-ASCII text too (for a stdout that is not UTF-8)."""
        record = asdict(self)
        record["score"] = _finite_or_none(round(self.score, 4))
        record["stream_time_s"] = _finite_or_none(round(self.stream_time_s, 3))
        record["match_start_s"] = _finite_or_none(round(self.match_start_s, 3))
        # rounding to 3 significant digits turns the largest doubles into inf
        record["p_value"] = _finite_or_none(None if self.p_value is None else float(f"{self.p_value:.3g}"))
        line = json.dumps(record, ensure_ascii=ascii_only, allow_nan=False)
        return line.translate(_LINE_BREAK_ESCAPES)
