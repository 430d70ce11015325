"""Weight-space interpolation of two encoders from one lineage (a "model soup", WiSE-FT).

A fine-tune that moves the encoder towards new material (stage 6: the second arranger and
out-of-catalog negatives) can lose some of what its starting point did well. Averaging the
two sets of weights, theta = (1 - alpha) * theta_start + alpha * theta_tuned, often keeps
both: the two points lie in one basin because one was trained from the other.

BatchNorm statistics are not weights: the average of two running means is not the mean of
the averaged network's activations. After averaging they are measured again on training
batches (as SWA does), so the exported, folded norms match the new network.

Both ends may be a training checkpoint (.pt) or an exported model folder (encoder.onnx +
model.json, imported with its norms rebuilt from the same batches). The result is a
checkpoint that `coverwatch export` takes.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from coverwatch.model.export import load_checkpoint
from coverwatch.model.features import load_tracks
from coverwatch.model.network import CoverEncoder
from coverwatch.model.train import TrainConfig, _group_tracks, read_split, sample_batch

log = logging.getLogger(__name__)

SOUP_NORM_BATCHES = 16  # training batches that measure the averaged network's BatchNorm statistics


def load_encoder(source: Path, n_classes: int, batches: list[torch.Tensor]) -> CoverEncoder:
    """An encoder from a checkpoint, or from an exported folder with its norms rebuilt on `batches`."""
    if source.is_dir():
        from coverwatch.model.from_onnx import calibrate_batchnorm, encoder_from_onnx

        model = encoder_from_onnx(source, n_classes=n_classes)
        calibrate_batchnorm(model, batches)
        return model.eval()
    return load_checkpoint(source)


def interpolate(start: CoverEncoder, tuned: CoverEncoder, alpha: float) -> CoverEncoder:
    """(1 - alpha) * start + alpha * tuned, weight by weight, into a copy of `tuned`.

    The classifier is `tuned`'s (the start's may have other classes; export drops it anyway).
    Integer buffers (BatchNorm's batch counters) are `tuned`'s.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if start.dims.to_dict() | {"n_classes": 0} != tuned.dims.to_dict() | {"n_classes": 0}:
        raise ValueError(f"encoders of different shapes cannot be averaged: {start.dims} vs {tuned.dims}")
    start_weights = start.state_dict()
    mixed = {}
    for name, value in tuned.state_dict().items():
        if name.startswith("classifier.") or not value.is_floating_point():
            mixed[name] = value.clone()
        else:
            mixed[name] = (1.0 - alpha) * start_weights[name] + alpha * value
    soup = CoverEncoder(tuned.dims)
    soup.load_state_dict(mixed)
    return soup.eval()


@torch.no_grad()
def remeasure_batchnorm(model: CoverEncoder, batches: list[torch.Tensor]) -> None:
    """Set every BatchNorm's running statistics to the mean over `batches` of its batch statistics.

    Norms run in train mode (normalising by each batch, as in training) while dropout stays
    off, so each norm sees the activations the final eval-mode network will produce.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [norm.momentum for norm in norms]
    model.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the batches
        norm.train()
    try:
        for frames in batches:
            model.features(frames)
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
        model.eval()


def make_soup(start: Path, tuned: Path, alpha: float, manifest: Path, cache_dir: Path, out: Path, cfg: TrainConfig) -> Path:
    """Write the checkpoint `out` interpolating `start` towards `tuned` by `alpha`; returns `out`."""
    train_items, _ = read_split(manifest)
    tracks, _ = load_tracks(train_items, cache_dir, desc="CQT train")
    groups = _group_tracks(tracks)
    rng = np.random.default_rng([cfg.seed, 2**30])
    batches = [sample_batch(groups, cfg, rng)[0] for _ in range(SOUP_NORM_BATCHES)]
    # n_classes only sizes the classifier of an imported folder; interpolate ignores it.
    soup = interpolate(load_encoder(start, len(groups), batches), load_encoder(tuned, len(groups), batches), alpha)
    remeasure_batchnorm(soup, batches)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"model": soup.state_dict(), "dims": soup.dims.to_dict(), "soup": {"start": str(start), "tuned": str(tuned), "alpha": alpha}},
        out,
    )
    log.info("soup alpha=%.2f of %s -> %s written to %s (norms from %d batches)", alpha, start, tuned, out, len(batches))
    return out
