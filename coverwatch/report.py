"""`coverwatch report`: an as-run log (CSV + one self-contained HTML page) from match events.

The daemon writes one JSON line per decision (coverwatch/streamer/sinks/events.py). A *play*
is a match_start and its match_end, paired by (stream, song_id, match_start_s):

- complete: both events are in the log;
- open:     a match_start without its match_end (the play was still on at the end of the log);
            its end, duration and stream end are left empty, and the timeline draws it to the
            end of its log or the station's next play, whichever comes first;
- end-only: a match_end without its match_start (the log began mid-play); listed from the
            end's own fields.

Schema 2 events carry the estimated start of the play (play_start_s, play_start_wall_time)
and, on match_end, its duration_s. Schema 1 events lack them: the play starts at
match_start_s, at the wall time of that decision, and lasts until the match_end's decision.
A wall time the event does not give is placed from the nearest one it does give, by the
stream-time difference. A play's end is its start + duration_s, so end - start is always
the duration listed.

Events are de-duplicated by event_id (a replayed file writes the same ids). A line that is
not a valid event is skipped with a warning naming file:line and counted.

Only coverwatch.cli imports this module.
"""

from __future__ import annotations

import csv
import dataclasses
import html
import json
import logging
import math
import re
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path

from coverwatch.streamer.sinks.events import EVENT_KINDS

log = logging.getLogger(__name__)

CSV_NAME = "as-run.csv"
HTML_NAME = "as-run.html"
DEFAULT_TITLE = "As-run log"
COLUMNS = ("station", "song_id", "title", "artist", "album", "isrc", "start", "end", "duration_s",
           "stream_start_s", "stream_end_s", "score", "p_value", "status")  # fmt: skip
METADATA_COLUMNS = ("artist", "album", "isrc")
COMPLETE, OPEN, END_ONLY = "complete", "open", "end-only"
MAX_SECONDS = 1e9  # ~32 years: the largest stream time or duration taken (a sum of such stays a valid datetime)
MIN_YEAR, MAX_YEAR = 1970, 9000  # the wall times taken
MAX_WARNINGS = 20  # skipped lines warned about one by one; the rest are only counted
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")  # a spreadsheet runs such a cell as a formula
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_SURROGATES = re.compile("[\ud800-\udfff]")
_CONTROLS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class EventError(ValueError):
    """A JSON line that is not a valid match event; the message is the reason."""


@dataclass(frozen=True)
class Event:
    """One validated match event."""

    kind: str  # match_start | match_end
    event_id: str
    stream: str
    song_id: str
    title: str
    metadata: Mapping[str, str]
    score: float | None
    stream_time_s: float  # stream time of the decision
    match_start_s: float  # stream time of the match_start decision (the pair key)
    wall_time: datetime  # wall time of the decision (UTC)
    p_value: float | None
    play_start_s: float | None  # schema 2: estimated stream time the play began
    play_start_wall: datetime | None  # schema 2: its wall time
    duration_s: float | None  # schema 2, match_end only

    @property
    def pair_key(self) -> tuple[str, str, int]:
        """(stream, song, match start in ms): what a match_start and its match_end share."""
        return self.stream, self.song_id, round(self.match_start_s * 1000)


@dataclass(frozen=True)
class Skipped:
    """A line that was not a valid event."""

    where: str  # FILE:LINE
    reason: str


@dataclass(frozen=True)
class EventLog:
    """The valid, de-duplicated events of some files and what was left out."""

    events: tuple[Event, ...]
    skipped: tuple[Skipped, ...]
    duplicates: int
    log_ends: Mapping[str, datetime]  # event_id -> the last instant of the latest file that holds it


@dataclass(frozen=True)
class Play:
    """One row of the as-run log."""

    station: str
    song_id: str
    title: str
    metadata: Mapping[str, str]
    start: datetime
    end: datetime | None  # None: open
    duration_s: float | None
    stream_start_s: float
    stream_end_s: float | None
    score: float | None  # the best of the start's and the end's
    p_value: float | None  # the smallest of the two
    status: str  # COMPLETE | OPEN | END_ONLY
    open_until: datetime  # the latest an open play can have lasted: its log's end, or the station's next play

    @property
    def drawn_end(self) -> datetime:
        """Where the timeline ends the play: its end, or for an open play the end of the log."""
        return self.end if self.end is not None else max(self.open_until, self.start)


@dataclass(frozen=True)
class ReportSummary:
    """What `coverwatch report` wrote."""

    plays: int
    stations: int
    csv: Path
    html: Path
    skipped_lines: int

    def to_dict(self) -> dict:
        return {
            "plays": self.plays,
            "stations": self.stations,
            "csv": str(self.csv),
            "html": str(self.html),
            "skipped_lines": self.skipped_lines,
        }


# --- reading -----------------------------------------------------------------------------


def _clean(text: str) -> str:
    """`text` with lone surrogates (a JSON "\\ud800" escape) replaced, so it encodes as UTF-8."""
    return _SURROGATES.sub("\ufffd", text)


def _text(record: Mapping, key: str, required: bool = True) -> str:
    value = record.get(key)
    if value is None and not required:
        return ""
    if value is None:
        raise EventError(f"missing key {key!r}" if key not in record else f"{key!r} is null")
    if not isinstance(value, str):
        raise EventError(f"{key!r} is not a string")
    return _clean(value)


def _number(record: Mapping, key: str, required: bool = True) -> float | None:
    value = record.get(key)
    if value is None:
        if required:
            raise EventError(f"missing key {key!r}" if key not in record else f"{key!r} is null")
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise EventError(f"{key!r} is not a number")
    if not abs(value) <= MAX_SECONDS:  # also NaN and inf; and any time sum stays a valid datetime
        raise EventError(f"{key!r} is out of range")
    return float(value)


def _wall(record: Mapping, key: str, required: bool = True) -> datetime | None:
    text = _text(record, key, required)
    if not text:
        if required:
            raise EventError(f"{key!r} is empty")
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise EventError(f"{key!r} is not an ISO time: {text[:40]!r}") from None
    # The daemon writes UTC with a Z; a time without a zone is taken as UTC.
    moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    if not MIN_YEAR <= moment.year <= MAX_YEAR:
        raise EventError(f"{key!r} is out of range: {text[:40]!r}")
    return moment


def _metadata(record: Mapping) -> dict[str, str]:
    value = record.get("metadata")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise EventError("'metadata' is not an object")
    return {_clean(str(k)): _clean(v if isinstance(v, str) else json.dumps(v)) for k, v in value.items() if v is not None}


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def parse_event(line: str) -> Event:
    """One JSON line -> an Event; EventError names what is wrong."""
    try:
        record = json.loads(line, parse_constant=_reject_constant)
    except ValueError as exc:
        raise EventError(f"not JSON ({exc})") from None
    if not isinstance(record, dict):
        raise EventError("not a JSON object")
    kind = _text(record, "event")
    if kind not in EVENT_KINDS:
        raise EventError(f"'event' is {kind[:40]!r}, not one of {', '.join(EVENT_KINDS)}")
    version = record.get("schema_version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise EventError("'schema_version' is not a positive integer")
    numbers = {key: _number(record, key) for key in ("stream_time_s", "match_start_s")}
    optional = {key: _number(record, key, required=False) for key in ("score", "p_value", "play_start_s", "duration_s")}
    if optional["duration_s"] is not None and optional["duration_s"] < 0:
        raise EventError("'duration_s' is negative")
    return Event(
        kind=kind, event_id=_text(record, "event_id"), stream=_text(record, "stream"), song_id=_text(record, "song_id"),
        title=_text(record, "title", required=False), metadata=_metadata(record), score=optional["score"],
        stream_time_s=numbers["stream_time_s"], match_start_s=numbers["match_start_s"], wall_time=_wall(record, "wall_time"),
        p_value=optional["p_value"], play_start_s=optional["play_start_s"],
        play_start_wall=_wall(record, "play_start_wall_time", required=False), duration_s=optional["duration_s"],
    )  # fmt: skip


def _lines(path: Path) -> Iterator[tuple[int, str | None]]:
    """(line number, text) of a file's non-blank lines; text None for a line that is not UTF-8."""
    with path.open("rb") as file:
        for number, raw in enumerate(file, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield number, None
                continue
            if text.strip():
                yield number, text


def last_instant(event: Event) -> datetime:
    """The latest wall time the event speaks of: its decision, or the end of the play it closes."""
    if event.duration_s is not None and event.play_start_wall is not None:
        return max(event.wall_time, event.play_start_wall + timedelta(seconds=event.duration_s))
    return event.wall_time


def read_events(paths: Sequence[Path]) -> EventLog:
    """The valid events of `paths` in file order, the first of each event_id kept."""
    events: dict[str, Event] = {}
    skipped: list[Skipped] = []
    duplicates = 0
    files_of: dict[str, list[int]] = {}  # event_id -> indexes of the files that hold it
    file_ends: list[datetime | None] = []
    for index, path in enumerate(paths):
        file_ends.append(None)
        for number, text in _lines(path):
            where = f"{path}:{number}"
            try:
                if text is None:
                    raise EventError("not UTF-8")
                event = parse_event(text)
            except EventError as exc:
                skipped.append(Skipped(where, str(exc)))
                continue
            file_ends[index] = max(file_ends[index] or last_instant(event), last_instant(event))
            files_of.setdefault(event.event_id, []).append(index)
            if event.event_id in events:
                duplicates += 1
            else:
                events[event.event_id] = event
    log_ends = {event_id: max(file_ends[i] for i in indexes) for event_id, indexes in files_of.items()}
    return EventLog(tuple(events.values()), tuple(skipped), duplicates, log_ends)


# --- pairing -----------------------------------------------------------------------------


def _best(values: Iterable[float | None], pick=max) -> float | None:
    """`pick` of the values that are not None; None if there are none."""
    present = [v for v in values if v is not None]
    return pick(present) if present else None


def _first(values: Iterable):
    """The first value that is not None, else None."""
    return next((v for v in values if v is not None), None)


def _wall_at(event: Event, stream_s: float) -> datetime:
    """The wall time of stream time `stream_s`, placed from the event's own decision."""
    return event.wall_time - timedelta(seconds=event.stream_time_s - stream_s)


def make_play(start: Event | None, end: Event | None, open_until: datetime) -> Play:
    """One row from a match_start and/or its match_end (at least one of them)."""
    events = [e for e in (start, end) if e is not None]
    if not events:
        raise ValueError("a play needs a match_start or a match_end")
    first = events[0]
    stream_start = _first([*(e.play_start_s for e in events), first.match_start_s])
    start_wall = _first(e.play_start_wall for e in events) or _wall_at(first, stream_start)
    duration = None
    if end is not None:
        duration = end.duration_s if end.duration_s is not None else max(0.0, end.stream_time_s - stream_start)
    metadata: dict[str, str] = {}
    for event in reversed(events):  # the start's values win, the end's fill in
        metadata.update({k: v for k, v in event.metadata.items() if v})
    return Play(
        station=first.stream, song_id=first.song_id, title=next((e.title for e in events if e.title), ""), metadata=metadata,
        start=start_wall, end=None if duration is None else start_wall + timedelta(seconds=duration), duration_s=duration,
        stream_start_s=stream_start, stream_end_s=None if duration is None else stream_start + duration,
        score=_best(e.score for e in events), p_value=_best((e.p_value for e in events), pick=min),
        status=COMPLETE if start and end else OPEN if start else END_ONLY, open_until=open_until,
    )  # fmt: skip


def pair_plays(events: Sequence[Event], log_ends: Mapping[str, datetime] | None = None) -> list[Play]:
    """Every play of `events`, sorted by station, then start.

    An open play lasted at most until the end of its log (`log_ends`: event_id -> the end of
    the log that holds it, as read_events gives; by default the latest instant of `events`)
    or the start of the station's next play, whichever comes first."""
    starts: dict[tuple, Event] = {}
    ends: dict[tuple, Event] = {}
    everything_end = max(map(last_instant, events), default=None)
    for event in events:
        chosen = starts if event.kind == "match_start" else ends
        if event.pair_key in chosen:
            log.warning(
                "%s for %s at %.3f s appears twice with different event_ids; the first is kept",
                event.kind,
                event.song_id,
                event.match_start_s,
            )
        else:
            chosen[event.pair_key] = event
    plays = []
    for key in dict.fromkeys([*starts, *ends]):
        first = starts.get(key) or ends[key]
        log_end = everything_end if log_ends is None else log_ends.get(first.event_id, last_instant(first))
        plays.append(make_play(starts.get(key), ends.get(key), log_end))
    plays.sort(key=lambda p: (p.station, p.start, p.song_id))
    for i, (play, following) in enumerate(pairwise(plays)):
        if play.status == OPEN and following.station == play.station and following.start < play.open_until:
            plays[i] = dataclasses.replace(play, open_until=max(following.start, play.start))
    return plays


# --- CSV ---------------------------------------------------------------------------------


def iso(moment: datetime | None) -> str:
    """ISO 8601 UTC with milliseconds and a Z, as the daemon writes; '' for None."""
    return "" if moment is None else moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _num(value: float | None, digits: int = 3) -> str:
    return "" if value is None else repr(round(value, digits))


def play_row(play: Play) -> dict[str, str]:
    """The play's cells, formatted as text (the CSV's and the HTML table's)."""
    return {
        "station": play.station, "song_id": play.song_id, "title": play.title,
        **{column: play.metadata.get(column, "") for column in METADATA_COLUMNS},
        "start": iso(play.start), "end": iso(play.end), "duration_s": _num(play.duration_s),
        "stream_start_s": _num(play.stream_start_s), "stream_end_s": _num(play.stream_end_s), "score": _num(play.score, 4),
        "p_value": "" if play.p_value is None else f"{play.p_value:.3g}", "status": play.status,
    }  # fmt: skip


def csv_safe(cell: str) -> str:
    """`cell` with a leading apostrophe where a spreadsheet would run it as a formula
    (=, +, -, @, tab, CR first), except a plain number such as -1.5."""
    if cell.startswith(_FORMULA_START) and not _NUMBER.fullmatch(cell):
        return "'" + cell
    return cell


def write_csv(plays: Sequence[Play], path: Path) -> None:
    """The as-run CSV: a header of COLUMNS, one row per play, UTF-8 without a BOM."""
    with path.open("w", encoding="utf-8", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(COLUMNS)
        for play in plays:
            row = play_row(play)
            writer.writerow([csv_safe(row[column]) for column in COLUMNS])


# --- HTML --------------------------------------------------------------------------------

PALETTE = ("#4e79a7", "#e15759", "#59a14f", "#b07aa1", "#9c755f", "#d37295", "#2f8f83", "#c0762b", "#6b6ecf", "#7f7f3a")
TICK_STEPS_S = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400, 172800, 604800, 2592000)
SVG_WIDTH, LABEL_W, RIGHT_PAD, AXIS_H, LANE_H, LANE_GAP = 1200, 170, 48, 34, 34, 10
MIN_SPAN_S = 60.0  # the shortest time axis
CHAR_W = 7.0  # average width of a 12 px label character, for truncation

STYLE = """
:root { color-scheme: light; --ink: #1f2933; --muted: #616e7c; --line: #d9e2ec; --band: #f5f7fa; --accent: #334e68; }
* { box-sizing: border-box; }
body { margin: 0; padding: 24px 28px 40px; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: var(--ink); background: #fff; }
h1 { margin: 0 0 4px; font-size: 24px; font-weight: 650; color: var(--accent); }
h2 { margin: 28px 0 10px; font-size: 16px; font-weight: 650; color: var(--accent); }
.sources { margin: 0; color: var(--muted); font-size: 12px; }
.summary { display: flex; flex-wrap: wrap; gap: 12px; margin: 18px 0 0; padding: 0; list-style: none; }
.summary li { min-width: 150px; padding: 10px 16px; border: 1px solid var(--line); border-radius: 8px; background: var(--band); }
.summary .k { display: block; color: var(--muted); font-size: 11px; letter-spacing: .06em; text-transform: uppercase; }
.summary .v { display: block; font-size: 20px; font-weight: 600; }
.summary .v small { font-size: 12px; font-weight: 400; color: var(--muted); }
.timeline { width: 100%; height: auto; border: 1px solid var(--line); border-radius: 8px; background: #fff; }
.timeline text { font-family: inherit; }
.timeline .tick { stroke: var(--line); }
.timeline .ticklabel { font-size: 11px; fill: var(--muted); }
.timeline .lanelabel { font-size: 13px; font-weight: 600; fill: var(--ink); }
.timeline .lane { fill: var(--band); }
.timeline .play { stroke: rgba(0,0,0,.35); stroke-width: 1; }
.timeline .play.open { fill-opacity: .55; stroke-dasharray: 5 3; stroke: #243b53; }
.timeline .play.end-only { fill-opacity: .75; stroke-dasharray: 2 2; stroke: #243b53; }
.timeline .label { font-size: 12px; fill: #fff; font-weight: 600; pointer-events: none; }
.timeline .open + .label, .timeline .end-only + .label { fill: #102a43; }
.legend { display: flex; gap: 18px; margin: 8px 2px 0; color: var(--muted); font-size: 12px; }
.legend span::before { content: ""; display: inline-block; width: 22px; height: 10px; margin-right: 6px; vertical-align: -1px;
                       border: 1px solid #243b53; background: #9fb3c8; border-radius: 2px; }
.legend .open::before { border-style: dashed; background: rgba(159,179,200,.55); }
.legend .end-only::before { border-style: dotted; background: rgba(159,179,200,.75); }
.scroll { overflow-x: auto; border: 1px solid var(--line); border-radius: 8px; }
table { width: 100%; border-collapse: collapse; font-size: 12px; }
th, td { padding: 5px 6px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
th { background: var(--accent); color: #fff; font-weight: 600; white-space: nowrap; }
tbody tr:nth-child(even) { background: var(--band); }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.time, td.key { font-variant-numeric: tabular-nums; white-space: nowrap; }
td.text { min-width: 7em; }
.status { display: inline-block; padding: 1px 7px; border-radius: 10px; font-size: 11px; font-weight: 600; background: #d9f2e3; color: #1e6b3a; }
.status.open { background: #fff1d6; color: #8a5a00; }
.status.end-only { background: #e4e7eb; color: #3e4c59; }
footer { margin-top: 24px; color: var(--muted); font-size: 12px; }
"""


def _esc(text: str) -> str:
    """HTML-escaped text (quotes too), control characters replaced."""
    return html.escape(_CONTROLS.sub("\ufffd", text), quote=True)


def _short(text: str, chars: int) -> str:
    return text if len(text) <= chars else text[: max(chars - 1, 0)] + "\u2026"


def song_color(song_id: str) -> str:
    """A fixed colour per song, so repeats of a song look alike on every page."""
    return PALETTE[zlib.crc32(song_id.encode("utf-8", "replace")) % len(PALETTE)]


def tick_step_s(span_s: float, max_ticks: int = 10) -> int:
    """The smallest round step that puts at most `max_ticks` ticks over `span_s`."""
    longest = TICK_STEPS_S[-1]
    return next((step for step in TICK_STEPS_S if span_s / step <= max_ticks), math.ceil(span_s / max_ticks / longest) * longest)


def time_domain(plays: Sequence[Play]) -> tuple[datetime, datetime, int]:
    """(first tick, last tick, step in s): the plays' time span widened to whole steps."""
    first = min(p.start for p in plays)
    last = max(p.drawn_end for p in plays)
    step = tick_step_s(max((last - first).total_seconds(), MIN_SPAN_S))
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    low = math.floor((first - epoch).total_seconds() / step) * step
    high = max(math.ceil((last - epoch).total_seconds() / step) * step, low + math.ceil(MIN_SPAN_S / step) * step)
    return epoch + timedelta(seconds=low), epoch + timedelta(seconds=high), step


def _tick_label(moment: datetime, step: int, previous: datetime | None) -> str:
    clock = moment.strftime("%H:%M:%S" if step < 60 else "%H:%M")
    return f"{moment:%b %d} {clock}" if previous is None or previous.date() != moment.date() else clock


def _play_tooltip(play: Play) -> str:
    artist = play.metadata.get("artist", "")
    song = f"{play.title or play.song_id}" + (f" \u2014 {artist}" if artist else "")
    end = iso(play.end) if play.end else f"open (no match_end; over by {iso(play.open_until)} at the latest)"
    lines = [song, f"song_id {play.song_id}", f"{iso(play.start)} \u2192 {end}"]
    if play.duration_s is not None:
        lines.append(f"{play.duration_s:.1f} s")
    lines.append(f"score {_num(play.score, 4) or '-'}, p-value {'-' if play.p_value is None else f'{play.p_value:.3g}'}")
    lines.append(f"status {play.status}")
    return "\n".join(lines)


def timeline_svg(plays: Sequence[Play]) -> str:
    """An SVG timeline: one lane per station, one rect per play, a UTC time axis on top."""
    stations = list(dict.fromkeys(p.station for p in plays))
    first, last, step = time_domain(plays)
    span = (last - first).total_seconds()
    plot_w = SVG_WIDTH - LABEL_W - RIGHT_PAD
    height = AXIS_H + len(stations) * (LANE_H + LANE_GAP) + LANE_GAP

    def x(moment: datetime) -> float:
        return LABEL_W + plot_w * (moment - first).total_seconds() / span

    svg = f'viewBox="0 0 {SVG_WIDTH} {height}" width="{SVG_WIDTH}" height="{height}" role="img" aria-label="Timeline of plays per station"'
    parts = [f'<svg class="timeline" xmlns="http://www.w3.org/2000/svg" {svg}>']
    for lane, station in enumerate(stations):
        y = AXIS_H + LANE_GAP + lane * (LANE_H + LANE_GAP)
        parts.append(f'<path class="lane" d="M{LABEL_W} {y - 3}h{plot_w}v{LANE_H + 6}h{-plot_w}z"/>')
        label = _esc(_short(station, int((LABEL_W - 16) / 7.5)))
        count = sum(p.station == station for p in plays)
        parts.append(f'<text class="lanelabel" x="{LABEL_W - 12}" y="{y + LANE_H / 2 + 4:.1f}" text-anchor="end">'
                     f"<title>{_esc(station)}: {count} play{'' if count == 1 else 's'}</title>{label}</text>")  # fmt: skip
    previous = None
    for i in range(round(span / step) + 1):
        moment = first + timedelta(seconds=i * step)
        tx = x(moment)
        parts.append(f'<line class="tick" x1="{tx:.1f}" y1="{AXIS_H - 6}" x2="{tx:.1f}" y2="{height - 4}"/>')
        parts.append(
            f'<text class="ticklabel" x="{tx:.1f}" y="{AXIS_H - 12}" text-anchor="middle">{_esc(_tick_label(moment, step, previous))}</text>'
        )
        previous = moment
    parts.append(f'<text class="ticklabel" x="12" y="{AXIS_H - 12}">time (UTC)</text>')
    for play in plays:
        y = AXIS_H + LANE_GAP + stations.index(play.station) * (LANE_H + LANE_GAP)
        x0 = x(play.start)
        width = max(x(play.drawn_end) - x0, 2.0)
        parts.append(f'<g><title>{_esc(_play_tooltip(play))}</title>'
                     f'<rect class="play {play.status}" x="{x0:.1f}" y="{y}" width="{width:.1f}" height="{LANE_H}" rx="4" '
                     f'fill="{song_color(play.song_id)}"/>')  # fmt: skip
        chars = int((width - 10) / CHAR_W)
        if chars >= 3:
            parts.append(
                f'<text class="label" x="{x0 + 5:.1f}" y="{y + LANE_H / 2 + 4:.1f}">{_esc(_short(play.title or play.song_id, chars))}</text>'
            )
        parts.append("</g>")
    parts.append("</svg>")
    return "\n".join(parts)


CELL_CLASS = {"station": "key", "song_id": "key", "album": "short", "isrc": "key", "start": "time", "end": "time",
              **dict.fromkeys(("duration_s", "stream_start_s", "stream_end_s", "score", "p_value"), "num")}  # fmt: skip


def _cell(column: str, value: str) -> str:
    if column == "status":
        return f'<td><span class="status {_esc(value)}">{_esc(value)}</span></td>'
    return f'<td class="{CELL_CLASS.get(column, "text")}">{_esc(value)}</td>'


def plays_table(plays: Sequence[Play]) -> str:
    """The CSV's rows as an HTML table."""
    head = "".join(f"<th>{_esc(c)}</th>" for c in COLUMNS)
    rows = ["<tr>" + "".join(_cell(c, row[c]) for c in COLUMNS) + "</tr>" for row in map(play_row, plays)]
    return f'<table class="plays">\n<thead><tr>{head}</tr></thead>\n<tbody>\n' + "\n".join(rows) + "\n</tbody>\n</table>"


def _span_text(plays: Sequence[Play]) -> tuple[str, str]:
    first = min(p.start for p in plays)
    last = max(p.drawn_end for p in plays)
    hours, rest = divmod(round((last - first).total_seconds()), 3600)
    return f"{iso(first)[:16].replace('T', ' ')} \u2192 {iso(last)[:16].replace('T', ' ')} UTC", f"{hours} h {rest // 60:02d} min"


def render_html(plays: Sequence[Play], title: str, sources: Sequence[Path], skipped: int) -> str:
    """The whole page: title, summary, timeline and table, with nothing loaded from outside."""
    stations = len({p.station for p in plays})
    by_status = {s: sum(p.status == s for p in plays) for s in (OPEN, END_ONLY)}
    detail = ", ".join(f"{n} {s}" for s, n in by_status.items() if n)
    span, length = _span_text(plays)
    summary = [("Plays", f"{len(plays)}" + (f" <small>({_esc(detail)})</small>" if detail else "")), ("Stations", str(stations)),
               ("Time span", f"{_esc(span)} <small>({_esc(length)})</small>"), ("Skipped lines", str(skipped))]  # fmt: skip
    items = "\n".join(f'<li><span class="k">{k}</span><span class="v">{v}</span></li>' for k, v in summary)
    files = ", ".join(_esc(str(p)) for p in sources)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_esc(title)}</title>
<style>{STYLE}</style>
</head>
<body>
<header>
<h1>{_esc(title)}</h1>
<p class="sources">From {files}</p>
<ul class="summary">
{items}
</ul>
</header>
<section>
<h2>Timeline</h2>
{timeline_svg(plays)}
<div class="legend"><span class="complete">complete</span><span class="open">open: no match_end (drawn to the end of the log or the next play)</span>\
<span class="end-only">started before the log</span></div>
</section>
<section>
<h2>Plays</h2>
<div class="scroll">
{plays_table(plays)}
</div>
</section>
<footer>Times are UTC. A play's start is the daemon's estimate of when the song began; its end is start + duration.</footer>
</body>
</html>
"""


# --- the command -------------------------------------------------------------------------


def _write_text(path: Path, text: str) -> None:
    """Write through a temporary file, so a reader never sees half a page."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)


def _warn_skipped(skipped: Sequence[Skipped]) -> None:
    for item in skipped[:MAX_WARNINGS]:
        log.warning("%s: skipped: %s", item.where, item.reason)
    if len(skipped) > MAX_WARNINGS:
        log.warning("%d more malformed lines skipped (%d in all)", len(skipped) - MAX_WARNINGS, len(skipped))


def write_report(paths: Sequence[Path], out: Path, title: str = DEFAULT_TITLE) -> ReportSummary:
    """Read the event files, write OUT/as-run.csv and OUT/as-run.html. ValueError if no line is a valid event."""
    event_log = read_events(paths)
    if not event_log.events:
        names = ", ".join(map(str, paths))
        first = f"; first: {event_log.skipped[0].where}: {event_log.skipped[0].reason}" if event_log.skipped else ""
        raise ValueError(f"no valid match event in {names} ({len(event_log.skipped)} malformed lines{first})")
    _warn_skipped(event_log.skipped)
    if event_log.duplicates:
        log.info("%d duplicate events (same event_id) dropped", event_log.duplicates)
    plays = pair_plays(event_log.events, event_log.log_ends)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, html_path = out / CSV_NAME, out / HTML_NAME
    partial_csv = csv_path.with_name(csv_path.name + ".partial")
    write_csv(plays, partial_csv)
    partial_csv.replace(csv_path)
    _write_text(html_path, render_html(plays, title, paths, len(event_log.skipped)))
    return ReportSummary(len(plays), len({p.station for p in plays}), csv_path, html_path, len(event_log.skipped))
