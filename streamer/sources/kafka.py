"""Audio chunks from Kafka (schema: streamer/sources/wire.py), many streams per consumer-group member.

The loop: poll a batch -> for each message, decode (malformed -> dead-letter topic), check
the stream's sequence (repeat -> skipped, gap -> the stream restarts rather than splicing
unrelated audio), process -> deliver the events the batch caused (acks=all, retried until
acknowledged) -> commit. At-least-once, and more: the committed offset trails the newest
processed chunk by a *replay horizon* (the longest window + the decision history + one
hop), so whoever reads the partition next (this instance after a crash, or another after a
rebalance) re-reads enough audio to rebuild each stream's windows and scores. A checkpoint
written with each commit (streamer/service/checkpoints.py) records the last offset whose events
were delivered; re-read chunks up to it rebuild state without emitting again, later ones
emit events whose ids equal the original ones (event ids depend on stream, song, kind and
the capture-clock time of the match start). The checkpoint also holds each stream's open
match, restored when the replay is done, so a match that opened before the replayed span
keeps its start (and its end event's id).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from coverwatch.streamer.config import KafkaConfig
from coverwatch.streamer.kafka_client import producer_settings, security_settings, wait_acknowledged, wait_for_broker
from coverwatch.streamer.service.checkpoints import CheckpointTopic
from coverwatch.streamer.service.metrics import Metrics
from coverwatch.streamer.service.pipeline import ChunkError
from coverwatch.streamer.sources.wire import AudioChunk, MalformedChunk, decode_chunk

log = logging.getLogger(__name__)

POLL_TIMEOUT_MS = 500
COMMIT_TIMEOUT_MS = 5000  # a commit stuck longer is retried with the next batch


class ChunkProcessor(Protocol):
    """What the source drives (the daemon's Server)."""

    def process(self, chunk: AudioChunk, emit: bool) -> None: ...  # queues the chunk's decisions; may raise ChunkError

    def end_stream(self, stream_id: str, emit: bool) -> None: ...  # takes queued decisions first

    def deliver(self) -> bool: ...  # takes queued decisions (one batch); True once every event is acknowledged

    def open_match(self, stream_id: str) -> tuple[str, float] | None: ...

    def restore_match(self, stream_id: str, song_id: str | None, started_s: float) -> None: ...

    def tick(self) -> None: ...  # called every loop turn: watchdog, reload requests


@dataclass
class StreamTrack:
    partition: TopicPartition
    last_seq: int
    epoch: int = 0  # bumped when the stream restarts (gap); older chunks are no longer needed
    last_seen: float = field(default_factory=time.monotonic)
    clock_end_s: float = 0.0  # capture clock at the end of the newest chunk
    live: bool = False  # has emitted (not only replayed): its state is this instance's to end


@dataclass(frozen=True)
class Processed:
    offset: int
    stream_id: str
    epoch: int
    clock_start_s: float


class PartitionLog:
    """Offsets processed on one partition, kept while their audio is inside the replay horizon."""

    def __init__(self) -> None:
        self.records: deque[Processed] = deque()
        self.next_offset: int | None = None  # one past the newest processed message

    def add(self, record: Processed | None, offset: int) -> None:
        if record is not None:
            self.records.append(record)
        self.next_offset = offset + 1

    def commit_offset(self, tracks: dict[str, StreamTrack], horizon_s: float) -> int | None:
        """Oldest offset still needed to rebuild a live stream; everything before is done."""

        def needed(r: Processed) -> bool:
            track = tracks.get(r.stream_id)
            return track is not None and track.epoch == r.epoch and r.clock_start_s >= track.clock_end_s - horizon_s

        while self.records and not needed(self.records[0]):
            self.records.popleft()
        return self.records[0].offset if self.records else self.next_offset


@dataclass
class Replay:
    """What a partition's checkpoint says: re-read up to `delivered` silently, then restore `open`."""

    delivered: int
    open: dict[str, tuple[str, float] | None]


class KafkaSource:
    def __init__(self, cfg: KafkaConfig, horizon_s: float, metrics: Metrics | None = None) -> None:
        self.cfg, self.horizon_s, self.metrics = cfg, horizon_s, metrics
        self.running = False
        self.tracks: dict[str, StreamTrack] = {}
        self.logs: dict[TopicPartition, PartitionLog] = {}
        self.delivered_until: dict[TopicPartition, int] = {}  # last offset whose events were delivered
        self.replays: dict[TopicPartition, Replay] = {}  # partitions still replaying their checkpoint
        self.checkpoint_store = CheckpointTopic(cfg)
        self.owned: set[TopicPartition] = set()
        self._consumer: KafkaConsumer | None = None
        self._dead_letters: KafkaProducer | None = None
        self._processor: ChunkProcessor | None = None
        self._unread_checkpoints: set[TopicPartition] = set()
        self._rebalances: queue.SimpleQueue = queue.SimpleQueue()
        self._revoked_pending: set[TopicPartition] = set()

    # -- plumbing -----------------------------------------------------------------------
    def _error(self, operation: str, exc: BaseException) -> None:
        if self.metrics:
            self.metrics.kafka_errors.labels(operation).inc()
        log.warning("kafka %s failed: %s", operation, exc)

    def _make_consumer(self) -> KafkaConsumer:
        return KafkaConsumer(
            bootstrap_servers=self.cfg.brokers,
            group_id=self.cfg.group_id,
            client_id=self.cfg.client_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=self.cfg.session_timeout_ms,
            heartbeat_interval_ms=self.cfg.heartbeat_interval_ms,
            max_poll_records=self.cfg.max_poll_records,
            request_timeout_ms=max(30000, self.cfg.session_timeout_ms + 5000),
            **security_settings(self.cfg),
        )

    def _touch_streams(self) -> None:
        """After a stall of our own (broker outage, blocked delivery) no stream counts as idle."""
        now = time.monotonic()
        for track in self.tracks.values():
            track.last_seen = now

    # -- the loop -----------------------------------------------------------------------
    def run(self, processor: ChunkProcessor) -> None:
        self._processor = processor
        self.running = True
        try:
            if not wait_for_broker(self.cfg, should_stop=lambda: not self.running, keepalive=processor.tick):
                return  # stopped (SIGTERM) before a broker appeared
            self._consumer = self._make_consumer()
            self._consumer.subscribe(self.cfg.audio_topics, listener=_Rebalance(self._rebalances))
            log.info("consuming %s as group %s from %s", self.cfg.audio_topics, self.cfg.group_id, self.cfg.bootstrap_servers)
            while self.running:
                try:
                    batch = self._consumer.poll(timeout_ms=POLL_TIMEOUT_MS)
                except KafkaError as exc:
                    self._error("poll", exc)
                    processor.tick()
                    self._touch_streams()
                    time.sleep(0.5)
                    continue
                self._apply_rebalances()
                handled = self._handle_batch(batch)
                if handled:
                    started = time.monotonic()
                    self._deliver_and_commit(handled)
                    if time.monotonic() - started > 1.0:
                        self._touch_streams()
                dropped = self._drop_idle_streams()
                if dropped:  # their match_end events, and checkpoints that no longer list them
                    self._deliver_and_commit(dropped)
                self._update_lag()
                processor.tick()
        finally:
            self._close()

    def stop(self) -> None:
        self.running = False

    def _handle_batch(self, batch: dict) -> list[TopicPartition]:
        """Handle records of owned partitions until the batch ends or a drain begins."""
        handled = []
        for tp, records in batch.items():
            if tp not in self.owned:  # fetched before a revocation: its next owner reads it
                continue
            handled.append(tp)
            for record in records:
                if not self.running:  # draining: finish the chunk in hand, not the batch
                    return handled
                self._handle(tp, record)
        return handled

    def _handle(self, tp: TopicPartition, record) -> None:
        started = time.perf_counter()
        log_ = self.logs.setdefault(tp, PartitionLog())
        emit = record.offset > self.delivered_until.get(tp, -1)
        if emit and tp in self.replays:  # the replay is over: back to the checkpointed matches
            self._finish_replay(tp)
        try:
            chunk = decode_chunk(record.key, record.value, record.headers, self.cfg.max_chunk_s)
        except MalformedChunk as exc:
            if emit:  # a replayed dead letter was already sent
                self._dead_letter(tp, record, exc)
            log_.add(None, record.offset)
            return
        if self.metrics:
            self.metrics.observe_stage("decode", time.perf_counter() - started)
        track = self._sequence(tp, chunk, emit)
        if track is None:  # a repeat of a chunk already processed
            log_.add(None, record.offset)
            return
        try:
            self._processor.process(chunk, emit)
            outcome = "processed" if emit else "replayed"
            track.live = track.live or emit
        except ChunkError as exc:
            outcome = "bad_chunk"
            log.warning("skipped chunk %s/%d: %s", chunk.stream_id, chunk.seq, exc)
        clock_start = chunk.capture_ts_ms / 1000
        track.clock_end_s = clock_start + chunk.duration_s
        log_.add(Processed(record.offset, chunk.stream_id, track.epoch, clock_start), record.offset)
        if self.metrics:  # latency is observed when the batch's decisions are taken (processor.deliver)
            self.metrics.chunks.labels(outcome).inc()

    def _sequence(self, tp: TopicPartition, chunk: AudioChunk, emit: bool) -> StreamTrack | None:
        """Update the stream's sequence bookkeeping; None when the chunk must be skipped."""
        track = self.tracks.get(chunk.stream_id)
        if track is None:
            self.tracks[chunk.stream_id] = track = StreamTrack(tp, chunk.seq)
            log.info("stream %s appeared on %s[%d] at seq %d", chunk.stream_id, tp.topic, tp.partition, chunk.seq)
            return track
        track.last_seen = time.monotonic()
        restarted = chunk.seq <= track.last_seq and chunk.capture_ts_ms / 1000 >= track.clock_end_s + self.cfg.max_chunk_s
        if chunk.seq <= track.last_seq and not restarted:
            if self.metrics:
                self.metrics.chunks.labels("duplicate").inc()
            log.warning("stream %s: chunk %d repeated or out of order (newest %d): skipped", chunk.stream_id, chunk.seq, track.last_seq)
            return None
        if restarted or chunk.seq > track.last_seq + 1:
            if restarted:
                log.warning("stream %s: seq went back to %d with newer audio: the publisher restarted", chunk.stream_id, chunk.seq)
            else:
                missing = chunk.seq - track.last_seq - 1
                if self.metrics:
                    self.metrics.sequence_gaps.inc(missing)
                log.warning("stream %s: %d chunk(s) missing before %d: restarting its window", chunk.stream_id, missing, chunk.seq)
            self._processor.end_stream(chunk.stream_id, emit=emit)
            track.epoch += 1
        track.last_seq = chunk.seq
        return track

    def _dead_letter(self, tp: TopicPartition, record, exc: MalformedChunk) -> None:
        if self.metrics:
            self.metrics.dead_letters.labels(exc.reason).inc()
            self.metrics.chunks.labels("dead_letter").inc()
        log.warning("dead letter %s[%d]@%d: %s", tp.topic, tp.partition, record.offset, exc)
        if not self.cfg.dead_letter_topic:
            return
        headers = list(record.headers or []) + [
            ("dead_letter_reason", exc.reason.encode()),
            ("dead_letter_detail", exc.detail.encode("utf-8", "replace")[:1000]),
            ("source", f"{tp.topic}/{tp.partition}/{record.offset}".encode()),
        ]
        while True:  # the dead letter must land before its offset can be committed
            try:
                if self._dead_letters is None:
                    self._dead_letters = KafkaProducer(**producer_settings(self.cfg, "dead-letters"))
                future = self._dead_letters.send(self.cfg.dead_letter_topic, key=record.key, value=record.value or b"", headers=headers)
                wait_acknowledged([future], self.cfg.send_timeout_s, self._processor.tick)
                return
            except KafkaError as exc2:
                self._error("produce_dead_letter", exc2)
                if not getattr(exc2, "retriable", True):  # too large for the topic, not authorised: give up on it
                    log.error("dead letter %s[%d]@%d dropped: %s", tp.topic, tp.partition, record.offset, exc2)
                    return
                self._processor.tick()
                if not self.running:
                    raise
                time.sleep(1.0)

    # -- commits ------------------------------------------------------------------------
    def _deliver_and_commit(self, partitions: list[TopicPartition]) -> bool:
        if not self._processor.deliver():
            log.warning("events not delivered: offsets of %d partition(s) left uncommitted", len(partitions))
            return False
        offsets, checkpoints = {}, {}
        for tp in partitions:
            log_ = self.logs.get(tp)
            if log_ is None or log_.next_offset is None or tp not in self.owned:
                continue
            offset = log_.commit_offset(self.tracks, self.horizon_s)
            delivered = max(self.delivered_until.get(tp, -1), log_.next_offset - 1)
            self.delivered_until[tp] = delivered
            offsets[tp] = OffsetAndMetadata(offset, "", -1)
            checkpoints[tp] = {"committed": offset, "delivered": delivered, "open": self._open_matches(tp)}
        if not offsets:
            return True
        try:  # the checkpoint first: it may run ahead of the commit, never behind
            self.checkpoint_store.save(checkpoints, keepalive=self._processor.tick)
        except KafkaError as exc:
            self._error("checkpoint", exc)
            return False
        try:
            self._consumer.commit(offsets, timeout_ms=COMMIT_TIMEOUT_MS)
        except KafkaError as exc:  # e.g. a rebalance took the partition: its new owner re-reads
            self._error("commit", exc)
            return False
        return True

    def _open_matches(self, tp: TopicPartition) -> dict[str, tuple[str, float] | None]:
        """Each stream's open match on one partition; while the partition is still replaying,
        the checkpoint it replays is passed on unchanged (the rebuilt state is not final yet)."""
        replay = self.replays.get(tp)
        open_matches = dict(replay.open) if replay else {}
        for stream_id, track in self.tracks.items():
            if track.partition == tp and track.live:
                open_matches[stream_id] = self._processor.open_match(stream_id)
        return open_matches

    def _drop_idle_streams(self) -> list[TopicPartition]:
        """Close streams without a chunk for `stream_idle_s`; the partitions they were on.

        A stream this instance only replayed was not its to end: it is dropped silently."""
        now = time.monotonic()
        idle = [sid for sid, track in self.tracks.items() if now - track.last_seen > self.cfg.stream_idle_s]
        partitions = []
        for stream_id in idle:
            track = self.tracks.pop(stream_id)
            replay = self.replays.get(track.partition)
            if replay is not None and stream_id in replay.open:  # idle before its replay finished
                self._processor.restore_match(stream_id, *(replay.open.pop(stream_id) or (None, 0.0)))
                track.live = True
            log.info("stream %s idle for %.0f s: closed", stream_id, now - track.last_seen)
            self._processor.end_stream(stream_id, emit=track.live)
            partitions.append(track.partition)
        return sorted(set(partitions))

    def _update_lag(self) -> None:
        if not self.metrics:
            return
        for tp in self.owned:
            highwater = self._consumer.highwater(tp)
            log_ = self.logs.get(tp)
            if highwater is not None and log_ is not None and log_.next_offset is not None:
                self.metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(max(0, highwater - log_.next_offset))

    # -- rebalance ----------------------------------------------------------------------
    # kafka-python 3 calls the rebalance listener on its IO thread, concurrently with this
    # loop, and forbids blocking calls there; the listener only queues what happened and
    # the loop applies it between batches.
    def _apply_rebalances(self) -> None:
        while not self._rebalances.empty():
            kind, partitions = self._rebalances.get_nowait()
            if kind == "revoked":
                self._on_revoked(partitions)
            elif kind == "lost":
                self._on_lost(partitions)
            else:
                self._on_assigned(partitions)
        while self._unread_checkpoints and self.running:
            self._read_checkpoints()

    def _on_revoked(self, partitions: list[TopicPartition]) -> None:
        """Stop handling the partitions, but keep their streams until the new assignment is
        known: an eager rebalance revokes everything and usually hands most of it back."""
        log.info("partitions revoked: %s", [f"{tp.topic}[{tp.partition}]" for tp in partitions])
        self.owned.difference_update(partitions)
        self._revoked_pending.update(partitions)

    def _on_lost(self, partitions: list[TopicPartition]) -> None:
        """Membership was lost: another member may have moved on, so nothing here is kept."""
        log.warning("partitions lost: %s", [f"{tp.topic}[{tp.partition}]" for tp in partitions])
        for tp in partitions:
            self.owned.discard(tp)
            self._revoked_pending.discard(tp)
            self._forget(tp)

    def _on_assigned(self, partitions: list[TopicPartition]) -> None:
        """Own the partitions; drop what went to others; read checkpoints of the new ones."""
        log.info("partitions assigned: %s", [f"{tp.topic}[{tp.partition}]" for tp in partitions])
        for tp in self._revoked_pending - set(partitions):
            self._forget(tp)
        new = set(partitions) - self._revoked_pending - self.owned
        self._revoked_pending.clear()
        self.owned.update(partitions)
        self._unread_checkpoints.update(new)

    def _forget(self, tp: TopicPartition) -> None:
        """Drop a partition's streams silently: their next owner replays and carries the matches on."""
        self._unread_checkpoints.discard(tp)
        self.logs.pop(tp, None)
        self.delivered_until.pop(tp, None)
        self.replays.pop(tp, None)
        if self.metrics:
            with contextlib.suppress(KeyError):
                self.metrics.consumer_lag.remove(tp.topic, str(tp.partition))
        for stream_id in [s for s, t in self.tracks.items() if t.partition == tp]:
            del self.tracks[stream_id]
            self._processor.end_stream(stream_id, emit=False)

    def _read_checkpoints(self) -> None:
        """New partitions' checkpoints: offsets up to 'delivered' are replayed silently, then the
        streams' open matches are restored. Retried until read: without it the replay would
        emit again under other ids."""
        partitions = set(self._unread_checkpoints)
        try:
            found = self.checkpoint_store.load(partitions, keepalive=self._processor.tick)
        except KafkaError as exc:
            self._error("read_checkpoints", exc)
            time.sleep(1.0)
            return
        self._unread_checkpoints -= partitions
        for tp, checkpoint in found.items():
            try:
                opened = {sid: (m[0], float(m[1])) if m else None for sid, m in checkpoint.get("open", {}).items()}
                self.delivered_until[tp] = int(checkpoint["delivered"])
                self.replays[tp] = Replay(int(checkpoint["delivered"]), opened)
            except (ValueError, KeyError, TypeError, IndexError):
                log.warning("%s[%d]: unreadable checkpoint %r", tp.topic, tp.partition, str(checkpoint)[:80])

    def _finish_replay(self, tp: TopicPartition) -> None:
        """The partition reached its checkpoint: restore every stream's match as it was then."""
        replay = self.replays.pop(tp)
        for stream_id, match in replay.open.items():
            self._processor.restore_match(stream_id, *(match or (None, 0.0)))
            if stream_id in self.tracks:
                self.tracks[stream_id].live = True

    def _close(self) -> None:
        for closable in (self._consumer, self._dead_letters, self.checkpoint_store):
            if closable is not None:
                try:
                    closable.close()
                except Exception as exc:  # closing must not mask the loop's own outcome
                    log.warning("closing %s: %s", type(closable).__name__, exc)


class _Rebalance(ConsumerRebalanceListener):
    """Runs on kafka-python's IO thread: queue the change for the source's loop, nothing more."""

    def __init__(self, changes: queue.SimpleQueue) -> None:
        self.changes = changes

    def on_partitions_revoked(self, revoked) -> None:
        if revoked:
            self.changes.put(("revoked", list(revoked)))

    def on_partitions_assigned(self, assigned) -> None:
        if assigned:
            self.changes.put(("assigned", list(assigned)))

    def on_partitions_lost(self, lost) -> None:
        if lost:
            self.changes.put(("lost", list(lost)))
