"""Artefact integrity: damaged model and index files are refused with a message naming the
file, a damaged index sent by SIGHUP leaves the loaded one serving, and `coverwatch index
build` killed at any point of its write leaves the old or the new index, both complete.

Damage is real: one bit flipped or the file cut short, on copies of freshly exported
models and freshly built indexes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import soundfile

from coverwatch.streamer.embed.artifacts import MODEL_FILES, ArtifactError, load_model_info
from coverwatch.streamer.frontend.audio import SAMPLE_RATE
from coverwatch.streamer.search.store import MANIFEST, load_index, read_manifest
from tests.conftest import coverwatch, melody
from tests.daemon import Daemon, free_port, send_stream, wait_for, write_config

CHUNK_S = 0.5
KILL_POLL_S = 0.0002  # how often the kill loop looks at the index folder


def flip_bit(path: Path, offset: int, bit: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def same_json(a: bytes, b: bytes) -> bool:
    """True when both parse to equal values (a flip of a float's last digit can leave the number unchanged)."""
    try:
        return json.loads(a) == json.loads(b)
    except ValueError:
        return False


def truncate(path: Path, fraction: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


# --------------------------------------------------------------------------- model


@pytest.mark.parametrize("name", ["cqt", "encoder"])
@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_model_graph_is_refused(random_model_dir, tmp_path, name, damage):
    model = tmp_path / "model"
    shutil.copytree(random_model_dir, model)
    graph = model / MODEL_FILES[name]
    if damage == "flip":
        flip_bit(graph, graph.stat().st_size // 2, bit=3)
    else:
        truncate(graph, 0.7)
    with pytest.raises(ArtifactError, match=rf"{MODEL_FILES[name]}: sha256 does not match model.json"):
        load_model_info(model)


def test_every_single_bit_flip_in_model_json_is_refused(random_model_dir, tmp_path):
    """model.json carries sidecar_sha256 over all its fields, so no one-bit change to any
    byte (values, keys, punctuation) that changes its content yields a model that loads."""
    model = tmp_path / "model"
    shutil.copytree(random_model_dir, model)
    sidecar = model / MODEL_FILES["sidecar"]
    original = sidecar.read_bytes()
    assert "sidecar_sha256" in json.loads(original)
    accepted = []
    for offset in range(len(original)):
        data = bytearray(original)
        data[offset] ^= 1 << (offset % 8)
        sidecar.write_bytes(bytes(data))
        try:
            load_model_info(model, verify=False)
        except ArtifactError:
            continue
        if not same_json(bytes(data), original):  # e.g. a float's 17th digit: the same number
            accepted.append((offset, original[max(0, offset - 15) : offset + 15]))
    sidecar.write_bytes(original)
    load_model_info(model)  # the undamaged copy still loads
    assert not accepted, f"{len(accepted)} of {len(original)} flips loaded, e.g. {accepted[:3]}"


def test_truncated_model_json_is_refused(random_model_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(random_model_dir, model)
    truncate(model / MODEL_FILES["sidecar"], 0.6)
    with pytest.raises(ArtifactError, match="model.json: corrupt model sidecar"):
        load_model_info(model)


def test_cli_refuses_a_damaged_model_with_one_line(random_model_dir, index_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(random_model_dir, model)
    flip_bit(model / "encoder.onnx", 1000)
    soundfile.write(tmp_path / "q.wav", melody(0, 12.0), SAMPLE_RATE)
    proc = coverwatch("identify", "--model", model, "--index", index_dir, tmp_path / "q.wav")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("coverwatch: error: ")
    assert "encoder.onnx: sha256 does not match model.json" in proc.stderr
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- index


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_faiss_file_is_refused(index_dir, damage):
    faiss_file = next(index_dir.glob("vectors-*.faiss"))
    if damage == "flip":
        flip_bit(faiss_file, faiss_file.stat().st_size - 20, bit=5)
    else:
        truncate(faiss_file, 0.5)
    with pytest.raises(ArtifactError, match=r"vectors-.*\.faiss: sha256 does not match the manifest"):
        load_index(index_dir)


def test_every_single_bit_flip_in_the_manifest_is_refused(index_dir):
    """The manifest records the model's sha256s and a sha256 of itself: any one-bit change
    that changes its content (a vector's span, a calibration value, a song title, the FAISS
    digest) is refused."""
    manifest_path = index_dir / MANIFEST
    original = manifest_path.read_bytes()
    manifest = json.loads(original)
    assert {"cqt_sha256", "encoder_sha256", "model_hash"} <= set(manifest["model"])
    assert manifest["model"]["model_hash"] == manifest["model_hash"]
    accepted = []
    for offset in range(len(original)):
        data = bytearray(original)
        data[offset] ^= 1 << (offset % 8)
        manifest_path.write_bytes(bytes(data))
        try:
            read_manifest(index_dir)
        except ArtifactError:
            continue
        if not same_json(bytes(data), original):
            accepted.append((offset, original[max(0, offset - 15) : offset + 15]))
    manifest_path.write_bytes(original)
    assert len(load_index(index_dir).songs) == 3
    assert not accepted, f"{len(accepted)} of {len(original)} flips loaded, e.g. {accepted[:3]}"


def test_truncated_manifest_is_refused(index_dir):
    truncate(index_dir / MANIFEST, 0.9)
    with pytest.raises(ArtifactError, match="manifest.json: corrupt index manifest"):
        load_index(index_dir)


def test_sighup_with_a_bit_flipped_index_keeps_the_old_one_serving(kafka_broker, make_topic, random_model_dir, index_dir, tmp_path):
    topic = make_topic(1)
    config = write_config(tmp_path / "d.toml", kafka_broker.bootstrap, topic, f"{topic}.events", f"g-{uuid.uuid4().hex[:8]}", free_port())
    with Daemon(tmp_path, "d", config, random_model_dir, index_dir) as daemon:
        assert daemon.metric("coverwatch_index_songs") == 3
        faiss_file = next(index_dir.glob("vectors-*.faiss"))
        flip_bit(faiss_file, faiss_file.stat().st_size // 2)
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: daemon.metric("coverwatch_index_reloads_total{outcome=failed}") == 1, 30, "damaged index not refused", daemon)
        assert daemon.metric("coverwatch_index_songs") == 3
        assert "sha256 does not match the manifest" in daemon.logs()
        audio = melody(4, 6.0)
        send_stream(kafka_broker.bootstrap, topic, "s", audio, SAMPLE_RATE, CHUNK_S)
        chunks = -(-len(audio) // int(CHUNK_S * SAMPLE_RATE))
        wait_for(lambda: daemon.chunks() >= chunks, 60, "no chunks served after the refused reload", daemon)
        assert daemon.stop() == 0


# --------------------------------------------------------------------------- killed writes


def _kill_when(proc: subprocess.Popen, index_dir: Path, seen: Callable[[Path], bool], timeout_s: float = 240.0) -> bool:
    """SIGKILL `proc` the moment `seen(index_dir)` holds; False if it finished first."""
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None and time.monotonic() < deadline:
        if seen(index_dir):
            proc.kill()
            proc.wait()
            return True
        time.sleep(KILL_POLL_S)
    proc.wait(timeout=10)
    return False


def _names(index_dir: Path) -> set[str]:
    try:
        return {entry.name for entry in os.scandir(index_dir)}
    except FileNotFoundError:
        return set()


def test_index_build_killed_mid_write_leaves_old_or_new_index(random_model_dir, refs_csv, index_dir, tmp_path):
    """`coverwatch index build` over an existing 3-song index with 4 songs, SIGKILLed at each
    step of its write: as soon as the new FAISS temp file appears, once the new FAISS file
    has its name, once the manifest's temp file appears, and once the new manifest is in
    place. Each time the folder loads as the complete old (3 songs) or new (4 songs) index,
    and the following write cleans up what the killed one left."""
    soundfile.write(refs_csv.parent / "song3.wav", melody(3, 30.0), SAMPLE_RATE)
    refs4 = refs_csv.parent / "refs4.csv"
    refs4.write_text(refs_csv.read_text() + "song3,Song 3,song3.wav,artist3\n")
    old_faiss = {p.name for p in index_dir.glob("vectors-*.faiss")}

    def new_faiss(d: Path) -> bool:
        return any(n.startswith("vectors-") and n.endswith(".faiss") and n not in old_faiss for n in _names(d))

    def new_manifest(d: Path) -> bool:
        try:
            return len(json.loads((d / MANIFEST).read_text())["songs"]) == 4
        except (OSError, ValueError, KeyError):
            return False

    kill_points = {
        "faiss temp file": lambda d: any(n.endswith(".faiss.tmp") for n in _names(d)),
        "new faiss file": new_faiss,
        "manifest temp file": lambda d: MANIFEST + ".tmp" in _names(d),
        "new manifest": new_manifest,
    }
    # --force: each build replaces the 3-song index copied into `work`
    args = [sys.executable, "-m", "coverwatch", "index", "build", "--force", "--model", str(random_model_dir), "--refs", str(refs4), "--out"]
    outcomes = {}
    for point, seen in kill_points.items():
        work = tmp_path / f"kill-{point.replace(' ', '-')}"
        shutil.copytree(index_dir, work)
        proc = subprocess.Popen([*args, str(work)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        killed = _kill_when(proc, work, seen)
        left_behind = _names(work)
        songs = len(load_index(work).songs)  # never a half-written index
        assert songs in (3, 4), f"{point}: {songs} songs"
        if MANIFEST + ".tmp" in left_behind:
            # The kill landed before the manifest's rename: the old manifest, and the old
            # FAISS file it names, must still be there and whole.
            assert songs == 3, f"{point}: manifest temp file left, yet {songs} songs"
        outcomes[point] = (killed, songs)
        coverwatch("index", "build", "--force", "--model", random_model_dir, "--refs", refs4, "--out", work, check=True)
        live = [next(work.glob(pattern)).name for pattern in ("vectors-*.faiss", "table-*.npy", "chroma-*.npy")]
        assert sorted(_names(work)) == sorted([MANIFEST, *live])
        assert len(load_index(work).songs) == 4
    caught = [p for p, (killed, _) in outcomes.items() if killed]
    # The temp files live for milliseconds; the polling loop must have caught the later points,
    # which last until the process ends. A kill is not instant, so the process may have got one
    # step further than the point that triggered it: a point's outcome is old or new, and the
    # new manifest, once seen, can only load as the new index.
    assert {"new faiss file", "new manifest"} <= set(caught), outcomes
    assert outcomes["new manifest"][1] == 4, outcomes
