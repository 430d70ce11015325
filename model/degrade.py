"""Seeded audio degradations for training data: reverb, EQ, compression, noise, lossy codec.

Each degradation maps (N,) float32 audio at SAMPLE_RATE to (N,) float32 audio of the same
length, drawing its parameters from the generator it is given, so a (seed, name) pair
always gives the same output. `degrade` applies a chain in the fixed order of
`DEGRADATIONS` (a room, then the channel: EQ, broadcast compression, noise, codec).

Compression, noise and the codec round trip reuse the broadcast-chain functions of
`coverwatch.model.effects` with randomised settings; reverb and EQ are numpy/scipy here (no
extra package: pedalboard would do the same with more dependencies).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Sequence

import numpy as np
from scipy import signal

from coverwatch.model.effects import CODECS, codec_roundtrip, compress, noise, rms_dbfs
from coverwatch.streamer.frontend.audio import SAMPLE_RATE, seconds_to_samples

log = logging.getLogger(__name__)

REVERB_RT60_S = (0.3, 1.8)  # decay time of the synthetic room, uniform
REVERB_WET = (0.15, 0.5)  # share of reverberant signal in the mix, uniform
REVERB_PREDELAY_S = (0.005, 0.03)
EQ_BANDS = (2, 4)  # peaking filters per EQ, inclusive
EQ_FREQ_HZ = (80.0, 7000.0)  # band centre, log-uniform
EQ_GAIN_DB = (-12.0, 12.0)
EQ_Q = (0.5, 2.5)
EQ_BANDLIMIT_SHARE = 0.4  # share of EQs that also band-limit (telephone / cheap speaker)
EQ_HIGHPASS_HZ = (150.0, 400.0)
EQ_LOWPASS_HZ = (2500.0, 5000.0)
COMP_THRESHOLD_DBFS = (-32.0, -16.0)
COMP_RATIO = (2.0, 8.0)
NOISE_SNR_DB = (5.0, 30.0)  # programme RMS over noise RMS
PEAK_LEVEL = 0.9  # a degraded signal louder than full scale is scaled to this peak


def reverb(audio: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(N,) -> (N,): convolution with a synthetic room (exponentially decaying noise)."""
    rt60 = float(rng.uniform(*REVERB_RT60_S))
    n = seconds_to_samples(rt60)
    t = np.arange(n) / SAMPLE_RATE
    tail = rng.standard_normal(n) * np.exp(-6.9 * t / rt60)  # -60 dB at rt60 (ln 1000 = 6.9)
    tail = np.concatenate((np.zeros(seconds_to_samples(float(rng.uniform(*REVERB_PREDELAY_S)))), tail))
    wet = signal.fftconvolve(audio, tail)[: len(audio)]
    wet *= math.sqrt(np.mean(audio.astype(np.float64) ** 2) / max(float(np.mean(wet**2)), 1e-20))
    share = float(rng.uniform(*REVERB_WET))
    return _fit((1.0 - share) * audio + share * wet)


def _peaking(freq: float, gain_db: float, q: float) -> np.ndarray:
    """(1, 6) second-order section of a peaking EQ (RBJ audio-EQ cookbook)."""
    a = 10.0 ** (gain_db / 40.0)
    w = 2.0 * math.pi * freq / SAMPLE_RATE
    alpha = math.sin(w) / (2.0 * q)
    b = [1.0 + alpha * a, -2.0 * math.cos(w), 1.0 - alpha * a]
    den = [1.0 + alpha / a, -2.0 * math.cos(w), 1.0 - alpha / a]
    return np.array([[*(x / den[0] for x in b), 1.0, den[1] / den[0], den[2] / den[0]]])


def eq(audio: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(N,) -> (N,): random peaking bands, sometimes with a band limit (high- and low-pass)."""
    sections = []
    for _ in range(int(rng.integers(EQ_BANDS[0], EQ_BANDS[1] + 1))):
        freq = float(np.exp(rng.uniform(np.log(EQ_FREQ_HZ[0]), np.log(EQ_FREQ_HZ[1]))))
        sections.append(_peaking(freq, float(rng.uniform(*EQ_GAIN_DB)), float(rng.uniform(*EQ_Q))))
    if rng.random() < EQ_BANDLIMIT_SHARE:
        band = (float(rng.uniform(*EQ_HIGHPASS_HZ)), float(rng.uniform(*EQ_LOWPASS_HZ)))
        sections.append(signal.butter(2, band, btype="bandpass", fs=SAMPLE_RATE, output="sos"))
    return _fit(signal.sosfilt(np.concatenate(sections), audio))


def compression(audio: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(N,) -> (N,): broadcast compressor + make-up gain + soft limiter, random threshold and ratio."""
    return compress(audio.astype(np.float32), float(rng.uniform(*COMP_THRESHOLD_DBFS)), float(rng.uniform(*COMP_RATIO)))


def additive_noise(audio: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(N,) -> (N,): pinkish noise at a random SNR below the programme's RMS."""
    level = rms_dbfs(audio) - float(rng.uniform(*NOISE_SNR_DB))
    hiss = noise(rng, len(audio) / SAMPLE_RATE + 0.01, level)[: len(audio)]
    return _fit(audio + np.pad(hiss, (0, len(audio) - len(hiss))))


def lossy_codec(audio: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(N,) -> (N,): round trip through a low-bitrate codec of `coverwatch.evaluation.simulate.CODECS`."""
    names = sorted(CODECS)
    return _fit(codec_roundtrip(audio.astype(np.float32), names[int(rng.integers(len(names)))]))


Degradation = Callable[[np.ndarray, np.random.Generator], np.ndarray]
DEGRADATIONS: dict[str, Degradation] = {  # application order of a chain
    "reverb": reverb,
    "eq": eq,
    "compression": compression,
    "noise": additive_noise,
    "codec": lossy_codec,
}


def _fit(audio: np.ndarray) -> np.ndarray:
    """float32 copy, scaled down to PEAK_LEVEL if it would clip."""
    peak = float(np.max(np.abs(audio))) if len(audio) else 0.0
    scale = PEAK_LEVEL / peak if peak > 1.0 else 1.0
    return (np.asarray(audio, np.float64) * scale).astype(np.float32)


def _seeded(seed: int, name: str) -> np.random.Generator:
    """Generator for one degradation of a chain: depends on (seed, name) only."""
    return np.random.default_rng(int.from_bytes(hashlib.sha256(f"degrade\x1f{seed}\x1f{name}".encode()).digest()[:8], "big"))


def parse_chain(text: str) -> tuple[str, ...]:
    """Chain text to names in application order: "codec+reverb" -> ("reverb", "codec"), "" -> ()."""
    names = tuple(name for name in text.split("+") if name)
    unknown = [name for name in names if name not in DEGRADATIONS]
    if unknown:
        raise ValueError(f"unknown degradation(s) {unknown}; known: {', '.join(DEGRADATIONS)}")
    return tuple(name for name in DEGRADATIONS if name in names)


def random_chain(rng: np.random.Generator) -> tuple[str, ...]:
    """A non-empty chain: each degradation with probability 1/2, at least one."""
    names = tuple(name for name in DEGRADATIONS if rng.random() < 0.5)
    return names or (list(DEGRADATIONS)[int(rng.integers(len(DEGRADATIONS)))],)


def degrade(audio: np.ndarray, chain: Sequence[str], seed: int) -> np.ndarray:
    """(N,) float32 -> (N,) float32: `chain` applied in `DEGRADATIONS` order, parameters from `seed`."""
    assert audio.ndim == 1, audio.shape
    out = np.asarray(audio, np.float32)
    for name in parse_chain("+".join(chain)):
        out = DEGRADATIONS[name](out, _seeded(seed, name))
    assert len(out) == len(audio) and np.isfinite(out).all(), chain
    return out
