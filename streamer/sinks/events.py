"""Match events: the JSON-lines schema written to stdout, files and Kafka.

    {"schema_version": 2, "event": "match_start" | "match_end", "event_id": "...",
     "stream": "...", "song_id": "...", "title": "...", "metadata": {"artist": "...", "isrc": "..."},
     "score": 0.83, "stream_time_s": 61.3, "match_start_s": 61.3, "wall_time": "2026-11-29T01:02:03.456Z",
     "play_start_s": 44.8, "play_start_wall_time": "2026-11-29T01:01:46.956Z", "duration_s": null,
     "p_value": 2.1e-06, "reference_offset_s": 17.2}

`metadata` holds the reference's extra refs-CSV columns or file tags (artist, album, isrc,
...). `stream_time_s` is when the decision was taken and `match_start_s` when the match's
start was decided (the same on a match_start; it pairs a match_end with its start).
`play_start_s` is the estimated stream time at which the play itself began (earlier: the
decision needs seconds of evidence; streamer/decide/hysteresis.py says how it is
estimated), `play_start_wall_time` the same instant on the wall clock, and `duration_s`
(match_end only) the play's estimated length. `reference_offset_s` (match_start only) is
the point of the reference recording that the stream is playing at `stream_time_s`, from
the melody alignment (streamer/decide/alignment.py; null when the alignment is off or found
no path): a play that joined a song mid-way starts at a large offset. Version 1 events
had neither `schema_version` nor the last five keys.

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
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone

SCHEMA_VERSION = 2  # bump when a key changes meaning or goes; new keys alone keep readers working
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


def utc_now_iso(earlier_s: float = 0.0) -> str:
    """The wall clock now (or `earlier_s` seconds ago), ISO 8601 UTC with milliseconds."""
    moment = datetime.now(timezone.utc) - timedelta(seconds=earlier_s)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


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
    metadata: dict[str, str] = field(default_factory=dict)  # the reference's refs-CSV columns / tags
    play_start_s: float | None = None  # estimated stream time the play began
    play_start_wall_time: str | None = None
    duration_s: float | None = None  # match_end: the play's estimated length
    reference_offset_s: float | None = None  # match_start: where in the reference the stream is at stream_time_s

    def __post_init__(self) -> None:
        for name in ("stream", "song_id", "title"):  # what sinks encode (JSON lines, Kafka keys) must be valid UTF-8
            object.__setattr__(self, name, _scalar_text(getattr(self, name)))
        object.__setattr__(self, "metadata", {_scalar_text(str(k)): _scalar_text(str(v)) for k, v in self.metadata.items()})

    def to_json(self, ascii_only: bool = False) -> str:
        """One line of JSON: every line break a splitter could see (NEL, U+2028, U+2029 too) is
        escaped; `ascii_only` escapes all non-ASCII text too (for a stdout that is not UTF-8)."""
        record = {"schema_version": SCHEMA_VERSION, **asdict(self)}
        record["score"] = _finite_or_none(round(self.score, 4))
        for name in ("stream_time_s", "match_start_s", "play_start_s", "duration_s", "reference_offset_s"):
            value = getattr(self, name)
            record[name] = None if value is None else _finite_or_none(round(value, 3))
        # rounding to 3 significant digits turns the largest doubles into inf
        record["p_value"] = _finite_or_none(None if self.p_value is None else float(f"{self.p_value:.3g}"))
        line = json.dumps(record, ensure_ascii=ascii_only, allow_nan=False)
        return line.translate(_LINE_BREAK_ESCAPES)
