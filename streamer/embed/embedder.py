"""onnxruntime sessions for the two model graphs: waveform -> CQT frames -> embeddings.

Letters: B batch, N samples, T frames, F CQT bins, D embedding dims.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from coverwatch.streamer.embed.artifacts import MODEL_FILES, ArtifactError, ModelInfo, load_model_info
from coverwatch.streamer.frontend.audio import N_BINS, cqt_in_pieces

log = logging.getLogger(__name__)

DENORMAL_FLOOR = np.float32(1e-30)  # |sample| below this (-600 dBFS) is set to 0 before the CQT


def _session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # Idle intra-op threads sleep instead of spinning: each session keeps its own pool, and
    # the CQT's spinning threads took the cores from the encoder's (and from numpy) between
    # calls. Measured on 2 cores (bench_stream.py, 2 threads): 60-65x -> 148-160x real time
    # per CPU second and 119-130x -> 200-213x per wall second; 200 streams 194x -> 201x.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped errors for bad graphs
        raise ArtifactError(f"{path}: onnxruntime cannot load the graph ({exc})") from None


class Embedder:
    """Runs cqt.onnx and encoder.onnx from a verified model folder."""

    def __init__(self, model_dir: Path, threads: int = 2) -> None:
        self.info: ModelInfo = load_model_info(model_dir)
        self.model_dir = model_dir
        self._cqt = _session(model_dir / MODEL_FILES["cqt"], threads)
        self._encoder = _session(model_dir / MODEL_FILES["encoder"], threads)

    @property
    def kernel_length(self) -> int:
        return self.info.kernel_length

    @property
    def dim(self) -> int:
        return self.info.embedding_dim

    def cqt(self, waveform: np.ndarray) -> np.ndarray:
        """(N,) float32 at SAMPLE_RATE, N >= kernel_length -> (T, F) log-CQT frames."""
        assert waveform.ndim == 1 and waveform.dtype == np.float32, (waveform.shape, waveform.dtype)
        assert len(waveform) >= self.kernel_length, f"need >= {self.kernel_length} samples, got {len(waveform)}"
        # Denormal samples (a fade's tail, a dithered silence) slow the CQT ~18x; they are far
        # below hearing, so they become 0. (onnxruntime's set_denormal_as_zero would instead
        # flip the whole process's FPU flags.)
        waveform = np.where(np.abs(waveform) < DENORMAL_FLOOR, np.float32(0.0), waveform)
        return self._cqt.run(None, {"waveform": waveform[None]})[0][0]

    def embed(self, frames: np.ndarray) -> np.ndarray:
        """(B, T, F) float32 log-CQT -> (B, D) float32, rows L2-normalised."""
        assert frames.ndim == 3 and frames.shape[2] == N_BINS and frames.dtype == np.float32, (frames.shape, frames.dtype)
        return self._encoder.run(None, {"frames": frames})[0]

    def embed_windows(self, windows: list[tuple[int, np.ndarray]], batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """[(owner, (T_i, F) window)] -> ((Q, D) embeddings, (Q,) their owners), in as few
        encoder calls as possible: windows of one length together, `batch_size` per call."""
        by_length: dict[int, list[tuple[int, np.ndarray]]] = {}
        for owner, window in windows:
            by_length.setdefault(len(window), []).append((owner, window))
        vectors, owners = [np.zeros((0, self.dim), np.float32)], []
        for items in by_length.values():
            for first in range(0, len(items), batch_size):
                part = items[first : first + batch_size]
                vectors.append(self.embed(np.stack([window for _, window in part]).astype(np.float32, copy=False)))
                owners.extend(owner for owner, _ in part)
        return np.concatenate(vectors), np.asarray(owners, dtype=np.int64)

    def cqt_whole(self, audio: np.ndarray) -> np.ndarray:
        """(N,) float32 -> (T, F) for a whole file, in overlapping pieces (bounded memory)."""
        return cqt_in_pieces(audio, self.kernel_length, self.cqt)
