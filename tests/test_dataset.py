"""Tests for coverwatch.model.render and coverwatch.model.dataset: tiny builds (3 groups x 2 versions of <= 6 s)."""

from __future__ import annotations

import hashlib
import itertools
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("music21")
pytest.importorskip("pretty_midi")

import soundfile as sf

from coverwatch.model import render
from coverwatch.model.dataset import (
    MANIFEST_COLUMNS,
    _family_heads,
    build_cover_dataset,
    is_demo_family,
    read_manifest,
    split_of,
)
from coverwatch.model.render import (
    HELD_OUT_SOUNDFONT,
    TRAIN_SOUNDFONT,
    ReservedDataError,
    check_collection_allowed,
    check_soundfont_allowed,
    parse_tune,
    random_arrangement,
    scan_corpus,
)
from coverwatch.streamer.frontend.audio import SAMPLE_RATE

needs_fluidsynth = pytest.mark.skipif(shutil.which("fluidsynth") is None, reason="needs the fluidsynth CLI (Debian package)")

# 3 groups at val_fraction 0.5 with seed 1 give both splits (checked in test_manifest).
TINY = {"n_groups": 3, "versions_per_group": 2, "val_fraction": 0.5, "seed": 1, "max_seconds": 6.0}


def _first_tune(collection: str = "essenFolksong") -> render.Tune:
    for source in scan_corpus([collection]):
        try:
            return parse_tune(source)
        except render.TuneSkipped:
            continue
    raise AssertionError("no usable tune")


def _audio_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.flac"))}


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    build_cover_dataset(out, **TINY)
    return out


# --- guards -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    ["bach", "bach/bwv66.6", "oneills1850", "ryansMammoth/book1.abc", "airdsAirs", "AirdsAirs", render.CORPUS_DIR / "bach" / "x.mxl"],
)
def test_reserved_collections_raise(path: str | Path) -> None:
    with pytest.raises(ReservedDataError):
        check_collection_allowed(path)


def test_reserved_collection_refused_by_scan() -> None:
    with pytest.raises(ReservedDataError):
        scan_corpus(["essenFolksong", "oneills1850"])


def test_allowed_collections_pass() -> None:
    for name in ("essenFolksong", "nottingham-dataset", render.CORPUS_DIR / "essenFolksong" / "han1.abc"):
        check_collection_allowed(name)


def test_fluidr3_refused_even_through_symlink(tmp_path: Path) -> None:
    target = tmp_path / "FluidR3_GM.sf2"
    target.write_bytes(b"RIFF")
    innocent = tmp_path / "default-GM.sf2"
    innocent.symlink_to(target)
    for path in (target, innocent):
        with pytest.raises(ReservedDataError):
            check_soundfont_allowed(path)
    for system_path in (render.FORBIDDEN_SOUNDFONT, Path("/usr/share/sounds/sf2/default-GM.sf2")):
        # default-GM.sf2 may point to another installed soundfont (e.g. OPL3), and FluidR3 may be absent
        if system_path.exists() and render.FORBIDDEN_SOUNDFONT.exists() and system_path.resolve().samefile(render.FORBIDDEN_SOUNDFONT):
            with pytest.raises(ReservedDataError):
                check_soundfont_allowed(system_path)
    assert check_soundfont_allowed(TRAIN_SOUNDFONT) == TRAIN_SOUNDFONT.resolve()


def test_render_refuses_fluidr3(tmp_path: Path) -> None:
    forbidden = tmp_path / "FluidR3_GM.sf2"
    forbidden.write_bytes(b"RIFF")
    arrangement = random_arrangement(np.random.default_rng(0), forbidden)
    with pytest.raises(ReservedDataError):
        render.render(_first_tune(), arrangement)


# --- tunes and arrangements ---------------------------------------------------------


def test_parse_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COVERWATCH_CACHE", str(tmp_path))
    tune = _first_tune()
    assert list((tmp_path / "tunes").rglob("*.json"))
    assert tune.notes[0][1] == 0.0
    assert [n[1] for n in tune.notes] == sorted(n[1] for n in tune.notes)
    assert tune.n_bars >= render.MIN_BARS and len(tune.chords) == tune.n_bars
    assert all(len(set(chord)) == 3 for chord in tune.chords)

    def no_parsing(*args: object) -> None:
        raise AssertionError("cache not used")

    monkeypatch.setattr(render, "_parse_abc", no_parsing)
    assert _first_tune() == tune


def test_iter_tunes_limit() -> None:
    tunes = list(render.iter_tunes(("nottingham-dataset",), limit=1))
    assert len(tunes) == 1 and tunes[0].tune_id.startswith("nottingham-dataset/")


def test_versions_of_a_group_differ() -> None:
    rng = np.random.default_rng(3)
    arrangements: list[render.Arrangement] = []
    for _ in range(4):
        arrangements.append(random_arrangement(rng, TRAIN_SOUNDFONT, 100.0, arrangements))
    for field in ("program", "transpose", "accompaniment"):
        assert len({getattr(a, field) for a in arrangements}) == 4, field
    tempos = sorted(a.tempo_bpm for a in arrangements)
    assert all(b / a >= render.MIN_TEMPO_RATIO for a, b in itertools.pairwise(tempos))
    assert all(75.0 <= t <= 125.0 for t in tempos)


@needs_fluidsynth
def test_render_output_format() -> None:
    tune = _first_tune()
    arrangement = random_arrangement(np.random.default_rng(0), TRAIN_SOUNDFONT, tune.base_tempo_bpm)
    audio = render.render(tune, arrangement, max_seconds=5.0)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert SAMPLE_RATE * 2 < len(audio) <= SAMPLE_RATE * 5
    assert np.isclose(np.abs(audio).max(), render.PEAK_LEVEL, atol=1e-3)
    assert float(np.sqrt(np.mean(audio**2))) > 0.02


# --- splits -------------------------------------------------------------------------


def test_split_depends_only_on_family_and_seed() -> None:
    families = [f"family {i}" for i in range(2000)]
    splits = [split_of(f, 0, 0.15) for f in families]
    assert splits == [split_of(f, 0, 0.15) for f in families]
    assert 0.10 < splits.count("val") / len(families) < 0.20
    assert splits != [split_of(f, 1, 0.15) for f in families]


def test_demo_families_never_in_dataset_sources() -> None:
    dataset_sources = _family_heads(render.DEFAULT_COLLECTIONS, demo=False)
    demo_sources = _family_heads(render.DEFAULT_COLLECTIONS, demo=True)
    assert demo_sources and not any(is_demo_family(s.family) for s in dataset_sources)
    assert not {s.family for s in dataset_sources} & {s.family for s in demo_sources}


# --- builds -------------------------------------------------------------------------


@needs_fluidsynth
def test_manifest(tiny_build: Path) -> None:
    header = (tiny_build / "manifest.csv").read_text().splitlines()[0]
    assert tuple(header.split(",")) == MANIFEST_COLUMNS
    rows = read_manifest(tiny_build / "manifest.csv")
    assert len(rows) == TINY["n_groups"] * TINY["versions_per_group"]
    split_of_group: dict[str, set[str]] = {}
    for row in rows:
        split_of_group.setdefault(row.group_id, set()).add(row.split)
        expected_font = HELD_OUT_SOUNDFONT if row.split == "val" else TRAIN_SOUNDFONT
        assert row.soundfont == expected_font.name
        info = sf.info(tiny_build / row.path)
        assert (info.samplerate, info.channels, info.format) == (SAMPLE_RATE, 1, "FLAC")
        assert info.duration <= TINY["max_seconds"]
    assert all(len(splits) == 1 for splits in split_of_group.values())
    assert {s for splits in split_of_group.values() for s in splits} == {"train", "val"}


@needs_fluidsynth
def test_build_is_deterministic_and_resumable(tiny_build: Path, tmp_path: Path) -> None:
    build_cover_dataset(tmp_path, **TINY)
    assert (tmp_path / "manifest.csv").read_text() == (tiny_build / "manifest.csv").read_text()
    reference = _audio_hashes(tiny_build)
    assert _audio_hashes(tmp_path) == reference

    files = sorted(tmp_path.rglob("*.flac"))
    deleted, corrupted, kept = files[0], files[1], files[2:]
    deleted.unlink()
    corrupted.write_bytes(b"not audio")
    kept_stats = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in kept}
    build_cover_dataset(tmp_path, **TINY)
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in kept} == kept_stats
    assert _audio_hashes(tmp_path) == reference


@needs_fluidsynth
def test_failed_renders_are_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # the render workers find no fluidsynth
    manifest = build_cover_dataset(tmp_path / "out", **TINY)
    assert read_manifest(manifest) == []
    assert not list((tmp_path / "out").rglob("*.flac"))


@needs_fluidsynth
def test_render_ends_a_voice_that_never_dies_away(monkeypatch: pytest.MonkeyPatch) -> None:
    """This tune under this church-organ arrangement, cut at exactly this length, leaves a
    voice sounding after its last note, and fluidsynth's file renderer ran until the timeout
    (found in the demo's calibration audio). "All sound off" after the music ends lets the
    render finish."""
    monkeypatch.setattr(render, "FLUIDSYNTH_TIMEOUT_S", 30)  # a regression fails in 30 s, not 120
    source = next(s for s in scan_corpus(["essenFolksong"]) if s.tune_id == "essenFolksong/erk10/178")
    arrangement = render.Arrangement(
        soundfont=HELD_OUT_SOUNDFONT, program=19, transpose=-2, tempo_bpm=101.61, accompaniment="full", octave_shift=-1,
        ornament="passing", swing=0.0, velocity=94, repeats=3, accomp_program=19, bass_program=34,
    )  # fmt: skip
    audio = render.render(parse_tune(source), arrangement, max_seconds=56.98274601388158)
    assert abs(len(audio) / SAMPLE_RATE - 56.98) < 0.5


@needs_fluidsynth
def test_several_training_soundfonts_change_only_the_synthesis(tiny_build: Path, tmp_path: Path) -> None:
    fonts = (TRAIN_SOUNDFONT, HELD_OUT_SOUNDFONT)
    rows = read_manifest(build_cover_dataset(tmp_path, **TINY, train_soundfonts=fonts))
    one_font = read_manifest(tiny_build / "manifest.csv")
    assert len(rows) == len(one_font)
    for row, before in zip(rows, one_font, strict=True):
        # the arrangement draws are those of the one-soundfont build
        assert (row.group_id, row.transpose, row.tempo_bpm, row.program, row.accompaniment) == (
            before.group_id, before.transpose, before.tempo_bpm, before.program, before.accompaniment,
        )  # fmt: skip
    train_groups = {r.group_id for r in rows if r.split == "train"}
    assert train_groups
    for group in train_groups:  # two versions, two soundfonts: each version its own
        assert sorted(r.soundfont for r in rows if r.group_id == group) == sorted(f.name for f in fonts)
    assert {r.soundfont for r in rows if r.split == "val"} == {HELD_OUT_SOUNDFONT.name}


def test_a_reserved_training_soundfont_is_refused_before_rendering(tmp_path: Path) -> None:
    reserved = tmp_path / "FluidR3_GM.sf2"
    reserved.write_bytes(b"RIFF")
    with pytest.raises(ReservedDataError):
        build_cover_dataset(tmp_path / "out", **TINY, train_soundfonts=(TRAIN_SOUNDFONT, reserved))
    assert not (tmp_path / "out").exists()
