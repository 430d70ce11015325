"""Weight-space interpolation of two encoders (coverwatch.model.soup): the ends reproduce
their models, norms are re-measured on the averaged network, the result exports, and
encoders that cannot be averaged are refused."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

from coverwatch.model.export import export_model, load_checkpoint  # noqa: E402
from coverwatch.model.network import CoverEncoder, ModelDims  # noqa: E402
from coverwatch.model.soup import interpolate, make_soup, remeasure_batchnorm  # noqa: E402
from coverwatch.model.train import TrainPaths, train  # noqa: E402
from coverwatch.streamer.embed.embedder import Embedder  # noqa: E402
from tests.test_train import TINY, _manifest  # noqa: E402

DIMS = ModelDims(stem_channels=8, d_model=32, n_heads=2, n_layers=1, d_ff=64, embedding_dim=64, n_classes=3)


def _model(seed: int, dims: ModelDims = DIMS) -> CoverEncoder:
    torch.manual_seed(seed)
    return CoverEncoder(dims).eval()


def _frames(seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.normal(-6.0, 1.0, size=(4, 300, 84)).astype(np.float32))


def test_the_ends_and_the_midpoint_of_the_interpolation():
    start, tuned = _model(0), _model(1)
    a, b = start.state_dict(), tuned.state_dict()
    name = "blocks.0.attn.out.weight"
    assert torch.equal(interpolate(start, tuned, 0.0).state_dict()[name], a[name])
    assert torch.equal(interpolate(start, tuned, 1.0).state_dict()[name], b[name])
    assert torch.allclose(interpolate(start, tuned, 0.5).state_dict()[name], (a[name] + b[name]) / 2)


def test_alpha_outside_the_segment_and_other_shapes_are_refused():
    with pytest.raises(ValueError, match="alpha"):
        interpolate(_model(0), _model(1), 1.5)
    wider = dataclasses.replace(DIMS, d_model=64, d_ff=128)
    with pytest.raises(ValueError, match="different shapes"):
        interpolate(_model(0), _model(1, wider), 0.5)


def test_remeasured_norms_hold_the_statistics_of_their_inputs():
    model = _model(2)
    first_norm = model.stem.blocks[0].norm
    batches = [_frames(s) for s in range(3)]
    remeasure_batchnorm(model, batches)
    assert not model.training and first_norm.momentum is not None  # left as found
    inputs = []
    hook = first_norm.register_forward_hook(lambda _m, args, _out: inputs.append(args[0]))
    with torch.no_grad():
        for frames in batches:
            model.features(frames)
    hook.remove()
    x = torch.cat([i.transpose(0, 1).reshape(i.shape[1], -1) for i in inputs], dim=1)  # (C, everything)
    assert torch.allclose(first_norm.running_mean, x.mean(1), atol=1e-4)
    assert torch.allclose(first_norm.running_var, x.var(1), rtol=0.05)


def test_a_soup_of_an_exported_folder_and_a_checkpoint_exports_and_serves(tmp_path):
    manifest = _manifest(tmp_path / "data", 4, 30)
    start_dir = tmp_path / "start"
    start = _model(3, dataclasses.replace(DIMS, n_classes=3))
    torch.save({"model": start.state_dict(), "dims": start.dims.to_dict()}, tmp_path / "start.pt")
    export_model(tmp_path / "start.pt", start_dir)
    train(TINY, TrainPaths(manifest, tmp_path / "run", tmp_path / "cache", init=start_dir))
    tuned = tmp_path / "run" / "last.pt"

    out = make_soup(start_dir, tuned, 0.75, manifest, tmp_path / "cache", tmp_path / "soup" / "soup.pt", TINY)
    soup = load_checkpoint(out)
    expected = 0.25 * start.state_dict()["project.weight"] + 0.75 * load_checkpoint(tuned).state_dict()["project.weight"]
    assert torch.allclose(soup.state_dict()["project.weight"], expected, atol=1e-6)
    info = export_model(out, tmp_path / "soup_model")
    embedder = Embedder(tmp_path / "soup_model", threads=1)
    vectors = embedder.embed(embedder.cqt_whole(_tone())[None])
    assert info.embedding_dim == 64 and np.allclose(np.linalg.norm(vectors, axis=-1), 1.0, atol=1e-4)


def _tone() -> np.ndarray:
    t = np.arange(22050 * 6) / 22050
    return (0.3 * np.sin(2 * np.pi * 220 * t) + 0.2 * np.sin(2 * np.pi * 330 * t)).astype(np.float32)
