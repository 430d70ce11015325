"""Audio effect primitives on (N,) float32 audio at SAMPLE_RATE: levels, a broadcast-style
compressor + limiter, lossy codec round trips and coloured noise.

Shared by the training degradations (`coverwatch.model.degrade`, with randomised settings)
and the broadcast simulator (`coverwatch.evaluation.simulate`, with its fixed chain).
"""

from __future__ import annotations

import io
import math

import numpy as np
import soundfile as sf

from coverwatch.streamer.frontend.audio import SAMPLE_RATE, seconds_to_samples

# Broadcast chain (the simulator's defaults).
COMP_THRESHOLD_DBFS = -24.0
COMP_RATIO = 4.0
COMP_ATTACK_S, COMP_RELEASE_S = 0.005, 0.25
COMP_BLOCK_S = 0.01  # gain computer resolution
TARGET_RMS_DBFS = -16.0  # make-up gain aims the programme loudness here
LIMIT_CEILING = 0.95  # soft limiter ceiling (linear)
CODECS = {  # name -> (format, subtype, compression_level); levels give ~24-40 kbps at 22.05 kHz
    "mp3-32k": ("MP3", "MPEG_LAYER_III", 0.85),
    "ogg-vorbis-q0": ("OGG", "VORBIS", 0.95),
    "opus-low": ("OGG", "OPUS", 0.9),
}
CODEC_BLOCK = 65536  # samples per encoder write
OPUS_RATE = 48000  # libsndfile's Opus encoder takes 8/12/16/24/48 kHz only



def db_to_gain(db: float) -> float:
    return float(10.0 ** (db / 20.0))


def rms_dbfs(audio: np.ndarray) -> float:
    """RMS level of (N,) audio in dBFS (-inf dB for silence is floored at -200)."""
    return float(10.0 * np.log10(max(float(np.mean(np.square(audio, dtype=np.float64))), 1e-20)))


def compress(audio: np.ndarray, threshold_dbfs: float = COMP_THRESHOLD_DBFS, ratio: float = COMP_RATIO) -> np.ndarray:
    """Broadcast-style processing of (N,) audio: feed-forward RMS compressor with attack and
    release, make-up gain to TARGET_RMS_DBFS, then a tanh soft limiter at LIMIT_CEILING."""
    block = seconds_to_samples(COMP_BLOCK_S)
    n_blocks = math.ceil(len(audio) / block)
    padded = np.pad(audio, (0, n_blocks * block - len(audio)))
    level_db = 10.0 * np.log10(np.maximum(np.mean(padded.reshape(n_blocks, block) ** 2, axis=1), 1e-12))
    target_db = np.where(level_db > threshold_dbfs, threshold_dbfs + (level_db - threshold_dbfs) / ratio, level_db) - level_db
    attack, release = math.exp(-COMP_BLOCK_S / COMP_ATTACK_S), math.exp(-COMP_BLOCK_S / COMP_RELEASE_S)
    gain_db = np.empty(n_blocks)
    g = 0.0
    for i, t in enumerate(target_db):  # one-pole smoothing: fast down (attack), slow up (release)
        coef = attack if t < g else release
        g = coef * g + (1.0 - coef) * t
        gain_db[i] = g
    centres = (np.arange(n_blocks) + 0.5) * block
    gain = 10.0 ** (np.interp(np.arange(len(audio)), centres, gain_db) / 20.0)
    out = audio * gain
    loud = np.abs(out) > 10 ** (-45 / 20)  # make-up gain from programme, not from gaps
    programme_db = rms_dbfs(out[loud]) if loud.any() else TARGET_RMS_DBFS
    out = out * db_to_gain(TARGET_RMS_DBFS - programme_db)
    return (LIMIT_CEILING * np.tanh(out / LIMIT_CEILING)).astype(np.float32)


def codec_roundtrip(audio: np.ndarray, codec: str) -> np.ndarray:
    """Encode (N,) float32 at SAMPLE_RATE with a lossy codec of CODECS and decode it back
    (same length; the encoder's leading delay, tens of ms, is left in)."""
    fmt, subtype, level = CODECS[codec]
    rate = OPUS_RATE if subtype == "OPUS" else SAMPLE_RATE
    signal = audio if rate == SAMPLE_RATE else resample(audio, SAMPLE_RATE, rate)
    buffer = io.BytesIO()
    with sf.SoundFile(buffer, "w", rate, 1, format=fmt, subtype=subtype, compression_level=level) as handle:
        for start in range(0, len(signal), CODEC_BLOCK):  # libsndfile's Vorbis encoder crashes on one huge write
            handle.write(signal[start : start + CODEC_BLOCK])
    buffer.seek(0)
    decoded, decoded_rate = sf.read(buffer, dtype="float32")
    if decoded_rate != SAMPLE_RATE:
        decoded = resample(decoded, decoded_rate, SAMPLE_RATE)
    out = np.zeros(len(audio), np.float32)
    out[: min(len(out), len(decoded))] = decoded[: len(out)]
    return out


def resample(audio: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    import soxr

    return soxr.resample(audio, rate_in, rate_out).astype(np.float32)


def noise(rng: np.random.Generator, seconds: float, dbfs: float) -> np.ndarray:
    """Pinkish noise (white through a one-pole low-pass, mixed with white) at `dbfs` RMS."""
    white = rng.standard_normal(seconds_to_samples(seconds))
    low = np.cumsum(white) * 0.02
    low -= np.convolve(low, np.ones(2205) / 2205, mode="same")  # remove the random-walk drift
    out = white + 3.0 * low
    return (out * db_to_gain(dbfs) / max(math.sqrt(float(np.mean(out**2))), 1e-12)).astype(np.float32)
