"""Render folk tunes from the music21 corpus as varied audio "versions" (covers).

Pipeline: `scan_corpus` splits corpus ABC files into per-tune `TuneSource`s (cheap, no
music parsing) -> `parse_tune` turns one into a `Tune` (melody notes, meter, key;
cached as JSON) -> `Arrangement` says how to play it (soundfont, instrument, key,
tempo, accompaniment, ornaments, ...) -> `render` synthesises it with the fluidsynth
CLI into float32 mono audio at `SAMPLE_RATE`.

Units: musical time is in *beats*, and a beat is always one quarter note (music21's
quarterLength), whatever the meter; tempo is quarter notes per minute; audio time is
in seconds.

Held-out data: some corpus collections and one soundfont are reserved for evaluation.
`check_collection_allowed` and `check_soundfont_allowed` raise `ReservedDataError`
for them and are called on every path this module reads.
"""

from __future__ import annotations

import bisect
import hashlib
import importlib.util
import io
import json
import logging
import math
import os
import re
import struct
import subprocess
import tempfile
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pretty_midi
import soundfile as sf

from coverwatch.streamer.frontend.audio import SAMPLE_RATE

log = logging.getLogger(__name__)

# --- data locations and held-out guards ---------------------------------------------

# music21's bundled corpus, located without importing music21 (importing costs ~0.5 s).
CORPUS_DIR = Path(importlib.util.find_spec("music21").origin).parent / "corpus"

# Corpus collections reserved for held-out evaluation: never read them.
RESERVED_COLLECTIONS = frozenset({"bach", "oneills1850", "ryansMammoth", "airdsAirs"})

# Collections of the project's own leave-out cover set (coverwatch.model.leaveout): allowed,
# but never for training data (`build_cover_dataset` refuses them).
LEAVEOUT_COLLECTIONS = ("miscFolk",)

# ABC collections used by default (both allowed). nottingham-dataset holds only 2 tunes
# in music21's copy; essenFolksong holds ~8.5k.
DEFAULT_COLLECTIONS = ("essenFolksong", "nottingham-dataset")

# music21's ABC parser test fixtures: they duplicate tunes found in the real Essen files.
EXCLUDED_SOURCES = frozenset({"essenFolksong/test0", "essenFolksong/test1", "essenFolksong/testd", "essenFolksong/teste"})

# Reserved for held-out evaluation. Note that /usr/share/sounds/sf2/default-GM.sf2 is a
# symlink to it, so checks compare resolved paths.
FORBIDDEN_SOUNDFONT = Path("/usr/share/sounds/sf2/FluidR3_GM.sf2")

# Soundfont for training renders (ships inside the pretty_midi package).
TRAIN_SOUNDFONT = Path(pretty_midi.__file__).parent / "TimGM6mb.sf2"

# Soundfont for validation renders and the demo, so the model is not tuned to one synth.
HELD_OUT_SOUNDFONT = Path("/usr/share/sounds/sf3/MuseScore_General_Full.sf3")

# Bump when the parsed-tune JSON format or the parsing rules change.
PARSE_CACHE_VERSION = 2

# Bump when the sf3 -> sf2 conversion changes.
SOUNDFONT_CACHE_VERSION = 1


class ReservedDataError(ValueError):
    """Data reserved for held-out evaluation was about to be used."""


class TuneSkipped(ValueError):
    """A corpus tune that cannot be used; `reason` is "parse-error", "no-notes" or "too-short"."""

    def __init__(self, tune_id: str, reason: str, detail: str = "") -> None:
        super().__init__(f"{tune_id}: {reason}{': ' + detail if detail else ''}")
        self.tune_id = tune_id
        self.reason = reason


class RenderError(RuntimeError):
    """fluidsynth failed, timed out, or produced no usable audio."""


def cache_dir() -> Path:
    """Root of coverwatch's caches: $COVERWATCH_CACHE, else ~/.cache/coverwatch."""
    return Path(os.environ.get("COVERWATCH_CACHE") or Path.home() / ".cache" / "coverwatch")


def check_collection_allowed(path: str | Path) -> None:
    """Raise `ReservedDataError` if `path` names or lies in a reserved corpus collection.

    Accepts a collection name ("bach"), a corpus-relative name ("bach/bwv66.6") or a
    file-system path; symlinks are resolved and names compared case-insensitively.
    """
    path = Path(path)
    candidates = [path, path.resolve()] if path.exists() else [path]
    reserved = {name.casefold() for name in RESERVED_COLLECTIONS}
    for candidate in candidates:
        hits = reserved.intersection(part.casefold() for part in candidate.parts)
        if hits:
            raise ReservedDataError(f"{path} belongs to reserved collection(s) {sorted(hits)}")


def check_soundfont_allowed(path: str | Path) -> Path:
    """Return the resolved soundfont path; raise `ReservedDataError` if it is FluidR3.

    Symlinks are resolved first (default-GM.sf2 points to FluidR3_GM.sf2). Raises
    `FileNotFoundError` if the soundfont does not exist.
    """
    resolved = Path(path).resolve(strict=True)
    is_forbidden = "fluidr3" in resolved.name.casefold() or (FORBIDDEN_SOUNDFONT.exists() and resolved.samefile(FORBIDDEN_SOUNDFONT))
    if is_forbidden:
        raise ReservedDataError(f"soundfont {path} (-> {resolved}) is reserved for evaluation")
    return resolved


# --- corpus scanning ----------------------------------------------------------------


@dataclass(frozen=True)
class TuneSource:
    """One tune of a corpus ABC file, not yet parsed.

    `abc` is the file's header (text before the first X: line) plus this tune's text.
    """

    tune_id: str  # f"{collection}/{file_stem}/{index}", index = 0-based position in file
    title: str
    abc: str

    @property
    def family(self) -> str:
        """Title-family key: variants of one song (same normalised title) share it."""
        return title_family(self.title) or self.tune_id


def title_family(title: str) -> str:
    """Normalise a title so variants of one song compare equal.

    ASCII-folds, lower-cases, drops parenthesised text, punctuation and trailing
    numbers ("CUCA 1" and "Cuca 2" -> "cuca"). Returns "" for an empty title.
    """
    text = unicodedata.normalize("NFKD", title).encode("ascii", "ignore").decode().casefold()
    text = re.sub(r"\([^)]*\)", " ", text)
    words = re.sub(r"[^a-z0-9]+", " ", text).split()
    while words and words[-1].isdigit():
        words.pop()
    return " ".join(words)


def _repair_title(title: str) -> str:
    """Undo a mis-conversion in some Essen files: C1 control characters are cp437 bytes ("Sp\x94tter")."""
    return "".join(bytes([ord(c)]).decode("cp437") if 0x80 <= ord(c) < 0xA0 else c for c in title)


def scan_corpus(collections: Sequence[str] = DEFAULT_COLLECTIONS) -> list[TuneSource]:
    """All tunes of the ABC files in `collections`, in file then position order.

    Only splits text; no music is parsed. Raises `ReservedDataError` for a reserved
    collection and `FileNotFoundError` for a collection that is not in the corpus.
    """
    sources: list[TuneSource] = []
    for collection in collections:
        check_collection_allowed(collection)
        folder = CORPUS_DIR / collection
        if not folder.is_dir():
            raise FileNotFoundError(f"no corpus collection {collection!r} in {CORPUS_DIR}")
        for path in sorted(folder.glob("*.abc")):
            check_collection_allowed(path)
            if f"{collection}/{path.stem}" in EXCLUDED_SOURCES:
                continue
            header, *tunes = re.split(r"(?m)^(?=X:)", path.read_text(encoding="utf-8", errors="replace"))
            for index, text in enumerate(tunes):
                title = re.search(r"(?m)^T:[ \t]*(.*?)[ \t]*$", text)
                sources.append(
                    TuneSource(
                        tune_id=f"{collection}/{path.stem}/{index}",
                        title=_repair_title(title.group(1)) if title else "",
                        abc=header + text,
                    )
                )
    return sources


# --- tunes --------------------------------------------------------------------------

Note = tuple[int, float, float]  # (MIDI pitch, start beat, duration in beats)
Triad = tuple[int, int, int]  # pitch classes (root, third, fifth)

MIN_BARS = 6  # shorter tunes are skipped

# Krumhansl-Kessler key profiles, index 0 = tonic.
_MAJOR_PROFILE = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
_MINOR_PROFILE = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])
_FINAL_NOTE_WEIGHT = 2.0  # extra histogram weight (beats) of the last note: folk tunes end on the tonic

SCALES = {"major": (0, 2, 4, 5, 7, 9, 11), "minor": (0, 2, 3, 5, 7, 8, 10)}  # natural minor
# Candidate triads as (root, third, fifth) semitones above the tonic, in order of
# preference (earlier wins ties). Minor uses the harmonic-minor dominant (V, not v).
_TRIADS = {
    "major": ((0, 4, 7), (7, 11, 2), (5, 9, 0), (9, 0, 4), (2, 5, 9), (4, 7, 11)),
    "minor": ((0, 3, 7), (7, 11, 2), (5, 8, 0), (8, 0, 3), (3, 7, 10), (10, 2, 5)),
}
_DOWNBEAT_WEIGHT = 2.0  # a note starting on the bar line counts this many times its length


@dataclass(frozen=True)
class Tune:
    """A monophonic melody with its bars and key. All times are in beats (quarter notes).

    `bars` are the bar lines as written (music21's measures), so pickups, shortened
    phrase-end bars and irregular bars (common in the Essen collection) keep the
    melody and the accompaniment aligned. Bar i spans bars[i] .. bars[i + 1].
    """

    tune_id: str
    title: str
    notes: tuple[Note, ...]  # sorted, non-overlapping, first note at beat 0
    bars: tuple[float, ...]  # bar lines: bars[0] = 0.0, bars[-1] = end of the tune
    beats_per_bar: float  # nominal, from the M: field: 3/4 -> 3.0, 6/8 -> 3.0
    pulse: float  # quarter notes per counted beat: 3/4 -> 1.0, 6/8 -> 1.5, 2/2 -> 2.0
    key_tonic: int  # pitch class 0..11 (0 = C)
    key_mode: str  # "major" or "minor"

    @property
    def n_bars(self) -> int:
        """Number of bars, a pickup bar included."""
        return len(self.bars) - 1

    @property
    def pass_beats(self) -> float:
        """Length in beats of one play-through; repeats start this far apart."""
        return self.bars[-1]

    def bar_of(self, beat: float) -> int:
        """Index of the bar containing `beat`."""
        return min(max(bisect.bisect_right(self.bars, beat + 1e-9) - 1, 0), self.n_bars - 1)

    def on_bar_line(self, beat: float) -> bool:
        """Whether `beat` falls on a bar line."""
        return math.isclose(self.bars[self.bar_of(beat)], beat, abs_tol=1e-6)

    @property
    def base_tempo_bpm(self) -> float:
        """A natural tempo: the median note lasts ~0.35 s, clamped to 72..140 bpm."""
        median = float(np.median([duration for _, _, duration in self.notes]))
        return float(np.clip(60.0 * median / 0.35, 72.0, 140.0))

    @cached_property
    def chords(self) -> tuple[Triad, ...]:
        """One diatonic triad per bar, chosen from the bar's melody pitch classes.

        Each candidate triad of the key scores the duration of the bar's notes whose
        pitch class it contains (notes on the bar line count double); the best wins,
        ties go to the more common chord (I, V, IV, ...). A bar without notes keeps
        the previous chord; the first defaults to the tonic triad.
        """
        weights = np.zeros((self.n_bars, 12))
        for pitch, start, duration in self.notes:
            weight = _DOWNBEAT_WEIGHT if self.on_bar_line(start) else 1.0
            weights[self.bar_of(start), pitch % 12] += duration * weight
        candidates = [tuple((self.key_tonic + step) % 12 for step in triad) for triad in _TRIADS[self.key_mode]]
        chords: list[Triad] = []
        for bar_weights in weights:
            if not bar_weights.any():
                chords.append(chords[-1] if chords else candidates[0])
                continue
            scores = [bar_weights[list(triad)].sum() for triad in candidates]
            chords.append(candidates[int(np.argmax(scores))])  # argmax keeps the first of ties
        return tuple(chords)


def estimate_key(notes: Sequence[Note]) -> tuple[int, str]:
    """(tonic pitch class, "major"|"minor") by Krumhansl-Kessler profile correlation.

    The histogram is duration-weighted, with the final note weighted extra.
    """
    histogram = np.zeros(12)
    for pitch, _, duration in notes:
        histogram[pitch % 12] += duration
    histogram[notes[-1][0] % 12] += _FINAL_NOTE_WEIGHT
    best = max(
        (np.corrcoef(histogram, np.roll(profile, tonic))[0, 1], tonic, mode)
        for mode, profile in (("major", _MAJOR_PROFILE), ("minor", _MINOR_PROFILE))
        for tonic in range(12)
    )
    return best[1], best[2]


def _parse_abc(tune_id: str, abc: str) -> dict:
    """Parse one ABC tune with music21 into the JSON-able fields of `Tune`.

    Raises `TuneSkipped`. Ties are merged; chord symbols and grace notes dropped; a
    written chord keeps its top note; overlaps are cut so the melody is monophonic.
    Repeat signs are not expanded (arrangements repeat whole tunes instead).
    """
    from music21 import chord, converter, harmony, meter, note, stream  # slow import

    try:
        score = converter.parseData(abc, format="abc").stripTies()
    except Exception as exc:  # music21 raises many exception types on malformed ABC
        raise TuneSkipped(tune_id, "parse-error", f"{type(exc).__name__}: {exc}") from exc
    flat = score.flatten()
    raw: list[Note] = []
    for element in flat.getElementsByClass((note.Note, chord.Chord)):
        if isinstance(element, harmony.ChordSymbol) or element.duration.quarterLength <= 0:
            continue
        pitch = element.pitch if isinstance(element, note.Note) else max(element.pitches)
        raw.append((pitch.midi, float(element.offset), float(element.duration.quarterLength)))
    if not raw:
        raise TuneSkipped(tune_id, "no-notes")
    raw.sort(key=lambda n: (n[1], -n[0]))
    first = raw[0][1]
    notes: list[Note] = []
    for pitch, start, duration in raw:
        if notes and notes[-1][1] == start - first:
            continue  # simultaneous with the previous (higher) note
        if notes and notes[-1][1] + notes[-1][2] > start - first:
            prev_pitch, prev_start, _ = notes[-1]
            notes[-1] = (prev_pitch, prev_start, start - first - prev_start)
        notes.append((pitch, start - first, duration))

    header_meter = re.search(r"(?m)^M:\D*(\d+)\s*/\s*(\d+)", abc)  # "M: 3/4", "M: FREI4/4"; "M: none" -> 4/4
    signature = meter.TimeSignature("/".join(header_meter.groups()) if header_meter else "4/4")
    beats_per_bar = float(signature.barDuration.quarterLength)
    end = max(start + duration for _, start, duration in notes)
    measures = score.parts[0] if score.parts else score
    bar_lines = {float(m.offset) - first for m in measures.getElementsByClass(stream.Measure)}
    if len(bar_lines) < 2:  # no usable measures: a regular grid from the first note
        bar_lines = set(np.arange(0.0, end, beats_per_bar).tolist())
    bars = [0.0, *sorted(b for b in bar_lines if 1e-6 < b < end - 1e-6), end]
    tonic, mode = estimate_key(notes)
    fields = {
        "notes": notes,
        "bars": bars,
        "beats_per_bar": beats_per_bar,
        "pulse": float(signature.beatDuration.quarterLength),
        "key_tonic": tonic,
        "key_mode": mode,
    }
    if Tune(tune_id=tune_id, title="", **_tuple_notes(fields)).n_bars < MIN_BARS:
        raise TuneSkipped(tune_id, "too-short")
    return fields


def _tuple_notes(fields: dict) -> dict:
    """`fields` with notes and bars as tuples (JSON gives lists)."""
    return {**fields, "notes": tuple(tuple(n) for n in fields["notes"]), "bars": tuple(fields["bars"])}


def parse_tune(source: TuneSource) -> Tune:
    """Parse `source` into a `Tune`, through the JSON cache; raise `TuneSkipped`.

    The cache (under `cache_dir()/tunes`) is keyed by a hash of the ABC text, so it
    stays valid when files are reordered; unusable tunes are cached as skips too.
    """
    digest = hashlib.sha1(f"{PARSE_CACHE_VERSION}\n{source.abc}".encode()).hexdigest()
    path = cache_dir() / "tunes" / digest[:2] / f"{digest}.json"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        try:
            record = {"fields": _parse_abc(source.tune_id, source.abc)}
        except TuneSkipped as skipped:
            record = {"skip": skipped.reason, "detail": str(skipped)}
        write_text_atomic(path, json.dumps(record))
    if "skip" in record:
        raise TuneSkipped(source.tune_id, record["skip"], record["detail"])
    return Tune(tune_id=source.tune_id, title=source.title, **_tuple_notes(record["fields"]))


def iter_tunes(collections: Sequence[str] = DEFAULT_COLLECTIONS, limit: int | None = None) -> Iterator[Tune]:
    """Yield usable tunes of `collections` in corpus order, at most `limit` of them.

    Tunes that fail to parse are skipped with a warning; skip counts by reason are
    logged when the iteration ends. Parsing costs ~45 ms a tune, cached after.
    """
    skipped: Counter[str] = Counter()
    yielded = 0
    try:
        for source in scan_corpus(collections):
            if limit is not None and yielded >= limit:
                return
            try:
                tune = parse_tune(source)
            except TuneSkipped as exc:
                skipped[exc.reason] += 1
                if exc.reason == "parse-error":
                    log.warning("skipping tune: %s", exc)
                continue
            yielded += 1
            yield tune
    finally:
        log.info("iter_tunes: %d tunes yielded, skipped %s", yielded, dict(skipped))


# --- arrangements -------------------------------------------------------------------

ACCOMPANIMENTS = ("none", "bass", "chords", "full")  # "full" = bass + chords + drums
ORNAMENTS = ("plain", "passing", "split")  # passing notes in thirds / long notes re-struck
TRANSPOSE_RANGE = (-6, 6)  # semitones, inclusive
TEMPO_SPREAD = 0.25  # tempo = base tempo * U(1 - spread, 1 + spread)
MIN_TEMPO_RATIO = 1.04  # versions of a group differ in tempo by at least 4%
MAX_SWING = 0.3  # fraction of half a beat by which off-beat eighths are delayed
VELOCITY_RANGE = (60, 115)  # melody MIDI velocity, inclusive
MAX_REPEATS = 3

# General MIDI programs (0-based) that carry a melody well in both soundfonts.
MELODY_PROGRAMS = (
    0, 1, 4, 6, 8, 11, 12, 16, 19, 21, 22, 24, 25, 26, 40, 41, 42, 48, 52, 56, 57, 60,
    65, 66, 68, 71, 73, 74, 75, 79, 80, 81, 104, 105, 110,
)  # fmt: skip
CHORD_PROGRAMS = (0, 2, 4, 5, 16, 19, 21, 24, 25, 27, 46, 48, 49, 50, 52, 61, 88, 89)
BASS_PROGRAMS = (32, 33, 34, 35, 38, 42, 43, 58, 70)


@dataclass(frozen=True)
class Arrangement:
    """How to play a tune: everything that makes one version differ from another."""

    soundfont: Path
    program: int  # GM program of the melody, 0..127
    transpose: int  # semitones, TRANSPOSE_RANGE
    tempo_bpm: float  # quarter notes per minute
    accompaniment: str  # one of ACCOMPANIMENTS
    octave_shift: int  # melody octave, -1/0/+1 (then folded into a playable range)
    ornament: str  # one of ORNAMENTS
    swing: float  # 0..MAX_SWING, applied in meters whose pulse is a quarter note
    velocity: int  # melody MIDI velocity; accompaniment plays softer
    repeats: int  # play-throughs of the whole tune, 1..MAX_REPEATS
    accomp_program: int  # GM program of the chords
    bass_program: int  # GM program of the bass line


def _pick_unused(rng: np.random.Generator, options: Sequence, used: set) -> object:
    """A random option not in `used`, or any option once all are used."""
    fresh = [option for option in options if option not in used]
    pool = fresh or list(options)
    return pool[int(rng.integers(len(pool)))]


def random_arrangement(
    rng: np.random.Generator,
    soundfont: Path,
    base_tempo_bpm: float = 100.0,
    avoid: Sequence[Arrangement] = (),
) -> Arrangement:
    """Draw an arrangement that differs from each one in `avoid`.

    Program, transpose and accompaniment are drawn from those not yet used in `avoid`
    (accompaniment repeats only beyond 4 versions); tempo is base * U(0.75, 1.25),
    redrawn a few times to stay >= 4% from the others.
    """
    tempos = [a.tempo_bpm for a in avoid]
    low, high = 1 - TEMPO_SPREAD, 1 + TEMPO_SPREAD
    for _ in range(20):
        tempo = base_tempo_bpm * float(rng.uniform(low, high))
        if all(max(tempo, t) / min(tempo, t) >= MIN_TEMPO_RATIO for t in tempos):
            break
    return Arrangement(
        soundfont=soundfont,
        program=_pick_unused(rng, MELODY_PROGRAMS, {a.program for a in avoid}),
        transpose=_pick_unused(rng, range(TRANSPOSE_RANGE[0], TRANSPOSE_RANGE[1] + 1), {a.transpose for a in avoid}),
        tempo_bpm=round(tempo, 2),
        accompaniment=_pick_unused(rng, ACCOMPANIMENTS, {a.accompaniment for a in avoid}),
        octave_shift=int(rng.integers(-1, 2)),
        ornament=ORNAMENTS[int(rng.integers(len(ORNAMENTS)))],
        swing=round(float(rng.uniform(0.0, MAX_SWING)) if rng.random() < 0.3 else 0.0, 3),
        velocity=int(rng.integers(VELOCITY_RANGE[0], VELOCITY_RANGE[1] + 1)),
        repeats=int(rng.integers(1, MAX_REPEATS + 1)),
        accomp_program=int(rng.choice(CHORD_PROGRAMS)),
        bass_program=int(rng.choice(BASS_PROGRAMS)),
    )


def pass_seconds(tune: Tune, arrangement: Arrangement) -> float:
    """Duration in seconds of one play-through of `tune` at the arrangement's tempo."""
    return tune.pass_beats * 60.0 / arrangement.tempo_bpm


# --- MIDI arrangement ---------------------------------------------------------------

MELODY_RANGE = (55, 84)  # the melody's median pitch is folded by octaves into this range
BASS_LOW = 36  # bass roots lie in BASS_LOW .. BASS_LOW + 11
CHORD_LOW = 55  # chord tones lie in CHORD_LOW .. CHORD_LOW + 11 (close position)
ACCENT = 8  # extra velocity of melody notes on a bar line
ACCOMP_LEVEL = 0.65  # accompaniment velocity relative to the melody
DRUM_LEVEL = 0.6  # drum velocity relative to the melody
KICK, SNARE, CLOSED_HAT = 36, 38, 42  # GM percussion keys (channel 10)
_MIN_SPLIT_BEATS = 1.0  # "split" re-strikes notes at least this long
_MIN_PASSING_BEATS = 0.5  # "passing" fills thirds after notes at least this long


def _ornament(notes: Sequence[Note], tune: Tune, ornament: str) -> list[Note]:
    """Apply the melodic ornament: "plain" (none), "passing" or "split"."""
    if ornament == "plain":
        return list(notes)
    scale = {(tune.key_tonic + step) % 12 for step in SCALES[tune.key_mode]}
    result: list[Note] = []
    for i, (pitch, start, duration) in enumerate(notes):
        half = duration / 2
        if ornament == "split" and duration >= _MIN_SPLIT_BEATS:
            result += [(pitch, start, half), (pitch, start + half, half)]
            continue
        following = notes[i + 1] if i + 1 < len(notes) else None
        if (
            ornament == "passing"
            and following is not None
            and duration >= _MIN_PASSING_BEATS
            and math.isclose(start + duration, following[1])
            and abs(following[0] - pitch) in (3, 4)
        ):
            low, high = sorted((pitch, following[0]))
            between = [p for p in range(low + 1, high) if p % 12 in scale]
            if between:
                result += [(pitch, start, half), (between[0], start + half, half)]
                continue
        result.append((pitch, start, duration))
    return result


def fold_shift(notes: Sequence[Note], shift: int, low: int, high: int) -> int:
    """`shift` moved by octaves so that the notes' median pitch plus it lies in [low, high]."""
    median = float(np.median([pitch for pitch, _, _ in notes]))
    while median + shift > high:
        shift -= 12
    while median + shift < low:
        shift += 12
    return shift


def _melody_shift(notes: Sequence[Note], arrangement: Arrangement) -> int:
    """Semitones to add to the melody: transpose + octave shift, folded into MELODY_RANGE."""
    return fold_shift(notes, arrangement.transpose + 12 * arrangement.octave_shift, *MELODY_RANGE)


def _accompaniment(tune: Tune, arrangement: Arrangement) -> dict[str, list[tuple[int, float, float, float]]]:
    """Accompaniment events for one pass: {"bass"|"chords"|"drums": [(pitch, start, dur, level)]}.

    A bar of length L has p = round(L / pulse) pulses (at least 1): bass plays the root
    on pulse 0 and the fifth on pulse p/2 (even p); chords strike every pulse (only
    pulses 1, 2 in a 3-pulse bar with bass: "oom-pah-pah"); drums: kick on the bass
    pulses, snare on the others, hi-hat every half pulse. A pickup (a first bar
    shorter than the meter's) is left unaccompanied.
    """
    parts: dict[str, list[tuple[int, float, float, float]]] = {"bass": [], "chords": [], "drums": []}
    style = arrangement.accompaniment
    if style == "none":
        return parts
    pulse = tune.pulse
    with_bass = style in ("bass", "full")
    for bar, (root, third, fifth) in enumerate(tune.chords):
        bar_start, bar_end = tune.bars[bar], tune.bars[bar + 1]
        if bar == 0 and bar_end < tune.beats_per_bar - 1e-6:
            continue
        pulses = max(1, round((bar_end - bar_start) / pulse))
        bass_pulses = {0: root, pulses // 2: fifth} if pulses % 2 == 0 else {0: root}
        for index in range(pulses):
            at = bar_start + index * pulse
            if with_bass and index in bass_pulses:
                pc = (bass_pulses[index] + arrangement.transpose) % 12
                parts["bass"].append((BASS_LOW + (pc - BASS_LOW) % 12, at, 0.9 * pulse, 1.0))
            if style in ("chords", "full") and not (with_bass and pulses == 3 and index == 0):
                for chord_pc in (root, third, fifth):
                    pc = (chord_pc + arrangement.transpose) % 12
                    parts["chords"].append((CHORD_LOW + (pc - CHORD_LOW) % 12, at, 0.8 * pulse, 0.9))
            if style == "full":
                drum = KICK if index in bass_pulses else SNARE
                parts["drums"].append((drum, at, 0.1, 1.0))
                for hat in (at, at + pulse / 2):
                    parts["drums"].append((CLOSED_HAT, hat, 0.1, 0.6))
    return parts


def _swing(beats: float, swing: float) -> float:
    """Warp time within each beat so the off-beat eighth lands `swing`/2 beats late."""
    whole = math.floor(beats)
    frac = beats - whole
    middle = 0.5 + swing / 2
    warped = frac * middle / 0.5 if frac <= 0.5 else middle + (frac - 0.5) * (1 - middle) / 0.5
    return whole + warped


def arrange(tune: Tune, arrangement: Arrangement, max_seconds: float | None = None) -> pretty_midi.PrettyMIDI:
    """Build the MIDI performance of `tune` under `arrangement`.

    Notes starting at or after `max_seconds` are dropped and longer ones cut there.
    Melody notes on a bar line are accented by `ACCENT` velocity.
    """
    seconds_per_beat = 60.0 / arrangement.tempo_bpm
    swing = arrangement.swing if tune.pulse == 1.0 else 0.0
    melody = _ornament(tune.notes, tune, arrangement.ornament)
    shift = _melody_shift(melody, arrangement)
    accompaniment = _accompaniment(tune, arrangement)

    def seconds(beats: float) -> float:
        return _swing(beats, swing) * seconds_per_beat

    midi = pretty_midi.PrettyMIDI(initial_tempo=arrangement.tempo_bpm)
    tracks = {
        "melody": pretty_midi.Instrument(program=arrangement.program, name="melody"),
        "bass": pretty_midi.Instrument(program=arrangement.bass_program, name="bass"),
        "chords": pretty_midi.Instrument(program=arrangement.accomp_program, name="chords"),
        "drums": pretty_midi.Instrument(program=0, is_drum=True, name="drums"),
    }
    levels = {"melody": 1.0, "bass": ACCOMP_LEVEL, "chords": ACCOMP_LEVEL, "drums": DRUM_LEVEL}
    events: list[tuple[str, int, float, float, float]] = []
    for repeat in range(arrangement.repeats):
        offset = repeat * tune.pass_beats
        for pitch, start, duration in melody:
            accent = 1.0 + ACCENT / arrangement.velocity if tune.on_bar_line(start) else 1.0
            events.append(("melody", pitch + shift, offset + start, duration, accent))
        for part, part_events in accompaniment.items():
            events += [(part, p, offset + s, d, level) for p, s, d, level in part_events]
    for part, pitch, start_beats, duration, level in events:
        start, end = seconds(start_beats), seconds(start_beats + duration)
        if max_seconds is not None:
            if start >= max_seconds:
                continue
            end = min(end, max_seconds)
        velocity = int(np.clip(round(arrangement.velocity * levels[part] * level), 1, 127))
        tracks[part].notes.append(pretty_midi.Note(velocity, int(pitch), start, end))
    midi.instruments = [track for track in tracks.values() if track.notes]
    return midi


# --- synthesis ----------------------------------------------------------------------

FLUIDSYNTH = "fluidsynth"
FLUIDSYNTH_GAIN = 0.6
FLUIDSYNTH_TIMEOUT_S = 120
PEAK_LEVEL = 0.9  # renders are peak-normalised to this
SILENCE_DB = -60.0  # trailing audio quieter than this (relative to the peak) is trimmed
END_FADE_S = 0.02  # fade at the very end to avoid a click after trimming
CUT_FADE_S = 1.0  # fade-out when `max_seconds` cuts the music short
# fluidsynth's file renderer runs until every voice has died away, and a church-organ
# rendition once left a voice sounding after its last note (9700 s of audio written in 20 s,
# then the timeout). "All sound off" this long after the last note ends such a voice once
# ordinary releases have faded (other renders are byte-identical with it).
SOUND_OFF_AFTER_S = 5.0


def synth_soundfont(soundfont: Path) -> Path:
    """The file fluidsynth should load for `soundfont` (guarded by `check_soundfont_allowed`).

    An .sf2 is used as is. An .sf3 (Ogg-compressed) is converted once to an .sf2 under
    `cache_dir()/soundfonts`: fluidsynth decompresses an sf3 on every start (2-6 s for
    MuseScore_General_Full), the cached sf2 loads in ~0.3 s. The conversion changes
    the rendered audio by < 1e-5 (-100 dB).
    """
    resolved = check_soundfont_allowed(soundfont)
    if resolved.suffix.casefold() != ".sf3":
        return resolved
    stat = resolved.stat()
    key = f"{SOUNDFONT_CACHE_VERSION}:{resolved}:{stat.st_size}:{stat.st_mtime_ns}"
    target = cache_dir() / "soundfonts" / f"{resolved.stem}-{hashlib.sha1(key.encode()).hexdigest()[:12]}.sf2"
    if not target.exists():
        log.info("converting %s to %s (once; ~15 s, ~500 MB)", resolved, target)
        _convert_sf3(resolved, target)
    return target


def _riff_chunks(data: bytes, start: int, end: int) -> Iterator[tuple[bytes, bytes]]:
    """(chunk id, payload) of the RIFF chunks in data[start:end]."""
    while start + 8 <= end:
        chunk_id = data[start : start + 4]
        (size,) = struct.unpack_from("<I", data, start + 4)
        yield chunk_id, data[start + 8 : start + 8 + size]
        start += 8 + size + (size & 1)


def _riff_chunk(chunk_id: bytes, payload: bytes) -> bytes:
    """Serialise one RIFF chunk, with its pad byte."""
    return chunk_id + struct.pack("<I", len(payload)) + payload + b"\0" * (len(payload) & 1)


_SHDR = struct.Struct("<20sIIIIIBbHH")  # SoundFont sample header record (46 bytes)
_SF3_COMPRESSED = 0x10  # sampleType flag of an Ogg Vorbis sample in an sf3


def _convert_sf3(source: Path, target: Path) -> None:
    """Write `source` (.sf3) as a plain 16-bit .sf2 at `target`, atomically.

    sf3 sample headers give byte ranges of Ogg streams and loop points relative to
    the sample; sf2 wants absolute sample-frame indices and 46 zero frames after each.
    """
    data = source.read_bytes()
    lists = {payload[:4]: list(_riff_chunks(payload, 4, len(payload))) for _, payload in _riff_chunks(data, 12, len(data))}
    smpl = dict(lists[b"sdta"])[b"smpl"]
    pdta = dict(lists[b"pdta"])
    headers = [_SHDR.unpack_from(pdta[b"shdr"], i) for i in range(0, len(pdta[b"shdr"]), _SHDR.size)]

    def decode(header: tuple) -> bytes | None:
        _, start, end, *_, sample_type = header
        if not sample_type & _SF3_COMPRESSED:
            return None
        pcm, _ = sf.read(io.BytesIO(smpl[start:end]), dtype="int16")
        return pcm.tobytes()

    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:  # libsndfile releases the GIL
        decoded = list(pool.map(decode, headers[:-1]))  # the last header is the EOS terminator
    pad = b"\0" * 2 * 46
    new_headers, pieces, position = bytearray(), [], 0
    for header, pcm in zip(headers, [*decoded, None]):
        name, start, end, loop_start, loop_end, rate, pitch, correction, link, sample_type = header
        if pcm is not None:
            frames = len(pcm) // 2
            start, end = position, position + frames
            loop_start, loop_end = position + loop_start, position + loop_end
            sample_type &= ~_SF3_COMPRESSED
            pieces += [pcm, pad]
            position += frames + 46
        new_headers += _SHDR.pack(name, start, end, loop_start, loop_end, rate, pitch, correction, link, sample_type)
    pdta[b"shdr"] = bytes(new_headers)
    info = b"".join(
        _riff_chunk(cid, struct.pack("<HH", 2, 1) if cid == b"ifil" else payload)  # version 2.01
        for cid, payload in lists[b"INFO"]
    )
    info_list = _riff_chunk(b"LIST", b"INFO" + info)
    pdta_list = _riff_chunk(b"LIST", b"pdta" + b"".join(_riff_chunk(cid, pdta[cid]) for cid, _ in lists[b"pdta"]))
    smpl_size = sum(len(piece) for piece in pieces)  # even: 16-bit frames
    sdta_header = b"LIST" + struct.pack("<I", 4 + 8 + smpl_size) + b"sdta" + b"smpl" + struct.pack("<I", smpl_size)
    riff_size = 4 + len(info_list) + len(sdta_header) + smpl_size + len(pdta_list)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as out:  # streamed: the samples are ~500 MB
        out.write(b"RIFF" + struct.pack("<I", riff_size) + b"sfbk" + info_list + sdta_header)
        out.writelines(pieces)
        out.write(pdta_list)
    os.replace(tmp, target)


def silence_all_voices(midi: pretty_midi.PrettyMIDI, at_s: float) -> None:
    """Append "all sound off" (MIDI CC 120) on every instrument's channel at `at_s` seconds."""
    for instrument in midi.instruments:
        instrument.control_changes.append(pretty_midi.ControlChange(number=120, value=0, time=at_s))


def render(
    tune: Tune,
    arrangement: Arrangement,
    max_seconds: float | None = None,
    arranger: Callable[[Tune, Arrangement, float | None], pretty_midi.PrettyMIDI] = arrange,
) -> np.ndarray:
    """Synthesise `tune` under `arrangement`: float32 mono, shape (n_samples,), at SAMPLE_RATE.

    `arranger` makes the MIDI performance (`coverwatch.model.styles` has a second one).

    Runs the fluidsynth CLI on a temporary MIDI file, mixes to mono, trims trailing
    silence (below `SILENCE_DB` re peak) and peak-normalises to `PEAK_LEVEL`. With
    `max_seconds`, the music is cut there with a `CUT_FADE_S` fade-out. Raises
    `RenderError` (fluidsynth failure, timeout, silent output) or `ReservedDataError`.
    """
    soundfont = synth_soundfont(arrangement.soundfont)
    midi = arranger(tune, arrangement, max_seconds)
    if not midi.instruments:
        raise RenderError(f"{tune.tune_id}: nothing to play")
    silence_all_voices(midi, midi.get_end_time() + SOUND_OFF_AFTER_S)
    with tempfile.TemporaryDirectory(prefix="coverwatch-render-") as tmp:
        midi_path, wav_path = Path(tmp) / "in.mid", Path(tmp) / "out.wav"
        midi.write(str(midi_path))
        command = [
            FLUIDSYNTH, "-ni", "-q", "-g", str(FLUIDSYNTH_GAIN), "-r", str(SAMPLE_RATE),
            "-O", "float",  # float output: no dither noise, no clipping before normalising
            "-o", "synth.dynamic-sample-loading=1",  # load only the samples played
            "-F", str(wav_path), str(soundfont), str(midi_path),
        ]  # fmt: skip
        try:
            result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=FLUIDSYNTH_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            raise RenderError(f"{tune.tune_id}: fluidsynth timed out after {FLUIDSYNTH_TIMEOUT_S} s") from exc
        except FileNotFoundError as exc:
            raise RenderError(f"{FLUIDSYNTH} not found on PATH (Debian package fluidsynth)") from exc
        if result.returncode != 0 or not wav_path.exists():
            raise RenderError(f"{tune.tune_id}: fluidsynth exit {result.returncode}: {result.stderr.strip()[-500:]}")
        audio, rate = sf.read(wav_path, dtype="float32", always_2d=True)
    if rate != SAMPLE_RATE:
        raise RenderError(f"{tune.tune_id}: fluidsynth wrote {rate} Hz, expected {SAMPLE_RATE}")
    audio = audio.mean(axis=1)
    truncated = max_seconds is not None and arrangement.repeats * pass_seconds(tune, arrangement) > max_seconds
    if max_seconds is not None:
        audio = audio[: int(max_seconds * SAMPLE_RATE)]
    return _finish(audio, fade_s=CUT_FADE_S if truncated else END_FADE_S, name=tune.tune_id)


def _finish(audio: np.ndarray, fade_s: float, name: str) -> np.ndarray:
    """Trim trailing silence, fade out over `fade_s`, peak-normalise; float32 mono."""
    peak = float(np.abs(audio).max()) if audio.size else 0.0
    if not np.isfinite(peak) or peak < 1e-6:
        raise RenderError(f"{name}: rendered audio is silent or invalid")
    loud = np.flatnonzero(np.abs(audio) > peak * 10 ** (SILENCE_DB / 20))
    audio = audio[: loud[-1] + 1] * (PEAK_LEVEL / peak)
    fade = min(len(audio), int(fade_s * SAMPLE_RATE))
    audio[len(audio) - fade :] *= np.linspace(1.0, 0.0, fade)
    return audio.astype(np.float32)


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` via a temporary file and os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
