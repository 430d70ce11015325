"""Tests for coverwatch.model.variants: melody matching on hand-made melodies, the held-out split, and
that held-out families stay out of a cover-dataset build."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("music21")
pytest.importorskip("pretty_midi")

from coverwatch.model.dataset import _family_heads, _unit_hash, build_cover_dataset, read_manifest
from coverwatch.model.render import Tune, title_family
from coverwatch.model.variants import (
    SIMILARITY_THRESHOLD,
    group_tunes,
    is_heldout_family,
    melody_intervals,
    melody_similarity,
)

# "Alle meine Entchen" as (pitch, start, duration), then a sung variant of it.
THEME = [60, 62, 64, 65, 67, 67, 69, 69, 69, 69, 67, 69, 69, 69, 69, 67, 65, 65, 65, 65, 64, 64, 62, 62, 62, 62, 60]
VARIANT = [60, 62, 64, 65, 67, 67, 69, 71, 69, 69, 67, 69, 69, 67, 65, 65, 65, 64, 64, 62, 62, 64, 62, 60]


def _tune(tune_id: str, title: str, pitches: list[int], transpose: int = 0) -> Tune:
    notes = tuple((p + transpose, float(i), 1.0) for i, p in enumerate(pitches))
    end = float(len(pitches))
    return Tune(tune_id, title, notes, tuple(np.arange(0.0, end, 4.0).tolist()) + (end,), 4.0, 1.0, 0, "major")


def _random_melody(seed: int, length: int = 30) -> list[int]:
    rng = np.random.default_rng(seed)
    return (60 + np.cumsum(rng.choice([-5, -4, -3, -2, -1, 1, 2, 3, 4, 5, 7], size=length))).clip(48, 84).tolist()


def test_intervals_merge_repeats_and_ignore_key() -> None:
    notes = [(60, 0, 1), (60, 1, 1), (64, 2, 1), (50, 3, 1), (67, 4, 1)]
    assert melody_intervals(notes).tolist() == [4, -12, 12]  # 60 60 merged; -14 and +17 clipped to an octave
    shifted = [(p + 5, s, d) for p, s, d in notes]
    assert np.array_equal(melody_intervals(notes), melody_intervals(shifted))


def test_similarity_of_hand_made_melodies() -> None:
    theme, variant = (melody_intervals(_tune("a", "x", m).notes) for m in (THEME, VARIANT))
    assert melody_similarity(theme, theme) == pytest.approx(1.0)
    assert melody_similarity(theme, melody_intervals(_tune("b", "x", THEME, transpose=7).notes)) == pytest.approx(1.0)
    assert melody_similarity(theme, variant) >= SIMILARITY_THRESHOLD
    unrelated = [melody_similarity(theme, melody_intervals(_tune("c", "x", _random_melody(seed)).notes)) for seed in range(20)]
    assert max(unrelated) < SIMILARITY_THRESHOLD, unrelated
    assert melody_similarity(theme, np.array([], np.int8)) == 0.0


def test_groups_need_title_and_melody() -> None:
    tunes = [
        _tune("c/f/0", "Entchenlied 1", THEME),
        _tune("c/f/1", "Entchenlied (Variante)", VARIANT, transpose=-3),
        _tune("c/f/2", "Entchenlied 3", _random_melody(1)),  # same title, other melody
        _tune("c/f/3", "Ganz anders", THEME),  # same melody, other title: not linked (titles first)
        _tune("c/f/4", "Entchenlied", THEME, transpose=2),  # a copy of c/f/0 in another key: dropped
        _tune("c/g/0", "Zwei Fremde", _random_melody(2)),
        _tune("c/g/1", "Zwei Fremde", _random_melody(3)),
    ]
    groups = group_tunes(tunes)
    assert [g.tune_ids for g in groups] == [("c/f/0", "c/f/1")]
    assert groups[0].family == title_family("Entchenlied") and groups[0].group_id == "variants_c_f_0"
    assert groups[0].min_similarity >= SIMILARITY_THRESHOLD
    assert groups[0].heldout == is_heldout_family("entchenlied")
    assert group_tunes(list(reversed(tunes))) == groups  # order-independent


def test_heldout_split_is_deterministic_and_near_its_fraction() -> None:
    families = [f"family {i}" for i in range(2000)]
    first = [is_heldout_family(f) for f in families]
    assert first == [is_heldout_family(f) for f in families]
    assert 0.35 < np.mean(first) < 0.45


@pytest.mark.skipif(shutil.which("fluidsynth") is None, reason="needs the fluidsynth CLI (Debian package)")
def test_excluded_families_never_in_a_build(tmp_path: Path) -> None:
    """The first 2 families a seed-3 build would take are excluded: neither appears, and others fill in."""
    heads = sorted(_family_heads(("essenFolksong",), demo=False), key=lambda s: _unit_hash("order", 3, s.tune_id))
    excluded = frozenset(s.family for s in heads[:2])
    manifest = build_cover_dataset(
        tmp_path, n_groups=2, versions_per_group=1, seed=3, max_seconds=3.0, collections=("essenFolksong",), exclude_families=excluded
    )
    rows = read_manifest(manifest)
    assert len(rows) == 2
    assert not {title_family(r.title) for r in rows} & excluded
