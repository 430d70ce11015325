"""The leave-out cover set (model/leaveout.py): versions of one tune differ in every axis the
generator controls, yet share the melody; the set is reproducible and in the evaluation
manifest format."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import soundfile

from coverwatch.model.leaveout import EFFECTS, VOICES, Version, apply_effect, build_leaveout_set, render_version, synth_note
from coverwatch.model.render import ReservedDataError, iter_tunes
from coverwatch.streamer.decide.alignment import alignment_score, chroma
from coverwatch.streamer.embed.artifacts import resolve_model_dir
from coverwatch.streamer.embed.embedder import Embedder
from coverwatch.streamer.frontend.audio import SAMPLE_RATE

pytest.importorskip("music21")


@pytest.fixture(scope="module")
def two_tunes():
    tunes = list(iter_tunes(("miscFolk",), limit=2))
    assert len(tunes) == 2
    return tunes


def plain(**changes) -> Version:
    base = dict(transpose=0, tempo=1.0, octave=0, dotted=False, ornament="none", accompaniment="drone",
                melody_voice="organ", accompaniment_voice="organ", drums=False, effects=())  # fmt: skip
    return Version(**{**base, **changes})


@pytest.mark.parametrize("voice", VOICES)
def test_every_voice_sounds_at_its_pitch(voice):
    note = synth_note(voice, 69, 0.5, np.random.default_rng(0))
    assert np.isfinite(note).all() and np.abs(note).max() > 0.05
    spectrum = np.abs(np.fft.rfft(note * np.hanning(len(note))))
    freqs = np.fft.rfftfreq(len(note), 1 / SAMPLE_RATE)
    strongest = freqs[np.argmax(spectrum)]
    assert min(abs(strongest / 440.0 - k) for k in (1, 2, 3)) < 0.03  # the fundamental or a low harmonic of A4


@pytest.mark.parametrize("effect", EFFECTS)
def test_every_effect_keeps_length_and_changes_the_sound(effect):
    x = 0.5 * np.sin(2 * np.pi * 440 * np.arange(SAMPLE_RATE) / SAMPLE_RATE)
    y = apply_effect(effect, x, np.random.default_rng(0))
    assert y.shape == x.shape and np.isfinite(y).all() and not np.allclose(x, y, atol=1e-3)


def test_versions_share_the_melody_not_the_sound(two_tunes):
    first, second = two_tunes
    rng = np.random.default_rng
    a = render_version(first, plain(), rng(0))
    b = render_version(first, plain(transpose=3, tempo=1.2, accompaniment="alberti", melody_voice="pluck", effects=("telephone",)), rng(1))
    other = render_version(second, plain(transpose=3, tempo=1.2, accompaniment="alberti", melody_voice="pluck", effects=("telephone",)), rng(1))
    assert a.dtype == np.float32 and abs(np.abs(a).max() - 0.9) < 1e-3
    assert len(b) < len(a) or len(b) / SAMPLE_RATE >= 25.0  # faster, or more passes to reach the minimum length
    embedder = Embedder(resolve_model_dir(""), 1)  # the shipped CQT front end; the alignment is the daemon's
    ca, cb, co = (chroma(embedder.cqt_whole(x)) for x in (a, b, other))
    assert alignment_score(cb, ca, 13, 0.1) > alignment_score(co, ca, 13, 0.1) + 0.1


def test_the_set_is_reproducible_and_in_manifest_format(tmp_path):
    manifest = build_leaveout_set(tmp_path / "a", groups=2, seed=3)
    again = build_leaveout_set(tmp_path / "b", groups=2, seed=3)
    rows = list(csv.DictReader(manifest.open()))
    assert len(rows) == 8 and {r["split"] for r in rows} == {"val"} and len({r["group_id"] for r in rows}) == 2
    assert all(r["group_id"].startswith("leaveout-miscFolk-") for r in rows)
    for row, twin in zip(rows, csv.DictReader(again.open())):
        x, rate = soundfile.read(row["path"], dtype="float32")
        assert rate == SAMPLE_RATE and 10.0 < len(x) / rate <= 45.0
        np.testing.assert_array_equal(x, soundfile.read(twin["path"], dtype="float32")[0])
    settings = {(r["transpose"], r["tempo_bpm"], r["accompaniment"]) for r in rows}
    assert len(settings) == 8  # every version is arranged its own way


def test_reserved_collections_are_refused():
    with pytest.raises(ReservedDataError):
        list(iter_tunes(("oneills1850",), limit=1))


def test_training_data_refuses_the_leave_out_collection(tmp_path):
    from coverwatch.model.dataset import build_cover_dataset

    with pytest.raises(ValueError, match="kept for the leave-out evaluation"):
        build_cover_dataset(tmp_path, 2, collections=("essenFolksong", "miscFolk"))
