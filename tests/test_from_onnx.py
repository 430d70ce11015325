"""An exported encoder read back into a trainable network (coverwatch.model.from_onnx):
the same function as the checkpoint it came from, norms that behave in training mode,
fine-tuning from a model folder, and graphs it cannot map refused."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from coverwatch.model.export import export_model, load_checkpoint  # noqa: E402
from coverwatch.model.from_onnx import OnnxImportError, calibrate_batchnorm, encoder_from_onnx  # noqa: E402
from coverwatch.model.network import CoverEncoder, ModelDims  # noqa: E402
from coverwatch.model.train import TrainPaths, train  # noqa: E402
from coverwatch.streamer.embed.artifacts import MODEL_FILES  # noqa: E402
from tests.test_train import TINY, _manifest  # noqa: E402


def _frames(seed: int, batch: int = 4, frames: int = 400) -> torch.Tensor:
    """(batch, frames, 84) log-CQT-like frames: a few loud pitch classes over a noise floor."""
    rng = np.random.default_rng(seed)
    x = rng.normal(-6.0, 0.5, size=(batch, frames, 84))
    for b in range(batch):
        for bin_ in rng.choice(84, size=6, replace=False):
            x[b, :, bin_] += rng.uniform(2.0, 5.0)
    return torch.from_numpy(x.astype(np.float32))


@pytest.fixture(scope="module")
def trained_like_model_dir(tmp_path_factory) -> tuple[Path, Path]:
    """A random checkpoint whose every BatchNorm has trained-looking statistics and affine terms, exported."""
    torch.manual_seed(1)
    dims = ModelDims(stem_channels=8, d_model=32, n_heads=2, n_layers=1, d_ff=64, embedding_dim=64, n_classes=3)
    model = CoverEncoder(dims)
    for norm in [block.norm for block in model.stem.blocks] + [model.neck]:
        norm.running_mean.normal_(0, 0.3)
        norm.running_var.uniform_(0.3, 3.0)
        norm.weight.data.uniform_(0.5, 1.5)
        norm.bias.data.normal_(0, 0.2)
    folder = tmp_path_factory.mktemp("trained_like")
    checkpoint = folder / "model.pt"
    torch.save({"model": model.state_dict(), "dims": dims.to_dict()}, checkpoint)
    export_model(checkpoint, folder / "export")
    return checkpoint, folder / "export"


def test_imported_encoder_computes_the_checkpoints_function(trained_like_model_dir):
    checkpoint, model_dir = trained_like_model_dir
    original = load_checkpoint(checkpoint)
    imported = encoder_from_onnx(model_dir)  # also checked against onnxruntime inside
    frames = _frames(0)
    with torch.no_grad():
        assert torch.allclose(imported.embed(frames), original.embed(frames), atol=1e-5)
        # every weight that survives the export unfolded comes back exactly
        for name in ("stem.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.mlp.2.weight", "pool.score.2.weight", "ln_final.bias"):
            assert torch.allclose(imported.state_dict()[name], original.state_dict()[name], atol=1e-6), name


def test_calibrated_norms_keep_eval_and_make_train_mode_match(trained_like_model_dir):
    _, model_dir = trained_like_model_dir
    imported = encoder_from_onnx(model_dir)
    frames = _frames(1, batch=16)
    with torch.no_grad():
        before = imported.embed(frames)
        raw = copy.deepcopy(imported).train()  # a forward pass in train mode moves the running statistics
        uncalibrated_train = torch.nn.functional.normalize(raw.features(frames), dim=1)
        calibrate_batchnorm(imported, [_frames(s, batch=16) for s in (2, 3, 4)])
        after = imported.embed(frames)
        imported.train()
        calibrated_train = torch.nn.functional.normalize(imported.features(frames), dim=1)
    assert torch.allclose(after, before, atol=1e-5)  # eval mode: exactly the exported function
    # Train mode normalises by the batch: calibrated norms undo that, the identity norms of the raw import do not.
    calibrated_cos = (calibrated_train * before).sum(1).min().item()
    uncalibrated_cos = (uncalibrated_train * before).sum(1).min().item()
    assert calibrated_cos > 0.95 and uncalibrated_cos < calibrated_cos - 0.05, (calibrated_cos, uncalibrated_cos)


def test_fine_tune_from_an_exported_model_folder(tmp_path, random_model_dir):
    frozen = dataclasses.replace(TINY, steps=2, lr=1e-12, warmup_steps=1, dropout=0.0)
    paths = TrainPaths(_manifest(tmp_path / "data", 4, 20), tmp_path / "run", tmp_path / "cache", init=random_model_dir)
    metrics = train(frozen, paths)
    assert metrics["train_groups"] == 3
    tuned = CoverEncoder(ModelDims(**{**torch.load(tmp_path / "run" / "last.pt", weights_only=False)["dims"]}))
    tuned.load_state_dict(torch.load(tmp_path / "run" / "last.pt", weights_only=False)["model"])
    tuned.eval()
    reference = encoder_from_onnx(random_model_dir).eval()
    frames = _frames(5)
    with torch.no_grad():
        cos = (tuned.embed(frames) * reference.embed(frames)).sum(1)
    # no learning happened: only the norms' running statistics moved a little with the training batches
    assert cos.min().item() > 0.99


def test_a_graph_whose_weights_lost_their_names_is_refused(random_model_dir, tmp_path):
    """A graph that still runs, but whose Linear bias no longer names its layer: nothing to map it to."""
    broken = tmp_path / "broken"
    broken.mkdir()
    model = onnx.load(str(random_model_dir / MODEL_FILES["encoder"]))
    for init in model.graph.initializer:
        if init.name == "blocks.0.attn.out.bias":
            init.name = "val_renamed"
    for node in model.graph.node:
        node.input[:] = ["val_renamed" if name == "blocks.0.attn.out.bias" else name for name in node.input]
    onnx.save(model, str(broken / MODEL_FILES["encoder"]))
    (broken / MODEL_FILES["sidecar"]).write_text((random_model_dir / MODEL_FILES["sidecar"]).read_text())
    with pytest.raises(OnnxImportError, match=r"blocks\.0\.attn\.out\.(weight|bias) not found"):
        encoder_from_onnx(broken)


def test_other_dims_in_the_sidecar_are_refused(random_model_dir, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / MODEL_FILES["encoder"]).write_bytes((random_model_dir / MODEL_FILES["encoder"]).read_bytes())
    sidecar = json.loads((random_model_dir / MODEL_FILES["sidecar"]).read_text())
    sidecar["dims"]["d_ff"] = 128
    (other / MODEL_FILES["sidecar"]).write_text(json.dumps(sidecar))
    with pytest.raises(OnnxImportError, match="mlp"):
        encoder_from_onnx(other)
