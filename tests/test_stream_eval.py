"""Stream-level scoring on hand-made timelines, and `coverwatch evaluate-stream` end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile

from coverwatch.evaluation.stream_eval import (
    GRACE_S,
    PlayResult,
    StreamResult,
    TruthPlay,
    miss_table,
    play_type,
    plays_from_truth,
    plot_timeline,
    score_events,
    summarize,
    write_report,
)
from coverwatch.streamer.frontend.audio import SAMPLE_RATE
from tests.conftest import coverwatch, melody


def start(song: str, t: float, score: float = 0.8) -> dict:
    return {"event": "match_start", "song_id": song, "stream_time_s": t, "match_start_s": t, "score": score}


def end(song: str, t: float, started: float) -> dict:
    return {"event": "match_end", "song_id": song, "stream_time_s": t, "match_start_s": started, "score": 0.3}


def event_key(e: dict) -> tuple:
    return e["event"], e["song_id"], e["stream_time_s"], e["match_start_s"], round(e["score"], 4)


PLAYS = [TruthPlay("a", 10.0, 100.0), TruthPlay("b", 200.0, 245.0, {"talk_intro": True, "offset_s": 12.0}), TruthPlay("a", 400.0, 480.0)]


def test_caught_missed_false_alarm_latency_and_end_error():
    events = [start("a", 16.0), end("a", 107.5, 16.0), start("c", 300.0), end("c", 310.0, 300.0), start("a", 420.0)]
    r = score_events("s", events, PLAYS, duration_s=500.0)
    assert [p.caught for p in r.plays] == [True, False, True]
    assert r.plays[0].latency_s == pytest.approx(6.0)
    assert r.plays[0].end_error_s == pytest.approx(7.5)
    assert r.plays[2].end_error_s == pytest.approx(20.0)  # still open at the end of the stream (500 s)
    assert r.plays[1].reason == "not detected"
    assert [e["song_id"] for e in r.false_alarms] == ["c"] and r.n_starts == 3 and r.fragments == 0


def test_grace_after_play_end_counts_but_not_later():
    plays = [TruthPlay("a", 0.0, 40.0)]
    assert score_events("s", [start("a", 40.0 + GRACE_S)], plays, 100.0).plays[0].caught
    late = score_events("s", [start("a", 40.0 + GRACE_S + 0.5)], plays, 100.0)
    assert not late.plays[0].caught and len(late.false_alarms) == 1


def test_start_before_play_is_a_false_alarm_and_play_uses_next_start():
    r = score_events("s", [start("a", 5.0), start("a", 12.0)], PLAYS, 500.0)
    assert r.plays[0].detected_s == 12.0 and len(r.false_alarms) == 1


def test_second_start_in_caught_play_is_a_fragment_not_a_false_alarm():
    events = [start("a", 20.0), end("a", 40.0, 20.0), start("a", 50.0)]
    r = score_events("s", events, PLAYS, 500.0)
    assert r.fragments == 1 and r.false_alarms == [] and r.plays[0].detected_s == 20.0


def test_wrong_song_during_play_is_reported_as_confusion():
    events = [start("x", 205.0), end("x", 230.0, 205.0)]
    r = score_events("s", events, PLAYS, 500.0)
    assert r.plays[1].reason == "confused with x"
    assert len(r.false_alarms) == 1


def test_previous_match_running_over_a_play_is_an_overrun():
    events = [start("a", 20.0), end("a", 215.0, 20.0)]
    r = score_events("s", events, PLAYS, 500.0)
    assert r.plays[1].reason == "overrun by a" and r.false_alarms == []


def test_repeated_song_each_play_needs_its_own_start():
    r = score_events("s", [start("a", 15.0)], PLAYS, 500.0)
    assert [p.caught for p in r.plays] == [True, False, False]


def test_summary_buckets_rates_and_quantiles():
    plays = [TruthPlay("a", 0.0, 45.0), TruthPlay("b", 100.0, 190.0), TruthPlay("c", 300.0, 400.0), TruthPlay("d", 500.0, 520.0)]
    events = [start("a", 8.0), start("b", 104.0), start("z", 250.0)]
    results = [score_events("s1", events, plays, 1800.0), score_events("s2", [], [TruthPlay("a", 0.0, 70.0)], 1800.0)]
    s = summarize(results)
    assert s["hours"] == 1.0 and s["plays"] == 5
    assert s["recall 30-60 s"] == 1.0 and s["plays 30-60 s"] == 1
    assert s["recall >= 60 s"] == pytest.approx(1 / 3) and s["plays >= 60 s"] == 3
    assert s["plays < 30 s"] == 1
    assert s["match_start precision"] == pytest.approx(2 / 3)
    assert s["false alarms per hour"] == 1.0 and s["false alarms per 24 h"] == 24.0
    assert s["latency median s"] == pytest.approx(6.0)
    assert s["latency p90 s"] == pytest.approx(4.0 + 0.9 * 4.0)


def test_summary_without_events_or_plays_has_no_nan():
    s = summarize([score_events("s", [], [], 3600.0)])
    assert s["match_start precision"] is None and s["recall all"] is None and s["false alarms per 24 h"] == 0.0


def test_play_types_and_miss_table():
    r = score_events("s", [start("a", 16.0)], PLAYS, 500.0)
    assert play_type(PLAYS[1]) == "30-60 s, joined late, talk intro"
    table = miss_table([r])
    assert table[">= 60 s"] == {"caught": 1, "not detected": 1}
    assert table["30-60 s, joined late, talk intro"] == {"overrun": 1}  # song a's match never ended: it overlaps play b


def test_plays_from_truth_sorts_and_keeps_play_facts():
    truth = {"plays": [{"song_id": "b", "start_s": 50, "end_s": 90, "talk_outro": True}, {"song_id": "a", "start_s": 0, "end_s": 40}]}
    plays = plays_from_truth(truth)
    assert [p.song_id for p in plays] == ["a", "b"] and plays[1].info == {"talk_outro": True} and plays[1].length_s == 40


def test_report_and_plot_are_written(tmp_path):
    events = [start("a", 16.0), end("a", 107.5, 16.0), start("c", 300.0)]
    r = score_events("s", events, PLAYS, 500.0)
    truth = {"segments": [{"kind": "music", "start_s": 100, "end_s": 200}, {"kind": "talk", "start_s": 200, "end_s": 210}]}
    plot_timeline(r, truth, events, tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 5000
    write_report(tmp_path / "R.md", [r], summarize([r]), {"decision": {"start_hops": 2}}, [tmp_path / "t.png"])
    text = (tmp_path / "R.md").read_text()
    assert "| false alarms per 24 h | 173 | ≤ 1 | no |" in text
    assert "| s | b | 200-245 | 45 | 30-60 s, joined late, talk intro | not detected |" in text
    assert '"start_hops": 2' in text and "![t](t.png)" in text


def test_play_result_latency_none_when_missed():
    assert PlayResult(PLAYS[0], None, None, "not detected").latency_s is None
    assert StreamResult("s", 1.0, [], 0, [], 0).plays == []


def test_evaluate_stream_cli_runs_the_daemon_and_replay_matches_it(index_dir, random_model_dir, tmp_path):
    """A tiny stream (a catalog song's own audio, then unrelated audio) through `coverwatch
    evaluate-stream`; the tuning replay (whole-file hop scores + the daemon's hysteresis)
    must give exactly the daemon's events."""
    from coverwatch.evaluation.stream_eval import replay, stream_trace
    from coverwatch.streamer.config import Config
    from coverwatch.streamer.embed.embedder import Embedder
    from coverwatch.streamer.search.store import load_index

    song, _ = soundfile.read(tmp_path / "song1.wav", dtype="float32")  # written by the refs_csv fixture
    stream = np.concatenate([song, np.zeros(SAMPLE_RATE, np.float32), melody(99, 25.0)])
    path = tmp_path / "tiny.wav"
    soundfile.write(path, stream, SAMPLE_RATE)
    truth = {"duration_s": len(stream) / SAMPLE_RATE, "plays": [{"song_id": "song1", "start_s": 0.0, "end_s": 30.0}], "segments": []}
    path.with_suffix(".json").write_text(json.dumps(truth))

    trace = stream_trace(Embedder(random_model_dir), load_index(index_dir), path, Config().stream)
    assert trace.times[0] == 12.5 and np.all(np.diff(trace.times) == 2.5)
    start = round(max(max(s.values()) for s in trace.scores if s), 4) - 1e-4  # the best hop starts a match
    config = tmp_path / "low.toml"
    config.write_text(f"[decision]\nstart_threshold = {start}\nend_threshold = {start - 0.05}\nstart_hops = 1\nend_hops = 2\n")

    out = tmp_path / "report"
    proc = coverwatch(
        "--config", config, "evaluate-stream", path, "--index", index_dir, "--model", random_model_dir, "--out", out, check=True
    )
    summary = json.loads(proc.stdout)
    assert summary["plays"] == 1 and summary["plays 30-60 s"] == 1 and summary["hours"] == pytest.approx(56.0 / 3600, abs=1e-3)
    events = [json.loads(line) for line in (out / "tiny.events.jsonl").read_text().splitlines()]
    assert summary["match_starts"] == sum(e["event"] == "match_start" for e in events) >= 1
    assert (out / "tiny.timeline.png").exists() and "## Configuration" in (out / "REPORT.md").read_text()
    assert json.loads((out / "summary.json").read_text())["config"]["thresholds"]["source"] == "config"

    replayed = replay(trace, start, start - 0.05, start_hops=1, end_hops=2)
    assert [event_key(e) for e in replayed] == [event_key(e) for e in events]
