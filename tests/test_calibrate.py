"""Calibration: the extreme-value model on synthetic score distributions, the per-hop
statistics on hand-made hops, threshold resolution, and `coverwatch calibrate` / `index add`
on a real index."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile

from coverwatch.index_builder.calibrate import needs_recalibration
from coverwatch.streamer.config import DecisionConfig, StreamConfig
from coverwatch.streamer.decide.calibration import (
    ALIGNMENT_KEYS,
    SECONDS_PER_DAY,
    Gumbel,
    block_maxima,
    bootstrap_interval,
    false_alarms_per_day,
    fit_gumbel,
    leaders,
    p_value,
    run_statistic,
    settings_drift,
    thresholds_for_rate,
)
from coverwatch.streamer.frontend.audio import SAMPLE_RATE
from coverwatch.streamer.service.pipeline import resolve_thresholds
from tests.conftest import coverwatch, melody, tune


def test_gumbel_fit_recovers_parameters():
    maxima = np.random.default_rng(0).gumbel(0.4, 0.03, size=5000)
    g = fit_gumbel(maxima)
    assert g.loc == pytest.approx(0.4, abs=0.003) and g.scale == pytest.approx(0.03, rel=0.05)
    assert g.sf(g.isf(1e-4)) == pytest.approx(1e-4, rel=1e-6)


def synthetic_hops(rng: np.random.Generator, n_hops: int, n_songs: int) -> np.ndarray:
    """Per-hop top score of unrelated audio: the max over songs of N(0.3, 0.05), smoothed
    over neighbouring hops as overlapping windows are (so hops are not independent)."""
    per_song = rng.normal(0.3, 0.05, size=(n_hops + 3, n_songs)).max(axis=1)
    return np.convolve(per_song, np.ones(4) / 4, mode="valid")[:n_hops]


def test_calibrated_rate_holds_on_fresh_synthetic_audio():
    """Fit on 500 h of synthetic hops, then count threshold crossings on 500 fresh hours."""
    hop_s, block_s, target = 2.5, 60.0, 100.0  # a rate high enough to count
    rng = np.random.default_rng(1)
    hops = int(500 * 3600 / hop_s)
    stat = run_statistic(np.zeros(hops, np.int64), synthetic_hops(rng, hops, 20), start_hops=2)
    maxima, n_blocks = block_maxima(stat, int(block_s / hop_s))
    fit = thresholds_for_rate(maxima, n_blocks, block_s, target)
    fresh = run_statistic(np.zeros(hops, np.int64), synthetic_hops(rng, hops, 20), start_hops=2)
    above = fresh >= fit["start_threshold"]
    crossings = int(above[0]) + int(np.count_nonzero(above[1:] & ~above[:-1]))
    per_day = crossings / (hops * hop_s / SECONDS_PER_DAY)
    assert target / 2 < per_day < target * 2, (per_day, fit)
    assert fit["end_threshold"] < fit["start_threshold"]


def test_threshold_grows_with_catalog_size_and_with_stricter_targets():
    rng = np.random.default_rng(2)
    fits = {}
    for n_songs in (10, 1000):
        stat = synthetic_hops(rng, 20000, n_songs)
        maxima, n_blocks = block_maxima(stat, 24)
        fits[n_songs] = {t: thresholds_for_rate(maxima, n_blocks, 60.0, t)["start_threshold"] for t in (10.0, 1.0, 0.1)}
    assert fits[1000][1.0] > fits[10][1.0] + 0.05  # the maximum over more songs is higher
    assert fits[10][10.0] < fits[10][1.0] < fits[10][0.1]


def test_start_threshold_interval_covers_the_truth_and_narrows_with_more_blocks():
    """The bootstrap interval on synthetic Gumbel maxima: it holds the true 1-per-day threshold
    for most draws (percentile bootstraps of far quantiles run below their nominal 90 % on few
    blocks: 73 % at 20 blocks, 88 % at 200 in a 100-draw check), and it narrows as blocks grow."""
    truth_law, p_block = Gumbel(0.38, 0.04), 1.0 / 1440.0  # 60-s blocks, 1 false alarm per day
    truth = truth_law.isf(p_block)
    widths, covered = {}, {}
    for n_blocks in (20, 200):
        intervals = [bootstrap_interval(np.random.default_rng(seed).gumbel(0.38, 0.04, n_blocks), p_block) for seed in range(40)]
        widths[n_blocks] = float(np.median([high - low for low, high in intervals]))
        covered[n_blocks] = np.mean([low <= truth <= high for low, high in intervals])
    assert covered[20] >= 0.6 and covered[200] >= 0.75, covered
    assert widths[200] < widths[20] / 1.8, widths
    fit = thresholds_for_rate(np.random.default_rng(0).gumbel(0.38, 0.04, 30), 30, 60.0, 1.0)
    low, high = fit["start_threshold_interval"]
    assert low < fit["start_threshold"] < high and fit["n_blocks"] == 30


def test_too_little_audio_is_refused():
    with pytest.raises(ValueError, match="usable"):
        thresholds_for_rate(np.array([0.5, 0.6, 0.55]), 3, 60.0, 1.0)


def test_run_statistic_needs_one_song_leading_start_hops():
    songs = np.array([1, 1, 2, 2, 2, -1, 3])
    scores = np.array([0.5, 0.7, 0.9, 0.6, 0.8, -np.inf, 0.9])
    out = run_statistic(songs, scores, start_hops=2)
    assert out.tolist() == [-np.inf, 0.5, -np.inf, 0.6, 0.6, -np.inf, -np.inf]
    assert run_statistic(songs, scores, start_hops=1).tolist() == scores.tolist()


def test_block_maxima_skip_blocks_without_a_candidate():
    stat = np.array([0.1, 0.4, -np.inf, -np.inf, 0.3, 0.2, 0.9])  # the last, partial block is dropped
    maxima, n_blocks = block_maxima(stat, 2)
    assert maxima.tolist() == [0.4, 0.3] and n_blocks == 3


def test_leaders_pick_top_song_per_hop():
    songs, scores = leaders([{3: 0.5, 1: 0.7}, {}, {2: 0.4}])
    assert songs.tolist() == [1, -1, 2] and scores.tolist() == [0.7, -np.inf, 0.4]


def calibration(start: float = 0.62, end: float = 0.5) -> dict:
    stream = {"gumbel_loc": 0.45, "gumbel_scale": 0.03, "block_s": 60.0, "usable_share": 1.0, "n_songs": 100}
    return {"start_threshold": 0.9, "end_threshold": 0.8, "stream": {**stream, "start_threshold": start, "end_threshold": end}}


def test_p_value_and_rate_follow_the_fit():
    cal = calibration()
    assert p_value(cal, 0.7) < p_value(cal, 0.6) < p_value(cal, 0.5) < 1.0
    assert p_value({"start_threshold": 0.9}, 0.7) is None
    assert false_alarms_per_day(cal, 0.6) == pytest.approx(1440 * Gumbel(0.45, 0.03).sf(0.6))


def test_thresholds_prefer_config_then_stream_then_impostor_calibration():
    assert resolve_thresholds(DecisionConfig(start_threshold=0.7, end_threshold=0.6), calibration()).source == "config"
    t = resolve_thresholds(DecisionConfig(), calibration())
    assert (t.start, t.end, t.source) == (0.62, 0.5, "stream calibration")
    t = resolve_thresholds(DecisionConfig(start_threshold=0.55), calibration())
    assert (t.start, t.end, t.source) == (0.55, 0.5, "config + stream calibration")
    t = resolve_thresholds(DecisionConfig(), {"start_threshold": 0.9, "end_threshold": 0.8})
    assert (t.start, t.source) == (0.9, "index calibration")


def test_settings_drift_names_what_changed_since_the_calibration():
    served = StreamConfig()
    alignment = {key: getattr(served, key) for key in ALIGNMENT_KEYS}
    stream = {"windows_s": served.windows_s, "hop_s": served.hop_s, "top_k": served.top_k, "silence_dbfs": served.silence_dbfs, **alignment}
    assert settings_drift({"stream": stream}, served) == []
    assert settings_drift({"stream": stream}, StreamConfig(align_weight=0.0, hop_s=5.0)) == [
        f"stream.hop_s: calibrated {served.hop_s}, configured 5.0",
        f"stream.align_weight: calibrated {served.align_weight}, configured 0.0",
    ]
    impostor = {"start_threshold": 0.7, "end_threshold": 0.5, **alignment}  # build-time: only the alignment settings count
    assert settings_drift(impostor, StreamConfig(hop_s=5.0)) == []
    assert settings_drift(impostor, StreamConfig(align_delay=3)) == [f"stream.align_delay: calibrated {served.align_delay}, configured 3"]


def test_recalibration_when_catalog_size_moves():
    cal = calibration()
    assert not needs_recalibration(cal, 120, 0.25)
    assert needs_recalibration(cal, 130, 0.25) and needs_recalibration(cal, 70, 0.25)
    assert not needs_recalibration({"start_threshold": 0.9}, 1000, 0.25)


def test_calibrate_cli_stores_thresholds_and_index_add_recalibrates(index_dir, random_model_dir, tmp_path):
    config = tmp_path / "cal.toml"
    # Embedding scores alone: with the random model and the alignment term (these synthetic tunes
    # share their pitch material) the leading song changes nearly every hop, leaving too few
    # usable 5-s blocks. The alignment term's calibration is checked against the daemon in
    # tests/test_stream_eval.py (replay of the calibration's scores gives the daemon's events).
    config.write_text("[index_build]\ncalibration_block_s = 5.0\ntarget_false_alarms_per_day = 2.0\n[stream]\nalign_weight = 0.0\n")
    audio = []
    for seed in (50, 51):  # unrelated to the catalog's songs 0-2
        audio.append(tmp_path / f"outside{seed}.wav")
        soundfile.write(audio[-1], np.concatenate([melody(seed, 20.0), tune(seed, 20.0)]), SAMPLE_RATE)
    proc = coverwatch("--config", config, "calibrate", index_dir, "--model", random_model_dir, "--audio", *audio, check=True)
    stream = json.loads(proc.stdout)["stream"]
    assert stream["n_songs"] == 3 and stream["audio_s"] == pytest.approx(80.0, abs=0.1) and stream["block_s"] == 5.0
    assert stream["end_threshold"] <= stream["start_threshold"]
    assert false_alarms_per_day({"stream": stream}, stream["start_threshold"]) == pytest.approx(2.0, rel=1e-6)
    manifest = json.loads((index_dir / "manifest.json").read_text())
    assert manifest["calibration"]["stream"]["start_threshold"] == stream["start_threshold"]
    assert "impostor_median" in manifest["calibration"]  # the build-time calibration stays

    soundfile.write(tmp_path / "song9.wav", tune(9, 30.0), SAMPLE_RATE)  # 3 -> 4 songs: +33 % > recalibrate_growth
    (tmp_path / "more.csv").write_text("song_id,title,path\nsong9,Song 9,song9.wav\n")
    proc = coverwatch(
        "--config", config, "index", "add", index_dir, "--model", random_model_dir, "--refs", tmp_path / "more.csv", check=True
    )
    assert json.loads(proc.stdout)["calibration"]["stream"]["n_songs"] == 4
    assert "re-running the stream calibration" in proc.stderr

    for path in audio:
        path.unlink()
    soundfile.write(tmp_path / "song8.wav", tune(8, 30.0), SAMPLE_RATE)
    soundfile.write(tmp_path / "song7.wav", tune(7, 30.0), SAMPLE_RATE)
    (tmp_path / "more2.csv").write_text("song_id,title,path\nsong8,Song 8,song8.wav\nsong7,Song 7,song7.wav\n")
    proc = coverwatch(
        "--config", config, "index", "add", index_dir, "--model", random_model_dir, "--refs", tmp_path / "more2.csv", check=True
    )
    assert json.loads(proc.stdout)["calibration"]["stream"]["n_songs"] == 4  # audio gone: kept, with a warning
    assert "thresholds are stale" in proc.stderr


def test_calibration_gates_silence_as_the_daemon_does(index_dir, random_model_dir):
    """A tune, then a DC offset of 0.3 with -80 dBFS noise: the daemon embeds no window of the
    DC part, and the calibration's hop scores (coverwatch.index_builder.calibrate.hop_scores) skip the
    same hops; both measure a hop's energy about its mean."""
    from coverwatch.index_builder.calibrate import hop_scores
    from coverwatch.streamer.config import StreamConfig
    from coverwatch.streamer.embed.embedder import Embedder
    from coverwatch.streamer.search.store import load_index
    from coverwatch.streamer.service.pipeline import Monitor

    cfg = StreamConfig(windows_s=[10.0], hop_s=2.5)
    dc = 0.3 + 1e-4 * np.random.default_rng(0).standard_normal(30 * SAMPLE_RATE)
    audio = np.concatenate([melody(0, 20.0), dc]).astype(np.float32)
    embedder = Embedder(random_model_dir, threads=1)
    times, scores = hop_scores(embedder, load_index(index_dir), audio, cfg)
    dc_hops = [bool(s) for t, s in zip(times, scores) if t >= 20.0 + 10.0 + 1.0]  # windows wholly in the DC part
    assert dc_hops and not any(dc_hops)
    assert any(scores[i] for i, t in enumerate(times) if t <= 20.0)

    monitor = Monitor(embedder, load_index(index_dir), cfg, DecisionConfig(start_threshold=0.99, end_threshold=0.9))
    chunk = SAMPLE_RATE // 2
    for first in range(0, len(audio), chunk):
        monitor.process_chunk("s", audio[first : first + chunk], SAMPLE_RATE)
    silent = monitor.streams["s"].counts["silent_windows"]
    assert silent == sum(1 for s in scores if not s)  # the same hops gated in both
