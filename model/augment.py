"""Augmentations on log-CQT frames (B, T, F), applied per item in a training batch.

Working on the CQT instead of the audio lets the CQT of every training file be computed
once and cached: a key change is a roll of whole bins (12 bins per octave = 1 semitone
per bin), a tempo change is a resampling of the frame axis, SpecAugment masks bands.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def pitch_shift(frames: torch.Tensor, semitones: int) -> torch.Tensor:
    """(T, F) -> (T, F): shift up by `semitones` bins; vacated bins take the item's minimum."""
    if semitones == 0:
        return frames
    shifted = torch.full_like(frames, float(frames.min()))
    if semitones > 0:
        shifted[:, semitones:] = frames[:, :-semitones]
    else:
        shifted[:, :semitones] = frames[:, -semitones:]
    return shifted


def time_stretch(frames: torch.Tensor, rate: float) -> torch.Tensor:
    """(T, F) -> (round(T / rate), F): linear resampling of frames; rate > 1 is faster music."""
    n_out = max(2, int(round(frames.shape[0] / rate)))
    x = frames.T.unsqueeze(0)  # (1, F, T)
    return F.interpolate(x, size=n_out, mode="linear", align_corners=False)[0].T


def spec_augment(frames: torch.Tensor, rng: np.random.Generator, freq_mask_bins: int, time_mask_fraction: float) -> torch.Tensor:
    """(T, F) -> (T, F) with one frequency band and one time span set to the item mean."""
    out = frames.clone()
    fill = float(frames.mean())
    n_frames, n_bins = frames.shape
    if freq_mask_bins > 0:
        width = int(rng.integers(0, freq_mask_bins + 1))
        start = int(rng.integers(0, n_bins - width + 1))
        out[:, start : start + width] = fill
    if time_mask_fraction > 0:
        width = int(rng.integers(0, int(n_frames * time_mask_fraction) + 1))
        start = int(rng.integers(0, n_frames - width + 1))
        out[start : start + width] = fill
    return out
