"""`coverwatch quantize` on the shipped model: a complete, verified folder whose encoder tracks float32.

Bound: the cosine between the float32 and the reduced-precision embedding of the same window
is at least MIN_COSINE = 0.999. Both are unit vectors, so the error vector is at most
sqrt(2 (1 - cos)) = 0.045 long, and no inner-product score against any reference can move by
more than that. On tune() windows of 5-40 s the shipped model measured 0.99958-0.9997 for int8
and >= 0.99977 for fp16, so the bound leaves twice the observed (1 - cos) as headroom; the
retrieval effect itself is measured by `coverwatch evaluate` (bench/RESULTS.md).

fp16 keeps its output in float32 but computes the final L2 normalisation in float16, so its
norms are only unit to ~1e-4; int8 normalises in float32.
"""

import json
import subprocess
import sys

import numpy as np
import pytest

from coverwatch.model.quantize import quantize_model
from coverwatch.streamer.embed.artifacts import DEFAULT_MODEL_DIR, ArtifactError, load_model_info
from coverwatch.streamer.embed.embedder import Embedder
from coverwatch.streamer.frontend.audio import seconds_to_frames
from tests.conftest import coverwatch, tune

MIN_COSINE = 0.999
NORM_TOL = {"int8": 1e-5, "fp16": 1e-3}
WINDOWS_S = (5.0, 10.0, 20.0, 40.0)


@pytest.fixture(scope="module")
def fp32() -> Embedder:
    return Embedder(DEFAULT_MODEL_DIR, threads=1)


@pytest.fixture(scope="module")
def tune_frames(fp32) -> list[np.ndarray]:
    """CQT frames (T, F) of three 42-s tunes (the CQT graph is shared by all modes)."""
    return [fp32.cqt(tune(seed, 42.0)) for seed in range(3)]


@pytest.mark.parametrize("mode", ["int8", "fp16"])
def test_quantised_folder_verifies_and_tracks_float32(mode, fp32, tune_frames, tmp_path):
    out = tmp_path / mode
    info = quantize_model(DEFAULT_MODEL_DIR, out, mode)
    reloaded = load_model_info(out)  # verifies both sha256s
    assert reloaded == info
    assert info.cqt_sha256 == fp32.info.cqt_sha256, "the CQT graph must stay the float32 one"
    assert (out / "cqt.onnx").read_bytes() == (DEFAULT_MODEL_DIR / "cqt.onnx").read_bytes()
    assert info.encoder_sha256 != fp32.info.encoder_sha256 and info.model_hash != fp32.info.model_hash
    assert info.quantization["mode"] == mode and info.quantization["source_model_hash"] == fp32.info.model_hash
    assert info.quantization["source_encoder_sha256"] == fp32.info.encoder_sha256

    reduced = Embedder(out, threads=1)
    for frames in tune_frames:
        windows = [frames[: seconds_to_frames(s)] for s in WINDOWS_S]
        for window in windows:
            ref, got = fp32.embed(window[None]), reduced.embed(window[None])
            assert got.shape == ref.shape and got.dtype == np.float32 and np.isfinite(got).all()
            assert np.linalg.norm(got) == pytest.approx(1.0, abs=NORM_TOL[mode])
            assert float((ref * got).sum()) >= MIN_COSINE
        # The daemon batches equal-length windows across streams. Dynamic int8 picks one
        # activation scale per tensor, i.e. over the whole batch, so a window's embedding
        # depends slightly on its batch mates; it must stay within the same bound.
        batch = np.stack([frames[i : i + seconds_to_frames(10.0)] for i in (0, 200, 400)])
        apart = np.concatenate([reduced.embed(w[None]) for w in batch])
        assert (reduced.embed(batch) * apart).sum(axis=1).min() >= MIN_COSINE


def test_quantised_encoder_is_smaller_and_tampering_is_refused(tmp_path):
    out = tmp_path / "int8"
    quantize_model(DEFAULT_MODEL_DIR, out, "int8")
    # int8 weights for the transformer: the file must shrink (float32 conv stem and norms remain).
    assert (out / "encoder.onnx").stat().st_size < 0.5 * (DEFAULT_MODEL_DIR / "encoder.onnx").stat().st_size
    with (out / "encoder.onnx").open("ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ArtifactError, match="sha256 does not match"):
        load_model_info(out)


def test_refuses_bad_mode_requantising_and_overwriting_the_source(tmp_path):
    with pytest.raises(ValueError, match="expected one of int8, fp16"):
        quantize_model(DEFAULT_MODEL_DIR, tmp_path / "x", "int4")
    quantize_model(DEFAULT_MODEL_DIR, tmp_path / "int8", "int8")
    with pytest.raises(ValueError, match="already quantised"):
        quantize_model(tmp_path / "int8", tmp_path / "twice", "int8")
    with pytest.raises(ValueError, match="must differ"):
        quantize_model(DEFAULT_MODEL_DIR, DEFAULT_MODEL_DIR, "int8")


def test_cli_quantize_runs_without_torch(tmp_path):
    """The runtime never needs torch: block its import and run the real command line."""
    out = tmp_path / "int8"
    blocked = (
        "import sys, runpy; sys.modules['torch'] = None; "
        f"sys.argv = ['coverwatch', 'quantize', {str(DEFAULT_MODEL_DIR)!r}, {str(out)!r}, '--mode', 'int8']; "
        "runpy.run_module('coverwatch', run_name='__main__')"
    )
    proc = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    assert printed["model_hash"] == load_model_info(out).model_hash
    assert printed["quantization"]["mode"] == "int8"


def test_cli_quantize_error_is_one_line(tmp_path):
    proc = coverwatch("quantize", tmp_path / "missing", tmp_path / "out")
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "model sidecar not found" in proc.stderr
