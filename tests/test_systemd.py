"""The systemd side of the service: the unit passes `systemd-analyze verify` and its security
review, and coverwatch.streamer.service.notify speaks sd_notify to real unix datagram sockets."""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from coverwatch.streamer.service.notify import SystemdNotifier, monotonic_usec

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "coverwatch.service"
SHIPPED_EXEC = "/opt/coverwatch/venv/bin/coverwatch"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
# systemd 252 rates the unit 1.4; the margin absorbs scoring changes between versions, not
# a dropped hardening option (most cost 0.1 to 0.5).
MAX_EXPOSURE = 2.0

needs_systemd_analyze = pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed (Debian package: systemd)")


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SYSTEMD_ANALYZE, "--no-pager", *args], check=False, capture_output=True, text=True, timeout=60)


def service_settings(unit_text: str) -> dict[str, list[str]]:
    """[Service] assignments, each key with all its values in order (systemd keys repeat)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for line in unit_text.splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def coverwatch_command() -> str:
    """The installed entry point, or the interpreter running the package: something that exists."""
    entry_point = shutil.which("coverwatch")
    return entry_point if entry_point else f"{sys.executable} -m coverwatch"


# --- the unit ---------------------------------------------------------------------------


@needs_systemd_analyze
def test_unit_passes_systemd_analyze_verify(tmp_path):
    # verify rejects an ExecStart= binary that does not exist, so the copy runs the real one.
    text = UNIT.read_text()
    assert f"ExecStart={SHIPPED_EXEC} " in text
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace(f"ExecStart={SHIPPED_EXEC} ", f"ExecStart={coverwatch_command()} "))

    result = analyze("verify", "--man=no", str(unit))

    # A misspelt key or an unparsable value is only a warning (exit status 0) that ends in "ignoring".
    output = result.stdout + result.stderr
    complaint = re.compile("unknown|failed|invalid|ignoring", re.IGNORECASE)
    problems = [line for line in output.splitlines() if UNIT.name in line and complaint.search(line)]
    assert result.returncode == 0, output
    assert not problems, output


@needs_systemd_analyze
def test_unit_security_exposure_is_low():
    result = analyze("security", "--offline=yes", str(UNIT))

    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert result.returncode == 0 and match, result.stdout + result.stderr
    exposure = float(match.group(1))
    print(f"systemd-analyze security --offline=yes {UNIT.name}: exposure {exposure}")
    assert exposure <= MAX_EXPOSURE, result.stdout


def test_unit_matches_the_daemons_contract():
    from coverwatch.streamer.config import ServiceConfig

    settings = service_settings(UNIT.read_text())
    assert settings["Type"] == ["notify"] and settings["NotifyAccess"] == ["main"]
    assert settings["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert settings["ExecStart"][0].endswith("serve --source kafka")
    # systemd must not SIGKILL a daemon that is still draining within its own bound.
    assert float(settings["TimeoutStopSec"][0]) > ServiceConfig().drain_timeout_s


# --- the notify protocol ----------------------------------------------------------------


def bound_socket(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(2.0)
    return sock


def pending(sock: socket.socket) -> list[str]:
    """Every datagram already queued on `sock`."""
    sock.setblocking(False)
    messages = []
    try:
        while True:
            messages.append(sock.recv(4096).decode())
    except BlockingIOError:
        return messages
    finally:
        sock.settimeout(2.0)


@pytest.fixture()
def systemd_socket(tmp_path) -> Iterator[tuple[socket.socket, str]]:
    """A stand-in for PID 1's notify socket: (socket, $NOTIFY_SOCKET value)."""
    path = str(tmp_path / "notify.sock")
    with bound_socket(path) as sock:
        yield sock, path


def test_state_changes_arrive_as_assignments(systemd_socket):
    sock, path = systemd_socket
    with SystemdNotifier.from_env({"NOTIFY_SOCKET": path}) as notifier:
        assert notifier.enabled
        assert notifier.ready("model and index loaded")
        assert sock.recv(4096).decode() == "READY=1\nSTATUS=model and index loaded"
        assert notifier.status("2 streams\n0 errors")
        assert sock.recv(4096).decode() == "STATUS=2 streams 0 errors"  # a newline would start a new assignment
        assert notifier.stopping("draining")
        assert sock.recv(4096).decode() == "STOPPING=1\nSTATUS=draining"
        assert notifier.stopping()
        assert sock.recv(4096).decode() == "STOPPING=1"


def test_reload_is_bracketed_by_reloading_and_ready(systemd_socket):
    sock, path = systemd_socket
    with SystemdNotifier.from_env({"NOTIFY_SOCKET": path}) as notifier:
        before = monotonic_usec()
        notifier.reloading()
        after = monotonic_usec()
        notifier.ready_again()
        reloading, ready = sock.recv(4096).decode(), sock.recv(4096).decode()

    lines = reloading.split("\n")
    assert lines[0] == "RELOADING=1"
    key, _, stamp = lines[1].partition("=")
    assert key == "MONOTONIC_USEC" and before <= int(stamp) <= after
    assert ready == "READY=1"


def test_abstract_socket_is_spelled_with_an_at_sign():
    name = f"coverwatch-test-{uuid.uuid4().hex}"
    with bound_socket("\0" + name) as sock, SystemdNotifier.from_env({"NOTIFY_SOCKET": "@" + name}) as notifier:
        assert notifier.ready()
        assert sock.recv(4096).decode() == "READY=1"


def test_from_env_reads_the_process_environment_by_default(systemd_socket, monkeypatch):
    sock, path = systemd_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    with SystemdNotifier.from_env() as notifier:
        assert notifier.ready()
    assert sock.recv(4096).decode() == "READY=1"


def test_watchdog_pings_at_most_once_per_half_timeout(systemd_socket):
    sock, path = systemd_socket
    with SystemdNotifier.from_env({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())}) as notifier:
        assert notifier.watchdog_interval_s == 0.5
        assert notifier.watchdog()
        assert not notifier.watchdog()  # called from every loop iteration: the rest are dropped
        assert pending(sock) == ["WATCHDOG=1"]
        time.sleep(0.55)
        assert notifier.watchdog()
        assert pending(sock) == ["WATCHDOG=1"]


def test_watchdog_of_another_process_is_not_ours(systemd_socket):
    # A child that inherited the environment must not keep its parent's watchdog alive.
    sock, path = systemd_socket
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    with SystemdNotifier.from_env(env) as notifier:
        assert notifier.watchdog_interval_s is None
        assert not notifier.watchdog()
        assert notifier.ready()
    assert pending(sock) == ["READY=1"]


def test_without_notify_socket_everything_is_a_no_op():
    notifier = SystemdNotifier.from_env({"WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled and notifier.watchdog_interval_s is None
    sent = [notifier.ready("x"), notifier.reloading(), notifier.ready_again(), notifier.status("x"), notifier.stopping()]
    assert sent == [False] * 5 and not notifier.watchdog()
    notifier.close()


def test_missing_socket_is_logged_once_and_never_raised(tmp_path, caplog):
    path = str(tmp_path / "gone.sock")
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "60000000"}
    with caplog.at_level(logging.DEBUG, logger="coverwatch.streamer.service.notify"), SystemdNotifier.from_env(env) as notifier:
        assert not notifier.ready()
        assert not notifier.watchdog()
        assert not notifier.stopping()
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1 and "READY=1" in warnings[0].getMessage()

        # A failed ping does not count against the 30 s interval: the next call retries.
        with bound_socket(path) as sock:
            assert notifier.watchdog()
            assert sock.recv(4096).decode() == "WATCHDOG=1"


@pytest.mark.parametrize(
    ("env", "enabled", "interval"),
    [
        ({"NOTIFY_SOCKET": "vsock:2:1234"}, False, None),  # a VM's host socket: not for a local daemon
        ({"NOTIFY_SOCKET": "relative.sock"}, False, None),
        ({"NOTIFY_SOCKET": "/run/x.sock", "WATCHDOG_USEC": "soon"}, True, None),
        ({"NOTIFY_SOCKET": "/run/x.sock", "WATCHDOG_USEC": "0"}, True, None),
        ({"NOTIFY_SOCKET": "/run/x.sock", "WATCHDOG_USEC": "30000000"}, True, 15.0),
    ],
)
def test_unusable_settings_switch_features_off(env, enabled, interval):
    notifier = SystemdNotifier.from_env(env)
    assert notifier.enabled is enabled
    assert notifier.watchdog_interval_s == interval
