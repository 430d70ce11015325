"""The `coverwatch` command line, run as a real subprocess."""

import json

import numpy as np
import pytest
import soundfile

from coverwatch.streamer.frontend.audio import SAMPLE_RATE
from tests.conftest import coverwatch, melody


def test_index_info_and_add(index_dir, random_model_dir, tmp_path):
    info = json.loads(coverwatch("index", "info", index_dir, check=True).stdout)
    assert info["songs"] == 3
    soundfile.write(tmp_path / "extra.flac", melody(11, 25.0), SAMPLE_RATE)
    (tmp_path / "more.csv").write_text("song_id,title,path\nextra,Extra,extra.flac\n")
    added = json.loads(
        coverwatch("index", "add", index_dir, "--model", random_model_dir, "--refs", tmp_path / "more.csv", check=True).stdout
    )
    assert added["songs"] == 4


def test_identify_json_one_line_per_file_best_first(index_dir, random_model_dir, tmp_path):
    (tmp_path / "empty.wav").write_bytes(b"")
    proc = coverwatch(
        "identify",
        "--model",
        random_model_dir,
        "--index",
        index_dir,
        "--top-k",
        "2",
        "--json",
        tmp_path / "song2.wav",
        tmp_path / "empty.wav",
    )
    assert proc.returncode == 1  # one file failed
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(lines) == 2
    assert lines[0]["matches"][0]["song_id"] == "song2" and len(lines[0]["matches"]) == 2
    assert lines[0]["matches"][0]["score"] >= lines[0]["matches"][1]["score"]
    assert "empty file" in lines[1]["error"]


def test_serve_file_prints_only_events_on_stdout(index_dir, random_model_dir, tmp_path):
    audio = np.concatenate([melody(0, 25.0), np.zeros(SAMPLE_RATE * 15, np.float32)])
    soundfile.write(tmp_path / "stream.wav", np.stack([audio, audio], 1), SAMPLE_RATE)
    events_file = tmp_path / "events.jsonl"
    config = tmp_path / "cw.toml"
    config.write_text(f'[decision]\nstart_threshold = 0.5\nend_threshold = 0.4\nstart_hops = 1\n[sinks]\nfile = "{events_file}"\n')
    proc = coverwatch(
        "--config",
        config,
        "serve",
        "--model",
        random_model_dir,
        "--index",
        index_dir,
        "--source",
        f"file:{tmp_path / 'stream.wav'}",
        "--fast",
        check=True,
    )
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert events, proc.stderr
    assert {e["event"] for e in events} <= {"match_start", "match_end"}
    assert set(events[0]) >= {"event", "event_id", "stream", "song_id", "title", "score", "stream_time_s", "wall_time"}
    assert events[0]["stream"] == "stream"
    assert "served" in proc.stderr and "level=INFO" in proc.stderr
    assert [json.loads(line) for line in events_file.read_text().splitlines()] == events


@pytest.mark.parametrize(
    "args, message",
    [
        (["serve", "--source", "file:/nonexistent.wav", "--index", "{idx}", "--model", "{model}"], "no such audio file"),
        (["serve", "--source", "tcp:x", "--index", "{idx}", "--model", "{model}"], "unknown source"),
        (["serve", "--source", "file:x.wav", "--index", "/nonexistent", "--model", "{model}"], "index manifest not found"),
        (["serve", "--source", "file:x.wav", "--index", "{idx}", "--model", "/nonexistent"], "model sidecar not found"),
        (["index", "build", "--refs", "/nonexistent.csv", "--out", "{tmp}/o", "--model", "{model}"], "refs file not found"),
    ],
)
def test_errors_are_one_line_with_nonzero_exit(index_dir, random_model_dir, tmp_path, args, message):
    filled = [a.format(idx=index_dir, model=random_model_dir, tmp=tmp_path) for a in args]
    proc = coverwatch(*filled)
    assert proc.returncode == 1
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("coverwatch: error:")]
    assert len(error_lines) == 1 and message in error_lines[0], proc.stderr


def test_bad_config_exits_2_and_names_the_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[stream]\nhop = 3\n")
    proc = coverwatch("--config", bad, "index", "info", tmp_path)
    assert proc.returncode == 2 and "stream.hop: unknown key (did you mean 'stream.hop_s'?)" in proc.stderr


def test_index_from_other_model_refused_by_serve(index_dir, tmp_path, random_checkpoint):
    import torch

    from coverwatch.model.export import export_model

    checkpoint = torch.load(random_checkpoint, weights_only=False)
    for value in checkpoint["model"].values():
        if value.is_floating_point():
            value.add_(0.01)
    other_ckpt = tmp_path / "other.pt"
    torch.save(checkpoint, other_ckpt)
    export_model(other_ckpt, tmp_path / "other_model")
    soundfile.write(tmp_path / "x.wav", melody(0, 5.0), SAMPLE_RATE)
    proc = coverwatch(
        "serve", "--model", tmp_path / "other_model", "--index", index_dir, "--source", f"file:{tmp_path / 'x.wav'}", "--fast"
    )
    assert proc.returncode == 1 and "rebuild the index with this model" in proc.stderr


def test_bench_runs_the_named_script_from_the_checkout():
    result = coverwatch("bench", "streams", "--help")
    assert result.returncode == 0 and "bench_streams.py" in result.stdout and "--naive-up-to" in result.stdout
    result = coverwatch("bench", "kafka", "--no-such-option")
    assert result.returncode == 1  # the script's own usage error is passed on as a failure
