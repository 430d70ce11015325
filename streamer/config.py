"""Typed configuration: one frozen dataclass per `config.toml` section.

`load_config(path)` reads the file once with tomllib, checks every key, type and range,
and raises `ConfigError` listing *all* problems at once ("did you mean" for unknown keys).
Durations are stated in seconds; nothing derived (frames, samples) is stored here.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """An invalid configuration; the message lists every problem found."""


def _rng(lo: float | None = None, hi: float | None = None, choices: tuple = ()) -> dict:
    return {"min": lo, "max": hi, "choices": choices}


def _f(default: Any, lo: float | None = None, hi: float | None = None, choices: tuple = ()) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=_rng(lo, hi, choices))
    return field(default=default, metadata=_rng(lo, hi, choices))


@dataclass(frozen=True)
class ModelConfig:
    path: str = _f("")  # folder with cqt.onnx, encoder.onnx, model.json; "" = the bundled default
    threads: int = _f(2, 1, 256)  # onnxruntime intra-op threads
    batch_size: int = _f(8, 1, 1024)  # windows of one length per encoder call (8 measured best, bench/RESULTS.md)


@dataclass(frozen=True)
class IndexConfig:
    path: str = _f("")  # index folder made by `coverwatch index build`, or a catalog file (`coverwatch shard catalog`)
    threads: int = _f(1, 1, 256)  # FAISS (OpenMP) search threads: 1 measured best on 2 cores (2 add ~9 ms per search)


@dataclass(frozen=True)
class StreamConfig:
    windows_s: list[float] = _f([10.0, 20.0, 40.0], 3.0, 600.0)  # window lengths embedded each hop
    hop_s: float = _f(2.5, 0.25, 60.0)  # time between decisions
    chunk_s: float = _f(0.5, 0.01, 60.0)  # block size when reading files
    silence_dbfs: float = _f(-55.0, -120.0, 0.0)  # windows quieter than this (RMS) are not embedded
    top_k: int = _f(20, 1, 1000)  # neighbours fetched per window
    max_pending_windows: int = _f(256, 1, 100000)  # due windows that force an encoder pass mid-batch (bounds memory)
    # Alignment check (streamer/decide/alignment.py): each hop, the align_candidates best songs by
    # embedding score gain align_weight x the fraction of the last align_window_s of audio
    # whose chroma follows theirs in order (key- and tempo-invariant). Part of the score, so
    # a stream calibration records these and is measured with them.
    align_weight: float = _f(0.5, 0.0, 10.0)  # 0 = the embedding score alone
    align_window_s: float = _f(20.0, 3.0, 600.0)  # cut to the longest of windows_s (the ring holds no more)
    align_candidates: int = _f(5, 1, 1000)  # songs aligned per hop (~3 ms each for a 40-s reference, growing with its length)
    align_delay: int = _f(13, 1, 40)  # chroma steps (~0.21 s each) stacked into one delay-embedded step
    align_neighbours: float = _f(0.1, 0.01, 1.0)  # fraction of steps that are a step's nearest neighbours


@dataclass(frozen=True)
class DecisionConfig:
    # Scores are cosines plus stream.align_weight x an alignment fraction: up to 1 + align_weight.
    start_threshold: float = _f(0.0, -1.0, 11.0)  # 0 = use the calibrated value from the index manifest
    end_threshold: float = _f(0.0, -1.0, 11.0)  # 0 = calibrated
    start_hops: int = _f(2, 1, 100)  # hops a song must lead above start_threshold before match_start
    end_hops: int = _f(3, 1, 100)  # hops below end_threshold before match_end
    history_hops: int = _f(8, 1, 1000)  # per-song score history kept per stream


@dataclass(frozen=True)
class MicConfig:
    device: str = _f("")  # PortAudio device name or index; "" = system default
    sample_rate: int = _f(48000, 8000, 384000)
    channels: int = _f(1, 1, 64)
    block_s: float = _f(0.1, 0.005, 5.0)


@dataclass(frozen=True)
class SinkConfig:
    stdout: bool = _f(True)
    file: str = _f("")  # JSON-lines file to append events to; "" = none
    kafka: bool = _f(False)  # also send events to [kafka] events_topic (always on with --source kafka)


KAFKA_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
# Keys that would put a secret into config.toml: refused with a pointer to the file/env keys.
SECRET_KEYS = ("sasl_plain_password", "sasl_password", "password", "ssl_password")


@dataclass(frozen=True)
class KafkaConfig:
    bootstrap_servers: str = _f("127.0.0.1:9092")  # comma-separated host:port list
    audio_topics: list[str] = _f(["coverwatch.audio"])  # topics of audio chunks (`--source kafka`)
    group_id: str = _f("coverwatch")  # consumer group: instances sharing it split the partitions
    client_id: str = _f("coverwatch")
    events_topic: str = _f("coverwatch.events")  # match events; "" = no Kafka event sink
    dead_letter_topic: str = _f("coverwatch.dead-letter")  # malformed chunks, reason in a header
    checkpoint_topic: str = _f("coverwatch.checkpoints")  # per-partition replay checkpoints (make it compacted)
    session_timeout_ms: int = _f(10000, 1000, 300000)  # a silent instance leaves the group after this
    heartbeat_interval_ms: int = _f(3000, 100, 100000)
    max_poll_records: int = _f(50, 1, 10000)
    max_chunk_s: float = _f(10.0, 0.01, 60.0)  # longer chunks are dead-lettered as too large
    stream_idle_s: float = _f(60.0, 1.0, 86400.0)  # a stream without chunks for this long is dropped
    send_timeout_s: float = _f(10.0, 0.1, 600.0)  # wait for the broker's acks=all before retrying
    retry_backoff_max_s: float = _f(30.0, 0.1, 3600.0)  # longest pause between delivery retries
    connect_timeout_s: float = _f(30.0, 0.5, 86400.0)  # `serve --source kafka` exits (1) when no broker answers this long at start-up
    # Security, passed to every Kafka client. The password is never in this file: it is read
    # from sasl_password_file or the environment variable named by sasl_password_env.
    security_protocol: str = _f("PLAINTEXT", choices=KAFKA_PROTOCOLS)
    ssl_cafile: str = _f("")  # CA bundle (PEM) that signed the brokers' certificates; "" = system default
    ssl_certfile: str = _f("")  # client certificate (PEM) for mutual TLS
    ssl_keyfile: str = _f("")  # its private key (PEM)
    sasl_mechanism: str = _f("PLAIN", choices=("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"))
    sasl_plain_username: str = _f("")
    sasl_password_file: str = _f("")  # file whose content (trailing newline stripped) is the password
    sasl_password_env: str = _f("")  # or: name of the environment variable holding it

    @property
    def brokers(self) -> list[str]:
        """`bootstrap_servers` as the list kafka-python takes."""
        return [s.strip() for s in self.bootstrap_servers.split(",") if s.strip()]


@dataclass(frozen=True)
class MetricsConfig:
    port: int = _f(9108, 0, 65535)  # Prometheus /metrics port; 0 = off
    address: str = _f("127.0.0.1")  # listen address


@dataclass(frozen=True)
class ServiceConfig:
    drain_timeout_s: float = _f(20.0, 0.1, 600.0)  # SIGTERM: finish in-flight work, flush, commit within this


# FAISS index types `index build` accepts; streamer/search/index_types.py builds them
INDEX_TYPE_CHOICES = ("auto", "flat", "hnsw", "ivf", "ivf_sq8", "ivf_pq", "opq_ivf_pq", "two_stage")


@dataclass(frozen=True)
class IndexBuildConfig:
    segment_s: float = _f(20.0, 3.0, 600.0)  # reference segment length
    segment_hop_s: float = _f(10.0, 1.0, 600.0)  # hop between reference segments
    whole_track: bool = _f(True)  # also index each whole track
    index_type: str = _f("auto", choices=INDEX_TYPE_CHOICES)  # auto = chosen by catalog size (streamer/search/index_types.py)
    impostor_quantile: float = _f(0.999, 0.5, 1.0)  # calibration: quantile of non-matching scores
    # Thresholds for an index with too few impostor scores to estimate that quantile (a small
    # catalog, before `coverwatch calibrate`): the shipped model's stream calibration on the
    # 30-song demo catalog (start 0.977, end 0.543 for 1 false alarm a day), rounded up.
    fallback_start_threshold: float = _f(0.98, 0.0, 11.0)
    fallback_end_threshold: float = _f(0.55, 0.0, 11.0)
    target_false_alarms_per_day: float = _f(1.0, 1e-6, 1e4)  # `coverwatch calibrate`: start threshold for this rate
    calibration_block_s: float = _f(60.0, 5.0, 3600.0)  # calibration: score maxima are fitted per block of this length
    recalibrate_growth: float = _f(0.25, 0.0, 100.0)  # `index add` re-runs calibration when the song count moves by this fraction
    batch_size: int = _f(16, 1, 4096)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = _f(7000, 1)
    groups_per_batch: int = _f(8, 2)
    versions_per_group: int = _f(4, 2)
    crop_min_s: float = _f(5.0, 3.0)
    crop_max_s: float = _f(20.0, 3.0)
    lr: float = _f(1e-3, 0.0, 1.0)
    warmup_steps: int = _f(150, 0)
    min_lr_fraction: float = _f(0.02, 0.0, 1.0)
    weight_decay: float = _f(1e-4, 0.0, 1.0)
    triplet_margin: float = _f(0.3, 0.0, 2.0)
    triplet_mining: str = _f("all", choices=("all", "hard"))
    triplet_weight: float = _f(1.0, 0.0)
    ce_weight: float = _f(1.0, 0.0)
    label_smoothing: float = _f(0.1, 0.0, 0.9)
    outside_per_batch: int = _f(0, 0)  # out-of-catalog crops per batch (train --negatives); 0 = none
    outside_weight: float = _f(1.0, 0.0)  # weight of their hinge on max similarity to the batch's covers
    outside_ceiling: float = _f(0.3, -1.0, 1.0)  # cosine above which that hinge pushes down
    outside_bank_batches: int = _f(0, 0)  # earlier batches' covers the hinge also compares with (0 = this batch only)
    pitch_shift_bins: int = _f(6, 0, 24)  # random CQT roll, in semitones
    tempo_min: float = _f(0.8, 0.25, 1.0)  # random time-stretch of CQT frames
    tempo_max: float = _f(1.25, 1.0, 4.0)
    freq_mask_bins: int = _f(8, 0, 84)  # SpecAugment
    time_mask_fraction: float = _f(0.1, 0.0, 0.5)
    eval_every: int = _f(1000, 1)
    checkpoint_every: int = _f(100, 1)
    seed: int = _f(0)
    d_model: int = _f(192, 16)
    n_layers: int = _f(2, 1)
    n_heads: int = _f(4, 1)
    d_ff: int = _f(384, 16)
    stem_channels: int = _f(16, 4)
    embedding_dim: int = _f(512, 8)
    dropout: float = _f(0.1, 0.0, 0.9)
    threads: int = _f(2, 1, 256)


@dataclass(frozen=True)
class LoggingConfig:
    level: str = _f("INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    decision: DecisionConfig = field(default_factory=DecisionConfig)
    mic: MicConfig = field(default_factory=MicConfig)
    sinks: SinkConfig = field(default_factory=SinkConfig)
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)
    index_build: IndexBuildConfig = field(default_factory=IndexBuildConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _check_scalar(value: Any, tp: type, meta: dict, where: str, errors: list[str]) -> Any:
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if tp in (int, float) and isinstance(value, bool) or not isinstance(value, tp):
        errors.append(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
        return None
    if tp is float and not math.isfinite(value):  # TOML allows nan and inf; no setting means them
        errors.append(f"{where}: {value!r} is not a finite number")
        return None
    lo, hi, choices = meta.get("min"), meta.get("max"), meta.get("choices") or ()
    if lo is not None and value < lo or hi is not None and value > hi:
        bounds = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        errors.append(f"{where}: {value!r} is out of range {bounds}")
    if choices and value not in choices:
        errors.append(f"{where}: {value!r} is not one of {', '.join(map(repr, choices))}")
    return value


def _build(cls: type, table: dict, prefix: str, errors: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in table:
        if key not in names:
            hint = difflib.get_close_matches(key, names, n=1)
            suggestion = f" (did you mean '{prefix}{hint[0]}'?)" if hint else ""
            errors.append(f"{prefix}{key}: unknown key{suggestion}")
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in table:
            continue
        value, tp, where = table[f.name], hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                errors.append(f"{where}: expected a [{where}] table, got {type(value).__name__}")
                continue
            values[f.name] = _build(tp, value, f"{where}.", errors)
        elif typing.get_origin(tp) is list:
            (item_tp,) = typing.get_args(tp)
            if not isinstance(value, list) or not value:
                errors.append(f"{where}: expected a non-empty list of {_type_name(item_tp)}")
                continue
            values[f.name] = [_check_scalar(v, item_tp, f.metadata, f"{where}[{i}]", errors) for i, v in enumerate(value)]
        else:
            values[f.name] = _check_scalar(value, tp, f.metadata, where, errors)
    if errors:
        return None
    return cls(**values)


def _kafka_security_checks(k: KafkaConfig) -> list[str]:
    """Settings that only make sense together; every message names the keys involved."""
    errors = []
    protocol = f"security_protocol {k.security_protocol}"
    sasl, tls = k.security_protocol.startswith("SASL_"), k.security_protocol.endswith("SSL")
    sasl_given = [f"kafka.{key}" for key in ("sasl_plain_username", "sasl_password_file", "sasl_password_env") if getattr(k, key)]
    ssl_given = [f"kafka.{key}" for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile") if getattr(k, key)]
    if sasl and not k.sasl_plain_username:
        errors.append(f"kafka.sasl_plain_username: required with {protocol}")
    if sasl and bool(k.sasl_password_file) == bool(k.sasl_password_env):
        errors.append(f"kafka.sasl_password_file, kafka.sasl_password_env: {protocol} needs exactly one of them")
    if not sasl and sasl_given:
        errors.append(
            f"{', '.join(sasl_given)}: SASL settings given but security_protocol is {k.security_protocol} (use SASL_SSL or SASL_PLAINTEXT)"
        )
    if not tls and ssl_given:
        errors.append(f"{', '.join(ssl_given)}: TLS files given but security_protocol is {k.security_protocol} (use SSL or SASL_SSL)")
    if bool(k.ssl_certfile) != bool(k.ssl_keyfile):
        errors.append("kafka.ssl_certfile, kafka.ssl_keyfile: go together (mutual TLS)")
    for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile", "sasl_password_file"):
        path = getattr(k, key)
        if path and not Path(path).is_file():
            errors.append(f"kafka.{key}: {path!r} is not a readable file")
    return errors


def _cross_checks(cfg: Config) -> list[str]:
    errors = []
    if cfg.train.crop_min_s > cfg.train.crop_max_s:
        errors.append("train.crop_min_s must not exceed train.crop_max_s")
    if cfg.train.tempo_min > cfg.train.tempo_max:
        errors.append("train.tempo_min must not exceed train.tempo_max")
    if cfg.train.d_model % cfg.train.n_heads:
        errors.append("train.d_model must be divisible by train.n_heads")
    if cfg.decision.end_threshold and cfg.decision.start_threshold and cfg.decision.end_threshold > cfg.decision.start_threshold:
        errors.append("decision.end_threshold must not exceed decision.start_threshold (hysteresis)")
    if cfg.index_build.fallback_end_threshold > cfg.index_build.fallback_start_threshold:
        errors.append("index_build.fallback_end_threshold must not exceed index_build.fallback_start_threshold (hysteresis)")
    if sorted(cfg.stream.windows_s) != cfg.stream.windows_s or len(set(cfg.stream.windows_s)) != len(cfg.stream.windows_s):
        errors.append("stream.windows_s must be strictly increasing")
    errors.extend(_kafka_security_checks(cfg.kafka))
    if cfg.kafka.heartbeat_interval_ms * 3 > cfg.kafka.session_timeout_ms:
        errors.append("kafka.heartbeat_interval_ms must be at most a third of kafka.session_timeout_ms")
    return errors


def parse_config(table: dict, source: str = "<config>") -> Config:
    """Build a validated `Config` from a parsed TOML table; raise ConfigError listing all problems."""
    errors: list[str] = []
    kafka_table = table.get("kafka")
    secrets = [key for key in SECRET_KEYS if isinstance(kafka_table, dict) and key in kafka_table]
    for key in secrets:
        errors.append(
            f"kafka.{key}: secrets do not belong in the config; name a file (kafka.sasl_password_file) or an environment variable (kafka.sasl_password_env)"
        )
    if secrets:  # reported once, not again as unknown keys
        table = {**table, "kafka": {k: v for k, v in kafka_table.items() if k not in secrets}}
    cfg = _build(Config, table, "", errors)
    if cfg is not None:
        errors.extend(_cross_checks(cfg))
    if errors:
        raise ConfigError(f"{source}: {len(errors)} problem(s):\n  " + "\n  ".join(errors))
    return cfg


def load_config(path: str | Path | None) -> Config:
    """Read and validate a config file; `None` gives the defaults."""
    if path is None:
        return Config()
    path = Path(path)
    try:
        with path.open("rb") as fh:
            table = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (TOML must be): {exc}") from None
    except RecursionError:  # tomllib parses nested arrays and inline tables recursively
        raise ConfigError(f"{path}: not valid TOML: arrays or tables nested too deeply") from None
    except OSError as exc:  # a directory, no permission, an I/O error
        raise ConfigError(f"{path}: cannot read the config file ({exc.strerror or exc})") from None
    return parse_config(table, str(path))


def replace_section(cfg: Config, section: str, **changes: Any) -> Config:
    """A copy of `cfg` with fields of one section replaced (trusted callers: values are not checked)."""
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **changes)})


def override(cfg: Config, section: str, source: str = "command line", **changes: Any) -> Config:
    """A copy of `cfg` with fields of one section replaced by user input (command-line options),
    validated exactly as the config file's keys are: one ConfigError naming `section.key`."""
    table = dataclasses.asdict(cfg)
    table[section] = {**table[section], **changes}
    return parse_config(table, source)


__all__ = ["Config", "ConfigError", "load_config", "override", "parse_config", "replace_section"]
