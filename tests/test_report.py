"""`coverwatch report`: the as-run log (CSV + HTML) from match events, through the real command
line on events written here; one test renders the page in a real headless Chromium."""

from __future__ import annotations

import csv
import html
import json
import re
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path

import pytest

from coverwatch.streamer.sinks.events import make_event_id

BASE = datetime(2026, 11, 29, 1, 0, tzinfo=UTC)  # wall time of stream time 0
SCRIPT_TITLE = '<script>alert(1)</script> & "x"'
COLUMNS = ["station", "song_id", "title", "artist", "album", "isrc", "start", "end", "duration_s",
           "stream_start_s", "stream_end_s", "score", "p_value", "status"]  # fmt: skip


def iso(stream_s: float) -> str:
    return (BASE + timedelta(seconds=stream_s)).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def start_event(
    stream: str, song_id: str, play_start_s: float, lag_s: float = 20.0, title: str = "", score: float = 0.9, **metadata
) -> dict:
    """A schema-2 match_start decided `lag_s` after the play began."""
    decision = play_start_s + lag_s
    return {
        "schema_version": 2, "event": "match_start", "event_id": make_event_id(stream, song_id, decision, "match_start"),
        "stream": stream, "song_id": song_id, "title": title or song_id.title(), "metadata": metadata, "score": score,
        "stream_time_s": decision, "match_start_s": decision, "play_start_s": play_start_s, "play_start_wall_time": iso(play_start_s),
        "duration_s": None, "wall_time": iso(decision), "p_value": 1e-5,
    }  # fmt: skip


def end_event(start: dict, duration_s: float, lag_s: float = 8.0, score: float = 0.95) -> dict:
    """The schema-2 match_end of `start`'s play, decided `lag_s` after the play ended."""
    decision = start["play_start_s"] + duration_s + lag_s
    return {
        **start, "event": "match_end", "score": score, "p_value": 2e-6, "stream_time_s": decision, "duration_s": duration_s,
        "wall_time": iso(decision), "event_id": make_event_id(start["stream"], start["song_id"], start["match_start_s"], "match_end"),
    }  # fmt: skip


def schema1(event: dict) -> dict:
    """The same event as an older daemon wrote it."""
    old = {k: v for k, v in event.items() if k not in ("schema_version", "metadata", "play_start_s", "play_start_wall_time", "duration_s")}
    return old


def write_events(path: Path, events: list, extra_lines: tuple[str, ...] = ()) -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for e in events) + "".join(line + "\n" for line in extra_lines), encoding="utf-8")
    return path


def report(*args: object) -> subprocess.CompletedProcess:
    """The real command line: `python -m coverwatch report ...`."""
    return subprocess.run(
        [sys.executable, "-m", "coverwatch", "report", *map(str, args)], check=False, capture_output=True, text=True, timeout=120
    )


def run_ok(*args: object) -> tuple[dict, list[dict]]:
    proc = report(*args)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    summary = json.loads(proc.stdout)
    with open(summary["csv"], newline="", encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    return summary, rows


def day() -> list[dict]:
    """Two stations' plays: three complete plays on station-a, one on station-b."""
    a1 = start_event("station-a", "yesterday", 10.0, artist="The Beatles", album="Help!", isrc="GBAYE6500524")
    a2 = start_event("station-a", "jolene", 200.0, title="Jolene, live", artist="Dolly Parton")
    a3 = start_event("station-a", "hurt", 420.0, artist="Johnny Cash")
    b1 = start_event("station-b", "respect", 30.0, artist="Aretha Franklin", score=0.97)
    return [a1, b1, end_event(a1, 180.2), a2, end_event(a2, 150.0), end_event(b1, 140.0, score=0.91), a3, end_event(a3, 200.0)]


def test_pairs_each_start_with_its_end_and_prints_a_summary(tmp_path):
    events = write_events(tmp_path / "events.jsonl", day())
    summary, rows = run_ok(events, "--out", tmp_path / "out")
    assert summary == {"plays": 4, "stations": 2, "csv": str(tmp_path / "out" / "as-run.csv"),
                       "html": str(tmp_path / "out" / "as-run.html"), "skipped_lines": 0}  # fmt: skip
    assert list(rows[0]) == COLUMNS
    assert [(r["station"], r["song_id"]) for r in rows] == [("station-a", "yesterday"), ("station-a", "jolene"),
                                                            ("station-a", "hurt"), ("station-b", "respect")]  # fmt: skip
    first = rows[0]
    assert (
        first["title"] == "Yesterday" and first["artist"] == "The Beatles" and first["album"] == "Help!" and first["isrc"] == "GBAYE6500524"
    )
    assert first["start"] == "2026-11-29T01:00:10.000Z" and first["end"] == "2026-11-29T01:03:10.200Z"
    assert float(first["duration_s"]) == 180.2 and float(first["stream_start_s"]) == 10.0 and float(first["stream_end_s"]) == 190.2
    assert first["score"] == "0.95" and float(first["p_value"]) == 2e-6 and first["status"] == "complete"
    assert rows[3]["score"] == "0.97"  # the best of start and end
    assert all(r["status"] == "complete" for r in rows)
    raw = (tmp_path / "out" / "as-run.csv").read_bytes()
    assert raw.startswith(b"station,song_id,title,")  # no BOM


def test_a_replayed_file_is_deduplicated_by_event_id(tmp_path):
    events = day()
    first = write_events(tmp_path / "monday.jsonl", events)
    replay = write_events(tmp_path / "monday-replay.jsonl", list(reversed(events)))
    summary, rows = run_ok(first, replay, "--out", tmp_path / "out")
    _, alone = run_ok(first, "--out", tmp_path / "alone")
    assert summary["plays"] == 4 and rows == alone


def test_an_open_play_and_a_play_that_began_before_the_log(tmp_path):
    began_before = start_event("station-a", "yesterday", -60.0, artist="The Beatles")
    still_on = start_event("station-a", "hurt", 300.0)
    middle = start_event("station-a", "jolene", 150.0)
    lost_end = start_event("station-b", "respect", 0.0)  # the daemon restarted: another play follows without its end
    after = start_event("station-b", "valerie", 400.0)
    events = [end_event(began_before, 180.0), middle, end_event(middle, 120.0), still_on, lost_end, after, end_event(after, 100.0)]
    _, rows = run_ok(write_events(tmp_path / "events.jsonl", events), "--out", tmp_path / "out")
    assert [r["song_id"] for r in rows] == ["yesterday", "jolene", "hurt", "respect", "valerie"]
    end_only, complete, open_play = rows[:3]
    assert end_only["status"] == "end-only" and end_only["start"] == iso(-60.0) and end_only["end"] == iso(120.0)
    assert float(end_only["duration_s"]) == 180.0 and float(end_only["stream_start_s"]) == -60.0 and end_only["artist"] == "The Beatles"
    assert complete["status"] == "complete"
    assert open_play["status"] == "open" and open_play["start"] == iso(300.0)
    assert open_play["end"] == open_play["duration_s"] == open_play["stream_end_s"] == ""
    page = (tmp_path / "out" / "as-run.html").read_text(encoding="utf-8")
    assert page.count('class="play open"') == 2 and 'class="play end-only"' in page
    assert f"open (no match_end; over by {iso(400.0)} at the latest)" in page  # drawn up to the next play, not the log's end
    assert f"open (no match_end; over by {iso(400.0 + 100.0 + 8.0)} at the latest)" in page  # the log ends with valerie's end


def test_schema_1_events_start_at_match_start(tmp_path):
    start = schema1(start_event("station-a", "hurt", 100.0, lag_s=0.0))
    end = schema1(end_event(start_event("station-a", "hurt", 100.0, lag_s=0.0), 200.0, lag_s=0.0))
    lonely_end = schema1(end_event(start_event("station-b", "jolene", 50.0, lag_s=0.0), 90.0, lag_s=0.0))
    _, rows = run_ok(write_events(tmp_path / "old.jsonl", [start, end, lonely_end]), "--out", tmp_path / "out")
    assert [(r["station"], r["status"], r["start"], r["end"], float(r["duration_s"])) for r in rows] == [
        ("station-a", "complete", iso(100.0), iso(300.0), 200.0),
        ("station-b", "end-only", iso(50.0), iso(140.0), 90.0),
    ]
    assert rows[0]["artist"] == "" and rows[0]["title"] == "Hurt"


def test_malformed_lines_are_skipped_with_a_warning_and_the_report_still_written(tmp_path):
    good = start_event("station-a", "hurt", 10.0)
    bad = ["{not json", json.dumps({**good, "event_id": "x1", "score": "high"}), json.dumps({k: v for k, v in good.items() if k != "stream"}),
           json.dumps({**good, "event_id": "x2", "event": "match_middle"}), "[1, 2]"]  # fmt: skip
    events = write_events(tmp_path / "events.jsonl", [good, end_event(good, 100.0)], tuple(bad))
    proc = report(events, "--out", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["skipped_lines"] == 5 and json.loads(proc.stdout)["plays"] == 1
    for line, reason in ((3, "not JSON"), (4, "'score' is not a number"), (5, "missing key 'stream'"), (6, "'event' is 'match_middle'"),
                         (7, "not a JSON object")):  # fmt: skip
        assert f"{events}:{line}: skipped: {reason}" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    page = (tmp_path / "out" / "as-run.html").read_text(encoding="utf-8")
    assert re.search(r"Skipped lines</span><span class=\"v\">5<", page)


def test_a_file_without_any_valid_event_fails_with_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'garbage\n\xff\xfe not utf-8\n{"event": "match_start"}\n')
    proc = report(bad, "--out", tmp_path / "out")
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("coverwatch: error: no valid match event in "), proc.stderr
    assert "3 malformed lines" in proc.stderr and f"{bad}:1: not JSON" in proc.stderr
    assert proc.stdout == "" and not (tmp_path / "out").exists()
    missing = report(tmp_path / "nope.jsonl", "--out", tmp_path / "out")
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1 and missing.stderr.startswith("coverwatch: error: ")


def test_csv_quoting_and_the_formula_guard(tmp_path):
    tricky = start_event("station-a", "s1", 10.0, title='Hello, "world"\nsecond line', artist="=HYPERLINK(\"http://x\")", album="+1+2",
                         isrc="@SUM(A1)")  # fmt: skip
    numeric = start_event("station-a", "s2", 400.0, title="-12.5", artist="-", album="\tindent", isrc="1999")
    events = [tricky, end_event(tricky, 100.0), numeric, end_event(numeric, 100.0)]
    _, rows = run_ok(write_events(tmp_path / "events.jsonl", events), "--out", tmp_path / "out")
    assert rows[0]["title"] == 'Hello, "world"\nsecond line'  # quoted by the csv module, read back whole
    assert rows[0]["artist"] == '\'=HYPERLINK("http://x")' and rows[0]["album"] == "'+1+2" and rows[0]["isrc"] == "'@SUM(A1)"
    assert rows[1]["title"] == "-12.5" and rows[1]["isrc"] == "1999"  # numbers are left alone
    assert rows[1]["artist"] == "'-" and rows[1]["album"] == "'\tindent"
    assert len(rows) == 2


def test_html_escapes_titles_and_is_self_contained(tmp_path):
    play = start_event("station <b>", "s1", 10.0, title=SCRIPT_TITLE, artist="AC/DC & <i>friends</i>")
    events = write_events(tmp_path / "events.jsonl", [play, end_event(play, 100.0)])
    run_ok(events, "--out", tmp_path / "out", "--title", "Week <48> & co")
    page = (tmp_path / "out" / "as-run.html").read_text(encoding="utf-8")
    assert SCRIPT_TITLE not in page and "<script" not in page and "<i>" not in page and "<b>" not in page
    assert html.escape(SCRIPT_TITLE) in page and "AC/DC &amp; &lt;i&gt;friends&lt;/i&gt;" in page
    assert "<title>Week &lt;48&gt; &amp; co</title>" in page
    # Nothing is loaded from outside: no scripts, stylesheets, fonts or images.
    assert not re.search(r"<link|<img|src=|url\(|@import|https?://(?!www\.w3\.org/2000/svg)", page)


class _Dom(HTMLParser):
    """Counts the play rects of the timeline and the rows of the table."""

    def __init__(self) -> None:
        super().__init__()
        self.svgs = self.play_rects = self.body_rows = 0
        self.rect_fills: list[str] = []
        self._in_tbody = False

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.svgs += tag == "svg"
        if tag == "rect" and "play" in (attributes.get("class") or "").split():
            self.play_rects += 1
            if "complete" in attributes["class"].split():
                self.rect_fills.append(attributes["fill"])
        self._in_tbody = self._in_tbody or tag == "tbody"
        self.body_rows += tag == "tr" and self._in_tbody

    def handle_endtag(self, tag):
        self._in_tbody = self._in_tbody and tag != "tbody"


def _browser() -> str:
    for name in ("chromium-headless-shell", "chromium", "chromium-browser"):
        if path := shutil.which(name):
            return path
    pytest.skip("no headless Chromium (chromium-headless-shell or chromium) on PATH; CI installs it")


def _pixels(png: Path):
    """The screenshot as an (H, W, 3) uint8 array, or None when no PNG reader is installed."""
    np = pytest.importorskip("numpy")
    try:
        from PIL import Image

        return np.asarray(Image.open(png).convert("RGB"))
    except ImportError:
        pass
    try:
        import matplotlib.image

        return (matplotlib.image.imread(str(png))[..., :3] * 255).round().astype(np.uint8)
    except ImportError:
        return None


def test_the_page_renders_in_a_headless_browser(tmp_path):
    browser = _browser()
    still_on = start_event("station-b", "valerie", 600.0, title=SCRIPT_TITLE)
    events = write_events(tmp_path / "events.jsonl", [*day(), still_on])
    summary, rows = run_ok(events, "--out", tmp_path / "out")
    url = Path(summary["html"]).resolve().as_uri()
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'chromium-profile'}"]
    proc = subprocess.run([*flags, "--dump-dom", url], check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = _Dom()
    dom.feed(proc.stdout)
    assert dom.svgs >= 1 and dom.play_rects == len(rows) == summary["plays"] == 5
    assert dom.body_rows == len(rows)
    assert "alert(1)" in proc.stdout and "<script>alert" not in proc.stdout  # the title is text, not a script

    png = tmp_path / "page.png"
    proc = subprocess.run(
        [*flags, f"--screenshot={png}", "--window-size=1400,900", url], check=False, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and png.is_file(), proc.stderr[-2000:]
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
    pixels = _pixels(png)
    if pixels is None:
        return  # neither Pillow nor matplotlib: the size check above stands
    assert pixels.shape[:2] == (900, 1400)
    assert len({tuple(p) for p in pixels.reshape(-1, 3)[::7]}) > 50  # not a blank or one-colour page
    # The timeline was painted: a complete play's fill colour covers a good patch of the screen.
    fill = dom.rect_fills[0].lstrip("#")
    rgb = [int(fill[i : i + 2], 16) for i in (0, 2, 4)]
    close = (abs(pixels.astype(int) - rgb) <= 3).all(axis=-1)
    assert close.sum() > 500, f"{dom.rect_fills[0]} covers {close.sum()} pixels"
