"""The per-chunk path of the daemon: audio chunk -> resample -> rolling CQT -> windows ->
embeddings -> FAISS -> per-song scores -> alignment check -> hysteresis -> match events.

`Monitor` owns the model, the index and one `StreamState` per stream. A decision is due
every `hop_s` of stream time: each configured window that is already filled and not silent
is copied out of the stream's ring, and a song's score is the maximum over the windows and
over its retrieved segments, plus, for the best few songs, the alignment term of
streamer/decide/alignment.py over the last `align_window_s` of the ring.

Due decisions are batched across streams: `submit` pushes a chunk through resampling and
the incremental CQT and queues the decisions it makes due; `flush` embeds every queued
window (equal lengths together, `batch_size` per encoder call), searches all of them in
one FAISS call, then updates each stream's hysteresis in submission order. Embeddings do
not depend on decisions, so the events are exactly those of deciding chunk by chunk. Every
other operation on streams (end, restore, reload) resolves the queue first, and events
leave through one ordered outbox tagged by the caller (Kafka: live or replayed).
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from coverwatch.streamer.config import DecisionConfig, ModelConfig, StreamConfig
from coverwatch.streamer.decide.alignment import align_frames, chroma
from coverwatch.streamer.decide.calibration import fuse_hops, p_value, settings_drift
from coverwatch.streamer.decide.hysteresis import Decision, Hysteresis
from coverwatch.streamer.embed.embedder import Embedder
from coverwatch.streamer.frontend.audio import HOP_LENGTH, SAMPLE_RATE, AudioError, seconds_to_frames
from coverwatch.streamer.frontend.decode import MAX_ABS_SAMPLE, StreamResampler, to_mono
from coverwatch.streamer.frontend.rolling import MIN_FRAMES_PER_CALL, FrameRing, IncrementalCqt
from coverwatch.streamer.search.store import IndexStore
from coverwatch.streamer.service.metrics import Metrics
from coverwatch.streamer.sinks.events import MatchEvent, make_event_id, utc_now_iso

log = logging.getLogger(__name__)


def frame_end_s(n_frames: int, kernel_length: int) -> float:
    """Seconds of audio needed to complete `n_frames` CQT frames (valid framing, hop 512)."""
    return ((n_frames - 1) * HOP_LENGTH + kernel_length) / SAMPLE_RATE if n_frames > 0 else 0.0


class ChunkError(AudioError):
    """A chunk that cannot be processed (NaN, wrong shape, absurd rate); it is skipped and counted."""


@dataclass(frozen=True)
class Thresholds:
    start: float
    end: float
    source: str  # "config", "stream calibration", "index calibration", or "config + ..." when config sets one of the two
    detail: str = ""  # how the index calibration set them: "impostor scores", or "fallback default: ..." for a small catalog

    @property
    def is_fallback(self) -> bool:
        return self.detail.startswith("fallback")


def resolve_thresholds(decision: DecisionConfig, calibration: dict) -> Thresholds:
    """Config values when set (non-zero), otherwise the index's stream calibration
    (`coverwatch calibrate`, for a target false-alarm rate) if it has one, else its
    impostor calibration (made at build time)."""
    if decision.start_threshold and decision.end_threshold:
        return Thresholds(decision.start_threshold, decision.end_threshold, "config")
    source, fitted = ("stream calibration", calibration["stream"]) if calibration.get("stream") else ("index calibration", calibration)
    if "start_threshold" not in fitted:
        raise ValueError("the index has no calibration; set decision.start_threshold and decision.end_threshold")
    start = decision.start_threshold or float(fitted["start_threshold"])
    end = decision.end_threshold or min(start, float(fitted["end_threshold"]))
    if decision.start_threshold or decision.end_threshold:  # say so: a log reading "stream calibration" for a configured start misleads
        source = f"config + {source}"
    detail = "" if calibration.get("stream") else str(calibration.get("threshold_source", ""))
    return Thresholds(start, end, source, detail)


def play_lead_s(stream: StreamConfig) -> float:
    """How long before its first hop at or above end_threshold a play is taken to begin: half
    the shortest window (about the seconds of a song a window holds when it first scores)."""
    return min(stream.windows_s) / 2.0


@dataclass
class StageTimes:
    """Seconds spent per stage, summed over the run (benchmarks) and passed to `observer` (metrics)."""

    seconds: Counter = field(default_factory=Counter)
    observer: Callable[[str, float], None] | None = None

    def add(self, stage: str, started: float) -> float:
        now = time.perf_counter()
        self.seconds[stage] += now - started
        if self.observer is not None:
            self.observer(stage, now - started)
        return now


@dataclass
class StreamState:
    stream_id: str
    input_rate: int
    origin_s: float  # source clock at the stream's first sample: 0 for files/mic, capture time for Kafka
    resampler: StreamResampler
    cqt: IncrementalCqt
    ring: FrameRing
    decider: Hysteresis
    next_grid: int  # decisions happen at source-clock times next_grid * hop_s
    next_decision_frame: int
    samples_in: int = 0  # at SAMPLE_RATE
    counts: Counter = field(default_factory=Counter)

    @property
    def clock_s(self) -> float:
        """Source-clock time of the end of the audio received so far."""
        return self.origin_s + self.samples_in / SAMPLE_RATE


@dataclass
class PendingDecision:
    """A decision that is due but not yet taken: the stream's windows at that hop, copied."""

    state: StreamState
    time_s: float
    windows: list[np.ndarray]  # [(T_i, F)] non-silent windows, oldest frame first
    align_query: np.ndarray | None  # (S, 12) chroma of the last align_window_s (less while filling); None if silent or off
    tag: object  # returned with the decision's events (Kafka: emit or replay)


class Monitor:
    def __init__(
        self,
        embedder: Embedder,
        index: IndexStore,
        stream_cfg: StreamConfig,
        decision_cfg: DecisionConfig,
        metrics: Metrics | None = None,
        batch_size: int = ModelConfig().batch_size,
    ) -> None:
        self.embedder = embedder
        self.metrics = metrics
        self.index = index
        self.stream_cfg = stream_cfg
        self.decision_cfg = decision_cfg
        self.thresholds = resolve_thresholds(decision_cfg, index.calibration)
        self.window_frames = [seconds_to_frames(s) for s in stream_cfg.windows_s]
        self.align_frames = align_frames(stream_cfg)
        self.silence_power = 10.0 ** (stream_cfg.silence_dbfs / 10.0)  # mean square about each hop's mean (DC removed)
        self.streams: dict[str, StreamState] = {}
        self.times = StageTimes(observer=metrics.observe_stage if metrics else None)
        self.counts: Counter = Counter()
        self.batch_size = batch_size  # windows of one length per encoder call ([model] batch_size)
        self._pending: list[PendingDecision] = []
        self._pending_windows = 0
        self._outbox: list[tuple[object, MatchEvent]] = []
        if metrics:
            metrics.set_index(len(index.songs), index.n_vectors)
        log.info("decision thresholds start=%.3f end=%.3f (%s)", self.thresholds.start, self.thresholds.end, self.thresholds.source)
        if self.thresholds.is_fallback and not decision_cfg.start_threshold:
            log.warning(
                "the index's thresholds are a default, not measured (%s): run `coverwatch calibrate` on an hour of non-catalog audio",
                self.thresholds.detail,
            )
        self._warn_drift(index)

    def _warn_drift(self, index: IndexStore) -> None:
        drift = settings_drift(index.calibration, self.stream_cfg)
        if drift and self.thresholds.source != "config":
            log.warning(
                "the index's thresholds were measured with other settings (%s); re-run `coverwatch calibrate` "
                "(or `coverwatch index build`) with the settings you serve with",
                "; ".join(drift),
            )

    def replay_horizon_s(self) -> float:
        """Audio that rebuilds a stream's decisions exactly: the longest window, then enough
        hops for the score history and the hysteresis counters, plus a hop of slack."""
        d = self.decision_cfg
        return max(self.stream_cfg.windows_s) + (max(d.history_hops, d.start_hops, d.end_hops) + 1) * self.stream_cfg.hop_s

    def replace_index(self, index: IndexStore) -> None:
        """Swap in a reloaded index between chunks; open matches follow their song ids."""
        self._resolve()  # queued decisions were searched against the old index's rows
        thresholds = resolve_thresholds(self.decision_cfg, index.calibration)
        new_rows = index.song_rows()
        rows = {row: new_rows.get(song.song_id) for row, song in enumerate(self.index.songs)}
        for state in self.streams.values():
            state.decider.remap(rows)
            state.decider.start_threshold, state.decider.end_threshold = thresholds.start, thresholds.end
        self.index, self.thresholds = index, thresholds
        self._warn_drift(index)
        if self.metrics:
            self.metrics.set_index(len(index.songs), index.n_vectors)
        log.info("index replaced: %d songs, thresholds start=%.3f end=%.3f", len(index.songs), thresholds.start, thresholds.end)

    def open_match(self, stream_id: str) -> tuple[str, float] | None:
        """(song_id, start time) of the stream's open match, if any (checkpointed with Kafka commits)."""
        self._resolve()
        state = self.streams.get(stream_id)
        if state is None or state.decider.current is None:
            return None
        return self.index.songs[state.decider.current].song_id, state.decider.current_started_s

    def restore_match(self, stream_id: str, song_id: str | None, started_s: float) -> None:
        """Make the stream's open match the checkpointed one (None: no match open).

        After a restart the replayed audio rebuilds windows and score history, but a match
        that opened before the replayed span would be re-detected with a later start; the
        checkpoint keeps its identity (song, start time, hence its event ids).
        """
        self._resolve()
        state = self.streams.get(stream_id)
        if state is None:
            return
        state.decider.restore(self.index.song_rows().get(song_id) if song_id is not None else None, started_s)

    def _new_stream(self, stream_id: str, rate: int, origin_s: float) -> StreamState:
        cqt = IncrementalCqt(self.embedder.cqt, self.embedder.kernel_length)
        first_ready_s = origin_s + frame_end_s(min(self.window_frames), cqt.kernel_length)
        first_grid = math.ceil(first_ready_s / self.stream_cfg.hop_s - 1e-9)
        state = StreamState(
            stream_id=stream_id,
            input_rate=rate,
            origin_s=origin_s,
            resampler=StreamResampler(rate),
            cqt=cqt,
            ring=FrameRing(max(self.window_frames)),
            decider=Hysteresis(
                self.thresholds.start,
                self.thresholds.end,
                self.decision_cfg.start_hops,
                self.decision_cfg.end_hops,
                self.decision_cfg.history_hops,
                lead_s=play_lead_s(self.stream_cfg),
            ),
            next_grid=first_grid,
            next_decision_frame=0,
        )
        state.next_decision_frame = self._frame_at(state, first_grid * self.stream_cfg.hop_s)
        return state

    def _frame_at(self, state: StreamState, clock_s: float) -> int:
        """The first frame count whose audio reaches source-clock time `clock_s`."""
        offset = (clock_s - state.origin_s) * SAMPLE_RATE - state.cqt.kernel_length
        return max(min(self.window_frames), math.ceil(offset / HOP_LENGTH - 1e-6) + 1)

    def process_chunk(self, stream_id: str, samples: np.ndarray, sample_rate: int, clock_s: float | None = None) -> list[MatchEvent]:
        """Submit one chunk and take its decisions now; return every event in the outbox.

        For one caller feeding streams one chunk at a time (files, microphone). Raises
        ChunkError for a chunk that must be skipped.
        """
        self.submit(stream_id, samples, sample_rate, clock_s)
        return [event for _, event in self.flush()]

    def submit(self, stream_id: str, samples: np.ndarray, sample_rate: int, clock_s: float | None = None, tag: object = None) -> None:
        """Feed one chunk ((N,) or (N, C) float samples at sample_rate); its due decisions are queued.

        `clock_s` is the source clock at the chunk's first sample (Kafka: capture time); it
        sets a new stream's origin, so decisions fall on the same hop grid whichever chunk a
        stream (re)starts from. Raises ChunkError for a chunk that must be skipped; the
        stream's state is untouched then.
        """
        if samples.ndim not in (1, 2) or samples.size == 0:
            raise ChunkError(f"stream {stream_id}: empty or mis-shaped chunk {samples.shape}")
        if not np.isfinite(samples).all():
            raise ChunkError(f"stream {stream_id}: chunk contains NaN or infinite samples")
        if np.abs(samples).max() > MAX_ABS_SAMPLE:
            raise ChunkError(f"stream {stream_id}: sample values beyond +-{MAX_ABS_SAMPLE:g}; wrong encoding?")
        started = time.perf_counter()
        state = self.streams.get(stream_id)
        if state is None or state.input_rate != sample_rate:
            try:
                fresh = self._new_stream(stream_id, sample_rate, clock_s or 0.0)
            except AudioError as exc:
                raise ChunkError(f"stream {stream_id}: {exc}") from None
            if state is not None:
                log.warning("stream %s changed sample rate %d -> %d: restarting its window", stream_id, state.input_rate, sample_rate)
                self._close(stream_id, tag)  # its open match ends here
            state = self.streams[stream_id] = fresh
            if self.metrics:
                self.metrics.active_streams.set(len(self.streams))
        mono = state.resampler.process(to_mono(samples))
        state.samples_in += len(mono)
        now = self.times.add("resample", started)
        frames, energy = state.cqt.push(mono, min_frames=max(MIN_FRAMES_PER_CALL, state.next_decision_frame - state.cqt.frames_done))
        self.times.add("cqt", now)
        self.counts["chunks"] += 1
        self._advance(state, frames, energy, tag)
        if self._pending_windows >= self.stream_cfg.max_pending_windows:
            self._resolve()

    def flush(self) -> list[tuple[object, MatchEvent]]:
        """Take every queued decision; return the outbox's (tag, event) pairs in order and empty it."""
        self._resolve()
        out, self._outbox = self._outbox, []
        return out

    def _advance(self, state: StreamState, frames: np.ndarray, energy: np.ndarray, tag: object) -> None:
        """Append new frames, queueing a decision at every hop boundary they cross."""
        done = state.cqt.frames_done - len(frames)  # frame index of frames[0]
        while len(frames):
            take = min(len(frames), state.next_decision_frame - done)
            state.ring.append(frames[:take], energy[:take])
            frames, energy, done = frames[take:], energy[take:], done + take
            if done == state.next_decision_frame:
                self._queue(state, state.next_grid * self.stream_cfg.hop_s, tag)
                state.next_grid += 1
                state.next_decision_frame = self._frame_at(state, state.next_grid * self.stream_cfg.hop_s)

    def _queue(self, state: StreamState, time_s: float, tag: object) -> None:
        windows = []
        for n in self.window_frames:
            if n > state.ring.filled:
                break
            if state.ring.mean_energy(n) < self.silence_power:
                state.counts["silent_windows"] += 1
                continue
            windows.append(state.ring.latest(n)[0])  # a copy: the ring moves on before the batch is embedded
        align_query = None  # chroma now, not frames: 4.5 kB held per pending decision instead of 290 kB
        if windows and self.stream_cfg.align_weight > 0:
            n = min(self.align_frames, state.ring.filled)
            if state.ring.mean_energy(n) >= self.silence_power:
                align_query = chroma(state.ring.latest(n)[0])
        self._pending.append(PendingDecision(state, time_s, windows, align_query, tag))
        self._pending_windows += len(windows)
        self.counts["decisions"] += 1
        if self.metrics:
            self.metrics.decisions.inc()

    def _resolve(self) -> None:
        """Embed all queued windows, search them in one call, and apply the decisions in order."""
        if not self._pending:
            return
        pending, self._pending, self._pending_windows = self._pending, [], 0
        started = time.perf_counter()
        windows = [(owner, window) for owner, decision in enumerate(pending) for window in decision.windows]
        queries, owners = self.embedder.embed_windows(windows, self.batch_size)
        now = self.times.add("embed", started) if windows else started  # all-silent hops embed and search nothing
        scores = self.index.best_per_song_grouped(queries, owners, len(pending), self.stream_cfg.top_k)
        now = self.times.add("search", now) if windows else now
        positions: list[dict[int, float]] = []  # per hop: aligned songs' reference time at the hop
        scores = fuse_hops(scores, [d.align_query for d in pending], self.index, self.stream_cfg, positions)  # as the calibration does
        now = self.times.add("align", now) if windows and self.stream_cfg.align_weight > 0 else now
        for decision, song_scores, hop_positions in zip(pending, scores, positions):
            for made in decision.state.decider.update(song_scores, decision.time_s, hop_positions):
                self._outbox.append((decision.tag, self._event(decision.state, made)))
        self.times.add("decide", now)

    def _event(self, state: StreamState, decision: Decision) -> MatchEvent:
        song = self.index.songs[decision.song_index]
        self.counts[decision.kind] += 1
        return MatchEvent(
            event=decision.kind,
            event_id=make_event_id(state.stream_id, song.song_id, decision.started_s, decision.kind),
            stream=state.stream_id,
            song_id=song.song_id,
            title=song.title,
            score=decision.score,
            stream_time_s=decision.time_s,
            match_start_s=decision.started_s,
            wall_time=utc_now_iso(),
            p_value=p_value(self.index.calibration, decision.score),
            metadata=song.metadata,
            play_start_s=decision.play_start_s,
            play_start_wall_time=None if decision.play_start_s is None else utc_now_iso(decision.time_s - decision.play_start_s),
            duration_s=None if decision.play_end_s is None else decision.play_end_s - decision.play_start_s,
            reference_offset_s=decision.reference_s,
        )

    def end_stream(self, stream_id: str, tag: object = None) -> list[tuple[object, MatchEvent]]:
        """The stream ended (or jumped): take its queued decisions, close an open match, drop
        its state; return the outbox (as `flush`)."""
        self._close(stream_id, tag)
        return self.flush()

    def _close(self, stream_id: str, tag: object) -> None:
        self._resolve()
        state = self.streams.pop(stream_id, None)
        if self.metrics:
            self.metrics.active_streams.set(len(self.streams))
        if state is not None:
            self._outbox.extend((tag, self._event(state, d)) for d in state.decider.reset(state.clock_s))
