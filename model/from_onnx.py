"""Rebuild a trainable CoverEncoder from an exported model folder (encoder.onnx + model.json).

Training checkpoints live under `runs/` and are not shipped; the ONNX encoder is. So that a
shipped model can be fine-tuned without its checkpoint, its weights are read back here.
The exporter's optimiser changed three things that have to be undone:

- LayerNorm constants are found through their nodes (equal constants are merged).
- Linear weights are stored transposed, as MatMul constants with generated names
  (`val_212`): each is found through the Add that follows it, whose bias keeps the
  parameter's name (`blocks.0.attn.qkv.bias`), and transposed back.
- Every stem BatchNorm2d is folded into the conv before it (weight W * gamma / sigma and
  a bias, the folded shift, absent when zero; read from the Conv nodes in order), and the BNNeck into `project`.
  A folded layer is an affine map; `calibrate_batchnorm` turns it back into conv + BN
  with the running statistics of real training batches, so that the network computes
  the same function in eval mode (exactly) and in train mode (up to batch noise).

`encoder_from_onnx` checks the rebuilt network against onnxruntime on random frames and
raises `OnnxImportError` when they differ: a graph laid out otherwise fails loudly.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper
from torch import nn

from coverwatch.model.network import CoverEncoder, ModelDims
from coverwatch.streamer.embed.artifacts import MODEL_FILES

log = logging.getLogger(__name__)

MAX_ABS_DIFF = 1e-4  # largest embedding difference to onnxruntime accepted after the import


class OnnxImportError(ValueError):
    """An encoder graph whose weights cannot be mapped back onto CoverEncoder."""


def _linear_weights(graph: onnx.GraphProto, constants: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{"<module>.weight": (out, in)} for every MatMul by a constant followed by an Add of "<module>.bias"."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    weights: dict[str, np.ndarray] = {}
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        constant = [name for name in node.input if name in constants and constants[name].ndim == 2]
        if len(constant) != 1:
            continue
        for add in consumers.get(node.output[0], []):
            biases = [name for name in add.input if add.op_type == "Add" and name.endswith(".bias") and name in constants]
            if biases:
                weights[biases[0][: -len(".bias")] + ".weight"] = constants[constant[0]].T
    return weights


def _layer_norms(graph: onnx.GraphProto, constants: dict[str, np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(scale, bias) of every LayerNormalization node, in graph order.

    Read from the nodes, not by name: the exporter keeps one copy of equal constants, so
    two LayerNorms still at their initial ones/zeros share one unnamed initializer.
    """
    norms = []
    for node in graph.node:
        if node.op_type == "LayerNormalization":
            if len(node.input) < 3 or node.input[1] not in constants or node.input[2] not in constants:
                raise OnnxImportError(f"LayerNormalization {node.name} without constant scale and bias")
            norms.append((constants[node.input[1]], constants[node.input[2]]))
    return norms


def _copy_into(tensor: torch.Tensor, value: np.ndarray, name: str, encoder_path: Path) -> None:
    """tensor <- value (a writable copy), or OnnxImportError naming `name` when the shapes differ."""
    if tuple(value.shape) != tuple(tensor.shape):
        raise OnnxImportError(f"{encoder_path}: {name} is {tuple(value.shape)} in the graph, {tuple(tensor.shape)} in the network")
    tensor.copy_(torch.from_numpy(np.array(value)))


def _reset_norm(norm: nn.BatchNorm1d | nn.BatchNorm2d, shift: np.ndarray, name: str, encoder_path: Path) -> None:
    """Make `norm` the identity plus `shift` in eval mode (statistics 0 / 1, gamma 1)."""
    norm.running_mean.zero_()
    norm.running_var.fill_(1.0 - norm.eps)
    norm.weight.fill_(1.0)
    _copy_into(norm.bias, shift, name, encoder_path)


def load_onnx_weights(model: CoverEncoder, encoder_path: Path) -> None:
    """Copy the ONNX encoder's weights into `model` (same dims); folded norms become shifts."""
    graph = onnx.load(str(encoder_path)).graph
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    found = {name: value for name, value in constants.items() if "." in name}
    found.update(_linear_weights(graph, constants))
    state = model.state_dict()
    loaded: set[str] = set()
    with torch.no_grad():
        convs = [node for node in graph.node if node.op_type == "Conv"]
        if len(convs) != len(model.stem.blocks) or any(not set(c.input[1:]) <= constants.keys() for c in convs):
            raise OnnxImportError(f"{encoder_path}: expected {len(model.stem.blocks)} Conv nodes with constant weights")
        for i, (block, conv) in enumerate(zip(model.stem.blocks, convs, strict=True)):
            weight = constants[conv.input[1]]
            # a folded shift of all zeros is dropped from the node
            shift = constants[conv.input[2]] if len(conv.input) > 2 else np.zeros(weight.shape[0], dtype=np.float32)
            _copy_into(block.conv.weight, weight, f"stem.blocks.{i}.conv.weight", encoder_path)
            _reset_norm(block.norm, shift, f"stem.blocks.{i}.conv bias", encoder_path)
            loaded.update(k for k in state if k.startswith(f"stem.blocks.{i}."))
        _reset_norm(model.neck, np.zeros(model.dims.embedding_dim, dtype=np.float32), "neck.bias", encoder_path)
        loaded.update(k for k in state if k.startswith("neck."))
        # Module order is the order the forward pass meets the LayerNorms in, as the graph's.
        layer_norms = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.LayerNorm)]
        graph_norms = _layer_norms(graph, constants)
        if len(graph_norms) != len(layer_norms):
            raise OnnxImportError(f"{encoder_path}: {len(graph_norms)} LayerNormalization nodes, the network has {len(layer_norms)}")
        for (name, norm), (scale, bias) in zip(layer_norms, graph_norms, strict=True):
            _copy_into(norm.weight, scale, f"{name}.weight", encoder_path)
            _copy_into(norm.bias, bias, f"{name}.bias", encoder_path)
            loaded.update((f"{name}.weight", f"{name}.bias"))
        for name, tensor in state.items():
            if name in loaded or name.startswith("classifier."):
                continue
            if name not in found:
                raise OnnxImportError(f"{encoder_path}: parameter {name} not found in the graph")
            _copy_into(tensor, found[name], name, encoder_path)


@torch.no_grad()
def calibrate_batchnorm(model: CoverEncoder, batches: Iterable[torch.Tensor]) -> None:
    """Give every BatchNorm of an imported model the statistics of its inputs on `batches`.

    Each norm's eval-mode affine map is kept (eval computes exactly what it did before),
    re-expressed around those statistics, so that train mode (batch statistics ~ them)
    computes very nearly the same: fine-tuning starts from the exported function.
    """
    norms = [block.norm for block in model.stem.blocks] + [model.neck]
    sums: dict[nn.Module, list[torch.Tensor]] = {norm: [] for norm in norms}

    def record(module: nn.Module, inputs: tuple[torch.Tensor], _output: torch.Tensor) -> None:
        x = inputs[0].transpose(0, 1).reshape(inputs[0].shape[1], -1)  # (C, everything else)
        sums[module].append(torch.stack([x.sum(1), (x * x).sum(1), torch.full_like(x[:, 0], x.shape[1])]))

    was_training = model.training
    model.eval()
    hooks = [norm.register_forward_hook(record) for norm in norms]
    try:
        for frames in batches:
            model.features(frames)
    finally:
        for hook in hooks:
            hook.remove()
    for norm in norms:
        if not sums[norm]:
            raise ValueError("calibrate_batchnorm needs at least one batch")
        total, squares, count = torch.stack(sums[norm]).sum(0)
        mean = total / count
        var = (squares / count - mean * mean).clamp_min(1e-6)
        # Eval mode is the affine map x -> scale x + shift; keep it with the new statistics:
        # gamma (x - mean) / sqrt(var + eps) + beta == scale x + shift.
        scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
        shift = norm.bias - scale * norm.running_mean
        norm.weight.copy_(scale * torch.sqrt(var + norm.eps))
        norm.bias.copy_(shift + scale * mean)
        norm.running_mean.copy_(mean)
        norm.running_var.copy_(var)
    model.train(was_training)


def encoder_from_onnx(model_dir: Path, n_classes: int | None = None, check_frames: int = 600) -> CoverEncoder:
    """A CoverEncoder (eval mode) with the weights of model_dir's encoder, checked against onnxruntime.

    `n_classes` sizes the (new, untrained) classifier; by default the sidecar's.
    """
    model_dir = Path(model_dir)
    sidecar = json.loads((model_dir / MODEL_FILES["sidecar"]).read_text())
    dims = dict(sidecar["dims"])
    if n_classes is not None:
        dims["n_classes"] = n_classes
    model = CoverEncoder(ModelDims(**dims)).eval()
    encoder_path = model_dir / MODEL_FILES["encoder"]
    load_onnx_weights(model, encoder_path)
    frames = np.random.default_rng(0).normal(-4.0, 1.5, size=(3, check_frames, model.dims.n_bins)).astype(np.float32)
    session = ort.InferenceSession(str(encoder_path), providers=["CPUExecutionProvider"])
    theirs = session.run(None, {session.get_inputs()[0].name: frames})[0]
    with torch.no_grad():
        ours = model.embed(torch.from_numpy(frames)).numpy()
    diff = float(np.abs(ours - theirs).max())
    if diff > MAX_ABS_DIFF:
        raise OnnxImportError(f"{encoder_path}: the rebuilt network differs from onnxruntime by {diff:.2e} (> {MAX_ABS_DIFF:g})")
    log.info("imported %s (model hash %s): max |difference| to onnxruntime %.1e", model_dir, sidecar.get("model_hash"), diff)
    return model
