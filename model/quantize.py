"""Reduced-precision copies of an exported model folder (no torch needed: onnx + onnxruntime).

    quantize_model(MODEL_DIR, OUT_DIR, "int8")  ->  OUT_DIR/{cqt.onnx, encoder.onnx, model.json}

Only the encoder changes. cqt.onnx is copied byte for byte: its 16384-sample kernels sum
float32 products whose rounding the log of the front end already magnifies in quiet bins
(see tests/test_export_parity.py), and keeping it identical keeps the CQT sha256, so
`coverwatch evaluate --previous-model` can compare the two encoders on the same frames.

Modes:
  * int8: onnxruntime dynamic quantisation of the MatMul/Gemm weights, per output channel
    (activations are quantised at run time, so no calibration set is needed). The conv stem
    stays float32: quantising it too (ConvInteger) was slower on this CPU, and per-channel
    weights kept the embedding closer to float32 than per-tensor ones at the same speed
    (bench/bench_model.py and the "Encoder cost" section of bench/RESULTS.md).
  * fp16: weights and activations in float16 with float32 inputs and outputs, for
    comparison; onnxruntime's CPU provider has few float16 kernels, so it is not faster here.

The new sidecar carries the new encoder sha256 (so a new model hash; indexes built with the
float32 model are refused, as they should be) and a `quantization` record naming the source.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import replace
from pathlib import Path

import onnxruntime

from coverwatch.streamer.embed.artifacts import MODEL_FILES, ModelInfo, load_model_info, sha256_file, write_model_info

log = logging.getLogger(__name__)

QUANT_MODES = ("int8", "fp16")
INT8_OP_TYPES = ["MatMul", "Gemm"]  # the transformer and projection weights; Conv stays float32


def _quantize_int8(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # No quant_pre_process: its symbolic shape inference fails on the dynamo export's
    # dynamic shapes, and without it the pre-processed graph was no faster.
    quantize_dynamic(src, dst, op_types_to_quantize=INT8_OP_TYPES, per_channel=True, weight_type=QuantType.QInt8)


def _convert_fp16(src: Path, dst: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    onnx.save(convert_float_to_float16(onnx.load(str(src)), keep_io_types=True), str(dst))


_CONVERTERS = {"int8": _quantize_int8, "fp16": _convert_fp16}


def quantize_model(model_dir: Path, out_dir: Path, mode: str = "int8") -> ModelInfo:
    """Write a complete model folder in `out_dir`: the same CQT graph, a `mode` encoder, a sidecar."""
    if mode not in QUANT_MODES:
        raise ValueError(f"quantisation mode {mode!r}: expected one of {', '.join(QUANT_MODES)}")
    source = load_model_info(model_dir)
    if source.quantization:
        raise ValueError(f"{model_dir}: already quantised ({source.quantization['mode']}); quantise the float32 model instead")
    if out_dir.resolve() == model_dir.resolve():
        raise ValueError(f"{out_dir}: the output folder must differ from the source model folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_dir / MODEL_FILES["cqt"], out_dir / MODEL_FILES["cqt"])
    encoder = out_dir / MODEL_FILES["encoder"]
    tmp = encoder.with_suffix(".tmp")
    _CONVERTERS[mode](model_dir / MODEL_FILES["encoder"], tmp)
    tmp.replace(encoder)
    info = replace(
        source,
        cqt_sha256=sha256_file(out_dir / MODEL_FILES["cqt"]),
        encoder_sha256=sha256_file(encoder),
        quantization={
            "mode": mode,
            "source_model_hash": source.model_hash,
            "source_encoder_sha256": source.encoder_sha256,
            "onnxruntime": onnxruntime.__version__,
        },
    )
    write_model_info(out_dir, info)
    log.info("%s encoder of %s -> %s (model hash %s)", mode, source.model_hash, out_dir, info.model_hash)
    return info
