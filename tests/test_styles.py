"""Tests for coverwatch.model.styles (the second training arranger) and `data build --styled-fraction`."""

from __future__ import annotations

import dataclasses
import itertools
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("music21")
pytest.importorskip("pretty_midi")

import soundfile as sf

from coverwatch.model import render, styles
from coverwatch.model.dataset import build_cover_dataset, read_manifest
from coverwatch.model.render import TRAIN_SOUNDFONT, parse_tune, random_arrangement, scan_corpus

needs_fluidsynth = pytest.mark.skipif(shutil.which("fluidsynth") is None, reason="needs the fluidsynth CLI (Debian package)")
TINY = {"n_groups": 3, "versions_per_group": 2, "val_fraction": 0.5, "seed": 1, "max_seconds": 6.0}


@pytest.fixture(scope="module")
def tunes() -> list[render.Tune]:
    found = []
    for source in scan_corpus(["essenFolksong"]):
        try:
            found.append(parse_tune(source))
        except render.TuneSkipped:
            continue
        if len(found) == 4:
            return found
    raise AssertionError("no usable tunes")


def _style(**changes) -> styles.Style:
    base = styles.random_style(np.random.default_rng(0))
    return dataclasses.replace(base, humanise_s=0.0, rubato=0.0, **changes)


def _pitch_order(midi, parts: set[str]) -> list[int]:
    notes = sorted((n.start, n.pitch) for i in midi.instruments if i.name in parts for n in i.notes)
    return [pitch for _, pitch in notes]


@pytest.mark.parametrize(("texture", "role"), list(itertools.product(styles.TEXTURES, styles.MELODY_ROLES)))
def test_every_style_plays_the_whole_tune_in_order(tunes, texture: str, role: str) -> None:
    tune = tunes[0]
    arrangement = dataclasses.replace(random_arrangement(np.random.default_rng(3), TRAIN_SOUNDFONT), ornament="plain", repeats=1)
    style = _style(texture=texture, melody_role=role, melody_rhythm="straight", counter_line=True, groove="backbeat")
    midi = styles.arrange_styled(tune, arrangement, style=style)
    melody_parts = {"melody", "second"} if role == "shared" else {"melody"}
    played = _pitch_order(midi, melody_parts)
    written = [pitch for pitch, _, _ in tune.notes]
    assert len(played) == len(written)
    steps = np.diff(played) - np.diff(written)
    assert not steps.any(), "the tune's intervals must survive every style"
    shift = played[0] - written[0]
    assert (shift - arrangement.transpose) % 12 == 0
    names = {i.name for i in midi.instruments}
    assert {"texture", "counter", "drums"} <= names
    if role == "doubled":
        doubled = _pitch_order(midi, {"second"})
        assert len(doubled) == len(written) and abs(doubled[0] - played[0]) == 12
    if role in ("inner", "bass"):  # the tune sits under the chords
        chord_median = np.median([n.pitch for i in midi.instruments if i.name == "texture" for n in i.notes])
        assert np.median(played) < chord_median


def test_best_harmony_holds_the_melody_and_free_harmony_re_harmonises(tunes) -> None:
    held = []
    for tune in tunes:
        best = styles.harmonise(tune, _style(harmony_mode="best", harmony_rate="bar"), np.random.default_rng(0))
        assert [(a, b) for a, b, _ in best] == list(zip(tune.bars[:-1], tune.bars[1:]))
        assert best[-1][2][0] == tune.key_tonic  # ends on the tonic chord
        held += [pitch % 12 in chord for a, b, chord in best for pitch, start, _ in tune.notes if abs(start - a) < 1e-6]
    assert np.mean(held) > 0.75, "the chord under a bar line should hold its melody note (a random triad: ~0.4)"
    free = _style(harmony_mode="free", harmony_rate="half")
    draws = [[c for _, _, c in styles.harmonise(tunes[1], free, np.random.default_rng(seed))] for seed in range(3)]
    assert draws[0] != draws[1] or draws[0] != draws[2]


def test_voicing_moves_least_and_stays_in_range() -> None:
    c_major, f_major = (0, 4, 7), (5, 9, 0)
    first = styles.voice(c_major, None, 48, 72)
    assert first == [48, 52, 55]
    second = styles.voice(f_major, first, 48, 72)
    assert sorted(p % 12 for p in second) == [0, 5, 9]
    assert second == [48, 53, 57]  # C stays, E->F, G->A
    for triad in ((2, 5, 9), (11, 2, 5), (7, 11, 2)):
        assert all(48 <= p <= 72 for p in styles.voice(triad, second, 48, 72))


def test_rhythm_variations_keep_notes_in_order_without_overlap(tunes) -> None:
    tune = tunes[2]
    for rhythm in styles.MELODY_RHYTHMS:
        varied = styles.vary_rhythm(tune.notes, tune, rhythm)
        assert [p for p, _, _ in varied] == [p for p, _, _ in tune.notes]
        ends = [s + d for _, s, d in varied]
        assert all(d > 0 for _, _, d in varied)
        assert all(end <= start + 1e-9 for end, (_, start, _) in zip(ends[:-1], varied[1:]))
        assert ends[-1] == pytest.approx(tune.notes[-1][1] + tune.notes[-1][2])
    anticipated = styles.vary_rhythm(tune.notes, tune, "anticipate")
    assert any(s < o - 1e-6 for (_, s, _), (_, o, _) in zip(anticipated, tune.notes))


def test_styles_of_a_group_differ() -> None:
    rng = np.random.default_rng(5)
    drawn: list[styles.Style] = []
    for _ in range(4):
        drawn.append(styles.random_style(rng, drawn))
    assert len({s.texture for s in drawn}) == 4
    assert len({s.melody_role for s in drawn}) == 4


def test_rubato_bends_time_but_keeps_order(tunes) -> None:
    style = dataclasses.replace(_style(), rubato=styles.MAX_RUBATO, rubato_period_beats=8.0)
    seconds = styles.tempo_map(style, 120.0, 64.0, np.random.default_rng(0))
    times = np.array([seconds(b) for b in np.arange(0, 64, 0.5)])
    assert (np.diff(times) > 0).all()
    steps = np.diff(times)
    assert steps.max() / steps.min() > 1.1  # the tempo really drifts
    assert abs(times[-1] - 63.5 * 0.5) < 0.1 * 63.5 * 0.5


@needs_fluidsynth
def test_styled_fraction_restyles_only_training_versions(tmp_path: Path) -> None:
    plain = read_manifest(build_cover_dataset(tmp_path / "plain", **TINY))
    mixed = read_manifest(build_cover_dataset(tmp_path / "mixed", **TINY, styled_fraction=1.0))
    assert [(r.group_id, r.version, r.split) for r in plain] == [(r.group_id, r.version, r.split) for r in mixed]
    assert {r.split for r in mixed} == {"train", "val"}
    for before, row in zip(plain, mixed, strict=True):
        # key, tempo, program and synthesis are drawn as before; only the arranger changes
        assert (row.transpose, row.tempo_bpm, row.program, row.soundfont) == (before.transpose, before.tempo_bpm, before.program, before.soundfont)
        if row.split == "val":
            assert row == before
        else:
            assert row.accompaniment.startswith("styled+") and row.path.endswith("_styled.flac")
            styled, classic = (sf.read(tmp_path / d / r.path)[0] for d, r in (("mixed", row), ("plain", before)))
            assert styled.size > 0 and np.isfinite(styled).all() and not np.array_equal(styled[: classic.size], classic[: styled.size])
    with pytest.raises(ValueError, match="styled_fraction"):
        build_cover_dataset(tmp_path / "bad", **TINY, styled_fraction=1.5)
