"""Tests for coverwatch.model.degrade: each degradation is seeded, finite, length-preserving and audible,
and the dataset builder's degradation option leaves clean builds as they were."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("scipy")

from coverwatch.model.degrade import DEGRADATIONS, degrade, parse_chain, random_chain
from coverwatch.streamer.frontend.audio import SAMPLE_RATE

SECONDS = 4.0


@pytest.fixture(scope="module")
def music() -> np.ndarray:
    """(N,) float32: a few seconds of plucked-string-like notes with harmonics."""
    t = np.arange(int(SECONDS * SAMPLE_RATE)) / SAMPLE_RATE
    out = np.zeros_like(t)
    for k, freq in enumerate((220.0, 277.2, 329.6, 440.0, 329.6, 277.2, 247.0, 196.0)):
        local = t - k * SECONDS / 8
        on = local >= 0
        envelope = np.exp(-3.0 * np.clip(local, 0, None)) * on
        out += envelope * sum(np.sin(2 * np.pi * freq * h * t) / h for h in (1, 2, 3))
    return (0.5 * out / np.abs(out).max()).astype(np.float32)


@pytest.mark.parametrize("name", list(DEGRADATIONS))
def test_each_degradation(music: np.ndarray, name: str) -> None:
    first = degrade(music, [name], seed=11)
    assert first.dtype == np.float32 and first.shape == music.shape
    assert np.isfinite(first).all() and np.abs(first).max() <= 1.0
    assert np.array_equal(first, degrade(music, [name], seed=11)), "same seed, same audio"
    others = [degrade(music, [name], seed=seed) for seed in range(12, 16)]  # the codec choice is discrete: some may repeat
    assert any(not np.array_equal(first, other) for other in others), "other seeds, other parameters"
    # measurably changed: residual energy at least -40 dB relative to the music
    residual_db = 10 * np.log10(np.mean((first - music) ** 2) / np.mean(music**2))
    assert residual_db > -40.0, residual_db


def test_chain_order_and_names(music: np.ndarray) -> None:
    assert parse_chain("codec+reverb") == ("reverb", "codec")
    assert parse_chain("") == ()
    with pytest.raises(ValueError, match="unknown degradation"):
        parse_chain("reverb+flanger")
    assert np.array_equal(degrade(music, ["codec", "reverb"], 5), degrade(music, ["reverb", "codec"], 5))
    assert np.array_equal(degrade(music, [], 5), music)
    chains = [random_chain(np.random.default_rng(seed)) for seed in range(200)]
    assert all(chains) and {name for chain in chains for name in chain} == set(DEGRADATIONS)


@pytest.mark.skipif(shutil.which("fluidsynth") is None, reason="needs the fluidsynth CLI (Debian package)")
def test_dataset_option(tmp_path: Path) -> None:
    """degrade_fraction=1 writes degraded files beside, never over, the clean build's files."""
    pytest.importorskip("music21")
    from coverwatch.model.dataset import MANIFEST_COLUMNS, build_cover_dataset

    size = {"n_groups": 1, "versions_per_group": 1, "seed": 2, "max_seconds": 2.0, "collections": ("essenFolksong",)}
    clean = build_cover_dataset(tmp_path, **size)
    clean_text = clean.read_text()
    assert clean_text.splitlines()[0] == ",".join(MANIFEST_COLUMNS)
    clean_files = {p: p.read_bytes() for p in tmp_path.rglob("*.flac")}
    degraded = build_cover_dataset(tmp_path, **size, degrade_fraction=1.0)
    lines = degraded.read_text().splitlines()
    assert lines[0] == ",".join((*MANIFEST_COLUMNS, "degradation"))
    chains = [line.rsplit(",", 1)[1] for line in lines[1:]]
    assert len(chains) == 1 and all(parse_chain(c) for c in chains)
    assert all(p.read_bytes() == data for p, data in clean_files.items())
    assert len(list(tmp_path.rglob("*.flac"))) == 2
    assert build_cover_dataset(tmp_path, **size) and clean.read_text() == clean_text
