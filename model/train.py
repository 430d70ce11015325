"""Training of the cover encoder: `train(cfg, paths) -> metrics`.

Each step draws P cover groups x V versions, crops every version to one random length
(variable-length training, crop_min_s..crop_max_s), augments each crop on the CQT (tempo,
key, SpecAugment), and minimises triplet + cross-entropy. Adam with linear warm-up then
cosine annealing; validation mAP over whole held-out tracks every `eval_every` steps;
`last.pt` is written every `checkpoint_every` steps and training resumes from it.
With `TrainPaths.init` a fresh run starts from another run's encoder (same dims); the
classifier is new, as the groups differ, and the lr schedule starts again.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from coverwatch.model.augment import pitch_shift, spec_augment, time_stretch
from coverwatch.model.features import Track, load_tracks
from coverwatch.model.losses import cover_loss
from coverwatch.model.negatives import read_negative_manifest
from coverwatch.model.network import CoverEncoder, ModelDims
from coverwatch.model.retrieval_metrics import RetrievalScores, evaluate_similarity
from coverwatch.streamer.config import TrainConfig
from coverwatch.streamer.frontend.audio import seconds_to_frames

log = logging.getLogger(__name__)

EVAL_MAX_S = 180.0  # validation embeds at most this much of each track (keeps evals short)


@dataclass(frozen=True)
class TrainPaths:
    manifest: Path  # CSV with group_id,path[,split]; paths relative to the manifest's folder
    out_dir: Path  # checkpoints, curve plot, metrics
    cache_dir: Path  # cached CQT features
    init: Path | None = None  # start from this checkpoint's (or exported model folder's) encoder; its classifier is dropped
    negatives: Path | None = None  # manifest of out-of-catalog music (model/negatives.py), used when outside_per_batch > 0


def get_lr(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine annealing down to cfg.lr * min_lr_fraction."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    floor = cfg.lr * cfg.min_lr_fraction
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * min(1.0, progress)))


def dims_from_config(cfg: TrainConfig, n_classes: int) -> ModelDims:
    return ModelDims(
        stem_channels=cfg.stem_channels,
        d_model=cfg.d_model,
        n_heads=cfg.n_heads,
        n_layers=cfg.n_layers,
        d_ff=cfg.d_ff,
        embedding_dim=cfg.embedding_dim,
        n_classes=n_classes,
        dropout=cfg.dropout,
    )


def read_split(manifest: Path) -> tuple[list[tuple[str, Path]], list[tuple[str, Path]]]:
    """(train, validation) lists of (group_id, audio path). Without a `split` column every
    group goes to training."""
    train, val = [], []
    with manifest.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"group_id", "path"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{manifest}: missing column(s) {', '.join(sorted(missing))}")
        for row in reader:
            item = (row["group_id"], manifest.parent / row["path"])
            (val if row.get("split") == "val" else train).append(item)
    return train, val


def augmented_crop(frames: np.ndarray, length: int, cfg: TrainConfig, rng: np.random.Generator) -> torch.Tensor:
    """(T, F) track -> (length, F) crop at a random place, tempo and key, with SpecAugment."""
    rate = float(np.exp(rng.uniform(np.log(cfg.tempo_min), np.log(cfg.tempo_max))))
    span = min(len(frames), max(2, round(length * rate)))
    start = int(rng.integers(0, len(frames) - span + 1))
    crop = torch.from_numpy(frames[start : start + span].astype(np.float32))
    crop = time_stretch(crop, span / length)
    if len(crop) < length:  # track shorter than the crop: repeat it, as a song's repeats would
        crop = crop.repeat(math.ceil(length / len(crop)), 1)
    crop = crop[:length]
    shift = int(rng.integers(-cfg.pitch_shift_bins, cfg.pitch_shift_bins + 1)) if cfg.pitch_shift_bins else 0
    return spec_augment(pitch_shift(crop, shift), rng, cfg.freq_mask_bins, cfg.time_mask_fraction)


def sample_batch(
    groups: list[list[Track]], cfg: TrainConfig, rng: np.random.Generator, outside: list[Track] = ()
) -> tuple[torch.Tensor, torch.Tensor]:
    """P groups x V versions of augmented crops of one random length, then (with `outside`)
    cfg.outside_per_batch out-of-catalog crops of that length -> ((B, L, F), (B,) labels).

    Cover crops are labelled with their group's index; out-of-catalog crops -1, -2, ...
    (each its own, see model/losses.py).
    """
    chosen = rng.choice(len(groups), size=cfg.groups_per_batch, replace=False)
    length = seconds_to_frames(float(rng.uniform(cfg.crop_min_s, cfg.crop_max_s)))
    crops, labels = [], []
    for label in chosen:
        versions = groups[label]
        picks = rng.choice(len(versions), size=cfg.versions_per_group, replace=len(versions) < cfg.versions_per_group)
        for pick in picks:
            crops.append(augmented_crop(versions[pick].frames, length, cfg, rng))
            labels.append(int(label))
    if len(outside):
        for n, pick in enumerate(rng.choice(len(outside), size=cfg.outside_per_batch, replace=len(outside) < cfg.outside_per_batch)):
            crops.append(augmented_crop(outside[pick].frames, length, cfg, rng))
            labels.append(-1 - n)
    return torch.stack(crops), torch.tensor(labels)


@torch.no_grad()
def embed_tracks(model: CoverEncoder, tracks: list[Track], max_s: float = EVAL_MAX_S) -> np.ndarray:
    """(N, D) embeddings of tracks (first `max_s` seconds of each), model in eval mode."""
    was_training = model.training
    model.eval()
    limit = seconds_to_frames(max_s)
    out = np.stack([model.embed(torch.from_numpy(t.frames[:limit].astype(np.float32))[None])[0].numpy() for t in tracks])
    model.train(was_training)
    return out


def validate(model: CoverEncoder, tracks: list[Track]) -> RetrievalScores:
    emb = embed_tracks(model, tracks)
    groups = np.array([t.group for t in tracks])
    return evaluate_similarity(emb @ emb.T, groups, groups, exclude_self=True)


def _group_tracks(tracks: list[Track]) -> list[list[Track]]:
    by_group: dict[str, list[Track]] = {}
    for track in tracks:
        by_group.setdefault(track.group, []).append(track)
    return [v for _, v in sorted(by_group.items()) if len(v) >= 2]


def _plot_curve(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_map) = plt.subplots(1, 2, figsize=(10, 3.5))
    steps = [h["step"] for h in history if "loss" in h]
    ax_loss.plot(steps, [h["loss"] for h in history if "loss" in h], lw=0.8)
    ax_loss.set(xlabel="step", ylabel="training loss (triplet + CE)", yscale="log")
    evals = [h for h in history if "val_mAP" in h]
    ax_map.plot([h["step"] for h in evals], [h["val_mAP"] for h in evals], "o-")
    ax_map.set(xlabel="step", ylabel="validation mAP (whole tracks)", ylim=(0, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


BN_CALIBRATION_BATCHES = 8  # training batches whose statistics re-create the norms folded into an exported encoder


def _check_dims(theirs: dict, model: CoverEncoder, source: Path) -> None:
    """Raise unless `theirs` (dims of a checkpoint or exported model) match the model's, classifier and dropout aside."""
    free = {"n_classes", "dropout"}  # the classifier is new; dropout holds no weights
    theirs = {k: v for k, v in theirs.items() if k not in free}
    ours = {k: v for k, v in model.dims.to_dict().items() if k not in free}
    if theirs != ours:
        changed = sorted(k for k in ours if theirs.get(k) != ours[k])
        raise ValueError(f"{source}: dims differ from [train] config in {', '.join(changed)}: {theirs} vs {ours}")


def _load_all_but_classifier(model: CoverEncoder, weights: dict, source: Path) -> None:
    weights = {k: v for k, v in weights.items() if not k.startswith("classifier.")}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or any(not k.startswith("classifier.") for k in missing):
        raise ValueError(f"{source}: weights do not fit: missing {missing}, unexpected {unexpected}")


def load_encoder_weights(model: CoverEncoder, checkpoint_path: Path) -> None:
    """Copy every weight but the classifier from a checkpoint of the same shape (dropout may differ)."""
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    _check_dims(checkpoint["dims"], model, checkpoint_path)
    _load_all_but_classifier(model, checkpoint["model"], checkpoint_path)
    log.info(
        "initialised from %s (step %s, best val mAP %.3f)", checkpoint_path, checkpoint.get("step"), checkpoint.get("best", float("nan"))
    )


def load_exported_weights(model: CoverEncoder, model_dir: Path, batches: list[torch.Tensor]) -> None:
    """Copy every weight but the classifier from an exported model folder (encoder.onnx, model.json).

    The export folded each BatchNorm into the layer before it; `batches` (training crops)
    supply the statistics that turn them back into norms (coverwatch.model.from_onnx).
    """
    from coverwatch.model.from_onnx import calibrate_batchnorm, encoder_from_onnx

    imported = encoder_from_onnx(model_dir, n_classes=model.dims.n_classes)
    _check_dims(imported.dims.to_dict(), model, model_dir)
    calibrate_batchnorm(imported, batches)
    _load_all_but_classifier(model, imported.state_dict(), model_dir)
    log.info("initialised from the exported model %s (norm statistics from %d training batches)", model_dir, len(batches))


def train(cfg: TrainConfig, paths: TrainPaths, device: str = "cpu") -> dict:
    """Train (or resume) and return the final metrics. Writes last.pt, best.pt and curve.png."""
    torch.set_num_threads(cfg.threads)
    paths.out_dir.mkdir(parents=True, exist_ok=True)
    train_items, val_items = read_split(paths.manifest)
    train_tracks, skipped_train = load_tracks(train_items, paths.cache_dir, desc="CQT train")
    val_tracks, skipped_val = load_tracks(val_items, paths.cache_dir, desc="CQT val")
    groups = _group_tracks(train_tracks)
    outside: list[Track] = []
    if cfg.outside_per_batch > 0:
        if paths.negatives is None:
            raise ValueError("[train] outside_per_batch > 0 needs a negatives manifest (coverwatch train --negatives)")
        outside, skipped_outside = load_tracks(
            [("outside", p) for p in read_negative_manifest(paths.negatives)], paths.cache_dir, desc="CQT outside"
        )
        if not outside:
            raise ValueError(f"{paths.negatives}: no readable out-of-catalog audio ({skipped_outside} skipped)")
    if len(groups) < cfg.groups_per_batch:
        raise ValueError(f"only {len(groups)} training groups with >= 2 versions; need {cfg.groups_per_batch}")
    log.info(
        "training groups=%d tracks=%d out-of-catalog tracks=%d val tracks=%d skipped=%d",
        len(groups),
        len(train_tracks),
        len(outside),
        len(val_tracks),
        skipped_train + skipped_val,
    )

    dims = dims_from_config(cfg, n_classes=len(groups))
    model = CoverEncoder(dims).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = {"step": 0, "best": -1.0, "history": []}
    last = paths.out_dir / "last.pt"
    if last.exists():
        checkpoint = torch.load(last, map_location=device, weights_only=False)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optim"])
        state = {k: checkpoint[k] for k in state}
        log.info("resumed from %s at step %d", last, state["step"])
    elif paths.init is not None and paths.init.is_dir():
        calibration_rng = np.random.default_rng([cfg.seed, 2**31])  # its own stream: training's batches stay as without it
        batches = [sample_batch(groups, cfg, calibration_rng, outside)[0].to(device) for _ in range(BN_CALIBRATION_BATCHES)]
        load_exported_weights(model, paths.init, batches)
    elif paths.init is not None:
        load_encoder_weights(model, paths.init)

    def save(path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        torch.save(
            {
                "model": model.state_dict(),
                "optim": optimizer.state_dict(),
                "dims": dims.to_dict(),
                "config": dataclasses.asdict(cfg),
                **state,
            },
            tmp,
        )
        tmp.replace(path)

    # Unit vectors of recent batches' cover crops, for the out-of-catalog hinge (a stand-in catalog).
    bank: deque[torch.Tensor] = deque(maxlen=cfg.outside_bank_batches)
    rng = np.random.default_rng([cfg.seed, state["step"]])  # resuming continues a fresh, reproducible stream
    torch.manual_seed(cfg.seed + state["step"])
    model.train()
    progress = tqdm(range(state["step"], cfg.steps), initial=state["step"], total=cfg.steps, desc="train")
    started = time.time()
    for step in progress:
        for group in optimizer.param_groups:
            group["lr"] = get_lr(step, cfg)
        frames, labels = sample_batch(groups, cfg, rng, outside)
        necked = model.features(frames.to(device))
        # The triplet acts on the BNNeck output, the vector retrieval uses: on the raw
        # projection, cosine distances collapsed to ~0 for every pair early in training.
        loss, terms = cover_loss(
            necked,
            model.classifier(necked),
            labels.to(device),
            margin=cfg.triplet_margin,
            mining=cfg.triplet_mining,
            triplet_weight=cfg.triplet_weight,
            ce_weight=cfg.ce_weight,
            label_smoothing=cfg.label_smoothing,
            outside_weight=cfg.outside_weight,
            outside_ceiling=cfg.outside_ceiling,
            outside_bank=torch.cat(list(bank)) if bank else None,
        )
        if outside and cfg.outside_bank_batches:  # the bank only serves the out-of-catalog hinge
            bank.append(torch.nn.functional.normalize(necked.detach()[labels.to(device) >= 0], dim=1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        state["step"] = step + 1
        state["history"].append({"step": step + 1, "loss": float(loss.detach()), **terms})
        progress.set_postfix(loss=f"{float(loss.detach()):.3f}", lr=f"{get_lr(step, cfg):.1e}")
        is_last = state["step"] == cfg.steps
        if val_tracks and (state["step"] % cfg.eval_every == 0 or is_last):
            scores = validate(model, val_tracks)
            state["history"].append({"step": state["step"], "val_mAP": scores.map, "val_top1": scores.top1})
            log.info("step %d val %s", state["step"], scores.as_dict())
            if scores.map > state["best"]:
                state["best"] = scores.map
                save(paths.out_dir / "best.pt")
        if state["step"] % cfg.checkpoint_every == 0 or is_last:
            save(last)
    _plot_curve(state["history"], paths.out_dir / "curve.png")
    if not (paths.out_dir / "best.pt").exists():
        save(paths.out_dir / "best.pt")
    return {"steps": state["step"], "best_val_mAP": state["best"], "seconds": time.time() - started, "train_groups": len(groups)}
