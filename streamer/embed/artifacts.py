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
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from coverwatch.streamer.frontend.audio import BINS_PER_OCTAVE, FMIN, HOP_LENGTH, N_BINS, SAMPLE_RATE

log = logging.getLogger(__name__)

MODEL_FILES = {"cqt": "cqt.onnx", "encoder": "encoder.onnx", "sidecar": "model.json"}
DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "default_model"


class ArtifactError(RuntimeError):
    """A model or index file that is missing, corrupt, or does not belong with the others."""


def canonical_sha256(table: dict, skip: str) -> str:
    """sha256 of `table`'s canonical JSON without key `skip` (the key that stores this very digest).

    JSON floats round-trip exactly, so a table read back from disk hashes as it did when written."""
    body = {k: v for k, v in table.items() if k != skip}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


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
    # {} as exported; a quantised model records mode, source model hash and source encoder sha256
    quantization: dict = field(default_factory=dict)

    @property
    def model_hash(self) -> str:
        return hashlib.sha256(f"{self.cqt_sha256}:{self.encoder_sha256}".encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        """The sidecar's content: the fields, the model hash and a sha256 over both (`sidecar_sha256`)."""
        table = {**asdict(self), "model_hash": self.model_hash}
        return {**table, "sidecar_sha256": canonical_sha256(table, "sidecar_sha256")}


def read_json_file(path: Path, not_found: str, unreadable: str) -> object:
    """The parsed JSON of `path`; ArtifactError "PATH: <not_found>" if it is missing,
    "PATH: <unreadable> (why)" if it is not JSON."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path}: {not_found}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: {unreadable} ({exc})") from None


def resolve_model_dir(path: str | Path | None) -> Path:
    """The configured model folder, or the bundled default when empty."""
    return Path(path) if path else DEFAULT_MODEL_DIR


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to path.tmp, fsync it, rename it over `path`: readers see old or new, never half."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


def fsync_dir(path: Path) -> None:
    """Make the renames inside folder `path` durable."""
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_model_info(model_dir: Path, info: ModelInfo) -> None:
    """Write model.json atomically (a reader never sees half a sidecar)."""
    atomic_write(model_dir / MODEL_FILES["sidecar"], (json.dumps(info.to_dict(), indent=2) + "\n").encode())
    fsync_dir(model_dir)


def load_model_info(model_dir: Path, verify: bool = True) -> ModelInfo:
    """Read model.json and (with verify) check both graphs' sha256 and the front end."""
    sidecar = model_dir / MODEL_FILES["sidecar"]
    try:
        raw = json.loads(sidecar.read_text())
        if not isinstance(raw, dict):
            raise TypeError(f"expected a JSON object, got {type(raw).__name__}")
        recorded_digest = raw.pop("sidecar_sha256", None)
        if recorded_digest is not None and recorded_digest != canonical_sha256(raw, "sidecar_sha256"):
            raise ArtifactError(f"{sidecar}: sidecar_sha256 does not match its content (model.json altered or damaged)")
        recorded_hash = raw.pop("model_hash", None)
        info = ModelInfo(**raw)
    except FileNotFoundError:
        raise ArtifactError(f"{sidecar}: model sidecar not found (is {model_dir} a coverwatch model folder?)") from None
    except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{sidecar}: corrupt model sidecar ({exc})") from None
    expected = (SAMPLE_RATE, HOP_LENGTH, N_BINS, BINS_PER_OCTAVE)
    found = (info.sample_rate, info.hop_length, info.n_bins, info.bins_per_octave)
    if found != expected:
        raise ArtifactError(f"{sidecar}: front end (sr, hop, bins, bins/octave) = {found}, this build expects {expected}")
    if not math.isclose(info.fmin, FMIN, rel_tol=1e-9):
        raise ArtifactError(f"{sidecar}: fmin {info.fmin} Hz, this build expects {FMIN} Hz")
    if recorded_hash is not None and recorded_hash != info.model_hash:
        raise ArtifactError(f"{sidecar}: model_hash {recorded_hash} does not match its graph sha256s (sidecar altered or damaged)")
    if verify:
        for key, digest in (("cqt", info.cqt_sha256), ("encoder", info.encoder_sha256)):
            path = model_dir / MODEL_FILES[key]
            if not path.is_file():
                raise ArtifactError(f"{path}: model graph missing")
            if sha256_file(path) != digest:
                raise ArtifactError(f"{path}: sha256 does not match {sidecar.name} (file truncated, altered or from another export)")
    return info
