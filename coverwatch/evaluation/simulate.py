"""`coverwatch simulate`: broadcast-like streams with a ground-truth timeline.

A simulation folder holds one catalog and any number of streams (one per seed):

    OUT/catalog/refs.csv, OUT/catalog/<song_id>.flac   reference renditions (the index's songs)
    OUT/streams/sim-<seed>-<minutes>m.flac             the broadcast (16-bit, SAMPLE_RATE, mono)
    OUT/streams/sim-<seed>-<minutes>m.json             its timeline (see `simulate_stream`)
    OUT/calibration/bg-<seed>-<minutes>m.flac          the same broadcast without plays: audio for
                                                       `coverwatch calibrate` (non-catalog only)

Out-of-catalog material is split by name hash: `CALIBRATION_SHARE` of the game-music
tracks and non-catalog folk tunes feed only the calibration audio, the rest only the
streams, so a calibrated threshold is judged on music it was not fitted on.

A stream alternates *plays* (catalog songs rendered as covers the index has never seen:
other instrument, key, tempo, accompaniment; cut to 30 s .. the whole cover, some joined
late) with out-of-catalog music (Debian game music and non-catalog folk renditions, at
least `MIN_OUTSIDE_SHARE` of the music airtime), jingles, ads (speech over a music bed),
and silence and noise gaps. DJ speech talks over some play intros and outros; adjacent
audible segments crossfade over 2-6 s; every segment has its own level. The whole mix then
goes through a broadcast chain (compressor + limiter) and a low-bit-rate lossy codec.

Everything is drawn from seeded generators: the same seed gives the same stream, and a
stream or catalog already on disk is reused (the cache key is the file name plus
`SIM_VERSION` in the timeline). Needs the data extra (music21, fluidsynth) and Debian's
espeak-ng and game-music packages (`GAME_MUSIC_DIRS`).
"""

from __future__ import annotations

import io
import json
import logging
import math
import multiprocessing
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf

from coverwatch.model.dataset import (
    _cover_arrangement,
    _csv_text,
    _family_heads,
    _Job,
    _parse_first,
    _reference_arrangement,
    _render_job,
    _unit_hash,
    _with_repeats,
    _write_audio_atomic,
    group_id_of,
)
from coverwatch.model.effects import CODECS, codec_roundtrip, compress, db_to_gain, noise, resample
from coverwatch.model.render import (
    DEFAULT_COLLECTIONS,
    HELD_OUT_SOUNDFONT,
    RenderError,
    Tune,
    random_arrangement,
    synth_soundfont,
    write_text_atomic,
)
from coverwatch.streamer.frontend.audio import SAMPLE_RATE, seconds_to_samples
from coverwatch.streamer.frontend.decode import load_audio

log = logging.getLogger(__name__)

SIM_VERSION = 3  # bump when the generated audio or timeline format changes (invalidates caches)
RENDER_WORKERS = 2  # fluidsynth processes

# Catalog and plays.
CATALOG_SIZE = 40  # reference songs
FOLK_OUTSIDERS = 30  # non-catalog folk tunes available as out-of-catalog music
COVER_WHOLE_S = (80.0, 180.0)  # a cover's full length (whole passes of the tune), uniform
SHORT_PLAY_SHARE = 0.4  # share of plays cut to 30-60 s; the rest run 60 s .. whole
SHORT_PLAY_S = (30.0, 60.0)
LATE_JOIN_SHARE = 0.3  # share of partial plays that start mid-song rather than at its start

# Out-of-catalog material.
MIN_OUTSIDE_SHARE = 0.5  # out-of-catalog music >= this share of all music airtime
GAME_MUSIC_DIRS = (  # Debian packages asc-music, hyperrogue-music, drascula-music (none reserved)
    Path("/usr/share/games/asc/music"),
    Path("/usr/share/hyperrogue/music"),
    Path("/usr/share/scummvm/drascula/audio"),
)
CALIBRATION_SHARE = 0.3  # out-of-catalog tracks and tunes kept for calibration audio only (by name hash)
GAME_MUSIC_SHARE = 0.65  # out-of-catalog items taken from game music (the rest: folk renditions)
OUTSIDE_ITEM_S = (40.0, 200.0)  # length of one out-of-catalog item
FOLK_OUTSIDE_S = (30.0, 100.0)

# Interstitials (probabilities are per gap between two music items).
JINGLE_P, AD_P, SILENCE_P, NOISE_P = 0.25, 0.12, 0.06, 0.06
JINGLE_S = (3.0, 8.0)
AD_S = (15.0, 35.0)
SILENCE_S = (2.0, 8.0)
NOISE_S = (3.0, 10.0)
NOISE_DBFS = (-50.0, -35.0)  # RMS of a noise gap
AD_BED_DB = -14.0  # music bed under an ad, relative to its speech

# Talk-over, crossfades and levels.
TALK_INTRO_P, TALK_OUTRO_P = 0.35, 0.25  # per play
TALK_MAX_S = 15.0  # talk-over is cut at this length
DUCK_DB = -6.0  # music under talk-over is lowered by this much
CROSSFADE_S = (2.0, 6.0)  # between adjacent audible segments
SEGMENT_GAIN_DB = (-10.0, 0.0)  # per-segment level before the broadcast chain
ESPEAK = "espeak-ng"
ESPEAK_VOICES = ("en", "en-us", "en-gb-x-rp", "en-029", "en-gb-scotland")
ESPEAK_SPEED_WPM = (150, 190)
TALK_TEXT = (  # DJ talk is random sequences of these words
    "you are listening to coverwatch radio the finest tunes all night long and here is another one "
    "coming up after the news traffic is heavy on the northern bridge weather will be mild tomorrow "
    "call us now to win two tickets for the concert this weekend thanks for staying with us that was "
    "a lovely version of an old favourite stay tuned for more music and the latest headlines"
)



class SimulationError(RuntimeError):
    """Missing tools or material for a simulation."""


@dataclass(frozen=True)
class Piece:
    """One segment of a stream before mixing: `audio` (N,) float32 at SAMPLE_RATE."""

    kind: str  # play | music | jingle | ad | silence | noise
    audio: np.ndarray
    info: dict = field(default_factory=dict)  # song_id/title/source..., copied into the timeline
    talk: tuple[tuple[str, np.ndarray], ...] = ()  # ("intro"|"outro", speech) laid over this piece


# --- pure signal helpers -------------------------------------------------------------


def fade_edges(audio: np.ndarray, fade_in: int, fade_out: int) -> np.ndarray:
    """A copy of (N,) audio with linear fades of the given sample counts at each end."""
    audio = audio.astype(np.float32, copy=True)
    fade_in, fade_out = min(fade_in, len(audio) // 2), min(fade_out, len(audio) // 2)
    if fade_in:
        audio[:fade_in] *= np.linspace(0.0, 1.0, fade_in, dtype=np.float32)
    if fade_out:
        audio[len(audio) - fade_out :] *= np.linspace(1.0, 0.0, fade_out, dtype=np.float32)
    return audio


def lay_over(music: np.ndarray, speech: np.ndarray, at_end: bool) -> np.ndarray:
    """Speech laid over the start (or end) of `music`, the music ducked by DUCK_DB under it.

    Speech longer than the music or TALK_MAX_S is cut. Returns a new (N,) array.
    """
    n = min(len(speech), len(music), seconds_to_samples(TALK_MAX_S))
    out = music.astype(np.float32, copy=True)
    span = slice(len(out) - n, len(out)) if at_end else slice(0, n)
    ramp = min(n // 4, seconds_to_samples(0.3))  # duck smoothly, not with a click
    duck = np.full(n, db_to_gain(DUCK_DB), np.float32)
    if ramp:
        duck[:ramp] = np.linspace(1.0, db_to_gain(DUCK_DB), ramp)
        duck[n - ramp :] = np.linspace(db_to_gain(DUCK_DB), 1.0, ramp)
    level = math.sqrt(max(float(np.mean(np.square(out[span]))), 1e-12) / max(float(np.mean(np.square(speech[:n]))), 1e-12))
    out[span] = out[span] * duck + speech[:n] * level
    return out


def mix(pieces: list[Piece], crossfades_s: list[float]) -> tuple[np.ndarray, list[dict]]:
    """Lay pieces end to end: (N,) float32 stream and one timeline record per piece.

    Adjacent audible pieces overlap by `crossfades_s[i]` (between piece i and i+1) with
    linear fades; silence abuts its neighbours. A record spans the piece's fades, so
    crossfaded neighbours overlap in the timeline. Talk-over is recorded as
    {"kind": "talk", "over": "intro"|"outro", ...} records with the piece's song_id.
    """
    assert len(crossfades_s) == max(0, len(pieces) - 1), (len(pieces), len(crossfades_s))
    starts, cursor = [], 0
    for i, piece in enumerate(pieces):
        overlap = 0
        if i and piece.kind != "silence" and pieces[i - 1].kind != "silence":
            overlap = min(seconds_to_samples(crossfades_s[i - 1]), len(piece.audio) // 2, len(pieces[i - 1].audio) // 2)
        start = cursor - overlap
        starts.append((start, overlap))
        cursor = start + len(piece.audio)
    stream = np.zeros(cursor, np.float32)
    timeline = []
    for i, (piece, (start, fade_in)) in enumerate(zip(pieces, starts)):
        fade_out = starts[i + 1][1] if i + 1 < len(pieces) else 0
        audio = piece.audio
        for over, speech in piece.talk:
            audio = lay_over(audio, speech, at_end=over == "outro")
            n = min(len(speech), len(piece.audio), seconds_to_samples(TALK_MAX_S))
            t0 = start + (len(piece.audio) - n if over == "outro" else 0)
            timeline.append({"kind": "talk", "over": over, "song_id": piece.info.get("song_id"), **_span(t0, t0 + n)})
        stream[start : start + len(audio)] += fade_edges(audio, fade_in, fade_out)
        timeline.append({"kind": piece.kind, **_span(start, start + len(audio)), **piece.info})
    timeline.sort(key=lambda r: (r["start_s"], r["kind"] == "talk"))
    return stream, timeline


def _span(start: int, end: int) -> dict:
    return {"start_s": round(start / SAMPLE_RATE, 3), "end_s": round(end / SAMPLE_RATE, 3)}


def jingle(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """A station jingle: a rising arpeggio of bright tones over a noise swoosh, (N,) float32."""
    n = seconds_to_samples(seconds)
    t = np.arange(n) / SAMPLE_RATE
    root = 48 + int(rng.integers(0, 12))
    steps = rng.choice([0, 4, 7, 12, 16, 19], size=int(rng.integers(4, 8)))
    out = np.zeros(n, np.float64)
    note = n // (len(steps) + 1)
    for i, step in enumerate(steps):
        f0 = 440.0 * 2 ** ((root + 12 + step - 69) / 12)
        tt = t[: n - i * note]
        tone = sum(np.sin(2 * np.pi * f0 * k * tt) / k for k in (1, 2, 3, 5))
        out[i * note :] += tone * np.exp(-2.5 * tt) * 0.3
    sweep = rng.standard_normal(n) * np.sin(np.pi * t / seconds) ** 2 * 0.05
    out = out + sweep
    return (0.5 * out / max(float(np.abs(out).max()), 1e-9)).astype(np.float32)


# --- material ------------------------------------------------------------------------


def speech(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """DJ talk of about `seconds`: espeak-ng reading random station phrases, (N,) float32."""
    if shutil.which(ESPEAK) is None:
        raise SimulationError(f"{ESPEAK} not found (Debian package espeak-ng)")
    words = TALK_TEXT.split()
    text = " ".join(words[int(i)] for i in rng.integers(0, len(words), max(4, int(seconds * 2.6))))
    voice = ESPEAK_VOICES[int(rng.integers(len(ESPEAK_VOICES)))]
    speed = int(rng.integers(*ESPEAK_SPEED_WPM))
    result = subprocess.run([ESPEAK, "-v", voice, "-s", str(speed), "--stdout", text], capture_output=True, check=False, timeout=60)
    if result.returncode != 0:
        raise SimulationError(f"{ESPEAK} failed: {result.stderr.decode(errors='replace')[-300:]}")
    audio, rate = sf.read(io.BytesIO(result.stdout), dtype="float32")
    audio = audio if audio.ndim == 1 else audio.mean(axis=1)
    if rate != SAMPLE_RATE:
        audio = resample(audio, rate, SAMPLE_RATE)
    return (0.5 * audio / max(float(np.abs(audio).max()), 1e-9)).astype(np.float32)


def for_calibration(name: str) -> bool:
    """Whether out-of-catalog material `name` belongs to the calibration share."""
    return _unit_hash("calibration-material", name) < CALIBRATION_SHARE


def game_music_files(calibration: bool) -> list[Path]:
    """Sorted audio files of the allowed, installed Debian game-music packages: the calibration share or the rest."""
    files = sorted(
        p
        for d in GAME_MUSIC_DIRS
        if d.is_dir()
        for p in d.rglob("*")
        if p.suffix.lower() in (".ogg", ".mp3", ".flac", ".wav") and for_calibration(f"{p.parent.name}/{p.name}") == calibration
    )
    if not files:
        raise SimulationError(
            f"no game music found in {', '.join(map(str, GAME_MUSIC_DIRS))} (apt-get install asc-music hyperrogue-music drascula-music)"
        )
    return files


def game_excerpt(rng: np.random.Generator, files: list[Path], seconds: float) -> tuple[np.ndarray, dict]:
    """`seconds` of game music at peak 0.5: an excerpt of a random track, continued by
    further tracks (1-s fades between them) while the tracks are shorter than asked."""
    need = seconds_to_samples(seconds)
    parts, sources = [], []
    while sum(len(p) for p in parts) < need:
        path = files[int(rng.integers(len(files)))]
        audio = load_audio(path)
        if len(audio) < seconds_to_samples(5.0):  # jingles and effects, not music
            continue
        n = min(len(audio), need - sum(len(p) for p in parts) + seconds_to_samples(1.0))
        offset = int(rng.integers(0, len(audio) - n + 1))
        part = audio[offset : offset + n]
        parts.append(fade_edges(part / max(float(np.abs(part).max()), 1e-9) * 0.5, *(2 * [seconds_to_samples(1.0)])))
        sources.append(f"{path.parent.name}/{path.name}@{offset / SAMPLE_RATE:.1f}")
    return np.concatenate(parts)[:need].astype(np.float32), {"source": " + ".join(sources)}


# --- catalog -------------------------------------------------------------------------


def _tunes(seed: int, count: int) -> list[Tune]:
    """`count` usable demo-family tunes (never in any training split), in a seeded order."""
    sources = sorted(_family_heads(DEFAULT_COLLECTIONS, demo=True), key=lambda s: _unit_hash("sim-order", seed, s.tune_id))
    tunes = [tune for _, tune in _parse_first(sources, count)]
    if len(tunes) < count:
        raise SimulationError(f"only {len(tunes)} demo tunes available, {count} needed")
    return tunes


def _render_all(jobs: list[_Job], optional: frozenset[int] = frozenset()) -> list[np.ndarray | None]:
    """Render jobs in order on a spawn pool; raises RenderError on the first failure of a
    job whose position is not in `optional` (those give None, with a warning)."""
    if not jobs:
        return []
    for soundfont in {job.arrangement.soundfont for job in jobs}:
        synth_soundfont(soundfont)
    with multiprocessing.get_context("spawn").Pool(min(RENDER_WORKERS, len(jobs))) as pool:
        results = pool.map(_render_job, jobs, chunksize=1)
    for position, (job, _, error) in enumerate(results):
        if error and position in optional:
            log.warning("render of %s failed, replaced by other material: %s", job.tune.tune_id, error)
        elif error:
            raise RenderError(f"render of {job.tune.tune_id} failed: {error}")
    return [audio for _, audio, _ in results]


def ensure_catalog(out_dir: Path, seed: int = 0, size: int = CATALOG_SIZE) -> Path:
    """Render (once) `size` reference songs into OUT/catalog; return the refs.csv path."""
    catalog_dir = out_dir / "catalog"
    refs_csv = catalog_dir / "refs.csv"
    if refs_csv.exists():
        return refs_csv
    tunes = _tunes(seed, size)
    jobs = [
        _Job(t, _reference_arrangement(np.random.default_rng([seed, i]), t), 60.0, catalog_dir / f"{group_id_of(t)}.flac")
        for i, t in enumerate(tunes)
    ]
    log.info("rendering %d catalog songs into %s", len(jobs), catalog_dir)
    _render_all(jobs)
    rows = [(group_id_of(t), t.title, f"{group_id_of(t)}.flac") for t in tunes]
    write_text_atomic(refs_csv, _csv_text(("song_id", "title", "path"), rows))
    write_text_atomic(catalog_dir / "catalog.json", json.dumps({"version": SIM_VERSION, "seed": seed, "size": size}) + "\n")
    return refs_csv


# --- streams -------------------------------------------------------------------------


def stream_path(out_dir: Path, seed: int, duration_s: float, background: bool = False) -> Path:
    folder, prefix = ("calibration", "bg") if background else ("streams", "sim")
    return out_dir / folder / f"{prefix}-{seed}-{round(duration_s / 60)}m.flac"


def _plan(rng: np.random.Generator, duration_s: float, catalog: list[Tune], outsiders: list[Tune]) -> list[dict]:
    """The stream's running order: a list of item dicts (kind, seconds, and what to render).
    An empty `catalog` gives a stream of out-of-catalog material only."""
    items: list[dict] = []
    music_s = outside_s = total_s = 0.0
    n_play = 0
    while total_s < duration_s:
        if catalog and (outside_s >= MIN_OUTSIDE_SHARE * music_s or not items):  # a play, unless outside music is behind
            ci = int(rng.integers(len(catalog)))
            tune = catalog[ci]
            whole = float(rng.uniform(*COVER_WHOLE_S))
            seconds = float(rng.uniform(*SHORT_PLAY_S)) if rng.random() < SHORT_PLAY_SHARE else float(rng.uniform(SHORT_PLAY_S[1], whole))
            late = seconds < whole and rng.random() < LATE_JOIN_SHARE
            offset = float(rng.uniform(0.0, whole - seconds)) if late else 0.0
            items.append({
                "kind": "play", "tune": tune, "ci": ci, "seconds": seconds, "offset_s": offset, "whole_s": whole, "n": n_play,
                "talk_intro": bool(rng.random() < TALK_INTRO_P), "talk_outro": bool(rng.random() < TALK_OUTRO_P),
            })  # fmt: skip
            n_play += 1
            music_s += seconds
        while not catalog or outside_s < MIN_OUTSIDE_SHARE * music_s + 1e-9 or rng.random() < 0.3:
            if rng.random() < GAME_MUSIC_SHARE:
                seconds = float(rng.uniform(*OUTSIDE_ITEM_S))
                items.append({"kind": "music", "origin": "game", "seconds": seconds})
            else:
                seconds = float(rng.uniform(*FOLK_OUTSIDE_S))
                items.append({"kind": "music", "origin": "folk", "tune": outsiders[int(rng.integers(len(outsiders)))], "seconds": seconds})
            music_s += seconds
            outside_s += seconds
            if not catalog:
                break
        for kind, p, span in (
            ("jingle", JINGLE_P, JINGLE_S),
            ("ad", AD_P, AD_S),
            ("silence", SILENCE_P, SILENCE_S),
            ("noise", NOISE_P, NOISE_S),
        ):
            if rng.random() < p:
                items.append({"kind": kind, "seconds": float(rng.uniform(*span))})
        total_s = sum(item["seconds"] for item in items) - 4.0 * len(items)  # ~crossfades
    return items


def _cover_job(item: dict, seed: int, catalog_seed: int) -> _Job:
    """A fresh cover of catalog song `item["ci"]`: differs from its reference (see ensure_catalog)."""
    tune: Tune = item["tune"]
    reference = _reference_arrangement(np.random.default_rng([catalog_seed, item["ci"]]), tune)
    arrangement = _cover_arrangement(np.random.default_rng([seed, 1, item["n"]]), tune, reference, item["offset_s"] + item["seconds"])
    return _Job(tune, arrangement, item["offset_s"] + item["seconds"])


def simulate_stream(
    out_dir: Path,
    seed: int,
    duration_s: float,
    catalog_seed: int = 0,
    catalog_size: int = CATALOG_SIZE,
    background: bool = False,
    exclude: frozenset[str] = frozenset(),
) -> Path:
    """Render (once) a stream of about `duration_s` seconds; return its audio path.

    `background`: no plays, and out-of-catalog material from the calibration share only
    (no catalog is rendered). `exclude`: song ids (group ids) never used as out-of-catalog
    music, e.g. another catalog's songs when calibrating an index of that catalog.

    The timeline JSON next to it holds {"version", "seed", "duration_s", "sample_rate",
    "codec", "catalog": refs.csv path, "plays": [{song_id, title, start_s, end_s,
    offset_s, whole_s, partial, talk_intro, talk_outro}], "segments": [every piece and
    talk-over record from `mix`]}. Play spans include their crossfades.
    """
    audio_path = stream_path(out_dir, seed, duration_s, background)
    truth_path = audio_path.with_suffix(".json")
    if audio_path.exists() and truth_path.exists() and json.loads(truth_path.read_text()).get("version") == SIM_VERSION:
        log.info("simulated stream %s is cached", audio_path)
        return audio_path
    refs_csv = None if background else ensure_catalog(out_dir, catalog_seed, catalog_size)
    tunes = _tunes(catalog_seed, catalog_size + FOLK_OUTSIDERS)
    catalog = [] if background else tunes[:catalog_size]
    outsiders = [t for t in tunes[catalog_size:] if for_calibration(t.tune_id) == background and group_id_of(t) not in exclude]
    rng = np.random.default_rng([seed, 7, int(background)])
    items = _plan(rng, duration_s, catalog, outsiders)

    jobs, job_items = [], []
    for k, item in enumerate(items):
        if item["kind"] == "play":
            jobs.append(_cover_job(item, seed, catalog_seed))
            job_items.append(k)
        elif item["kind"] == "music" and item["origin"] == "folk":
            arrangement = random_arrangement(np.random.default_rng([seed, 2, k]), HELD_OUT_SOUNDFONT, item["tune"].base_tempo_bpm)
            jobs.append(_Job(item["tune"], _with_repeats(item["tune"], arrangement, item["seconds"]), item["seconds"]))
            job_items.append(k)
    log.info("stream seed %d: rendering %d folk pieces (%d items planned)", seed, len(jobs), len(items))
    optional = frozenset(i for i, k in enumerate(job_items) if items[k]["kind"] == "music")
    rendered = dict(zip(job_items, _render_all(jobs, optional)))

    files = game_music_files(calibration=background)
    pieces = []
    for k, item in enumerate(items):
        pieces.append(_piece(np.random.default_rng([seed, 3, k]), item, rendered.get(k), files))
    crossfades = [float(rng.uniform(*CROSSFADE_S)) for _ in range(len(pieces) - 1)]
    stream, timeline = mix(pieces, crossfades)
    codec = sorted(CODECS)[int(rng.integers(len(CODECS)))]
    stream = codec_roundtrip(compress(stream), codec)
    _write_audio_atomic(audio_path, stream, "FLAC")

    plays = [
        {key: r[key] for key in ("song_id", "title", "start_s", "end_s", "offset_s", "whole_s", "partial", "talk_intro", "talk_outro")}
        for r in timeline
        if r["kind"] == "play"
    ]
    truth = {
        "version": SIM_VERSION, "seed": seed, "duration_s": round(len(stream) / SAMPLE_RATE, 3), "sample_rate": SAMPLE_RATE,
        "codec": codec, "catalog": refs_csv and str(refs_csv), "background": background, "airtime_s": airtime(timeline),
        "plays": plays, "segments": timeline,
    }  # fmt: skip
    write_text_atomic(truth_path, json.dumps(truth, indent=1, ensure_ascii=False) + "\n")
    outside = truth["airtime_s"]["music"]
    log.info(
        "stream %s: %.0f s, %d plays, out-of-catalog music %.0f s, codec %s", audio_path, truth["duration_s"], len(plays), outside, codec
    )
    return audio_path


def airtime(timeline: list[dict]) -> dict[str, float]:
    """Seconds per segment kind (talk-over counted apart; crossfades count for both sides)."""
    totals: dict[str, float] = {}
    for r in timeline:
        totals[r["kind"]] = round(totals.get(r["kind"], 0.0) + r["end_s"] - r["start_s"], 1)
    return totals


def _piece(rng: np.random.Generator, item: dict, rendered: np.ndarray | None, files: list[Path]) -> Piece:
    gain = db_to_gain(float(rng.uniform(*SEGMENT_GAIN_DB)))
    kind, seconds = item["kind"], item["seconds"]
    if kind == "play":
        tune: Tune = item["tune"]
        audio = rendered[seconds_to_samples(item["offset_s"]) :]
        talk = []
        if item["talk_intro"]:
            talk.append(("intro", speech(rng, float(rng.uniform(4.0, TALK_MAX_S)))))
        if item["talk_outro"]:
            talk.append(("outro", speech(rng, float(rng.uniform(4.0, TALK_MAX_S)))))
        info = {
            "song_id": group_id_of(tune), "title": tune.title, "offset_s": round(item["offset_s"], 2), "whole_s": round(item["whole_s"], 2),
            "partial": bool(item["seconds"] < item["whole_s"]), "talk_intro": item["talk_intro"], "talk_outro": item["talk_outro"],
        }  # fmt: skip
        return Piece(kind, audio * gain, info, tuple(talk))
    if kind == "music":
        if item["origin"] == "folk" and rendered is not None:
            return Piece(kind, rendered * gain, {"origin": "folk", "source": item["tune"].tune_id})
        audio, info = game_excerpt(rng, files, seconds)
        return Piece(kind, audio * gain, {"origin": "game", **info})
    if kind == "jingle":
        return Piece(kind, jingle(rng, seconds) * gain)
    if kind == "ad":
        voice = speech(rng, seconds)
        bed, _ = game_excerpt(rng, files, len(voice) / SAMPLE_RATE)
        bed = np.pad(bed, (0, max(0, len(voice) - len(bed))))[: len(voice)]
        return Piece(kind, (voice + bed * db_to_gain(AD_BED_DB)) * gain)
    if kind == "silence":
        return Piece(kind, np.zeros(seconds_to_samples(seconds), np.float32))
    if kind == "noise":
        return Piece(kind, noise(rng, seconds, float(rng.uniform(*NOISE_DBFS))))
    raise ValueError(f"unknown segment kind {kind!r}")


def simulate(
    out_dir: Path, seeds: list[int], duration_s: float, catalog_seed: int = 0, catalog_size: int = CATALOG_SIZE, background: bool = False
) -> list[Path]:
    """Catalog plus one stream per seed (cached); returns the stream audio paths."""
    out_dir = Path(out_dir)
    return [simulate_stream(out_dir, seed, duration_s, catalog_seed, catalog_size, background) for seed in seeds]
