"""What a station's operator does, through the real command line: index a folder of their own
music in whatever formats it holds, keep the index safe, get honest thresholds and clear
errors, and turn the daemon's events into an as-run report."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile

from coverwatch.streamer.frontend.audio import SAMPLE_RATE
from tests.conftest import coverwatch, tune
from tests.encoded import encode

TAGS = {
    "anna.mp3": {"title": "Anna's Reel", "artist": "Anna Example", "album": "Reels", "isrc": "XXA012600001"},
    "bert.m4a": {"title": "Bert, the Jig", "artist": "Bert Example", "album": "Jigs", "isrc": "XXA012600002"},
    "cara.flac": {"title": "Cara's Air", "artist": "Cara Example", "isrc": "XXA012600003"},
    "dora.wma": {"title": "Dora", "artist": "Dora Example"},
}


def mixed_folder(folder: Path) -> dict[str, np.ndarray]:
    """MP3, M4A (AAC), FLAC and WMA files with tags, 25 s each -> {song_id: audio}."""
    folder.mkdir(parents=True, exist_ok=True)
    audio = {}
    for seed, (name, tags) in enumerate(TAGS.items()):
        audio[Path(name).stem] = tune(seed + 20, 25.0)
        encode(folder / name, audio[Path(name).stem], SAMPLE_RATE, tags)
    return audio


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The single `coverwatch: error:` line of a failed command (and no traceback)."""
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("coverwatch: error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def manifest_songs(index: Path) -> dict[str, dict]:
    return {s["song_id"]: s for s in json.loads((index / "manifest.json").read_text())["songs"]}


@pytest.fixture()
def music(tmp_path) -> tuple[Path, dict[str, np.ndarray]]:
    folder = tmp_path / "music"
    return folder, mixed_folder(folder)


def test_mixed_folder_indexes_with_tags_and_a_broken_file_is_listed(music, random_model_dir, tmp_path):
    folder, _ = music
    (folder / "broken.mp3").write_bytes(b"\xff\xfb\x90\x00" + b"not audio" * 50)
    index = tmp_path / "idx"
    refused = coverwatch("index", "build", "--refs", folder, "--out", index, "--model", random_model_dir)
    assert refused.returncode == 1
    assert "1 of 5 reference(s) cannot be decoded, nothing written" in error_line(refused)
    assert "broken.mp3" in error_line(refused) and "--skip-errors" in error_line(refused)
    assert not index.exists()

    built = json.loads(coverwatch("index", "build", "--refs", folder, "--out", index, "--model", random_model_dir, "--skip-errors", check=True).stdout)
    assert built["songs"] == 4
    assert [s["song_id"] for s in built["skipped"]] == ["broken"]
    assert "cannot decode audio" in built["skipped"][0]["error"]
    songs = manifest_songs(index)
    assert songs["anna"]["title"] == "Anna's Reel"
    assert songs["anna"]["metadata"] == {"artist": "Anna Example", "album": "Reels", "isrc": "XXA012600001"}
    assert songs["bert"]["metadata"]["isrc"] == "XXA012600002"  # an MP4 free-form atom
    assert songs["cara"]["metadata"] == {"artist": "Cara Example", "isrc": "XXA012600003"}
    assert songs["dora"]["title"] == "Dora" and songs["dora"]["metadata"] == {"artist": "Dora Example"}


def test_an_existing_index_is_replaced_only_with_force(music, random_model_dir, tmp_path):
    folder, _ = music
    index = tmp_path / "idx"
    coverwatch("index", "build", "--refs", folder, "--out", index, "--model", random_model_dir, check=True)
    before = (index / "manifest.json").read_bytes()
    again = coverwatch("index", "build", "--refs", folder, "--out", index, "--model", random_model_dir)
    assert again.returncode == 1 and "already holds an index (4 songs): pass --force" in error_line(again)
    assert (index / "manifest.json").read_bytes() == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    other = coverwatch("index", "build", "--refs", folder, "--out", tmp_path / "other", "--model", random_model_dir)
    assert "is not empty and holds no index" in error_line(other)
    forced = coverwatch("index", "build", "--refs", folder, "--out", index, "--model", random_model_dir, "--force", check=True)
    assert json.loads(forced.stdout)["songs"] == 4


def test_add_replace_and_remove(music, random_model_dir, tmp_path):
    folder, _ = music
    index = tmp_path / "idx"
    coverwatch("index", "build", "--refs", folder, "--out", index, "--model", random_model_dir, check=True)
    update = tmp_path / "update"
    update.mkdir()
    encode(update / "anna.flac", tune(99, 30.0), SAMPLE_RATE, {"title": "Anna's Reel (2026 remaster)", "artist": "Anna Example"})
    clash = coverwatch("index", "add", index, "--refs", update, "--model", random_model_dir)
    assert "already in the index: anna (pass --replace to update them)" in error_line(clash)

    replaced = json.loads(coverwatch("index", "add", index, "--refs", update, "--replace", "--model", random_model_dir, check=True).stdout)
    songs = manifest_songs(index)
    assert replaced["songs"] == 4 and songs["anna"]["title"] == "Anna's Reel (2026 remaster)"
    assert songs["anna"]["source"].endswith("anna.flac")

    query = tmp_path / "query.wav"
    soundfile.write(query, tune(22, 25.0), SAMPLE_RATE)  # cara's tune
    ranked = json.loads(coverwatch("identify", "--json", "--top-k", "4", "--index", index, "--model", random_model_dir, query, check=True).stdout)
    assert ranked["matches"][0]["song_id"] == "cara"
    assert ranked["matches"][0]["metadata"]["artist"] == "Cara Example"

    removed = json.loads(coverwatch("index", "remove", "cara", "dora", "--from", index, "--model", random_model_dir, check=True).stdout)
    assert removed["songs"] == 2 and set(manifest_songs(index)) == {"anna", "bert"}
    ranked = json.loads(coverwatch("identify", "--json", "--top-k", "4", "--index", index, "--model", random_model_dir, query, check=True).stdout)
    assert {m["song_id"] for m in ranked["matches"]} == {"anna", "bert"}
    unknown = coverwatch("index", "remove", "cara", "--from", index, "--model", random_model_dir)
    assert "no such song_id(s) in the index: cara (nothing removed)" in error_line(unknown)
    everything = coverwatch("index", "remove", "anna", "bert", "--from", index, "--model", random_model_dir)
    assert "would leave an empty index" in error_line(everything)


def test_a_small_catalog_gets_the_fallback_threshold_and_says_so(music, random_model_dir, tmp_path):
    folder, _ = music
    two = tmp_path / "two"
    two.mkdir()
    for name in ("anna.mp3", "bert.m4a"):
        (two / name).write_bytes((folder / name).read_bytes())
    built = coverwatch("index", "build", "--refs", two, "--out", tmp_path / "idx", "--model", random_model_dir, check=True)
    assert "impostor scores (at least 1000 are needed)" in built.stderr and "coverwatch calibrate" in built.stderr
    info = json.loads(coverwatch("index", "info", tmp_path / "idx", check=True).stdout)
    assert info["thresholds"]["set_by"].startswith("fallback default: only ")
    assert info["thresholds"]["start"] >= 0.98 and info["thresholds"]["end"] >= 0.55  # the [index_build] fallbacks


def test_identify_refuses_too_short_and_silent_queries(index_dir, random_model_dir, tmp_path):
    soundfile.write(tmp_path / "blip.wav", tune(0, 0.006), SAMPLE_RATE)
    soundfile.write(tmp_path / "second.wav", tune(0, 1.0), SAMPLE_RATE)
    soundfile.write(tmp_path / "silence.wav", np.zeros(15 * SAMPLE_RATE, np.float32), SAMPLE_RATE)
    soundfile.write(tmp_path / "full.wav", tune(0, 20.0), SAMPLE_RATE, subtype="PCM_16")
    data = (tmp_path / "full.wav").read_bytes()
    (tmp_path / "truncated.wav").write_bytes(data[: len(data) // 8])  # 2.5 s of the promised 20
    files = ["blip.wav", "second.wav", "silence.wav", "truncated.wav", "song1.wav"]
    proc = coverwatch("identify", "--json", "--index", index_dir, "--model", random_model_dir, *[tmp_path / f for f in files])
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert "too short (0.006 s; at least 10 s)" in records[0]["error"]
    assert "too short (1 s; at least 10 s)" in records[1]["error"]
    assert "silence (0.0 s above the -55 dBFS gate" in records[2]["error"]
    assert re.search(r"too short \(2\.\d+ s; at least 10 s\)", records[3]["error"])
    assert records[4]["matches"][0]["song_id"] == "song1" and records[4]["matches"][0]["metadata"] == {"artist": "artist1"}


def test_no_microphone_is_one_line(index_dir, random_model_dir):
    proc = coverwatch("serve", "--source", "mic:no-such-device-coverwatch", "--metrics-port", "0", "--index", index_dir, "--model", random_model_dir, timeout=60)
    assert proc.returncode == 1
    line = error_line(proc)
    assert "cannot open microphone no-such-device-coverwatch" in line and "--source file:PATH or --source kafka" in line


def test_metrics_port_out_of_range_is_one_line(index_dir, random_model_dir):
    proc = coverwatch("serve", "--metrics-port", "99999", "--index", index_dir, "--model", random_model_dir)
    assert proc.returncode == 2 and "metrics.port: 99999 is out of range [0, 65535]" in proc.stderr
    assert "Traceback" not in proc.stderr


def _closed_port() -> int:
    """A 127.0.0.1 port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_no_broker_waits_a_bounded_time_then_one_line(index_dir, random_model_dir, tmp_path):
    config = tmp_path / "cw.toml"
    config.write_text(f'[kafka]\nbootstrap_servers = "127.0.0.1:{_closed_port()}"\nconnect_timeout_s = 2\n[metrics]\nport = 0\n')
    started = time.monotonic()
    proc = coverwatch("--config", config, "serve", "--source", "kafka", "--index", index_dir, "--model", random_model_dir, timeout=120)
    assert proc.returncode == 1 and time.monotonic() - started < 60
    assert "no Kafka broker reachable at 127.0.0.1:" in error_line(proc) and "within 2 s" in error_line(proc)
    assert "level=ERROR" not in proc.stderr  # the Kafka client's own retry noise stays out


def test_sigterm_while_waiting_for_a_broker_stops_promptly(index_dir, random_model_dir, tmp_path):
    config = tmp_path / "cw.toml"
    config.write_text(f'[kafka]\nbootstrap_servers = "127.0.0.1:{_closed_port()}"\nconnect_timeout_s = 300\n[metrics]\nport = 0\n')
    args = [sys.executable, "-m", "coverwatch", "--config", config, "serve", "--source", "kafka", "--index", index_dir, "--model", random_model_dir]
    daemon = subprocess.Popen([str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        seen = ""
        while "no Kafka broker reachable" not in seen and time.monotonic() < deadline:
            seen += os.read(daemon.stderr.fileno(), 4096).decode()
        assert "waiting up to 300 s" in seen
        daemon.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        assert daemon.wait(timeout=30) == 0
        assert time.monotonic() - stopped < 5
    finally:
        daemon.kill()
        daemon.communicate()


def test_events_carry_metadata_and_play_times_and_make_a_report(music, random_model_dir, tmp_path):
    """The done-when of the operator issue: a tagged mixed folder indexes, the daemon's
    events name the reference's artist and ISRC, and `coverwatch report` turns them into an as-run log."""
    folder, audio = music
    index = tmp_path / "idx"
    coverwatch("index", "build", "--refs", folder, "--out", index, "--model", random_model_dir, check=True)
    gap = np.zeros(10 * SAMPLE_RATE, np.float32)
    stream = np.concatenate([gap, audio["bert"], gap, audio["cara"], gap])
    soundfile.write(tmp_path / "station-a.wav", stream, SAMPLE_RATE)
    events_file = tmp_path / "events.jsonl"
    config = tmp_path / "cw.toml"
    config.write_text(f'[decision]\nstart_threshold = 0.5\nend_threshold = 0.4\nstart_hops = 1\n[sinks]\nfile = "{events_file}"\n[metrics]\nport = 0\n')
    proc = coverwatch("--config", config, "serve", "--source", f"file:{tmp_path / 'station-a.wav'}", "--fast", "--index", index, "--model", random_model_dir, check=True)
    events = [json.loads(line) for line in events_file.read_text().splitlines()]
    assert events, proc.stderr
    songs = manifest_songs(index)
    for event in events:
        assert event["schema_version"] == 2
        assert event["metadata"] == songs[event["song_id"]]["metadata"]
        assert 0 <= event["play_start_s"] <= event["match_start_s"] <= event["stream_time_s"]
        if event["event"] == "match_end":
            assert event["duration_s"] >= 0
        else:
            assert event["duration_s"] is None
    assert any(e["metadata"].get("isrc") for e in events)

    out = tmp_path / "report"
    summary = json.loads(coverwatch("report", events_file, "--out", out, check=True).stdout)
    starts = [e for e in events if e["event"] == "match_start"]
    assert summary["plays"] == len(starts)
    with (out / "as-run.csv").open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["station"], r["song_id"]) for r in rows] == [("station-a", e["song_id"]) for e in starts]
    assert {r["isrc"] for r in rows} == {songs[e["song_id"]]["metadata"].get("isrc", "") for e in starts}
    assert "<svg" in (out / "as-run.html").read_text()
