"""The broadcast simulator: mixing and timeline on hand-made pieces, the broadcast chain and
codecs on generated signals, the running order, and one tiny rendered stream end to end."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import soundfile

from coverwatch.streamer.frontend.audio import SAMPLE_RATE

simulate = pytest.importorskip("coverwatch.evaluation.simulate", reason="the simulator needs the data extra")
from coverwatch.evaluation.simulate import MIN_OUTSIDE_SHARE, Piece, _plan, for_calibration, mix
from coverwatch.model.effects import CODECS, codec_roundtrip, compress, noise, rms_dbfs
from tests.conftest import melody


def tone(seconds: float, freq: float = 440.0, level: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (level * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_mix_crossfades_audible_neighbours_and_abuts_silence():
    pieces = [
        Piece("play", tone(10.0), {"song_id": "a"}),
        Piece("music", tone(8.0, 330.0), {"origin": "game"}),
        Piece("silence", np.zeros(2 * SAMPLE_RATE, np.float32)),
        Piece("jingle", tone(4.0, 660.0)),
    ]
    stream, timeline = mix(pieces, [3.0, 5.0, 5.0])
    spans = [(r["kind"], r["start_s"], r["end_s"]) for r in timeline]
    assert spans == [("play", 0.0, 10.0), ("music", 7.0, 15.0), ("silence", 15.0, 17.0), ("jingle", 17.0, 21.0)]
    assert len(stream) == 21 * SAMPLE_RATE
    assert np.abs(stream[int(15.5 * SAMPLE_RATE) : int(16.5 * SAMPLE_RATE)]).max() == 0.0
    mid = int(8.5 * SAMPLE_RATE)  # halfway through the crossfade both tones are at half level
    assert 0.25 < rms_dbfs(stream[mid - 2205 : mid + 2205]) - rms_dbfs(tone(1.0)) + 6.0 < 3.5
    assert timeline[0]["song_id"] == "a" and timeline[1]["origin"] == "game"


def test_mix_records_talk_over_and_ducks_music_under_it():
    speech = melody(3, 4.0, harmonics=1)
    music = tone(20.0)
    stream, timeline = mix([Piece("play", music, {"song_id": "a"}, (("intro", speech), ("outro", speech)))], [])
    talks = [r for r in timeline if r["kind"] == "talk"]
    assert [(r["over"], r["start_s"], r["end_s"], r["song_id"]) for r in talks] == [("intro", 0.0, 4.0, "a"), ("outro", 16.0, 20.0, "a")]
    assert not np.allclose(stream[: 4 * SAMPLE_RATE], music[: 4 * SAMPLE_RATE], atol=0.01)
    assert np.allclose(stream[6 * SAMPLE_RATE : 14 * SAMPLE_RATE], music[6 * SAMPLE_RATE : 14 * SAMPLE_RATE])


def test_compressor_evens_out_levels_and_limits_peaks():
    loud, quiet = tone(5.0, level=0.9), tone(5.0, level=0.05)
    out = compress(np.concatenate([loud, quiet]))
    assert np.abs(out).max() <= 0.95
    before = rms_dbfs(loud) - rms_dbfs(quiet)
    after = rms_dbfs(out[SAMPLE_RATE : 5 * SAMPLE_RATE]) - rms_dbfs(out[6 * SAMPLE_RATE :])
    assert after < before - 10.0  # 25 dB apart before, much closer after a 4:1 compressor
    assert abs(rms_dbfs(out) - (-16.0)) < 4.0


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_codecs_round_trip_lossy_but_recognisable(codec):
    audio = melody(1, 6.0)
    out = codec_roundtrip(audio, codec)
    assert out.shape == audio.shape and out.dtype == np.float32
    best = max(float(np.corrcoef(audio[: -lag or None], out[lag:])[0, 1]) for lag in range(0, 3000, 10))
    assert 0.5 < best < 0.9999  # the same music, but not a lossless copy


def test_noise_has_the_requested_level():
    out = noise(np.random.default_rng(0), 3.0, -40.0)
    assert len(out) == 3 * SAMPLE_RATE and abs(rms_dbfs(out) + 40.0) < 0.1


class FakeTune:
    def __init__(self, tune_id: str) -> None:
        self.tune_id = tune_id


def test_plan_is_seeded_and_keeps_outside_music_at_least_half():
    catalog, outsiders = [FakeTune(f"c{i}") for i in range(5)], [FakeTune(f"o{i}") for i in range(5)]
    plan = _plan(np.random.default_rng(3), 3600.0, catalog, outsiders)
    again = _plan(np.random.default_rng(3), 3600.0, catalog, outsiders)
    assert [(i["kind"], i["seconds"]) for i in plan] == [(i["kind"], i["seconds"]) for i in again]
    plays = [i for i in plan if i["kind"] == "play"]
    play_s = sum(i["seconds"] for i in plays)
    outside_s = sum(i["seconds"] for i in plan if i["kind"] == "music")
    assert outside_s >= MIN_OUTSIDE_SHARE * (outside_s + play_s) - 200.0  # the last play may not be balanced yet
    assert all(30.0 <= i["seconds"] <= i["whole_s"] for i in plays)
    assert any(i["seconds"] < 60 for i in plays) and any(i["seconds"] >= 60 for i in plays)
    assert {i["kind"] for i in plan} >= {"play", "music", "jingle", "ad"}
    background = _plan(np.random.default_rng(3), 600.0, [], outsiders)
    assert background and not any(i["kind"] == "play" for i in background)


def test_calibration_material_is_a_stable_minority():
    names = [f"dir/track{i}.ogg" for i in range(400)]
    share = sum(map(for_calibration, names)) / len(names)
    assert 0.2 < share < 0.4 and [for_calibration(n) for n in names] == [for_calibration(n) for n in names]


needs_material = pytest.mark.skipif(
    shutil.which("fluidsynth") is None or shutil.which("espeak-ng") is None or not simulate.GAME_MUSIC_DIRS[1].is_dir(),
    reason="needs fluidsynth, espeak-ng and hyperrogue-music (Debian)",
)


@needs_material
def test_tiny_stream_end_to_end_and_cached(tmp_path):
    path = simulate.simulate_stream(tmp_path, seed=5, duration_s=60.0, catalog_size=3)
    truth = json.loads(path.with_suffix(".json").read_text())
    info = soundfile.info(path)
    assert info.samplerate == SAMPLE_RATE and abs(info.duration - truth["duration_s"]) < 0.01
    assert truth["codec"] in CODECS and truth["plays"]
    refs = (tmp_path / "catalog" / "refs.csv").read_text().splitlines()
    catalog_ids = {line.split(",")[0] for line in refs[1:]}
    assert len(catalog_ids) == 3 and {p["song_id"] for p in truth["plays"]} <= catalog_ids
    for seg in truth["segments"]:
        assert 0.0 <= seg["start_s"] < seg["end_s"] <= truth["duration_s"] + 1e-3
    audio, _ = soundfile.read(path, dtype="float32")
    first = truth["plays"][0]
    assert rms_dbfs(audio[int(first["start_s"] * SAMPLE_RATE) : int(first["end_s"] * SAMPLE_RATE)]) > -35.0
    mtime = path.stat().st_mtime_ns
    assert simulate.simulate_stream(tmp_path, seed=5, duration_s=60.0, catalog_size=3) == path
    assert path.stat().st_mtime_ns == mtime  # cached, not rendered again
