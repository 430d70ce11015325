"""Match decisions per stream: hysteresis over per-song scores, one update per hop.

A song *starts* when it leads the scores at or above `start_threshold` for `start_hops`
consecutive hops. The current match *ends* when its own score stays below
`end_threshold` for `end_hops` consecutive hops, or when another song has led above
`start_threshold` for `start_hops` hops with a higher score (a switch: end, then start).
The thresholds come from the index's impostor calibration unless config overrides them.

Each decision also estimates when the play itself began and ended, for an as-run log: a
play begins `lead_s` before the first hop of the song's latest unbroken run at or above
`end_threshold` (a window must hold some seconds of the song before it scores), and ends
`lead_s` before the last hop the matched song scored at or above `end_threshold` (or where
the next song's play begins, for a switch; or when the stream ended, if still scoring).
On the demo stream this puts play starts 3.5-12 s after the true ones (the decisions come
20-25 s after) and play ends within 11 s of the true ones.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    kind: str  # "match_start" or "match_end"
    song_index: int
    score: float
    time_s: float  # stream time of the hop that decided
    started_s: float  # stream time at which this match started (== time_s for a start)
    play_start_s: float | None = None  # estimated stream time the play began
    play_end_s: float | None = None  # match_end: estimated stream time the play ended
    reference_s: float | None = None  # match_start: reference time the stream lines up with at time_s (None: unknown)


def end_decision(song: int, score: float, time_s: float, started_s: float, play_start_s: float, last_scored_s: float, lead_s: float) -> Decision:
    """The match_end of `song`'s match, its play taken to end `lead_s` before the last hop it
    scored (a song that faded kept scoring in windows still holding its last seconds, as at
    the start; 0 for a switch), and never before the play began."""
    return Decision("match_end", song, score, time_s, started_s, play_start_s, max(play_start_s, last_scored_s - lead_s))


@dataclass
class Hysteresis:
    start_threshold: float
    end_threshold: float
    start_hops: int
    end_hops: int
    history_hops: int = 8
    lead_s: float = 0.0  # a play starts this long before its first hop at or above end_threshold
    current: int | None = None
    current_started_s: float = 0.0
    current_play_start_s: float = 0.0
    last_above_s: float = 0.0  # last hop the current song scored at or above end_threshold
    rise_s: dict[int, float] = field(default_factory=dict)  # song -> first hop of its run at or above end_threshold
    streak_song: int | None = None
    streak: int = 0
    below: int = 0
    history: dict[int, deque] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.end_threshold > self.start_threshold:
            raise ValueError(f"end_threshold {self.end_threshold} above start_threshold {self.start_threshold}")

    def reset(self, time_s: float) -> list[Decision]:
        """Forget the stream's state (gap, end of stream); an open match ends now."""
        decisions = []
        if self.current is not None:
            decisions.append(self._end(self._last(self.current), time_s, self.last_above_s))
        self.current, self.streak_song, self.streak, self.below = None, None, 0, 0
        self.history.clear()
        self.rise_s.clear()
        return decisions

    def _end(self, score: float, time_s: float, play_end_s: float) -> Decision:
        return end_decision(self.current, score, time_s, self.current_started_s, self.current_play_start_s, play_end_s, self.lead_s if self.below else 0.0)

    def restore(self, song: int | None, started_s: float) -> None:
        """An open match from a checkpoint; its play start is taken to be its start decision."""
        self.current, self.current_started_s, self.below = song, started_s, 0
        self.current_play_start_s = self.last_above_s = started_s

    def remap(self, rows: dict[int, int | None]) -> None:
        """Follow an index reload: old song row -> new row (None = the song left the catalog)."""
        if self.current is not None and rows.get(self.current) is None:
            log.info("the matched song left the index: its match is dropped without an end event")
        self.current = rows.get(self.current) if self.current is not None else None
        self.streak_song = rows.get(self.streak_song) if self.streak_song is not None else None
        if self.streak_song is None:
            self.streak = 0
        self.history = {rows[song]: scores for song, scores in self.history.items() if rows.get(song) is not None}
        self.rise_s = {rows[song]: t for song, t in self.rise_s.items() if rows.get(song) is not None}

    def _last(self, song: int) -> float:
        scores = self.history.get(song)
        return float(scores[-1]) if scores else 0.0

    def _remember(self, scores: dict[int, float]) -> None:
        for song, score in scores.items():
            self.history.setdefault(song, deque(maxlen=self.history_hops)).append(score)
        for song in [s for s in self.history if s not in scores]:  # songs that left the top-k
            self.history[song].append(0.0)
            if max(self.history[song]) == 0.0:
                del self.history[song]

    def update(self, scores: dict[int, float], time_s: float, positions: dict[int, float] | None = None) -> list[Decision]:
        """One hop: `scores` maps song index -> aggregated similarity (absent = not retrieved);
        `positions` song index -> the reference time the stream lines up with now, where the
        alignment found one (a match_start carries its song's)."""
        self._remember(scores)
        for song in [s for s in self.rise_s if scores.get(s, float("-inf")) < self.end_threshold]:
            del self.rise_s[song]
        for song, score in scores.items():
            if score >= self.end_threshold:
                self.rise_s.setdefault(song, time_s)
        top, top_score = max(scores.items(), key=lambda kv: kv[1], default=(None, float("-inf")))
        current_score = scores.get(self.current, float("-inf")) if self.current is not None else float("-inf")

        challenger = top is not None and top != self.current and top_score >= self.start_threshold and top_score > current_score
        if challenger:
            self.streak = self.streak + 1 if top == self.streak_song else 1
            self.streak_song = top
        else:
            self.streak_song, self.streak = None, 0

        decisions: list[Decision] = []
        if self.current is not None:
            self.below = self.below + 1 if current_score < self.end_threshold else 0
            if not self.below:
                self.last_above_s = time_s
            switch = challenger and self.streak >= self.start_hops
            if self.below >= self.end_hops or switch:
                play_end = min(self.last_above_s, self._play_start(top, time_s)) if switch else self.last_above_s
                decisions.append(self._end(max(current_score, 0.0), time_s, play_end))
                self.current, self.below = None, 0
        if self.current is None and challenger and self.streak >= self.start_hops:
            self.current, self.current_started_s, self.below = top, time_s, 0
            self.current_play_start_s, self.last_above_s = self._play_start(top, time_s), time_s
            self.streak_song, self.streak = None, 0
            reference_s = (positions or {}).get(top)
            decisions.append(Decision("match_start", top, top_score, time_s, time_s, self.current_play_start_s, reference_s=reference_s))
        return decisions

    def _play_start(self, song: int, time_s: float) -> float:
        return max(0.0, self.rise_s.get(song, time_s) - self.lead_s)
