"""Cover-group datasets and the demo catalog + stream, rendered from the music21 corpus.

A *cover group* is one corpus tune rendered `versions_per_group` times with different
arrangements (`coverwatch.model.render.random_arrangement`). The training model learns that the
versions of a group are the same song.

Splits are decided per *title family* (`TuneSource.family`: variants of one song in
the Essen collection share a normalised title), by hashes, so they do not depend on
the order or number of tunes processed:

- demo: families with `_unit_hash("demo", family) < DEMO_FRACTION`, whatever the seed.
  `build_cover_dataset` never uses them, so demo tunes are in neither train nor val.
- val: other families with `_unit_hash("split", seed, family) < val_fraction`,
  rendered with the held-out soundfont.
- train: the rest, rendered with the training soundfont.

Only the first tune of each family (in corpus order) is used, so no two groups, and no
catalog song and out-of-catalog tune, are variants of one song. Melodies that recur
under different titles are not detected.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

from coverwatch.model.degrade import degrade, random_chain
from coverwatch.model.render import (
    DEFAULT_COLLECTIONS,
    HELD_OUT_SOUNDFONT,
    LEAVEOUT_COLLECTIONS,
    TRAIN_SOUNDFONT,
    Arrangement,
    RenderError,
    Tune,
    TuneSkipped,
    TuneSource,
    _pick_unused,
    arrange,
    check_soundfont_allowed,
    parse_tune,
    pass_seconds,
    random_arrangement,
    render,
    scan_corpus,
    synth_soundfont,
    write_text_atomic,
)
from coverwatch.model.styles import Style, arrange_styled, random_style
from coverwatch.streamer.frontend.audio import SAMPLE_RATE

log = logging.getLogger(__name__)

RENDER_WORKERS = 2  # rendering processes (the project machines have 2 cores)
MAX_VERSION_SECONDS = 60.0  # versions are cut (with a fade) at this length
DEMO_FRACTION = 0.02  # share of title families reserved for the demo (~130 of ~6.4k)
MANIFEST_COLUMNS = ("group_id", "version", "path", "title", "split", "soundfont", "transpose", "tempo_bpm", "program", "accompaniment")

# Demo layout.
CATALOG_SIZE = 30  # reference songs in catalog/refs.csv
STREAM_COVERS = 6  # catalog songs played as covers in the stream
STREAM_OUTSIDERS = 4  # out-of-catalog tunes in the stream
REFERENCE_SECONDS = (20.0, 60.0)  # a reference plays whole passes until >= min, cut at max
PLAN_MARGIN_S = 3.0  # passes are planned this much longer than needed (trailing rests get trimmed)
REFERENCE_PROGRAMS = (0, 1, 4, 21, 24, 25, 48)  # pianos, accordion, guitars, strings
REFERENCE_ACCOMPANIMENTS = ("bass", "chords", "full")
COVER_SECONDS = (30.0, 34.0)  # length of a cover in the stream, uniform
OUTSIDER_SECONDS = (20.0, 24.0)  # length of an out-of-catalog tune in the stream, uniform
COVER_TRANSPOSE = (1, 5)  # a cover is transposed by +-1..5 semitones from its reference
COVER_TEMPO_CHANGE = (0.10, 0.20)  # and its tempo changed by +-10..20 %
SILENCE_SECONDS = (5.0, 8.0)
NOISE_SECONDS = (8.0, 10.0)
NOISE_RMS = 0.005  # ~-46 dBFS white noise
STREAM_GAIN = (0.6, 1.0)  # each stream segment is scaled by a gain in this range
CROSSFADE_S = 1.0  # adjacent audible segments overlap by this much (linear fades)
SILENCE_AFTER, NOISE_AFTER = 3, 7  # gaps follow the 3rd and 7th musical segment


@dataclass(frozen=True)
class Row:
    """One rendered version in manifest.csv; `path` is relative to the manifest's folder."""

    group_id: str
    version: int
    path: str
    title: str
    split: str  # "train" or "val"
    soundfont: str  # file name of the soundfont
    transpose: int  # semitones
    tempo_bpm: float  # quarter notes per minute
    program: int  # GM program of the melody
    accompaniment: str


@dataclass(frozen=True)
class _Job:
    """One render: written to `path` (FLAC) if set, else returned."""

    tune: Tune
    arrangement: Arrangement
    max_seconds: float
    path: Path | None = None
    degradation: tuple[str, ...] = ()  # `coverwatch.model.degrade` chain applied after rendering
    degrade_seed: int = 0
    style: Style | None = None  # played by `coverwatch.model.styles` instead of `render.arrange`


def _digest(*parts: object) -> bytes:
    """SHA-256 of the string forms of `parts`."""
    return hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()


def _unit_hash(*parts: object) -> float:
    """A deterministic pseudo-random number in [0, 1) from `parts`."""
    return int.from_bytes(_digest(*parts)[:8], "big") / 2**64


def _rng(*parts: object) -> np.random.Generator:
    """A generator seeded from `parts`, so results do not depend on processing order."""
    return np.random.default_rng(int.from_bytes(_digest(*parts)[:8], "big"))


def is_demo_family(family: str) -> bool:
    """Whether a title family is reserved for the demo (independent of any seed)."""
    return _unit_hash("demo", family) < DEMO_FRACTION


def split_of(family: str, seed: int, val_fraction: float) -> str:
    """Split ("train" or "val") of a non-demo title family."""
    return "val" if _unit_hash("split", seed, family) < val_fraction else "train"


def group_id_of(tune: Tune) -> str:
    """File-name-safe group id: the tune id with "/" replaced by "_"."""
    return tune.tune_id.replace("/", "_")


def _family_heads(collections: Sequence[str], demo: bool) -> list[TuneSource]:
    """First tune of each title family in corpus order, demo families only or none."""
    heads: dict[str, TuneSource] = {}
    for source in scan_corpus(collections):
        heads.setdefault(source.family, source)
    return [source for family, source in heads.items() if is_demo_family(family) == demo]


def _parse_first(sources: Sequence[TuneSource], count: int) -> list[tuple[TuneSource, Tune]]:
    """Parse `sources` in order until `count` usable tunes are found; log what was skipped."""
    found: list[tuple[TuneSource, Tune]] = []
    skipped: Counter[str] = Counter()
    with tqdm(total=count, desc="parse", unit="tune") as bar:
        for source in sources:
            if len(found) == count:
                break
            try:
                found.append((source, parse_tune(source)))
                bar.update()
            except TuneSkipped as exc:
                skipped[exc.reason] += 1
                if exc.reason == "parse-error":
                    log.warning("skipping tune: %s", exc)
    log.info("parsed %d usable tunes, skipped %s", len(found), dict(skipped) or "none")
    if len(found) < count:
        log.warning("only %d usable tunes found, %d wanted", len(found), count)
    return found


def _write_audio_atomic(path: Path, audio: np.ndarray, format: str) -> None:
    """Write 16-bit `audio` at SAMPLE_RATE to `path` via a temporary file and os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    sf.write(tmp, audio, SAMPLE_RATE, format=format, subtype="PCM_16")
    os.replace(tmp, path)


def is_readable_audio(path: Path) -> bool:
    """Whether `path` is a non-empty audio file whose last frame decodes."""
    try:
        with sf.SoundFile(path) as audio:
            if audio.frames == 0:
                return False
            audio.seek(audio.frames - 1)
            return len(audio.read(1)) == 1
    except (OSError, RuntimeError, ValueError):  # missing, or not decodable by libsndfile
        return False


def _render_job(job: _Job) -> tuple[_Job, np.ndarray | None, str | None]:
    """Pool worker: render `job`; write it if it has a path. Returns (job, audio, error)."""
    try:
        arranger = arrange if job.style is None else functools.partial(arrange_styled, style=job.style)
        audio = render(job.tune, job.arrangement, job.max_seconds, arranger=arranger)
        if job.degradation:
            audio = degrade(audio, job.degradation, job.degrade_seed)
        if job.path is not None:
            _write_audio_atomic(job.path, audio, "FLAC")
            return job, None, None
        return job, audio, None
    except Exception as exc:  # noqa: BLE001 - one bad render must never stop a build
        return job, None, f"{type(exc).__name__}: {exc}"


def _run_jobs(jobs: Sequence[_Job], desc: str, workers: int = RENDER_WORKERS) -> list[tuple[_Job, np.ndarray | None, str | None]]:
    """Render `jobs` on a process pool with a progress bar; results in completion order."""
    if not jobs:
        return []
    for soundfont in {job.arrangement.soundfont for job in jobs}:
        synth_soundfont(soundfont)  # convert an sf3 once, before the workers race for it
    # spawn, not fork: the parent may run threads (tqdm's monitor), and workers see the current environment
    with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
        return list(tqdm(pool.imap_unordered(_render_job, jobs), total=len(jobs), desc=desc, unit="file"))


def render_missing(jobs: Sequence[_Job], desc: str) -> tuple[int, set[Path]]:
    """Render the jobs whose file is not there yet (a rerun resumes); return how many were
    attempted and the paths that failed (logged and skipped)."""
    pending = [job for job in jobs if not is_readable_audio(job.path)]
    failed = set()
    for job, _, error in _run_jobs(pending, desc=desc):
        if error:
            log.warning("render failed, skipped: %s: %s", job.path, error)
            failed.add(job.path)
    return len(pending), failed


def build_cover_dataset(
    out_dir: Path,
    n_groups: int,
    versions_per_group: int = 4,
    val_fraction: float = 0.15,
    seed: int = 0,
    *,
    collections: Sequence[str] = DEFAULT_COLLECTIONS,
    max_seconds: float = MAX_VERSION_SECONDS,
    degrade_fraction: float = 0.0,
    exclude_families: frozenset[str] = frozenset(),
    train_soundfonts: Sequence[Path] = (TRAIN_SOUNDFONT,),
    styled_fraction: float = 0.0,
) -> Path:
    """Render `n_groups` cover groups to out_dir/audio/<group_id>/v<version>.flac; return manifest.csv.

    Collections of the leave-out set (`LEAVEOUT_COLLECTIONS`) are refused: training on them
    would make that evaluation measure the training data again.
    Tunes are the first usable ones of the non-demo title families in an order fixed by
    `seed`, so a larger `n_groups` extends a smaller build. Each group's arrangements
    come from a generator seeded by (seed, tune_id); versions differ in program,
    transpose, accompaniment and tempo. Each version lasts at most `max_seconds`.

    Resumable: files that exist and decode are kept. Files and the manifest are
    written atomically; the manifest (columns `MANIFEST_COLUMNS`, sorted by group and
    version) lists only files present at the end. A failed render is logged, counted
    and left out, never fatal.

    Options that leave a build unchanged at their defaults:
    - `degrade_fraction`: share of versions (chosen by hash of seed, tune, version)
      passed through a random `coverwatch.model.degrade` chain (reverb, EQ, compression, noise,
      codec). They are written as v<version>_<chain>.flac, never over a clean file,
      and the manifest gains a `degradation` column ("" for clean versions).
    - `exclude_families`: title families never used (e.g. the held-out real-variant
      families of `coverwatch.model.variants`).
    - `train_soundfonts`: with more than one, each training version is synthesised with
      one of them, drawn apart from the group's other versions while any is unused (so a
      group's versions differ in synthesis too). The draw has its own random stream:
      the arrangements are those of the one-soundfont build. Validation keeps
      `HELD_OUT_SOUNDFONT`.
    - `styled_fraction`: share of training versions (chosen by hash of seed, tune, version)
      played by the second arranger, `coverwatch.model.styles` (its own harmonisation,
      textures, melody placement, counter-lines, grooves, rubato), with the key, tempo,
      programs and soundfont drawn as for the others. Its styles have their own random
      stream; the files are v<version>_styled[_<chain>].flac and the manifest's
      `accompaniment` column holds the style's name. Validation stays with `render.arrange`.
    """
    fractions = {"val_fraction": val_fraction, "degrade_fraction": degrade_fraction, "styled_fraction": styled_fraction}
    if n_groups < 1 or versions_per_group < 1 or not all(0.0 <= f <= 1.0 for f in fractions.values()):
        raise ValueError(
            f"bad sizes: n_groups={n_groups}, versions_per_group={versions_per_group}, "
            + ", ".join(f"{name}={value}" for name, value in fractions.items())
        )
    if not train_soundfonts:
        raise ValueError("train_soundfonts: at least one soundfont")
    for soundfont in train_soundfonts:
        check_soundfont_allowed(soundfont)
    if set(collections) & set(LEAVEOUT_COLLECTIONS):
        raise ValueError(f"{sorted(set(collections) & set(LEAVEOUT_COLLECTIONS))}: kept for the leave-out evaluation (coverwatch data leaveout), never for training")
    out_dir = Path(out_dir)
    heads = [s for s in _family_heads(collections, demo=False) if s.family not in exclude_families]
    sources = sorted(heads, key=lambda s: _unit_hash("order", seed, s.tune_id))
    degradation_of: dict[tuple[str, int], str] = {}
    rows: list[Row] = []
    jobs: list[_Job] = []
    for source, tune in _parse_first(sources, n_groups):
        split = split_of(source.family, seed, val_fraction)
        rng = _rng("arrangement", seed, tune.tune_id)
        soundfont_rng = _rng("soundfont", seed, tune.tune_id)
        style_rng = _rng("style", seed, tune.tune_id)
        arrangements: list[Arrangement] = []
        styles: list[Style] = []
        for version in range(versions_per_group):
            if split == "val":
                soundfont = HELD_OUT_SOUNDFONT
            elif len(train_soundfonts) == 1:
                soundfont = train_soundfonts[0]
            else:
                soundfont = _pick_unused(soundfont_rng, train_soundfonts, {a.soundfont for a in arrangements})
            arrangement = random_arrangement(rng, soundfont, tune.base_tempo_bpm, arrangements)
            arrangements.append(arrangement)
            styles.append(random_style(style_rng, styles))  # drawn for every version: a version's style does not depend on the fraction
            styled = split == "train" and _unit_hash("styled", seed, tune.tune_id, version) < styled_fraction
            chain = _degradation_chain(seed, tune.tune_id, version, degrade_fraction)
            suffix = ("_styled" if styled else "") + ("_" + "+".join(chain) if chain else "")
            relative = Path("audio") / group_id_of(tune) / f"v{version}{suffix}.flac"
            degradation_of[group_id_of(tune), version] = "+".join(chain)
            rows.append(
                Row(
                    group_id=group_id_of(tune),
                    version=version,
                    path=relative.as_posix(),
                    title=tune.title,
                    split=split,
                    soundfont=soundfont.name,
                    transpose=arrangement.transpose,
                    tempo_bpm=arrangement.tempo_bpm,
                    program=arrangement.program,
                    accompaniment=styles[-1].name if styled else arrangement.accompaniment,
                )
            )
            degrade_seed = int.from_bytes(_digest("degrade-seed", seed, tune.tune_id, version)[:4], "big")
            jobs.append(_Job(tune, arrangement, max_seconds, out_dir / relative, chain, degrade_seed, styles[-1] if styled else None))
    attempted, failed = render_missing(jobs, desc="render")
    rows = sorted((row for row in rows if out_dir / row.path not in failed), key=lambda r: (r.group_id, r.version))
    manifest = out_dir / "manifest.csv"
    if degrade_fraction > 0:
        table = [(*dataclasses.astuple(row), degradation_of[row.group_id, row.version]) for row in rows]
        write_text_atomic(manifest, _csv_text((*MANIFEST_COLUMNS, "degradation"), table))
    else:
        write_text_atomic(manifest, _csv_text(MANIFEST_COLUMNS, [dataclasses.astuple(row) for row in rows]))
    splits = Counter(row.split for row in rows if row.version == 0)
    log.info(
        "dataset %s: %d groups (%s), %d files: %d rendered, %d reused, %d failed",
        out_dir, len(jobs) // versions_per_group, dict(splits), len(rows),
        attempted - len(failed), len(jobs) - attempted, len(failed),
    )  # fmt: skip
    return manifest


def _degradation_chain(seed: int, tune_id: str, version: int, fraction: float) -> tuple[str, ...]:
    """The `coverwatch.model.degrade` chain of one version: () for a clean one (always when fraction is 0)."""
    if fraction <= 0 or _unit_hash("degrade", seed, tune_id, version) >= fraction:
        return ()
    return random_chain(_rng("degrade-chain", seed, tune_id, version))


def _csv_text(columns: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """CSV text with a header line."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    return buffer.getvalue()


def read_manifest(path: Path) -> list[Row]:
    """Rows of a manifest.csv written by `build_cover_dataset`."""
    with Path(path).open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = set(MANIFEST_COLUMNS) - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
        types = {field.name: field.type for field in dataclasses.fields(Row)}
        casts = {"int": int, "float": float, "str": str}
        return [Row(**{name: casts[types[name]](record[name]) for name in MANIFEST_COLUMNS}) for record in reader]


# --- demo ---------------------------------------------------------------------------


def _with_repeats(tune: Tune, arrangement: Arrangement, seconds: float) -> Arrangement:
    """`arrangement` with enough whole passes of `tune` to last `seconds` (+ `PLAN_MARGIN_S`)."""
    one_pass = pass_seconds(tune, dataclasses.replace(arrangement, repeats=1))
    return dataclasses.replace(arrangement, repeats=max(1, math.ceil((seconds + PLAN_MARGIN_S) / one_pass)))


def _reference_arrangement(rng: np.random.Generator, tune: Tune) -> Arrangement:
    """The catalog's "original": a plain arrangement in the written key at the base tempo."""
    arrangement = dataclasses.replace(
        random_arrangement(rng, HELD_OUT_SOUNDFONT, tune.base_tempo_bpm),
        program=int(rng.choice(REFERENCE_PROGRAMS)),
        transpose=0,
        tempo_bpm=round(tune.base_tempo_bpm, 2),
        accompaniment=str(rng.choice(REFERENCE_ACCOMPANIMENTS)),
        octave_shift=0,
        ornament="plain",
        swing=0.0,
    )
    return _with_repeats(tune, arrangement, REFERENCE_SECONDS[0])


def _cover_arrangement(rng: np.random.Generator, tune: Tune, reference: Arrangement, seconds: float) -> Arrangement:
    """A cover of `reference`: other program and accompaniment, +-1..5 semitones, +-10..20 % tempo."""
    sign = 1 if rng.random() < 0.5 else -1
    arrangement = dataclasses.replace(
        random_arrangement(rng, reference.soundfont, reference.tempo_bpm, avoid=[reference]),
        transpose=int(rng.choice([-1, 1]) * rng.integers(COVER_TRANSPOSE[0], COVER_TRANSPOSE[1] + 1)),
        tempo_bpm=round(reference.tempo_bpm * (1 + sign * float(rng.uniform(*COVER_TEMPO_CHANGE))), 2),
    )
    return _with_repeats(tune, arrangement, seconds)


def _place(stream: np.ndarray, audio: np.ndarray, start: int, fade: int) -> None:
    """Add `audio` into `stream` at `start` with linear fades of `fade` samples at both ends."""
    audio = audio.copy()
    fade = min(fade, len(audio) // 2)
    if fade:
        ramp = np.linspace(0.0, 1.0, fade, dtype=np.float32)
        audio[:fade] *= ramp
        audio[len(audio) - fade :] *= ramp[::-1]
    stream[start : start + len(audio)] += audio


def build_demo(out_dir: Path, seed: int = 7) -> Path:
    """Render the demo catalog, stream and ground truth into `out_dir`; return `out_dir`.

    Tunes come only from the demo-reserved title families (see the module docstring),
    so none is in any `build_cover_dataset` split; all audio uses the held-out soundfont.

    - catalog/refs.csv (song_id,title,path; path relative to catalog/) and
      catalog/<song_id>.flac: `CATALOG_SIZE` reference renditions, 20-60 s each.
    - stream.wav: ~5 min, 16-bit mono at SAMPLE_RATE: `STREAM_COVERS` catalog songs as
      covers (30-34 s) and `STREAM_OUTSIDERS` out-of-catalog tunes (20-24 s) in a
      seeded order, a 5-8 s silence and 8-10 s of low noise, adjacent audible
      segments crossfaded over `CROSSFADE_S`.
    - truth.json: {"sample_rate", "duration_s", "seed", "plays": [{song_id, title,
      start_s, end_s}], "out_of_catalog": [{tune_id, title, start_s, end_s}],
      "silence": [{start_s, end_s}], "noise": [{start_s, end_s}]}. A segment spans its
      fades, so neighbours overlap by `CROSSFADE_S`.

    Deterministic for a given seed; ~30-40 s on 2 cores (plus a one-off soundfont
    conversion and tune parsing on a cold cache). Raises `RenderError` if a render fails.
    """
    out_dir = Path(out_dir)
    sources = sorted(_family_heads(DEFAULT_COLLECTIONS, demo=True), key=lambda s: _unit_hash("demo-order", seed, s.tune_id))
    picked = [tune for _, tune in _parse_first(sources, CATALOG_SIZE + STREAM_OUTSIDERS)]
    if len(picked) < CATALOG_SIZE + STREAM_OUTSIDERS:
        raise RenderError(f"only {len(picked)} demo tunes available, {CATALOG_SIZE + STREAM_OUTSIDERS} needed")
    catalog, outsiders = picked[:CATALOG_SIZE], picked[CATALOG_SIZE:]
    references = {tune.tune_id: _reference_arrangement(_rng("demo-reference", seed, tune.tune_id), tune) for tune in catalog}

    plan_rng = _rng("demo-stream", seed)
    covered = [catalog[i] for i in sorted(plan_rng.choice(len(catalog), STREAM_COVERS, replace=False))]
    segments: list[tuple[str, _Job]] = []
    for tune in covered:
        seconds = float(plan_rng.uniform(*COVER_SECONDS))
        arrangement = _cover_arrangement(_rng("demo-cover", seed, tune.tune_id), tune, references[tune.tune_id], seconds)
        segments.append(("plays", _Job(tune, arrangement, seconds)))
    for tune in outsiders:
        seconds = float(plan_rng.uniform(*OUTSIDER_SECONDS))
        rng = _rng("demo-outsider", seed, tune.tune_id)
        arrangement = _with_repeats(tune, random_arrangement(rng, HELD_OUT_SOUNDFONT, tune.base_tempo_bpm), seconds)
        segments.append(("out_of_catalog", _Job(tune, arrangement, seconds)))
    segments = [segments[i] for i in plan_rng.permutation(len(segments))]

    catalog_dir = out_dir / "catalog"
    reference_jobs = [
        _Job(tune, references[tune.tune_id], REFERENCE_SECONDS[1], catalog_dir / f"{group_id_of(tune)}.flac") for tune in catalog
    ]
    audio_of: dict[str, np.ndarray] = {}
    for job, audio, error in _run_jobs(reference_jobs + [job for _, job in segments], desc="demo"):
        if error:
            raise RenderError(f"demo render of {job.tune.tune_id} failed: {error}")
        if audio is not None:
            audio_of[job.tune.tune_id] = audio
    refs = [(group_id_of(tune), tune.title, f"{group_id_of(tune)}.flac") for tune in catalog]
    write_text_atomic(catalog_dir / "refs.csv", _csv_text(("song_id", "title", "path"), refs))

    pieces: list[tuple[str, Tune | None, np.ndarray]] = []
    for index, (kind, job) in enumerate(segments, start=1):
        gain = float(plan_rng.uniform(*STREAM_GAIN))
        pieces.append((kind, job.tune, audio_of[job.tune.tune_id] * gain))
        if index == SILENCE_AFTER:
            pieces.append(("silence", None, np.zeros(int(plan_rng.uniform(*SILENCE_SECONDS) * SAMPLE_RATE), np.float32)))
        if index == NOISE_AFTER:
            noise = plan_rng.standard_normal(int(plan_rng.uniform(*NOISE_SECONDS) * SAMPLE_RATE)) * NOISE_RMS
            pieces.append(("noise", None, noise.astype(np.float32)))
    stream = np.zeros(sum(len(audio) for _, _, audio in pieces), np.float32)
    truth: dict[str, list[dict]] = {"plays": [], "out_of_catalog": [], "silence": [], "noise": []}
    fade = int(CROSSFADE_S * SAMPLE_RATE)
    cursor, previous_audible = 0, False
    for kind, tune, audio in pieces:
        audible = kind != "silence"
        start = cursor - fade if audible and previous_audible else cursor
        _place(stream, audio, start, fade if audible else 0)
        cursor, previous_audible = start + len(audio), audible
        span = {"start_s": round(start / SAMPLE_RATE, 3), "end_s": round(cursor / SAMPLE_RATE, 3)}
        if kind == "plays":
            truth[kind].append({"song_id": group_id_of(tune), "title": tune.title, **span})
        elif kind == "out_of_catalog":
            truth[kind].append({"tune_id": tune.tune_id, "title": tune.title, **span})
        else:
            truth[kind].append(span)
    stream = stream[:cursor]
    _write_audio_atomic(out_dir / "stream.wav", stream, "WAV")
    summary = {"sample_rate": SAMPLE_RATE, "duration_s": round(len(stream) / SAMPLE_RATE, 3), "seed": seed, **truth}
    write_text_atomic(out_dir / "truth.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    log.info("demo %s: %d references, %.0f s stream with %d plays", out_dir, len(refs), len(stream) / SAMPLE_RATE, len(truth["plays"]))
    return out_dir
