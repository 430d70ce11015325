"""Security properties of the runtime path.

* Nothing that can run code on load: the runtime packages (streamer/, index_builder/) never
  import pickle-like modules or call torch.load / np.load(allow_pickle=True), and torch or
  the training package are imported only inside the training-side commands; a real
  `coverwatch serve` run ends without torch ever imported. The artefacts it loads are ONNX
  and FAISS files, both checked against sha256s (tests/test_integrity.py).
* The metrics endpoint binds to the configured address, 127.0.0.1 by default.
* Kafka TLS/SASL settings pass from config.toml to every client; the password comes from a
  file or an environment variable, is refused in the config, and never shows in logs.
"""

from __future__ import annotations

import ast
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import soundfile

from coverwatch.streamer.config import Config, ConfigError, KafkaConfig, load_config, parse_config
from coverwatch.streamer.frontend.audio import SAMPLE_RATE
from coverwatch.streamer.kafka_client import SecretError, producer_settings, security_settings
from tests.conftest import melody
from tests.daemon import free_port, wait_for

ROOT = Path(__file__).resolve().parents[1]
RUNTIME_PACKAGES = ("streamer", "index_builder")
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
TRAINING_MODULES = ("torch", "coverwatch.model")  # the runtime imports neither, not even inside a function
SECRET = "s3cr3t-Pa55-7f1d9c"  # distinctive enough to grep for


def runtime_sources() -> list[Path]:
    return sorted(p for package in RUNTIME_PACKAGES for p in (ROOT / package).rglob("*.py"))


def _dotted(node: ast.AST) -> str:
    """`a.b.c` for a Name/Attribute chain, "" otherwise."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def unsafe_uses(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, what) for every pickle-like import, unsafe load call, or training import (at any depth)."""
    found = []

    def visit(node: ast.AST, function: str | None) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            function = node.name if function is None else function
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for name in names:
                root = name.split(".")[0]
                if root in UNSAFE_MODULES:
                    found.append((node.lineno, f"import {name}"))
                training = any(name == m or name.startswith(m + ".") for m in TRAINING_MODULES)
                if training:
                    found.append((node.lineno, f"import {name} in {function or 'module scope'}"))
        if isinstance(node, ast.Call):
            called = _dotted(node.func)
            if called.split(".")[-1] in ("load", "loads") and called.split(".")[0] in {"torch", *UNSAFE_MODULES}:
                found.append((node.lineno, f"{called}()"))
            if called in ("np.load", "numpy.load") and any(
                k.arg == "allow_pickle" and not (isinstance(k.value, ast.Constant) and k.value.value is False) for k in node.keywords
            ):
                found.append((node.lineno, f"{called}(allow_pickle=...)"))
            if called in ("eval", "exec"):
                found.append((node.lineno, f"{called}()"))
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(tree, None)
    return found


def test_the_scan_finds_what_it_looks_for():
    """The scanner itself, on a hand-written module holding each forbidden pattern once."""
    source = textwrap.dedent(
        """
        import pickle
        import numpy as np
        import torch
        from joblib import load
        def cmd_train():
            torch.load("x.pt")
        def helper():
            from coverwatch.model.train import train
            np.load("a.npy", allow_pickle=True)
            np.load("b.npy", allow_pickle=False)
            eval("1")
        """
    )
    assert [what for _, what in unsafe_uses(ast.parse(source))] == [
        "import pickle", "import torch in module scope", "import joblib", "torch.load()",
        "import coverwatch.model.train in helper", "np.load(allow_pickle=...)", "eval()",
    ]  # fmt: skip


def test_runtime_modules_never_unpickle_or_import_torch():
    problems = []
    for path in runtime_sources():
        uses = unsafe_uses(ast.parse(path.read_text(), str(path)))
        problems += [f"{path.relative_to(ROOT)}:{line}: {what}" for line, what in uses]
    assert len(runtime_sources()) > 20
    assert not problems, "\n".join(problems)


def test_serve_runs_without_importing_torch(random_model_dir, index_dir, tmp_path):
    """A whole `coverwatch serve` run in a fresh interpreter: torch is never imported."""
    soundfile.write(tmp_path / "a.wav", melody(0, 12.0), SAMPLE_RATE)
    argv = [
        "serve",
        "--model",
        str(random_model_dir),
        "--index",
        str(index_dir),
        "--source",
        f"file:{tmp_path / 'a.wav'}",
        "--fast",
        "--metrics-port",
        "0",
    ]
    program = f"import sys; from coverwatch.cli import main; code = main({argv!r}); print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr); sys.exit(code)"
    proc = subprocess.run([sys.executable, "-c", program], check=False, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "NO-TORCH"
    assert "served" in proc.stderr  # it really ran


def test_metrics_bind_to_localhost_by_default_and_to_the_configured_address():
    assert Config().metrics.address == "127.0.0.1"
    assert load_config(ROOT / "config.toml").metrics.address == "127.0.0.1"
    from coverwatch.streamer.service.metrics import Metrics

    server = Metrics().serve("127.0.0.1", free_port())
    try:
        assert server.server_address[0] == "127.0.0.1"
    finally:
        server.shutdown()
        server.server_close()


def test_literal_password_in_config_is_refused():
    with pytest.raises(ConfigError) as err:
        parse_config({"kafka": {"security_protocol": "SASL_SSL", "sasl_plain_username": "u", "sasl_plain_password": SECRET}})
    assert "kafka.sasl_plain_password: secrets do not belong in the config" in str(err.value)
    assert SECRET not in str(err.value)


@pytest.mark.parametrize(
    "kafka, message",
    [
        (
            {"security_protocol": "SASL_SSL", "sasl_plain_username": "u"},
            "kafka.sasl_password_file, kafka.sasl_password_env: security_protocol SASL_SSL needs exactly one of them",
        ),
        ({"security_protocol": "SASL_SSL", "sasl_password_env": "X"}, "kafka.sasl_plain_username: required"),
        (
            {"sasl_plain_username": "u", "sasl_password_env": "X"},
            "kafka.sasl_plain_username, kafka.sasl_password_env: SASL settings given but security_protocol is PLAINTEXT",
        ),
        (
            {"security_protocol": "PLAINTEXT", "ssl_cafile": "/etc/hostname"},
            "kafka.ssl_cafile: TLS files given but security_protocol is PLAINTEXT",
        ),
        ({"security_protocol": "SSL", "ssl_certfile": "/etc/hostname"}, "kafka.ssl_certfile, kafka.ssl_keyfile: go together"),
        (
            {"security_protocol": "SSL", "ssl_cafile": "/nonexistent/ca.pem"},
            "kafka.ssl_cafile: '/nonexistent/ca.pem' is not a readable file",
        ),
        ({"security_protocol": "TLS"}, "kafka.security_protocol: 'TLS' is not one of"),
    ],
)
def test_kafka_security_config_is_validated(kafka, message):
    with pytest.raises(ConfigError, match=message.replace("*", r"\*").replace("(", r"\(")):
        parse_config({"kafka": kafka})


def test_tls_and_sasl_settings_reach_every_client(tmp_path, monkeypatch):
    """From config.toml to the kwargs of the producers (and, through the same function, the consumers)."""
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    (tmp_path / "password").write_text(SECRET + "\n")
    config = tmp_path / "c.toml"
    config.write_text(
        f"""[kafka]
security_protocol = "SASL_SSL"
ssl_cafile = "{tmp_path / "ca.pem"}"
sasl_mechanism = "SCRAM-SHA-512"
sasl_plain_username = "coverwatch"
sasl_password_file = "{tmp_path / "password"}"
"""
    )
    cfg = load_config(config)
    assert SECRET not in repr(cfg) and SECRET not in json.dumps(cfg.kafka.__dict__)  # the config holds the path, not the secret
    settings = producer_settings(cfg.kafka, "events")
    assert settings["security_protocol"] == "SASL_SSL" and settings["ssl_cafile"] == str(tmp_path / "ca.pem")
    assert (settings["sasl_mechanism"], settings["sasl_plain_username"], settings["sasl_plain_password"]) == (
        "SCRAM-SHA-512",
        "coverwatch",
        SECRET,
    )
    monkeypatch.setenv("CW_TEST_KAFKA_PASSWORD", SECRET + "-env")
    by_env = KafkaConfig(security_protocol="SASL_PLAINTEXT", sasl_plain_username="u", sasl_password_env="CW_TEST_KAFKA_PASSWORD")
    assert security_settings(by_env)["sasl_plain_password"] == SECRET + "-env"
    monkeypatch.delenv("CW_TEST_KAFKA_PASSWORD")
    with pytest.raises(SecretError, match="'CW_TEST_KAFKA_PASSWORD' is not set"):
        security_settings(by_env)
    assert security_settings(KafkaConfig()) == {"security_protocol": "PLAINTEXT"}
    # Every client of the runtime takes its security settings from that one function.
    for module in ("sources/kafka", "service/checkpoints", "sinks/kafka", "sources/publish"):
        source = (ROOT / "streamer" / f"{module}.py").read_text()
        assert "security_settings(" in source or "producer_settings(" in source, module


def test_password_never_appears_in_logs(random_model_dir, index_dir, tmp_path):
    """`coverwatch serve --source kafka` at DEBUG, SASL towards a port that accepts TCP
    connections but never answers (so the start-up probe passes and the Kafka client itself
    connects and fails): it retries and logs its failures, and on SIGTERM drains; the
    password from the file is in neither stderr nor stdout."""
    (tmp_path / "password").write_text(SECRET + "\n")
    mute = socket.socket()
    mute.bind(("127.0.0.1", 0))
    mute.listen(64)  # the kernel completes handshakes from the backlog; nothing reads or replies
    config = tmp_path / "c.toml"
    config.write_text(
        f"""[kafka]
bootstrap_servers = "127.0.0.1:{mute.getsockname()[1]}"
security_protocol = "SASL_PLAINTEXT"
sasl_plain_username = "coverwatch"
sasl_password_file = "{tmp_path / "password"}"
send_timeout_s = 1.0
[metrics]
port = 0
[service]
drain_timeout_s = 2.0
"""
    )
    args = [sys.executable, "-m", "coverwatch", "--config", str(config), "--log-level", "DEBUG", "serve", "--source", "kafka",
            "--model", str(random_model_dir), "--index", str(index_dir)]  # fmt: skip
    err_path, out_path = tmp_path / "err", tmp_path / "out"
    with err_path.open("w") as err, out_path.open("w") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=err, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            wait_for(lambda: "consuming" in err_path.read_text() or proc.poll() is not None, 120, "daemon did not start consuming")
            time.sleep(3)  # connection attempts and their logs
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            mute.close()
    logs = err_path.read_text()
    assert "level=DEBUG" in logs and "coverwatch" in logs  # the logs are there, and verbose
    assert SECRET not in logs and SECRET not in out_path.read_text()
