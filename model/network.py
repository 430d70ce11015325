"""The cover-song encoder: log-CQT frames of any length -> one 512-d unit vector.

    (B, T, F) log-CQT
      -> octaves folded into 12 pitch classes, per-window standardisation (loudness drops out)
      -> conv stem, circular over pitch, stride 8 in time (~5.4 tokens per second),
         then each token's pitch profile is read relative to the window's own average
         profile (circular cross-correlation): tokens keep scale degrees, lose the key
      -> pre-norm Transformer encoder with sinusoidal positions
      -> attentive statistics pooling (weighted mean and std over time)
      -> linear projection to D -> BNNeck (batch norm) -> L2 normalisation: the embedding
    The triplet loss acts on the BNNeck output (the vector retrieval uses) and the
    classifier (training only) reads it too.

Letters: B batch, T frames, F CQT bins, D embedding dims, N tokens, C channels.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from coverwatch.streamer.frontend.audio import BINS_PER_OCTAVE, N_BINS


@dataclass(frozen=True)
class ModelDims:
    """Everything needed to rebuild the network; stored in checkpoints and the ONNX sidecar."""

    n_bins: int = N_BINS
    stem_channels: int = 32
    d_model: int = 256
    n_heads: int = 4
    n_layers: int = 4
    d_ff: int = 512
    embedding_dim: int = 512
    n_classes: int = 1
    dropout: float = 0.1

    def to_dict(self) -> dict:
        return asdict(self)


TIME_STRIDE = 8  # frames per token after the stem


def fold_octaves(frames: torch.Tensor) -> torch.Tensor:
    """(B, T, F) log-CQT -> (B, T, 12) log pitch-class energy (magnitudes summed over octaves)."""
    b, t, f = frames.shape
    magnitude = torch.exp(frames).reshape(b, t, f // BINS_PER_OCTAVE, BINS_PER_OCTAVE)
    return torch.log(magnitude.sum(dim=2) + 1e-4)


class CircularPitchConv(nn.Module):
    """Conv2d over (time, pitch class) that wraps around the 12 pitch classes, then BN + ReLU.

    Transposing the input rolls the output along pitch, exactly: the stem is key-equivariant.
    """

    def __init__(self, c_in: int, c_out: int, time_stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, stride=(time_stride, 1), padding=(1, 0), bias=False)
        self.norm = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x[..., -1:], x, x[..., :1]], dim=3)  # wrap pitch: B, C, T, 12 + 2
        return torch.relu(self.norm(self.conv(x)))


PITCH_CLASSES = 12
# _ROTATIONS[k, p] = (p + k) % 12: gathering with it stacks the 12 rotations of a profile.
_ROTATIONS = (torch.arange(PITCH_CLASSES).unsqueeze(0) + torch.arange(PITCH_CLASSES).unsqueeze(1)) % PITCH_CLASSES


def key_relative(x: torch.Tensor) -> torch.Tensor:
    """(B, C, N, 12) key-equivariant maps -> (B, N, C * 12) key-invariant token features.

    Each channel's token profile is circularly cross-correlated with that channel's
    profile averaged over the whole window: out[k] = sum_p x[p] * g[p + k]. A key change
    rolls x and g by the same amount and leaves every out[k] unchanged, while the relation
    between tokens (which scale degree each note sits on) survives, unlike a max over pitch.
    """
    b, c, n, p = x.shape
    profile = x.mean(dim=2)  # (B, C, 12)
    profile = profile / (profile.norm(dim=2, keepdim=True) + 1e-6)
    rotations = profile[:, :, _ROTATIONS.to(x.device)]  # (B, C, 12 shifts, 12 pitch classes)
    out = torch.einsum("bcnp,bckp->bnck", x, rotations)
    return out.reshape(b, n, c * p)


class ConvStem(nn.Module):
    """(B, T, F) -> (B, ceil(T/8), d_model): pitch classes, circular convs, key-relative tokens.

    Folding octaves removes octave and voicing changes; convolutions that wrap around the
    12 pitch classes are key-equivariant, and reading each token relative to the window's
    average profile makes it key-invariant: a key change is the largest difference between
    a song and its covers, so the network never has to learn it from examples.
    """

    def __init__(self, dims: ModelDims) -> None:
        super().__init__()
        c = dims.stem_channels
        self.blocks = nn.Sequential(
            CircularPitchConv(1, c, 2),
            CircularPitchConv(c, 2 * c, 2),
            CircularPitchConv(2 * c, 4 * c, 2),
            CircularPitchConv(4 * c, 4 * c, 1),
        )
        self.norm = nn.LayerNorm(4 * c * PITCH_CLASSES)
        self.proj = nn.Linear(4 * c * PITCH_CLASSES, dims.d_model)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        x = self.blocks(standardise(fold_octaves(frames)).unsqueeze(1))  # (B, C, T/8, 12)
        return self.proj(self.norm(key_relative(x)))


def sinusoidal_positions(n_tokens: int, d_model: int, device: torch.device) -> torch.Tensor:
    """(N, d_model) fixed sinusoidal position codes; computed per call so any length works."""
    position = torch.arange(n_tokens, device=device, dtype=torch.float32).unsqueeze(1)
    freqs = torch.exp(torch.arange(0, d_model, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    angles = position * freqs  # (N, d_model/2)
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(1)


class SelfAttention(nn.Module):
    def __init__(self, dims: ModelDims) -> None:
        super().__init__()
        self.n_heads = dims.n_heads
        self.qkv = nn.Linear(dims.d_model, 3 * dims.d_model)
        self.out = nn.Linear(dims.d_model, dims.d_model)
        self.dropout = dims.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (t.view(b, n, self.n_heads, d // self.n_heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(b, n, d))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, dims: ModelDims) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(dims.d_model)
        self.attn = SelfAttention(dims)
        self.ln_mlp = nn.LayerNorm(dims.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(dims.d_model, dims.d_ff),
            nn.GELU(),
            nn.Linear(dims.d_ff, dims.d_model),
            nn.Dropout(dims.dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_attn(x))
        return x + self.mlp(self.ln_mlp(x))


class AttentiveStatsPooling(nn.Module):
    """(B, N, d) -> (B, 2d): attention-weighted mean and standard deviation over tokens."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.score = nn.Sequential(nn.Linear(d_model, d_model // 2), nn.Tanh(), nn.Linear(d_model // 2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(self.score(x), dim=1)  # (B, N, 1)
        mean = (weights * x).sum(dim=1)
        var = (weights * (x - mean.unsqueeze(1)) ** 2).sum(dim=1)
        return torch.cat([mean, torch.sqrt(var.clamp_min(1e-6))], dim=1)


def standardise(frames: torch.Tensor) -> torch.Tensor:
    """Per-window standardisation of (B, T, F) log-CQT: zero mean, unit variance per item."""
    mean = frames.mean(dim=(1, 2), keepdim=True)
    std = frames.std(dim=(1, 2), keepdim=True)
    return (frames - mean) / (std + 1e-3)


class CoverEncoder(nn.Module):
    def __init__(self, dims: ModelDims) -> None:
        super().__init__()
        self.dims = dims
        self.stem = ConvStem(dims)
        self.blocks = nn.ModuleList(TransformerBlock(dims) for _ in range(dims.n_layers))
        self.ln_final = nn.LayerNorm(dims.d_model)
        self.pool = AttentiveStatsPooling(dims.d_model)
        self.project = nn.Linear(2 * dims.d_model, dims.embedding_dim)
        self.neck = nn.BatchNorm1d(dims.embedding_dim)
        self.classifier = nn.Linear(dims.embedding_dim, dims.n_classes, bias=False)

    def features(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, T, F) -> (B, D) BNNeck output, before normalisation (losses and classifier read it)."""
        assert frames.ndim == 3, f"expected (B, T, F) frames, got shape {tuple(frames.shape)}"
        x = self.stem(frames)
        x = x + sinusoidal_positions(x.shape[1], x.shape[2], x.device)
        for block in self.blocks:
            x = block(x)
        return self.neck(self.project(self.pool(self.ln_final(x))))

    def embed(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, T, F) log-CQT -> (B, D) L2-normalised embedding. The only method exported to ONNX."""
        return F.normalize(self.features(frames), dim=1)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.embed(frames)
