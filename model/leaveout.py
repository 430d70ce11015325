"""Leave-out cover sets: material that differs from training in every axis at once.

The project's own validation renders held-out tunes with the training pipeline's
arranger and a SoundFont synthesizer, so it shares everything with training but the tune
and the SoundFont, and overstates held-out accuracy about two-fold. This set changes all
of it together:

- **collection**: the music21 corpus's `miscFolk` ABC collections (American fife tunes,
  Northumbrian minstrelsy), never used for training (training reads `essenFolksong` and
  `nottingham-dataset`; the reserved ones are refused as everywhere);
- **arrangement**: an arranger written apart from `coverwatch.model.render` with other
  logic: a re-harmonisation per half bar from a wider chord set (ii, iii, vi, sevenths)
  chosen by a different rule, and accompaniments the training arranger does not have
  (drone, oom-pah, Alberti arpeggios, a counter-melody in thirds, a walking bass), plus
  melody octave, long-short (dotted) rhythm, grace notes, trills and staccato;
- **synthesis**: no SoundFont at all: notes are synthesised here (Karplus-Strong plucked
  strings, additive organ, two-operator FM, band-limited square and sawtooth voices, and
  noise/sine-sweep drums);
- **effects**: chains the training degradations never apply (telephone band-pass,
  tremolo, flanger, bit-crusher, tape wow, mains hum).

Each tune is one group of `VERSIONS` versions, each with its own key, tempo, arrangement,
voices and effects. Output: FLAC files and a manifest in the cover-dataset format
(`MANIFEST_COLUMNS`, every row in the `val` split) for `coverwatch evaluate`.

Letters: N samples.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

from coverwatch.model.dataset import MANIFEST_COLUMNS, _csv_text, _rng
from coverwatch.model.render import LEAVEOUT_COLLECTIONS, Note, Tune, iter_tunes, write_text_atomic
from coverwatch.streamer.frontend.audio import SAMPLE_RATE

log = logging.getLogger(__name__)

VERSIONS = 4
MAX_SECONDS = 45.0  # each version: whole passes of the tune until at least MIN_SECONDS, cut here
MIN_SECONDS = 25.0
TEMPO_RANGE = (0.7, 1.4)  # x the tune's natural tempo
TRANSPOSE = (-5, 6)  # semitones, inclusive
NYQUIST = SAMPLE_RATE / 2.0

# Chords as semitones above the tonic, per mode; sevenths included. Re-harmonisation picks,
# per half bar, the chord covering most melody duration, ties to the one *least* used so far
# (the training arranger keeps one triad a bar and prefers I, V, IV).
CHORDS = {
    "major": ((0, 4, 7), (2, 5, 9), (4, 7, 11), (5, 9, 0), (7, 11, 2, 5), (9, 0, 4), (2, 5, 9, 0), (9, 0, 4, 7)),
    "minor": ((0, 3, 7), (3, 7, 10), (5, 8, 0), (7, 11, 2, 5), (8, 0, 3), (10, 2, 5), (5, 8, 0, 3), (0, 3, 7, 10)),
}
ACCOMPANIMENTS = ("drone", "oompah", "alberti", "thirds", "walking", "block")
ORNAMENTS = ("none", "grace", "trill", "staccato")
VOICES = ("pluck", "organ", "fm", "square", "saw")
EFFECTS = ("telephone", "tremolo", "flanger", "bitcrush", "wow", "hum")


@dataclass(frozen=True)
class Version:
    transpose: int
    tempo: float  # x natural tempo
    octave: int  # melody octave shift
    dotted: bool  # long-short pairs of equal notes
    ornament: str
    accompaniment: str
    melody_voice: str
    accompaniment_voice: str
    drums: bool
    effects: tuple[str, ...]


def random_version(rng: np.random.Generator) -> Version:
    return Version(
        transpose=int(rng.integers(TRANSPOSE[0], TRANSPOSE[1] + 1)),
        tempo=float(rng.uniform(*TEMPO_RANGE)),
        octave=int(rng.choice([-1, 0, 0, 1])),
        dotted=bool(rng.random() < 0.3),
        ornament=str(rng.choice(ORNAMENTS)),
        accompaniment=str(rng.choice(ACCOMPANIMENTS)),
        melody_voice=str(rng.choice(VOICES)),
        accompaniment_voice=str(rng.choice(VOICES)),
        drums=bool(rng.random() < 0.4),
        effects=tuple(str(e) for e in rng.choice(EFFECTS, size=int(rng.integers(0, 3)), replace=False)),
    )


# --- arranging (beats) ------------------------------------------------------------------

Event = tuple[int, float, float, float]  # (MIDI pitch, start beat, duration in beats, velocity 0..1)


def reharmonise(tune: Tune, rng: np.random.Generator) -> list[tuple[float, float, tuple[int, ...]]]:
    """[(start beat, end beat, chord pitch classes)] one chord per half bar."""
    spans = []
    for a, b in zip(tune.bars[:-1], tune.bars[1:]):
        mid = a + (b - a) / 2.0
        spans += [(a, mid), (mid, b)] if b - a >= 2.0 else [(a, b)]
    chords = [tuple((tune.key_tonic + s) % 12 for s in c) for c in CHORDS[tune.key_mode]]
    used = np.zeros(len(chords))
    out = []
    for a, b in spans:
        weight = np.zeros(12)
        for pitch, start, duration in tune.notes:
            overlap = min(b, start + duration) - max(a, start)
            if overlap > 0:
                weight[pitch % 12] += overlap
        score = np.array([weight[list(c)].sum() / math.sqrt(len(c)) for c in chords]) + 1e-3 * rng.random(len(chords))
        best = np.flatnonzero(score >= score.max() - 1e-2)
        pick = int(best[np.argmin(used[best])])
        used[pick] += 1
        out.append((a, b, chords[pick]))
    return out


def _near(pc: int, centre: int) -> int:
    """The MIDI pitch of pitch class `pc` closest to `centre`."""
    return centre + ((pc - centre + 6) % 12) - 6


def dotted(notes: Sequence[Note]) -> list[Note]:
    """Pairs of equal notes (a beat or shorter) played long-short, 3:1."""
    out, i = [], 0
    while i < len(notes):
        pitch, start, duration = notes[i]
        if i + 1 < len(notes) and duration <= 1.0 and math.isclose(duration, notes[i + 1][2]) and math.isclose(start + duration, notes[i + 1][1]):
            out += [(pitch, start, duration * 1.5), (notes[i + 1][0], start + duration * 1.5, duration * 0.5)]
            i += 2
        else:
            out.append(notes[i])
            i += 1
    return out


def ornamented(notes: Sequence[Note], version: Version, scale_step: int = 2) -> list[Event]:
    """Melody events with the version's rhythm and ornaments."""
    events: list[Event] = []
    for pitch, start, duration in dotted(notes) if version.dotted else notes:
        if version.ornament == "grace" and duration >= 1.0:
            events += [(pitch + scale_step, start, 0.125, 0.6), (pitch, start + 0.125, duration - 0.125, 0.8)]
        elif version.ornament == "trill" and duration >= 1.5:
            events += [(pitch + (scale_step if k % 2 else 0), start + k * 0.125, 0.125, 0.7) for k in range(int(duration / 0.125))]
        elif version.ornament == "staccato":
            events.append((pitch, start, duration * 0.5, 0.8))
        else:
            events.append((pitch, start, duration, 0.8))
    return events


def accompaniment(tune: Tune, version: Version, chords, centre: int) -> list[Event]:
    """Accompaniment events around MIDI pitch `centre` (before transposition)."""
    style, out = version.accompaniment, []
    beat = tune.pulse
    for a, b, chord in chords:
        root = _near(chord[0], centre - 12)
        tones = sorted(_near(pc, centre) for pc in chord)
        if style == "drone":
            if a in tune.bars:  # tonic and fifth, one per bar
                end = tune.bars[min(tune.bars.index(a) + 1, len(tune.bars) - 1)]
                tonic = _near(tune.key_tonic, centre - 12)
                out += [(tonic, a, end - a, 0.5), (tonic + 7, a, end - a, 0.4)]
        elif style == "oompah":
            t, k = a, 0
            while t < b - 1e-6:
                out += [(root, t, beat * 0.5, 0.6)] if k % 2 == 0 else [(p, t, beat * 0.5, 0.45) for p in tones]
                t, k = t + beat, k + 1
        elif style == "alberti":
            order = [tones[0], tones[-1], tones[len(tones) // 2], tones[-1]]
            t, k = a, 0
            while t < b - 1e-6:
                out.append((order[k % 4] - 12, t, 0.5, 0.45))
                t, k = t + 0.5, k + 1
        elif style == "walking":
            t, k = a, 0
            steps = [0, 2, 4, 5] if 4 in [(pc - chord[0]) % 12 for pc in chord] else [0, 2, 3, 5]
            while t < b - 1e-6:
                out.append((root + steps[k % 4], t, beat * 0.9, 0.6))
                t, k = t + beat, k + 1
        elif style == "block":
            t = a
            while t < b - 1e-6:
                out += [(p - 12, t, beat * 0.8, 0.4) for p in tones]
                t += beat
    if style == "thirds":  # a counter-voice a diatonic third below the melody
        scale = [(tune.key_tonic + s) % 12 for s in ((0, 2, 4, 5, 7, 9, 11) if tune.key_mode == "major" else (0, 2, 3, 5, 7, 8, 10))]
        for pitch, start, duration in tune.notes:
            below = [pitch - d for d in (3, 4) if (pitch - d) % 12 in scale]
            out.append((below[0] if below else pitch - 3, start, duration, 0.5))
    return out


def drum_events(tune: Tune, end_beat: float) -> list[tuple[str, float]]:
    """[(kind, beat)]: kick on each bar line, hat on every beat."""
    hits, t = [], 0.0
    while t < end_beat:
        hits.append(("kick" if any(math.isclose(t % tune.pass_beats, b) for b in tune.bars) else "hat", t))
        t += tune.pulse
    return hits


# --- synthesis ------------------------------------------------------------------------


def midi_hz(pitch: float) -> float:
    return 440.0 * 2.0 ** ((pitch - 69) / 12.0)


def _envelope(n: int, attack_s: float, release_s: float, decay_per_s: float = 0.0) -> np.ndarray:
    t = np.arange(n) / SAMPLE_RATE
    env = np.minimum(1.0, t / max(attack_s, 1e-4)) * np.exp(-decay_per_s * t)
    release = min(n, int(release_s * SAMPLE_RATE))
    if release:
        env[-release:] *= np.linspace(1.0, 0.0, release)
    return env


def _additive(f0: float, n: int, amplitudes: Sequence[float], harmonics: Sequence[int]) -> np.ndarray:
    t = np.arange(n) / SAMPLE_RATE
    out = np.zeros(n)
    for h, a in zip(harmonics, amplitudes):
        if h * f0 < NYQUIST * 0.9:
            out += a * np.sin(2 * np.pi * h * f0 * t)
    return out


def _pluck(f0: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """Karplus-Strong: a noise burst in a delay line of one period, averaged each pass
    (y[n] = g (y[n-P] + y[n-P-1]) / 2, a period of samples at a time)."""
    period = max(2, int(round(SAMPLE_RATE / f0)))
    out = np.zeros(n + 2 * period + 1)
    burst = rng.uniform(-1, 1, period + 1)
    out[: period + 1] = burst - burst.mean()  # the loop passes DC unchanged: without this a pluck thumps
    for start in range(period + 1, len(out), period):
        stop = min(start + period, len(out))
        out[start:stop] = 0.498 * (out[start - period : stop - period] + out[start - period - 1 : stop - period - 1])
    return out[:n]


def synth_note(voice: str, pitch: float, seconds: float, rng: np.random.Generator) -> np.ndarray:
    """One note, (N,) float64 around unit peak."""
    f0, n = midi_hz(pitch), max(1, int(seconds * SAMPLE_RATE))
    if voice == "pluck":
        return _pluck(f0, n, rng) * _envelope(n, 0.002, 0.03)
    if voice == "organ":
        return _additive(f0, n, (1.0, 0.6, 0.4, 0.25, 0.15), (1, 2, 3, 4, 6)) * _envelope(n, 0.02, 0.05) / 2.0
    if voice == "fm":
        t = np.arange(n) / SAMPLE_RATE
        index = 2.5 * np.exp(-3.0 * t)
        return np.sin(2 * np.pi * f0 * t + index * np.sin(2 * np.pi * 2.0 * f0 * t)) * _envelope(n, 0.003, 0.05, 1.5)
    if voice == "square":
        odd = list(range(1, 40, 2))
        return _additive(f0, n, [1.0 / h for h in odd], odd) * _envelope(n, 0.005, 0.02) / 1.2
    if voice == "saw":
        harmonics = list(range(1, 30))
        return _additive(f0, n, [1.0 / h for h in harmonics], harmonics) * _envelope(n, 0.01, 0.05, 0.8) / 1.8
    raise ValueError(f"unknown voice {voice!r}")


def synth_drum(kind: str, rng: np.random.Generator) -> np.ndarray:
    n = int(0.15 * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    if kind == "kick":
        return np.sin(2 * np.pi * (50 + 100 * np.exp(-30 * t)) * t) * np.exp(-20 * t)
    noise = np.diff(rng.uniform(-1, 1, n + 1))  # first difference: a bright noise
    return 0.3 * noise * np.exp(-60 * t)


def mix(events: Sequence[Event], voice: str, seconds_per_beat: float, total: int, rng: np.random.Generator, gain: float) -> np.ndarray:
    out = np.zeros(total)
    for pitch, start, duration, velocity in events:
        a = int(start * seconds_per_beat * SAMPLE_RATE)
        if a >= total:
            continue
        note = synth_note(voice, pitch, duration * seconds_per_beat + 0.05, rng) * velocity
        b = min(total, a + len(note))
        out[a:b] += note[: b - a]
    return gain * out


# --- effects (none of these is used by the training degradations) -----------------------


def _one_pole_lowpass(x: np.ndarray, cutoff_hz: float) -> np.ndarray:
    from scipy.signal import lfilter

    alpha = 1.0 - math.exp(-2 * math.pi * cutoff_hz / SAMPLE_RATE)
    return lfilter([alpha], [1.0, alpha - 1.0], x)


def apply_effect(name: str, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(len(x)) / SAMPLE_RATE
    if name == "telephone":
        from scipy.signal import butter, sosfilt

        return sosfilt(butter(4, [300, 3400], btype="bandpass", fs=SAMPLE_RATE, output="sos"), x)
    if name == "tremolo":
        return x * (1.0 - 0.4 * (0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(3, 7) * t)))
    if name == "flanger":
        delay = (0.001 + 0.002 * (0.5 + 0.5 * np.sin(2 * np.pi * 0.25 * t))) * SAMPLE_RATE
        return 0.7 * x + 0.7 * np.interp(np.arange(len(x)) - delay, np.arange(len(x)), x, left=0.0)
    if name == "bitcrush":
        hold = int(rng.integers(2, 4))
        held = np.repeat(x[::hold], hold)[: len(x)]
        return np.round(held * 24) / 24
    if name == "wow":  # slow pitch drift: read the signal at a wobbling rate
        position = np.arange(len(x)) + 0.004 * SAMPLE_RATE * np.sin(2 * np.pi * 0.6 * t)
        return np.interp(position, np.arange(len(x)), x)
    if name == "hum":
        return x + 0.02 * np.sin(2 * np.pi * 50 * t) + 0.01 * np.sin(2 * np.pi * 150 * t)
    raise ValueError(f"unknown effect {name!r}")


# --- versions and the set ---------------------------------------------------------------


def render_version(tune: Tune, version: Version, rng: np.random.Generator) -> np.ndarray:
    """One version of `tune`, (N,) float32 at SAMPLE_RATE, peak 0.9."""
    seconds_per_beat = 60.0 / (tune.base_tempo_bpm * version.tempo)
    passes = max(1, math.ceil(MIN_SECONDS / (tune.pass_beats * seconds_per_beat)))
    notes = [(p, s + k * tune.pass_beats, d) for k in range(passes) for p, s, d in tune.notes]
    end_beat = passes * tune.pass_beats
    total = int(min(MAX_SECONDS, end_beat * seconds_per_beat + 0.5) * SAMPLE_RATE)
    centre = int(np.median([p for p, _, _ in tune.notes]))
    chords = [(a + k * tune.pass_beats, b + k * tune.pass_beats, c) for k in range(passes) for a, b, c in reharmonise(tune, rng)]
    shift = version.transpose + 12 * version.octave
    melody = [(p + shift, s, d, v) for p, s, d, v in ornamented(notes, version)]
    repeated = Tune(tune.tune_id, tune.title, tuple(notes), tuple(b + k * tune.pass_beats for k in range(passes) for b in tune.bars[:-1]) + (end_beat,),
                    tune.beats_per_bar, tune.pulse, tune.key_tonic, tune.key_mode)  # fmt: skip
    backing = [(p + version.transpose, s, d, v) for p, s, d, v in accompaniment(repeated, version, chords, centre)]
    audio = mix(melody, version.melody_voice, seconds_per_beat, total, rng, 1.0)
    audio += mix(backing, version.accompaniment_voice, seconds_per_beat, total, rng, 0.5)
    if version.drums:
        for kind, beat in drum_events(tune, end_beat):
            a = int(beat * seconds_per_beat * SAMPLE_RATE)
            hit = synth_drum(kind, rng)[: max(0, total - a)]
            audio[a : a + len(hit)] += 0.4 * hit
    for effect in version.effects:
        audio = apply_effect(effect, audio, rng)
    fade = min(len(audio), int(1.0 * SAMPLE_RATE))
    audio[-fade:] *= np.linspace(1.0, 0.0, fade)
    return (0.9 * audio / (np.abs(audio).max() + 1e-9)).astype(np.float32)


def build_leaveout_set(out_dir: Path, groups: int, seed: int = 0, collections: Sequence[str] = LEAVEOUT_COLLECTIONS) -> Path:
    """Render up to `groups` tunes x VERSIONS versions into out_dir; returns the manifest path.

    Reproducible: the same seed and corpus give the same versions (cached files are kept)."""
    out_dir = Path(out_dir)
    (out_dir / "audio").mkdir(parents=True, exist_ok=True)
    tunes = list(iter_tunes(collections))
    order = _rng("leaveout-order", seed).permutation(len(tunes))[:groups]
    rows = []
    for i in tqdm(order, desc="leave-out set", unit="group"):
        tune = tunes[int(i)]
        group = "leaveout-" + tune.tune_id.replace("/", "-")
        for v in range(VERSIONS):
            rng = _rng("leaveout", seed, tune.tune_id, v)
            version = random_version(rng)
            path = out_dir / "audio" / f"{group}-v{v}.flac"
            if not path.exists():
                tmp = path.with_suffix(".tmp.flac")
                sf.write(tmp, render_version(tune, version, rng), SAMPLE_RATE)
                tmp.replace(path)
            rows.append(
                (group, v, str(path), tune.title, "val", "none (numpy synth: " + version.melody_voice + ")", version.transpose,
                 round(tune.base_tempo_bpm * version.tempo, 1), -1, f"{version.accompaniment}; {version.ornament}; fx {'+'.join(version.effects) or 'none'}")
            )  # fmt: skip
    manifest = out_dir / "manifest.csv"
    write_text_atomic(manifest, _csv_text(MANIFEST_COLUMNS, rows))
    log.info("leave-out set: %d groups x %d versions in %s", len(order), VERSIONS, out_dir)
    return manifest
