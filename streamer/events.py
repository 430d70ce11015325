"""Match events: the JSON-lines schema written to stdout, files and (later) Kafka.

    {"event": "match_start" | "match_end", "event_id": "...", "stream": "...",
     "song_id": "...", "title": "...", "score": 0.83, "stream_time_s": 61.3,
     "match_start_s": 61.3, "wall_time": "2026-11-29T01:02:03.456Z"}

`event_id` is derived from (stream, song, match start time, event kind) only, so replaying
the same audio yields the same ids and consumers can de-duplicate.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

EVENT_KINDS = ("match_start", "match_end")


def make_event_id(stream: str, song_id: str, match_start_s: float, kind: str) -> str:
    """Deterministic id: sha1 of stream, song, start time (ms) and kind, 20 hex digits."""
    key = f"{stream}\x1f{song_id}\x1f{round(match_start_s * 1000)}\x1f{kind}"
    return hashlib.sha1(key.encode()).hexdigest()[:20]


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

    def to_json(self) -> str:
        record = asdict(self)
        record["score"] = round(self.score, 4)
        record["stream_time_s"] = round(self.stream_time_s, 3)
        record["match_start_s"] = round(self.match_start_s, 3)
        return json.dumps(record, ensure_ascii=False)
