"""The test broker helper (tests/broker.py): topics, pause/resume, and persistence across restarts."""

from __future__ import annotations

import time

import pytest

from tests.broker import MotoS3, TansuBroker, read_messages, unique_topic

pytestmark = pytest.mark.filterwarnings("ignore:(read|open)_text is deprecated:DeprecationWarning")


def produce(bootstrap: str, topic: str, n: int) -> None:
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=False)
    try:
        for i in range(n):
            producer.send(topic, key=b"k%d" % (i % 3), value=b"%d" % i, headers=[("seq", b"%d" % i)])
        producer.flush(timeout=10)
    finally:
        producer.close(timeout=5)


def test_topics_and_headers(kafka_broker, make_topic) -> None:
    topic = make_topic(partitions=3)
    assert kafka_broker.partitions(topic) == 3
    assert kafka_broker.partitions(unique_topic("absent")) == 0  # describing does not auto-create
    produce(kafka_broker.bootstrap, topic, 9)
    messages = read_messages(kafka_broker.bootstrap, topic, 9)
    assert sorted(int(m.value) for m in messages) == list(range(9))
    assert all(m.headers == [("seq", m.value)] for m in messages)


def test_pause_makes_the_broker_unreachable_until_resume(kafka_broker) -> None:
    from kafka.errors import KafkaError

    kafka_broker.pause()
    try:
        assert kafka_broker.paused and kafka_broker.running
        started = time.monotonic()
        with pytest.raises(KafkaError):
            kafka_broker.list_topics(timeout_ms=500)
        assert time.monotonic() - started < 3.0
    finally:
        kafka_broker.resume()
    assert not kafka_broker.paused
    kafka_broker.list_topics(timeout_ms=3000)


def test_memory_storage_is_lost_on_restart() -> None:
    with TansuBroker() as broker:
        topic = broker.create_topic(unique_topic(), 1)
        broker.restart()
        assert topic not in broker.list_topics()
    assert not broker.running


@pytest.mark.skipif(not MotoS3.available(), reason="moto is not installed: no local S3 endpoint for persistent storage")
def test_s3_storage_survives_restart() -> None:
    with MotoS3() as s3, TansuBroker(storage_engine=s3.storage_engine, env=s3.env) as broker:
        topic = broker.create_topic(unique_topic(), 2)
        produce(broker.bootstrap, topic, 20)
        broker.restart()
        assert broker.partitions(topic) == 2
        assert sorted(int(m.value) for m in read_messages(broker.bootstrap, topic, 20)) == list(range(20))
