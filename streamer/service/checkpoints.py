"""Per-partition checkpoints of the Kafka source, kept on a Kafka topic of their own.

A checkpoint says, for one (group, audio topic, partition): the last offset whose events
were delivered, and each stream's open match (song id, start time). It is written, with
acks=all, just before the offsets are committed, and read when a partition is assigned.
Kafka's commit metadata could hold it, but not every Kafka-compatible broker stores that
field (Tansu returns it empty), so a topic it is: key = "group|topic|partition", newest
record wins. Create the topic with `cleanup.policy=compact` so it stays small.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from coverwatch.streamer.config import KafkaConfig
from coverwatch.streamer.kafka_client import producer_settings, security_settings, wait_acknowledged

log = logging.getLogger(__name__)

READ_IDLE_S = 1.0  # a partition of the checkpoint topic is read to its end when polls come back empty this long
READ_LIMIT_S = 30.0
CONNECT_GRACE_S = 1.0


def checkpoint_key(group: str, tp: TopicPartition) -> bytes:
    return f"{group}|{tp.topic}|{tp.partition}".encode()


def _is_offset(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and -1 <= value < 2**63


def _is_open_match(value: object) -> bool:
    """None, or [song_id, start time in s] as `save` writes it."""
    if value is None:
        return True
    return (
        isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
        and isinstance(value[1], (int, float)) and not isinstance(value[1], bool) and math.isfinite(value[1])
    )  # fmt: skip


def parse_checkpoint(raw: bytes) -> dict | None:
    """A checkpoint record's value -> {"delivered": int, "open": {stream: [song_id, start_s] | None}, ...},
    or None when it is not a well-formed checkpoint: a damaged or foreign record on the
    compacted topic must not stop the daemon at every partition assignment."""
    try:
        state = json.loads(raw)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested too deeply
        return None
    if not isinstance(state, dict) or not _is_offset(state.get("delivered")):
        return None
    opened = state.setdefault("open", {})
    if not isinstance(opened, dict) or not all(_is_open_match(match) for match in opened.values()):
        return None
    return state


class CheckpointTopic:
    def __init__(self, cfg: KafkaConfig) -> None:
        self.cfg = cfg
        self._producer: KafkaProducer | None = None

    def save(self, checkpoints: dict[TopicPartition, dict], keepalive: Callable[[], None] = lambda: None) -> None:
        """Write every checkpoint and wait for acks=all (raises KafkaError on failure)."""
        if self._producer is None:
            self._producer = KafkaProducer(**producer_settings(self.cfg, "checkpoints"))
        futures = [
            self._producer.send(self.cfg.checkpoint_topic, key=checkpoint_key(self.cfg.group_id, tp), value=json.dumps(state).encode())
            for tp, state in checkpoints.items()
        ]
        wait_acknowledged(futures, self.cfg.send_timeout_s, keepalive)

    def load(self, partitions: Iterable[TopicPartition], keepalive: Callable[[], None] = lambda: None) -> dict[TopicPartition, dict]:
        """The newest checkpoint of each partition that has one; `keepalive` runs between polls."""
        wanted = {checkpoint_key(self.cfg.group_id, tp): tp for tp in partitions}
        found: dict[TopicPartition, dict] = {}
        consumer = KafkaConsumer(
            bootstrap_servers=self.cfg.brokers,
            client_id=f"{self.cfg.client_id}-checkpoints",
            group_id=None,
            enable_auto_commit=False,
            **security_settings(self.cfg),
        )
        try:
            ids = consumer.partitions_for_topic(self.cfg.checkpoint_topic) or set()
            topic_partitions = [TopicPartition(self.cfg.checkpoint_topic, p) for p in sorted(ids)]
            if not topic_partitions:
                return found
            consumer.assign(topic_partitions)
            consumer.seek_to_beginning(*topic_partitions)
            started = time.monotonic()
            idle_since = started + CONNECT_GRACE_S  # the first fetch needs a connection first
            # End offsets cannot be trusted on every broker (Tansu miscounts batches), so read
            # until the topic stays quiet for READ_IDLE_S.
            while time.monotonic() - idle_since < READ_IDLE_S and time.monotonic() - started < READ_LIMIT_S:
                batch = consumer.poll(timeout_ms=200)
                keepalive()  # the systemd watchdog must not fire while a large topic is read
                if batch:
                    idle_since = time.monotonic()
                for records in batch.values():
                    for record in records:
                        tp = wanted.get(record.key)
                        if tp is None:
                            continue
                        if record.value is None:  # a tombstone deletes the checkpoint
                            found.pop(tp, None)
                            continue
                        checkpoint = parse_checkpoint(record.value)
                        if checkpoint is None:
                            log.warning("unreadable checkpoint for %s[%d] ignored: %r", tp.topic, tp.partition, record.value[:80])
                        else:
                            found[tp] = checkpoint
        finally:
            consumer.close()
        log.info("checkpoints read for %d of %d partition(s)", len(found), len(wanted))
        return found

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close(timeout=self.cfg.send_timeout_s)
