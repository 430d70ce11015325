"""Export a trained checkpoint to the runtime format: two ONNX graphs and a JSON sidecar.

    OUT/cqt.onnx      waveform (B, N) float32 at SAMPLE_RATE -> frames (B, T, F) log-CQT
    OUT/encoder.onnx  frames (B, T, F) -> embedding (B, D), L2-normalised
    OUT/model.json    sample rate, hop, bins, kernel length, dims, sha256 of both graphs

Both graphs keep batch and time dynamic (torch.onnx.export with dynamo=True), so the
daemon feeds any amount of new audio to the CQT and any window length to the encoder.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from coverwatch.model.frontend import CqtFrontEnd
from coverwatch.model.network import CoverEncoder, ModelDims
from coverwatch.streamer.embed.artifacts import MODEL_FILES, ModelInfo, sha256_file
from coverwatch.streamer.frontend.audio import BINS_PER_OCTAVE, FMIN, HOP_LENGTH, N_BINS, SAMPLE_RATE, seconds_to_frames

log = logging.getLogger(__name__)

OPSET = 18
MAX_EXPORT_S = 900  # longest audio the graphs are declared for (15 min)


def load_checkpoint(path: Path) -> CoverEncoder:
    """A CoverEncoder in eval mode from a training checkpoint (trusted, our own file)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    model = CoverEncoder(ModelDims(**checkpoint["dims"]))
    model.load_state_dict(checkpoint["model"])
    return model.eval()


def _export(
    module: torch.nn.Module, example: torch.Tensor, path: Path, input_name: str, output_name: str, time_dim: torch.export.Dim
) -> None:
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.onnx.export(
        module,
        (example,),
        dynamo=True,
        opset_version=OPSET,
        optimize=True,
        input_names=[input_name],
        output_names=[output_name],
        dynamic_shapes={input_name: {0: batch, 1: time_dim}},  # input_name is forward()'s argument name
    )
    tmp = path.with_suffix(".tmp")
    program.save(str(tmp), external_data=False)
    tmp.replace(path)


def export_model(checkpoint: Path, out_dir: Path) -> ModelInfo:
    """Write cqt.onnx, encoder.onnx and model.json for `checkpoint` into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    encoder = load_checkpoint(checkpoint)
    front_end = CqtFrontEnd().eval()
    kernel = front_end.kernel_length
    waveform = torch.randn(1, kernel + HOP_LENGTH * 200) * 0.1
    samples = torch.export.Dim("samples", min=kernel, max=SAMPLE_RATE * MAX_EXPORT_S)
    frames = torch.export.Dim("frames", min=16, max=seconds_to_frames(MAX_EXPORT_S))
    _export(front_end, waveform, out_dir / MODEL_FILES["cqt"], "waveform", "frames", samples)
    with torch.no_grad():
        example_frames = front_end(torch.randn(2, SAMPLE_RATE * 12) * 0.1)
    _export(encoder, example_frames, out_dir / MODEL_FILES["encoder"], "frames", "embedding", frames)
    info = ModelInfo(
        sample_rate=SAMPLE_RATE,
        hop_length=HOP_LENGTH,
        n_bins=N_BINS,
        bins_per_octave=BINS_PER_OCTAVE,
        fmin=FMIN,
        kernel_length=kernel,
        embedding_dim=encoder.dims.embedding_dim,
        dims=encoder.dims.to_dict(),
        cqt_sha256=sha256_file(out_dir / MODEL_FILES["cqt"]),
        encoder_sha256=sha256_file(out_dir / MODEL_FILES["encoder"]),
    )
    tmp = out_dir / (MODEL_FILES["sidecar"] + ".tmp")
    tmp.write_text(json.dumps(info.to_dict(), indent=2) + "\n")
    tmp.replace(out_dir / MODEL_FILES["sidecar"])
    log.info("exported %s -> %s (model hash %s)", checkpoint, out_dir, info.model_hash)
    return info
