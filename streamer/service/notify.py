"""A dependency-free client for systemd's service notification protocol (sd_notify).

A service started with Type=notify finds the path of a unix datagram socket in $NOTIFY_SOCKET
and reports its state by sending newline-separated KEY=VALUE assignments to it (READY=1,
STOPPING=1, WATCHDOG=1, ...). With WatchdogSec= set, systemd also exports $WATCHDOG_USEC and
restarts the service when no WATCHDOG=1 arrives within that many microseconds.

Outside systemd (no $NOTIFY_SOCKET) every method is a cheap no-op, so the daemon calls the
notifier unconditionally. See sd_notify(3) and systemd.service(5).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Mapping
from typing import Self

log = logging.getLogger(__name__)

# A datagram send only blocks when systemd's receive queue is full. Waiting a little longer
# rides out a busy PID 1; waiting forever would stall the processing loop that pings the watchdog.
SEND_TIMEOUT_S = 1.0


def socket_address(notify_socket: str) -> str | None:
    """The address to send to for a $NOTIFY_SOCKET value, or None when it is unusable.

    '@name' denotes a socket in the abstract namespace, which Python spells with a leading NUL.
    Other forms systemd knows (vsock:CID:PORT) do not apply to a local daemon.
    """
    if notify_socket.startswith("@"):
        return "\0" + notify_socket[1:]
    if notify_socket.startswith("/"):
        return notify_socket
    return None


def watchdog_timeout_usec(environ: Mapping[str, str], pid: int) -> int | None:
    """The watchdog timeout from $WATCHDOG_USEC, or None when no watchdog applies to `pid`.

    systemd sets $WATCHDOG_PID so that a child inheriting the environment does not ping on
    behalf of the main process; an unset $WATCHDOG_PID means the watchdog is ours.
    """
    raw_usec, raw_pid = environ.get("WATCHDOG_USEC", ""), environ.get("WATCHDOG_PID", "")
    if not raw_usec:
        return None
    try:
        usec = int(raw_usec)
        owner = int(raw_pid) if raw_pid else pid
    except ValueError:
        log.warning("ignoring malformed WATCHDOG_USEC=%r / WATCHDOG_PID=%r", raw_usec, raw_pid)
        return None
    return usec if usec > 0 and owner == pid else None


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds: the clock systemd compares MONOTONIC_USEC against."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def one_line(text: str) -> str:
    """`text` without newlines, which would otherwise start a new (bogus) assignment."""
    return " ".join(text.splitlines())


class SystemdNotifier:
    """Sends state changes and watchdog pings to systemd over one kept-open datagram socket.

    Safe to share between threads: datagram sends are atomic, and the watchdog's rate limit and
    the lazily opened socket are guarded by locks. Send failures are logged (the first at
    WARNING) and never raised, so a broken notify socket degrades supervision instead of
    killing the daemon.
    """

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self._address = address
        self._interval_s = watchdog_usec / 2e6 if address and watchdog_usec else None
        self._sock: socket.socket | None = None
        self._last_ping: float | None = None
        self._ping_lock = threading.Lock()  # watchdog(): check-and-set of _last_ping
        self._sock_lock = threading.Lock()  # _socket(): at most one socket, whichever thread opens it
        self._warned = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Self:
        """A notifier configured from $NOTIFY_SOCKET, $WATCHDOG_USEC and $WATCHDOG_PID."""
        raw = environ.get("NOTIFY_SOCKET", "")
        address = socket_address(raw) if raw else None
        if raw and address is None:
            log.warning("unsupported NOTIFY_SOCKET=%r; systemd notifications are off", raw)
        return cls(address, watchdog_timeout_usec(environ, os.getpid()))

    @property
    def enabled(self) -> bool:
        """Whether a notify socket is configured (i.e. we run under systemd with Type=notify)."""
        return self._address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """Seconds between watchdog pings (half the timeout, as sd_watchdog_enabled(3) advises), or None."""
        return self._interval_s

    def ready(self, status: str = "") -> bool:
        """Startup (or a reload) is complete: systemd lets dependent units start and `start` return."""
        return self._send_state("READY=1", status)

    def ready_again(self, status: str = "") -> bool:
        """Ends a reload begun with reloading(); the same message as ready()."""
        return self.ready(status)

    def reloading(self, status: str = "") -> bool:
        """A reload has begun. MONOTONIC_USEC lets systemd ≥ 253 (Type=notify-reload) match it to its request."""
        return self._send_state(f"RELOADING=1\nMONOTONIC_USEC={monotonic_usec()}", status)

    def stopping(self, status: str = "") -> bool:
        """Shutdown (draining) has begun: systemd shows 'deactivating' and expects the exit."""
        return self._send_state("STOPPING=1", status)

    def status(self, text: str) -> bool:
        """A free-form one-line status, shown by `systemctl status`."""
        return self._send(f"STATUS={one_line(text)}")

    def watchdog(self) -> bool:
        """Pings the watchdog, at most once per watchdog_interval_s; returns whether a ping was sent.

        Cheap enough to call on every iteration of the processing loop: the rate limit keeps
        systemd from being flooded, and a loop that stops iterating stops pinging.
        """
        if self._interval_s is None:
            return False
        with self._ping_lock:
            now = time.monotonic()
            if self._last_ping is not None and now - self._last_ping < self._interval_s:
                return False
            sent = self._send("WATCHDOG=1")
            if sent:  # a failed ping is retried on the next call rather than after a full interval
                self._last_ping = now
            return sent

    def close(self) -> None:
        """Closes the socket; later calls reopen it."""
        with self._sock_lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _send_state(self, state: str, status: str) -> bool:
        return self._send(f"{state}\nSTATUS={one_line(status)}" if status else state)

    def _send(self, message: str) -> bool:
        """Sends one datagram; True on success, False when disabled or on a (logged) error."""
        if self._address is None:
            return False
        try:
            self._socket().sendto(message.encode(), self._address)
        except OSError as exc:
            self._log_failure(message, exc)
            return False
        return True

    def _socket(self) -> socket.socket:
        # Opened lazily so that building a notifier has no side effects outside systemd.
        with self._sock_lock:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                sock.settimeout(SEND_TIMEOUT_S)
                self._sock = sock
            return self._sock

    def _log_failure(self, message: str, exc: OSError) -> None:
        # Once loudly: a dead socket would otherwise log on every watchdog call of the hot loop.
        first = message.split("\n", 1)[0]
        if self._warned:
            log.debug("systemd notify %s failed: %s", first, exc)
        else:
            self._warned = True
            log.warning("systemd notify %s to %r failed: %s (further failures are logged at DEBUG)", first, self._address, exc)


__all__ = ["SystemdNotifier", "monotonic_usec"]
