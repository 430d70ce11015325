"""Training end to end on synthetic melodies (real CQT, real optimiser steps, real
checkpoints), fine-tuning from a run, and merging a variant dataset into a cover dataset."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import soundfile

torch = pytest.importorskip("torch")

from coverwatch.model.train import TrainPaths, load_encoder_weights, train  # noqa: E402
from coverwatch.streamer.config import TrainConfig  # noqa: E402
from coverwatch.streamer.frontend.audio import SAMPLE_RATE  # noqa: E402
from tests.conftest import melody, write_csv  # noqa: E402

TINY = TrainConfig(
    steps=4, groups_per_batch=2, versions_per_group=2, crop_min_s=4.0, crop_max_s=5.0, warmup_steps=1,
    eval_every=2, checkpoint_every=2, d_model=32, n_layers=1, n_heads=2, d_ff=64, stem_channels=8,
    embedding_dim=64, threads=1,
)  # fmt: skip


def _manifest(folder: Path, n_groups: int, seed: int) -> Path:
    """n_groups songs x 2 versions (the second transposed and faster); the last group is val."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for g in range(n_groups):
        for v, (transpose, tempo) in enumerate([(0, 1.0), (3, 1.15)]):
            name = f"g{g}v{v}.wav"
            soundfile.write(folder / name, melody(seed + g, 8.0, transpose=transpose, tempo=tempo), SAMPLE_RATE)
            rows.append({"group_id": f"g{g}", "path": name, "split": "val" if g == n_groups - 1 else "train"})
    return write_csv(folder / "manifest.csv", rows)


def _encoder_weights(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.startswith("classifier.")}


def test_train_then_fine_tune_from_its_encoder(tmp_path):
    first = train(TINY, TrainPaths(_manifest(tmp_path / "a", 4, 0), tmp_path / "run_a", tmp_path / "cache"))
    assert first["steps"] == 4 and first["train_groups"] == 3 and 0.0 <= first["best_val_mAP"] <= 1.0
    best_a = torch.load(tmp_path / "run_a" / "best.pt", weights_only=False)
    assert (tmp_path / "run_a" / "curve.png").stat().st_size > 0

    # A fine-tune on another dataset (5 training groups: a new classifier) with zero steps
    # of learning rate keeps the encoder as it was loaded.
    frozen = dataclasses.replace(TINY, steps=2, lr=1e-12, warmup_steps=1, dropout=0.0)
    paths = TrainPaths(_manifest(tmp_path / "b", 6, 10), tmp_path / "run_b", tmp_path / "cache", init=tmp_path / "run_a" / "best.pt")
    second = train(frozen, paths)
    assert second["train_groups"] == 5
    last_b = torch.load(tmp_path / "run_b" / "last.pt", weights_only=False)
    assert last_b["model"]["classifier.weight"].shape[0] == 5
    for name, weight in _encoder_weights(best_a["model"]).items():
        if ".running_" in name or name.endswith("num_batches_tracked"):
            continue  # BatchNorm statistics move with every forward pass in training mode
        assert torch.allclose(weight, last_b["model"][name], atol=1e-6), name


def test_fine_tune_refuses_a_checkpoint_of_other_dims(tmp_path, random_checkpoint):
    from coverwatch.model.network import CoverEncoder
    from coverwatch.model.train import dims_from_config

    model = CoverEncoder(dims_from_config(TINY, n_classes=7))  # random_checkpoint: embedding_dim 64, d_model 32 ...
    load_encoder_weights(model, random_checkpoint)  # ... same dims but n_classes: fits
    theirs = torch.load(random_checkpoint, weights_only=False)["model"]
    assert torch.equal(model.stem.proj.weight, theirs["stem.proj.weight"])
    wider = CoverEncoder(dims_from_config(dataclasses.replace(TINY, d_model=48), n_classes=3))
    with pytest.raises(ValueError, match="d_model"):
        load_encoder_weights(wider, random_checkpoint)


def test_merge_joins_a_variant_group_to_its_cover_group(tmp_path):
    pytest.importorskip("music21")
    from coverwatch.model.dataset import MANIFEST_COLUMNS, read_manifest
    from coverwatch.model.variants import merge_training_manifests

    def write(path: Path, rows: list[tuple]) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(MANIFEST_COLUMNS)
            for group_id, version, split in rows:
                title = {"b": "Song B", "variants_d": "Song B"}.get(group_id, f"Title of {group_id}")
                writer.writerow([group_id, version, f"audio/{group_id}/v{version}.flac", title, split, "sf", 0, 120.0, 0, "full"])
        return path

    covers = write(tmp_path / "covers" / "manifest.csv", [("a", 0, "train"), ("a", 1, "train"), ("b", 0, "val"), ("b", 1, "val")])
    variants = write(
        tmp_path / "variants" / "manifest.csv",
        [("variants_a", 0, "train"), ("variants_a", 1, "train"), ("variants_b", 0, "train"), ("variants_c", 0, "train"),
         ("variants_c", 1, "train"), ("variants_d", 0, "train"), ("variants_d", 1, "train")],
    )  # fmt: skip
    merged = read_manifest(merge_training_manifests(covers, variants, tmp_path / "merged" / "manifest.csv"))
    by_group: dict[str, list] = {}
    for row in merged:
        by_group.setdefault(row.group_id, []).append(row)
    # "a" gains its variants; "variants_b" is left out (its song validates), and so is
    # "variants_d", other tunes of the same title family ("Song B"); "variants_c" is new.
    assert sorted(by_group) == ["a", "b", "variants_c"]
    assert [r.version for r in by_group["a"]] == [0, 1, 100, 101]
    assert {r.split for r in by_group["a"]} == {"train"} and {r.split for r in by_group["b"]} == {"val"}
    assert by_group["a"][2].path == "../variants/audio/variants_a/v0.flac"
    assert by_group["b"][0].path == "../covers/audio/b/v0.flac"
    assert len({(r.group_id, r.version) for r in merged}) == len(merged)


def test_training_resumes_from_its_last_checkpoint(tmp_path, caplog):
    manifest = _manifest(tmp_path / "a", 4, 0)
    paths = TrainPaths(manifest, tmp_path / "run", tmp_path / "cache")
    train(dataclasses.replace(TINY, steps=2), paths)  # as if stopped after step 2
    stopped = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert stopped["step"] == 2
    with caplog.at_level("INFO", logger="coverwatch.model.train"):
        result = train(TINY, paths)
    assert "resumed from" in caplog.text and "at step 2" in caplog.text
    assert result["steps"] == 4
    finished = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert [h["step"] for h in finished["history"] if "loss" in h] == [1, 2, 3, 4]  # no step run twice or skipped
    assert not torch.equal(finished["model"]["project.weight"], stopped["model"]["project.weight"])


def test_corrupt_and_silent_files_are_skipped_and_counted(tmp_path):
    from coverwatch.model.features import load_tracks

    soundfile.write(tmp_path / "good.wav", melody(0, 6.0), SAMPLE_RATE)
    soundfile.write(tmp_path / "silent.wav", np.zeros(6 * SAMPLE_RATE, dtype=np.float32), SAMPLE_RATE)
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt not really")
    items = [("g", tmp_path / name) for name in ("good.wav", "silent.wav", "corrupt.wav", "missing.wav")]
    tracks, skipped = load_tracks(items, tmp_path / "cache")
    assert [t.path.name for t in tracks] == ["good.wav"] and skipped == 3
    assert tracks[0].frames.ndim == 2 and tracks[0].frames.shape[1] == 84


def _negative_music(folder: Path) -> dict[str, Path]:
    """A fake package folder: two long pieces (noise bursts, a chord drone), a short sting
    and a corrupt file."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(3)
    t = np.arange(int(25 * SAMPLE_RATE)) / SAMPLE_RATE
    bursts = (rng.standard_normal(len(t)) * (np.sin(2 * np.pi * 2.0 * t) > 0.5) * 0.2).astype(np.float32)
    drone = (0.2 * sum(np.sin(2 * np.pi * f * t) for f in (196.0, 246.9, 293.7))).astype(np.float32)
    soundfile.write(folder / "bursts.ogg", bursts, SAMPLE_RATE)
    soundfile.write(folder / "drone.flac", drone, SAMPLE_RATE)
    soundfile.write(folder / "sting.wav", drone[: 3 * SAMPLE_RATE], SAMPLE_RATE)
    (folder / "broken.ogg").write_bytes(b"OggS not really")
    return {"fake-music-data": folder}


def test_negative_manifest_lists_long_readable_music_only(tmp_path):
    from coverwatch.model.negatives import build_negative_manifest, read_negative_manifest

    manifest = build_negative_manifest(tmp_path / "negatives", _negative_music(tmp_path / "pkg"))
    assert [p.name for p in read_negative_manifest(manifest)] == ["bursts.ogg", "drone.flac"]
    with pytest.raises(FileNotFoundError, match="apt-get install absent-music"):
        build_negative_manifest(tmp_path / "none", {"absent-music": tmp_path / "no-such-folder"})


def test_training_with_out_of_catalog_negatives(tmp_path):
    from coverwatch.model.features import load_tracks
    from coverwatch.model.negatives import build_negative_manifest
    from coverwatch.model.train import _group_tracks, sample_batch

    negatives = build_negative_manifest(tmp_path / "negatives", _negative_music(tmp_path / "pkg"))
    cfg = dataclasses.replace(TINY, outside_per_batch=3, outside_ceiling=-1.0, outside_bank_batches=2)  # every outside crop is pushed
    manifest = _manifest(tmp_path / "a", 4, 0)
    with pytest.raises(ValueError, match="needs a negatives manifest"):
        train(cfg, TrainPaths(manifest, tmp_path / "run0", tmp_path / "cache"))

    result = train(cfg, TrainPaths(manifest, tmp_path / "run", tmp_path / "cache", negatives=negatives))
    assert result["steps"] == 4
    history = torch.load(tmp_path / "run" / "last.pt", weights_only=False)["history"]
    assert all(h["outside"] > 0 for h in history if "loss" in h)

    tracks, _ = load_tracks([("g0", tmp_path / "a" / "g0v0.wav"), ("g0", tmp_path / "a" / "g0v1.wav"),
                             ("g1", tmp_path / "a" / "g1v0.wav"), ("g1", tmp_path / "a" / "g1v1.wav")], tmp_path / "cache")  # fmt: skip
    outside, _ = load_tracks([("outside", tmp_path / "pkg" / "drone.flac")], tmp_path / "cache")
    frames, labels = sample_batch(_group_tracks(tracks), cfg, np.random.default_rng(0), outside)
    assert labels.tolist()[-3:] == [-1, -2, -3] and sorted(set(labels.tolist()[:-3])) == [0, 1]
    assert frames.shape[0] == 2 * 2 + 3
