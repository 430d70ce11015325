"""The runtime model artefact: two ONNX graphs plus a JSON sidecar, checked on load.

The sidecar states the audio front end (sample rate, hop, bins, kernel length), the
network dims and the sha256 of each graph. `load_model_info` refuses a folder whose
files are missing, truncated or altered, or whose front end differs from this build's
constants. The model hash (first 16 hex digits of sha256 over both graph hashes) is what
an index records, so the daemon can refuse an index built with another model.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from streamer.audio import BINS_PER_OCTAVE, HOP_LENGTH, N_BINS, SAMPLE_RATE

log = logging.getLogger(__name__)

MODEL_FILES = {"cqt": "cqt.onnx", "encoder": "encoder.onnx", "sidecar": "model.json"}
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"


class ArtifactError(RuntimeError):
    """A model or index file that is missing, corrupt, or does not belong with the others."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class ModelInfo:
    sample_rate: int
    hop_length: int
    n_bins: int
    bins_per_octave: int
    fmin: float
    kernel_length: int  # samples spanned by one CQT frame
    embedding_dim: int
    cqt_sha256: str
    encoder_sha256: str
    dims: dict = field(default_factory=dict)

    @property
    def model_hash(self) -> str:
        return hashlib.sha256(f"{self.cqt_sha256}:{self.encoder_sha256}".encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return {**asdict(self), "model_hash": self.model_hash}


def resolve_model_dir(path: str | Path | None) -> Path:
    """The configured model folder, or the bundled default when empty."""
    return Path(path) if path else DEFAULT_MODEL_DIR


def load_model_info(model_dir: Path, verify: bool = True) -> ModelInfo:
    """Read model.json and (with verify) check both graphs' sha256 and the front end."""
    sidecar = model_dir / MODEL_FILES["sidecar"]
    try:
        raw = json.loads(sidecar.read_text())
        raw.pop("model_hash", None)
        info = ModelInfo(**raw)
    except FileNotFoundError:
        raise ArtifactError(f"{sidecar}: model sidecar not found (is {model_dir} a coverwatch model folder?)") from None
    except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{sidecar}: corrupt model sidecar ({exc})") from None
    expected = (SAMPLE_RATE, HOP_LENGTH, N_BINS, BINS_PER_OCTAVE)
    found = (info.sample_rate, info.hop_length, info.n_bins, info.bins_per_octave)
    if found != expected:
        raise ArtifactError(f"{sidecar}: front end (sr, hop, bins, bins/octave) = {found}, this build expects {expected}")
    if verify:
        for key, digest in (("cqt", info.cqt_sha256), ("encoder", info.encoder_sha256)):
            path = model_dir / MODEL_FILES[key]
            if not path.is_file():
                raise ArtifactError(f"{path}: model graph missing")
            if sha256_file(path) != digest:
                raise ArtifactError(f"{path}: sha256 does not match {sidecar.name} (file truncated, altered or from another export)")
    return info
