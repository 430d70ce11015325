"""PyTorch vs onnxruntime on the exported graphs, random and musical audio, several lengths.

Tolerances: the encoder output is a unit vector, compared at 1e-4 (float32 reordering in
onnxruntime's kernels gives ~1e-7 here). The CQT is compared in magnitude, relative to the
clip's peak, at 1e-5 (-100 dB): the convolution over 16384-sample kernels accumulates float32
rounding of ~1e-7 x the kernel's energy, and the log the front end then takes
(log(|x| + 1e-4)) magnifies exactly those errors in near-silent bins (d log = d|x| / |x|),
so an absolute tolerance on log values would measure silence, not the transform.
"""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from coverwatch.model.export import load_checkpoint  # noqa: E402
from coverwatch.model.frontend import CqtFrontEnd  # noqa: E402
from coverwatch.streamer.embed.artifacts import ArtifactError, load_model_info  # noqa: E402
from coverwatch.streamer.embed.embedder import Embedder  # noqa: E402
from tests.conftest import melody, relative_magnitude_error  # noqa: E402

CQT_TOL = 1e-5
EMBED_TOL = 1e-4


@pytest.mark.parametrize("seconds", [1.0, 5.0, 23.7, 61.0])
@pytest.mark.parametrize("kind", ["noise", "melody"])
def test_torch_and_onnxruntime_agree(random_model_dir, random_checkpoint, seconds, kind):
    audio = (
        (np.random.default_rng(1).standard_normal(int(seconds * 22050)) * 0.1).astype(np.float32) if kind == "noise" else melody(3, seconds)
    )
    embedder = Embedder(random_model_dir, threads=1)
    front_end, encoder = CqtFrontEnd().eval(), load_checkpoint(random_checkpoint)
    with torch.no_grad():
        frames_torch = front_end(torch.from_numpy(audio)[None])[0].numpy()
        emb_torch = encoder.embed(torch.from_numpy(frames_torch)[None])[0].numpy()
    frames_ort = embedder.cqt(audio)
    emb_ort = embedder.embed(frames_ort[None])[0]
    cqt_diff = relative_magnitude_error(frames_torch, frames_ort)
    emb_diff = float(np.abs(emb_torch - emb_ort).max())
    print(f"{kind} {seconds}s: frames {frames_ort.shape} max|dCQT|/peak={cqt_diff:.2e} max|dEmb|={emb_diff:.2e}")
    assert frames_ort.shape == ((len(audio) - embedder.kernel_length) // 512 + 1, 84)
    assert cqt_diff < CQT_TOL and emb_diff < EMBED_TOL
    assert np.linalg.norm(emb_ort) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("samples", [16384, 16384 + 511, 22050 * 7 + 123])
def test_block_matmul_cqt_equals_nnaudio_conv(samples):
    """The front end's per-octave block product is the same transform as nnAudio's padded conv1d."""
    front_end = CqtFrontEnd().eval()
    audio = torch.from_numpy(melody(4, samples / 22050 + 0.01)[:samples])[None]
    with torch.no_grad():
        ours = front_end(audio)[0].numpy()
        reference = torch.log(front_end.cqt(audio) + 1e-4).transpose(1, 2)[0].numpy()
    assert ours.shape == reference.shape == ((samples - front_end.kernel_length) // 512 + 1, 84)
    assert relative_magnitude_error(reference, ours) < CQT_TOL


def test_batch_of_windows_equals_one_by_one(random_model_dir):
    embedder = Embedder(random_model_dir, threads=1)
    frames = embedder.cqt(melody(5, 20.0))
    batch = np.stack([frames[:300], frames[100:400]])
    together = embedder.embed(batch)
    apart = np.concatenate([embedder.embed(b[None]) for b in batch])
    assert np.abs(together - apart).max() < 1e-5


def test_sidecar_records_hashes_and_front_end(random_model_dir):
    sidecar = json.loads((random_model_dir / "model.json").read_text())
    assert sidecar["sample_rate"] == 22050 and sidecar["hop_length"] == 512 and sidecar["n_bins"] == 84
    assert len(sidecar["model_hash"]) == 16
    assert load_model_info(random_model_dir).model_hash == sidecar["model_hash"]


def test_truncated_or_missing_model_files_are_refused(random_model_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(random_model_dir, broken)
    data = (broken / "encoder.onnx").read_bytes()
    (broken / "encoder.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="sha256 does not match"):
        Embedder(broken)
    (broken / "cqt.onnx").unlink()
    with pytest.raises(ArtifactError, match="missing"):
        Embedder(broken)
    (broken / "model.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="corrupt model sidecar"):
        Embedder(broken)
    with pytest.raises(ArtifactError, match="sidecar not found"):
        Embedder(tmp_path / "nothing")


def test_embedding_is_invariant_to_key_changes(random_model_dir):
    """A transposition is a roll of whole CQT bins; the pitch-class stem with circular convs and
    key-relative tokens makes the exported encoder's output identical for every key."""
    embedder = Embedder(random_model_dir, threads=1)
    frames = embedder.cqt(melody(4, 15.0))
    reference = embedder.embed(frames[None])[0]
    for semitones in (1, 5, -3, 11):
        rolled = np.roll(frames, semitones, axis=1)
        assert np.abs(embedder.embed(rolled[None])[0] - reference).max() < 1e-5
