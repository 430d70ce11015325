"""The deterministic front end: waveform -> log-magnitude constant-Q frames.

It is kept apart from the network (it has no trainable weights) and is exported as its
own ONNX graph, `cqt.onnx`, so that the daemon can run it incrementally on new audio
only, while the encoder runs over windows of already computed frames.

Framing is "valid" (no centre padding): frame `t` covers samples
[t * HOP_LENGTH, t * HOP_LENGTH + KERNEL_LENGTH). A stream that keeps the last
KERNEL_LENGTH - HOP_LENGTH samples as left context therefore produces exactly the frames
of the whole signal.
"""

from __future__ import annotations

import torch
from nnAudio.features import CQT1992v2
from torch import nn

from streamer.audio import BINS_PER_OCTAVE, FMIN, HOP_LENGTH, N_BINS, SAMPLE_RATE

LOG_FLOOR = 1e-4  # magnitude floor before the log: about -80 dB below a full-scale tone


class CqtFrontEnd(nn.Module):
    """Waveform (B, N) float32 at SAMPLE_RATE -> log-CQT frames (B, T, F).

    T = (N - kernel_length) // HOP_LENGTH + 1 and F = N_BINS.
    """

    def __init__(self) -> None:
        super().__init__()
        self.cqt = CQT1992v2(
            sr=SAMPLE_RATE,
            hop_length=HOP_LENGTH,
            fmin=FMIN,
            n_bins=N_BINS,
            bins_per_octave=BINS_PER_OCTAVE,
            center=False,
            output_format="Magnitude",
            verbose=False,
        )

    @property
    def kernel_length(self) -> int:
        """Samples spanned by one frame (the lowest bin's kernel, padded to a power of two)."""
        return int(self.cqt.kernel_width)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        magnitude = self.cqt(waveform)  # (B, F, T)
        return torch.log(magnitude + LOG_FLOOR).transpose(1, 2)
