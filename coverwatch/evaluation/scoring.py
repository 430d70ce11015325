"""Stream-level scoring of match events against a ground-truth timeline (pure functions).

A play (song_id, start_s, end_s) is *caught* when a match_start for that song is decided
between its start and `grace_s` after its end (the decision lags the audio by up to one
window). A match_start that falls in no play of its song is a *false match*.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Play:
    song_id: str
    start_s: float
    end_s: float


@dataclass(frozen=True)
class StreamScore:
    caught: list[tuple[Play, float]]  # (play, detection latency in s from play start)
    missed: list[Play]
    false_matches: list[dict]  # the offending match_start events

    @property
    def recall(self) -> float:
        total = len(self.caught) + len(self.missed)
        return len(self.caught) / total if total else 1.0


def score_stream(events: list[dict], plays: list[Play], grace_s: float = 10.0) -> StreamScore:
    """Match `match_start` events (dicts with song_id, stream_time_s) to plays."""
    starts = [e for e in events if e.get("event") == "match_start"]
    used: set[int] = set()
    caught, missed = [], []
    for play in plays:
        hit = next(
            (
                i
                for i, e in enumerate(starts)
                if i not in used and e["song_id"] == play.song_id and play.start_s <= e["stream_time_s"] <= play.end_s + grace_s
            ),
            None,
        )
        if hit is None:
            missed.append(play)
        else:
            used.add(hit)
            caught.append((play, starts[hit]["stream_time_s"] - play.start_s))
    # A second start inside a play that was already caught is a re-detection, not a false match.
    false_matches = [
        e
        for i, e in enumerate(starts)
        if i not in used and not any(p.song_id == e["song_id"] and p.start_s <= e["stream_time_s"] <= p.end_s + grace_s for p in plays)
    ]
    return StreamScore(caught, missed, false_matches)
