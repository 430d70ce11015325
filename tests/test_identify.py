"""`coverwatch identify` re-scores its best candidates with the melody alignment, as the
daemon does: covers in another key and tempo are found even where the embedding alone
(here an untrained model) cannot tell the songs apart."""

from __future__ import annotations

import json

import numpy as np
import soundfile

from coverwatch.streamer.frontend.audio import SAMPLE_RATE
from tests.conftest import coverwatch, tune

SONGS = 8


def cover(audio: np.ndarray, semitones: int) -> np.ndarray:
    """Pitch and tempo both up by `semitones` (resampling), and quieter: a crude cover."""
    ratio = 2 ** (semitones / 12)
    return (0.6 * np.interp(np.arange(0, len(audio), ratio), np.arange(len(audio)), audio)).astype(np.float32)


def test_identify_finds_covers_by_the_alignment_where_the_embedding_cannot(random_model_dir, tmp_path):
    refs = tmp_path / "refs"
    refs.mkdir()
    for seed in range(SONGS):
        soundfile.write(refs / f"song{seed}.wav", tune(seed + 40, 40.0), SAMPLE_RATE)
    index = tmp_path / "idx"
    coverwatch("index", "build", "--refs", refs, "--out", index, "--model", random_model_dir, check=True)
    queries = []
    for seed in range(SONGS):
        queries.append(tmp_path / f"cover{seed}.wav")
        soundfile.write(queries[-1], cover(tune(seed + 40, 40.0)[SAMPLE_RATE * 5 :], 1 + seed % 4), SAMPLE_RATE)

    def top_songs(*config: str) -> list[str]:
        overrides = tmp_path / "config.toml"
        overrides.write_text("\n".join(config) + "\n")
        out = coverwatch("--config", overrides, "identify", "--json", "--top-k", "3", "--index", index, "--model", random_model_dir, *queries, check=True)
        return [json.loads(line)["matches"][0]["song_id"] for line in out.stdout.splitlines()]

    truth = [f"song{seed}" for seed in range(SONGS)]
    aligned = top_songs("[stream]", "align_weight = 0.5")
    embedding_only = top_songs("[stream]", "align_weight = 0.0")
    assert aligned == truth
    assert sum(a == b for a, b in zip(embedding_only, truth)) < SONGS  # the untrained embedding alone misses some
