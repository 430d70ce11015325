"""Match decisions per stream: hysteresis over per-song scores, one update per hop.

A song *starts* when it leads the scores at or above `start_threshold` for `start_hops`
consecutive hops. The current match *ends* when its own score stays below
`end_threshold` for `end_hops` consecutive hops, or when another song has led above
`start_threshold` for `start_hops` hops with a higher score (a switch: end, then start).
The thresholds come from the index's impostor calibration unless config overrides them.
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


@dataclass
class Hysteresis:
    start_threshold: float
    end_threshold: float
    start_hops: int
    end_hops: int
    history_hops: int = 8
    current: int | None = None
    current_started_s: float = 0.0
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
            decisions.append(Decision("match_end", self.current, self._last(self.current), time_s, self.current_started_s))
        self.current, self.streak_song, self.streak, self.below = None, None, 0, 0
        self.history.clear()
        return decisions

    def remap(self, rows: dict[int, int | None]) -> None:
        """Follow an index reload: old song row -> new row (None = the song left the catalog)."""
        if self.current is not None and rows.get(self.current) is None:
            log.info("the matched song left the index: its match is dropped without an end event")
        self.current = rows.get(self.current) if self.current is not None else None
        self.streak_song = rows.get(self.streak_song) if self.streak_song is not None else None
        if self.streak_song is None:
            self.streak = 0
        self.history = {rows[song]: scores for song, scores in self.history.items() if rows.get(song) is not None}

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

    def update(self, scores: dict[int, float], time_s: float) -> list[Decision]:
        """One hop: `scores` maps song index -> aggregated similarity (absent = not retrieved)."""
        self._remember(scores)
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
            switch = challenger and self.streak >= self.start_hops
            if self.below >= self.end_hops or switch:
                decisions.append(Decision("match_end", self.current, max(current_score, 0.0), time_s, self.current_started_s))
                self.current, self.below = None, 0
        if self.current is None and challenger and self.streak >= self.start_hops:
            self.current, self.current_started_s, self.below = top, time_s, 0
            self.streak_song, self.streak = None, 0
            decisions.append(Decision("match_start", top, top_score, time_s, time_s))
        return decisions
