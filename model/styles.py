"""Arrangement styles for training: a second arranger, written apart from `render.arrange`.

`render.arrange` plays every training version the same way: the melody on top, one
triad a bar (the tune's own `Tune.chords`), a root-and-fifth bass, block chords on the
pulse and one drum groove. A model trained only on that learns those habits. This
arranger changes what `render.arrange` keeps fixed:

- **harmony**: its own harmonisation, one chord per bar, half bar or pulse, scored from
  the melody with a root-motion prior (falling fifths, stepwise) and, in "free" mode,
  sampled rather than maximised, so versions re-harmonise the tune differently;
  voicings follow the previous chord by the smallest movement instead of close position;
- **texture**: sustained pads, broken-chord arpeggios, finger-picking, off-beat
  skanks, power chords, octave bass lines and four-part hymn writing;
- **where the tune sits**: on top, in an inner voice under a descant, in the bass under
  the chords, doubled an octave away, or handed between two instruments by phrase;
- **counter-line**: a second line of chord tones moving against the melody;
- **rhythm**: melody notes anticipated (syncopated) or laid back, several drum grooves
  with fills, human timing and velocity spread, slow tempo drift (rubato), dynamics
  swelling over a pass.

The leave-out arranger (`coverwatch.model.leaveout`) stays separate from both. Some of its
categories have counterparts here (re-harmonisation, arpeggios, a counter-line), written
with other rules, so a model trained on this arranger's output should be judged on the
real tune variants and the simulated broadcast as well as on the leave-out set.

Times are in beats (quarter notes) until `arrange_styled` maps them to seconds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pretty_midi

from coverwatch.model.render import (
    BASS_PROGRAMS,
    MELODY_PROGRAMS,
    SCALES,
    Arrangement,
    Note,
    Tune,
    _melody_shift,
    _ornament,
    fold_shift,
)

HARMONY_RATES = ("bar", "half", "pulse")  # how often the chord changes
HARMONY_MODES = ("best", "free")  # best-scoring chord, or one sampled from the scores
TEXTURES = ("pad", "arpeggio", "fingerpick", "offbeat", "power", "octave_bass", "hymn")
MELODY_ROLES = ("lead", "inner", "bass", "doubled", "shared")
MELODY_RHYTHMS = ("straight", "anticipate", "laid_back")
GROOVES = ("none", "backbeat", "four_floor", "shuffle", "brushes", "toms")

# GM programs (0-based) per job; drawn per version.
PAD_PROGRAMS = (16, 19, 48, 49, 50, 52, 88, 89, 91, 94)
PLUCK_PROGRAMS = (0, 4, 6, 11, 24, 25, 46, 105, 107)
STAB_PROGRAMS = (0, 2, 4, 16, 24, 27, 61)
POWER_PROGRAMS = (27, 29, 30)
LOW_MELODY_PROGRAMS = (32, 33, 42, 43, 58, 70, 71)  # bass-register instruments that can carry a tune

ACCOMP_RANGE = (48, 72)  # chord voicings stay in this MIDI range (the tune moves when it is low)
HIGH_ACCOMP_RANGE = (67, 91)  # ... and here when the tune is in an inner voice or the bass
INNER_RANGE = (50, 67)  # median pitch of a tune in an inner voice
BASS_MELODY_RANGE = (38, 55)  # median pitch of a tune in the bass
BASS_REGISTER = 33  # bass roots lie in BASS_REGISTER .. BASS_REGISTER + 11
ACCOMP_LEVEL = 0.6  # accompaniment velocity relative to the melody
COUNTER_LEVEL = 0.75
DRUM_LEVEL = 0.55
ROOT_MOTION_BONUS = {5: 0.35, 7: 0.15, 2: 0.1, 10: 0.1}  # root up a fourth (falling fifth), up a fifth, steps
SAMPLING_TEMPERATURE = 0.35  # "free" harmony: softmax temperature on the chord scores
ANTICIPATION = 0.5  # of a pulse: how early an anticipated bar-line note starts
LAY_BACK = 0.15  # of a pulse: how late a laid-back note starts
MAX_HUMANISE_S = 0.02  # timing spread (standard deviation) at most
MAX_RUBATO = 0.08  # tempo drifts by at most +-8 %
SWELL = (0.8, 1.1)  # velocity factor from the start to the end of a pass

Event = tuple[str, int, float, float, float]  # (part, MIDI pitch, start beat, duration beats, level)


@dataclass(frozen=True)
class Style:
    """How this arranger plays one version (drawn by `random_style`)."""

    harmony_rate: str  # one of HARMONY_RATES
    harmony_mode: str  # one of HARMONY_MODES
    texture: str  # one of TEXTURES
    melody_role: str  # one of MELODY_ROLES
    melody_rhythm: str  # one of MELODY_RHYTHMS
    counter_line: bool
    groove: str  # one of GROOVES
    texture_program: int
    second_program: int  # counter-line, doubling or shared-melody instrument
    bass_program: int
    humanise_s: float  # timing spread (standard deviation), seconds
    rubato: float  # relative tempo drift amplitude
    rubato_period_beats: float
    seed: int  # harmony sampling, humanising and rubato phase

    @property
    def name(self) -> str:
        """A short label for manifests: texture, melody role and extras."""
        extras = [self.harmony_mode + "-" + self.harmony_rate]
        if self.counter_line:
            extras.append("counter")
        if self.groove != "none":
            extras.append(self.groove)
        return "+".join(["styled", self.texture, self.melody_role, *extras])


def _texture_programs(texture: str) -> tuple[int, ...]:
    return {
        "pad": PAD_PROGRAMS, "hymn": PAD_PROGRAMS + (19, 20), "arpeggio": PLUCK_PROGRAMS, "fingerpick": PLUCK_PROGRAMS[4:] + (0,),
        "offbeat": STAB_PROGRAMS, "power": POWER_PROGRAMS, "octave_bass": PAD_PROGRAMS + STAB_PROGRAMS,
    }[texture]  # fmt: skip


def random_style(rng: np.random.Generator, avoid: Sequence[Style] = ()) -> Style:
    """Draw a style; texture and melody role differ from those in `avoid` while any is unused."""
    texture = _pick_fresh(rng, TEXTURES, {s.texture for s in avoid})
    role = _pick_fresh(rng, MELODY_ROLES, {s.melody_role for s in avoid}, weights=(0.35, 0.2, 0.1, 0.2, 0.15))
    return Style(
        harmony_rate=str(rng.choice(HARMONY_RATES, p=(0.45, 0.4, 0.15))),
        harmony_mode=str(rng.choice(HARMONY_MODES)),
        texture=texture,
        melody_role=role,
        melody_rhythm=str(rng.choice(MELODY_RHYTHMS, p=(0.5, 0.3, 0.2))),
        counter_line=bool(rng.random() < 0.35),
        groove=str(rng.choice(GROOVES, p=(0.3, 0.2, 0.15, 0.15, 0.1, 0.1))),
        texture_program=int(rng.choice(_texture_programs(texture))),
        second_program=int(rng.choice(MELODY_PROGRAMS)),
        bass_program=int(rng.choice(BASS_PROGRAMS)),
        humanise_s=round(float(rng.uniform(0.0, MAX_HUMANISE_S)), 4),
        rubato=round(float(rng.uniform(0.0, MAX_RUBATO)) if rng.random() < 0.5 else 0.0, 4),
        rubato_period_beats=round(float(rng.uniform(8.0, 32.0)), 2),
        seed=int(rng.integers(2**31)),
    )


def _pick_fresh(rng: np.random.Generator, options: Sequence[str], used: set[str], weights: Sequence[float] | None = None) -> str:
    """A random option not in `used` (weighted), or any option once all are used."""
    pool = [i for i, option in enumerate(options) if option not in used] or list(range(len(options)))
    p = np.array([1.0 if weights is None else weights[i] for i in pool])
    return options[pool[int(rng.choice(len(pool), p=p / p.sum()))]]


# --- harmony ------------------------------------------------------------------------


def diatonic_triads(tune: Tune) -> list[tuple[int, ...]]:
    """The key's triads on degrees I..VI as pitch classes (root first); minor's V is major."""
    scale = [(tune.key_tonic + step) % 12 for step in SCALES[tune.key_mode]]
    triads = [(scale[d], scale[(d + 2) % 7], scale[(d + 4) % 7]) for d in range(6)]
    if tune.key_mode == "minor":
        triads[4] = (triads[4][0], (triads[4][0] + 4) % 12, triads[4][2])  # raised leading tone
    return triads


def harmony_spans(tune: Tune, rate: str) -> list[tuple[float, float]]:
    """[(start, end) beats] of the chords: bars, halves of even bars, or pulses."""
    spans = []
    for start, end in zip(tune.bars[:-1], tune.bars[1:]):
        pulses = max(1, round((end - start) / tune.pulse))
        parts = {"bar": 1, "half": 2 if pulses % 2 == 0 else 1, "pulse": pulses}[rate]
        step = (end - start) / parts
        spans += [(start + i * step, start + (i + 1) * step) for i in range(parts)]
    return spans


def harmonise(tune: Tune, style: Style, rng: np.random.Generator) -> list[tuple[float, float, tuple[int, ...]]]:
    """[(start, end, triad pitch classes)]: a chord per span, scored from the melody.

    A triad scores the melody's duration on its tones (a note at the span's start
    counts 1.5x) minus half the duration off them, plus `ROOT_MOTION_BONUS` for the
    root's move from the previous chord; the last span prefers the tonic. "best" takes
    the top score, "free" samples from a softmax at `SAMPLING_TEMPERATURE`.
    """
    triads = diatonic_triads(tune)
    out: list[tuple[float, float, tuple[int, ...]]] = []
    spans = harmony_spans(tune, style.harmony_rate)
    for index, (a, b) in enumerate(spans):
        on, total = np.zeros(len(triads)), 0.0
        for pitch, start, duration in tune.notes:
            overlap = min(b, start + duration) - max(a, start)
            if overlap <= 0:
                continue
            weight = overlap * (1.5 if abs(start - a) < 1e-6 else 1.0)
            total += weight
            on += [weight if pitch % 12 in triad else 0.0 for triad in triads]
        score = (on - 0.5 * (total - on)) / max(total, 1e-6)
        if out:
            previous_root = out[-1][2][0]
            score += [ROOT_MOTION_BONUS.get((t[0] - previous_root) % 12, 0.0) for t in triads]
        if index == len(spans) - 1:
            score[0] += 0.5
        if style.harmony_mode == "best":
            pick = int(np.argmax(score))
        else:
            p = np.exp((score - score.max()) / SAMPLING_TEMPERATURE)
            pick = int(rng.choice(len(triads), p=p / p.sum()))
        out.append((a, b, triads[pick]))
    return out


def voice(triad: Sequence[int], previous: Sequence[int] | None, low: int, high: int) -> list[int]:
    """MIDI pitches of `triad` in close position within [low, high]: the inversion closest
    (sum of moves) to `previous`, the lowest one without a previous chord."""
    candidates = []
    for base in range(low, high - 10):
        pitches = sorted(base + (pc - base) % 12 for pc in triad)
        if pitches[-1] <= high:
            candidates.append(pitches)
    if previous is None:
        return candidates[0]
    return min(candidates, key=lambda pitches: sum(abs(p - q) for p, q in zip(pitches, previous)))


def bass_note(pitch_class: int) -> int:
    return BASS_REGISTER + (pitch_class - BASS_REGISTER) % 12


# --- parts (beats) ------------------------------------------------------------------


def texture_events(tune: Tune, style: Style, chords, transpose: int, accomp_range: tuple[int, int]) -> list[Event]:
    """Accompaniment events of one pass for `style.texture` over the chord spans."""
    events: list[Event] = []
    previous = None
    pulse = tune.pulse
    for a, b, triad in chords:
        triad = tuple((pc + transpose) % 12 for pc in triad)
        span = b - a
        pitches = voice(triad, previous, *accomp_range)
        previous = pitches
        root = bass_note(triad[0])
        if style.texture == "pad":
            events += [("texture", p, a, span, 0.8) for p in pitches]
        elif style.texture == "hymn":  # four parts: the tune, two inner voices and a bass on the root
            events += [("texture", p, a, span * 0.95, 0.85) for p in pitches[:2]]
            events.append(("bass", root + 12, a, span * 0.95, 0.9))
        elif style.texture == "arpeggio":
            step = pulse / (3 if pulse == 1.5 else 2 if span < 2 * pulse else 4)
            ladder = pitches + [p + 12 for p in pitches]
            n = max(1, round(span / step))
            up_down = ladder + ladder[-2:0:-1]
            events += [("texture", up_down[i % len(up_down)], a + i * step, step * 1.5, 0.75) for i in range(n)]
        elif style.texture == "fingerpick":
            n = max(1, round(span / (pulse / 2)))
            for i in range(n):
                at = a + i * pulse / 2
                if i % 2 == 0:  # alternating bass: root, then fifth
                    events.append(("bass", root if (i // 2) % 2 == 0 else bass_note(triad[2]), at, pulse * 0.9, 0.9))
                else:
                    events.append(("texture", pitches[(i // 2) % len(pitches) - 1], at, pulse * 0.6, 0.7))
        elif style.texture == "offbeat":
            n = max(1, round(span / pulse))
            events += [("texture", p, a + (i + 0.5) * pulse, pulse * 0.3, 0.8) for i in range(n) for p in pitches]
            events.append(("bass", root, a, span * 0.9, 0.9))
        elif style.texture == "power":
            low = accomp_range[0] + (triad[0] - accomp_range[0]) % 12  # root, fifth, octave from the range's floor
            n = max(1, round(span / (pulse / 2)))
            events += [("texture", p, a + i * pulse / 2, pulse * 0.45, 0.8) for i in range(n) for p in (low, low + 7, low + 12)]
        elif style.texture == "octave_bass":
            n = max(1, round(span / (pulse / 2)))
            events += [("bass", root + 12 * (i % 2), a + i * pulse / 2, pulse * 0.4, 0.9) for i in range(n)]
            events += [("texture", p, a, span, 0.55) for p in pitches]
    return events


def counter_events(chords, melody: Sequence[Note], transpose: int, pulse: float, center: int) -> list[Event]:
    """A counter-line: one chord tone per pulse near `center`, stepping against the melody's direction."""
    events: list[Event] = []
    previous_pitch, previous_melody = center, None
    for a, b, triad in chords:
        classes = {(pc + transpose) % 12 for pc in triad}
        n = max(1, round((b - a) / pulse))
        for i in range(n):
            at = a + i * pulse
            sounding = [p for p, s, d in melody if s <= at + 1e-6 < s + d]
            direction = 0 if not sounding or previous_melody is None else int(np.sign(sounding[0] - previous_melody))
            if sounding:
                previous_melody = sounding[0]
            options = [p for p in range(center - 9, center + 10) if p % 12 in classes and p != previous_pitch]
            wanted = previous_pitch - 3 * direction  # contrary motion, pulled back toward the centre
            wanted += int(np.sign(center - wanted)) if abs(center - wanted) > 6 else 0
            pitch = min(options, key=lambda p: abs(p - wanted))
            events.append(("counter", pitch, at, pulse * 0.95, 1.0))
            previous_pitch = pitch
    return events


# GM percussion keys
KICK, SIDE_STICK, SNARE, CLOSED_HAT, OPEN_HAT, LOW_TOM, HIGH_TOM, RIDE, TAMBOURINE, CRASH = 36, 37, 38, 42, 46, 45, 50, 51, 54, 49


def groove_events(tune: Tune, groove: str) -> list[Event]:
    """Drum events of one pass; the last full bar gets a fill, the first beat of the pass a crash."""
    if groove == "none":
        return []
    events: list[Event] = []
    pulse = tune.pulse
    bars = list(zip(tune.bars[:-1], tune.bars[1:]))
    for index, (a, b) in enumerate(bars):
        pulses = max(1, round((b - a) / pulse))
        if index == len(bars) - 1 and pulses >= 2:  # fill: snare and toms on every half pulse
            events += [("drums", (SNARE, HIGH_TOM, LOW_TOM)[i % 3], a + i * pulse / 2, 0.1, 0.9) for i in range(2 * pulses)]
            continue
        for i in range(pulses):
            at = a + i * pulse
            strong = i == 0 or (pulses % 2 == 0 and i == pulses // 2)
            if groove == "backbeat":
                events.append(("drums", KICK if strong else SNARE, at, 0.1, 1.0))
                events += [("drums", CLOSED_HAT, at + h, 0.1, 0.5) for h in (0, pulse / 2)]
            elif groove == "four_floor":
                events += [("drums", KICK, at, 0.1, 1.0), ("drums", OPEN_HAT, at + pulse / 2, 0.1, 0.5)]
            elif groove == "shuffle":
                events.append(("drums", KICK if strong else SNARE, at, 0.1, 0.9))
                events += [("drums", CLOSED_HAT, at + h, 0.1, 0.5) for h in (0, 2 * pulse / 3)]
            elif groove == "brushes":
                events += [("drums", RIDE, at, 0.2, 0.6)] + ([] if strong else [("drums", SIDE_STICK, at, 0.1, 0.7)])
            elif groove == "toms":
                events += [("drums", LOW_TOM if strong else HIGH_TOM, at, 0.1, 0.8), ("drums", TAMBOURINE, at + pulse / 2, 0.1, 0.5)]
    if bars:
        events.append(("drums", CRASH, 0.0, 0.5, 0.7))
    return events


def vary_rhythm(notes: Sequence[Note], tune: Tune, rhythm: str) -> list[Note]:
    """"anticipate": bar-line notes (not the first) start `ANTICIPATION` pulse early, the note
    before shortened to make room; "laid_back": notes off the bar line start `LAY_BACK` pulse late."""
    if rhythm == "straight":
        return list(notes)
    out = [list(note) for note in notes]
    for i in range(1, len(out)):
        _, start, duration = out[i]
        if rhythm == "anticipate" and tune.on_bar_line(start):
            shift = min(ANTICIPATION * tune.pulse, out[i - 1][2] / 2)
        elif rhythm == "laid_back" and not tune.on_bar_line(start):
            shift = -min(LAY_BACK * tune.pulse, duration / 2)
        else:
            continue
        out[i][1], out[i][2] = start - shift, duration + shift
        out[i - 1][2] = out[i][1] - out[i - 1][1]
    return [(int(p), float(s), float(d)) for p, s, d in out]


# --- the performance ------------------------------------------------------------------


def tempo_map(style: Style, tempo_bpm: float, total_beats: float, rng: np.random.Generator):
    """beats -> seconds under slow sinusoidal tempo drift (`style.rubato`, none at 0)."""
    grid = np.linspace(0.0, total_beats + 1.0, int((total_beats + 1.0) * 16) + 2)
    phase = float(rng.uniform(0, 2 * math.pi))
    tempo = tempo_bpm * (1.0 + style.rubato * np.sin(2 * math.pi * grid / style.rubato_period_beats + phase))
    seconds = np.concatenate([[0.0], np.cumsum(np.diff(grid) * 60.0 / tempo[:-1])])
    return lambda beats: float(np.interp(beats, grid, seconds))


def arrange_styled(tune: Tune, arrangement: Arrangement, max_seconds: float | None = None, *, style: Style) -> pretty_midi.PrettyMIDI:
    """The MIDI performance of `tune` with `arrangement`'s key, tempo, programs, ornament,
    velocity and repeats, played in `style`. Notes from `max_seconds` on are dropped."""
    rng = np.random.default_rng(style.seed)
    melody = vary_rhythm(_ornament(tune.notes, tune, arrangement.ornament), tune, style.melody_rhythm)
    shift = _melody_shift(melody, arrangement)
    accomp_range = ACCOMP_RANGE
    melody_program = arrangement.program
    if style.melody_role == "inner":
        shift, accomp_range = fold_shift(melody, shift, *INNER_RANGE), HIGH_ACCOMP_RANGE
    elif style.melody_role == "bass":
        shift, accomp_range = fold_shift(melody, shift, *BASS_MELODY_RANGE), HIGH_ACCOMP_RANGE
        melody_program = int(rng.choice(LOW_MELODY_PROGRAMS))
    chords = harmonise(tune, style, rng)
    pass_events: list[Event] = []
    doubling = 12 if float(np.median([p for p, _, _ in melody])) + shift < 70 else -12  # an octave above a low tune, below a high one
    for pitch, start, duration in melody:
        part = "melody"
        if style.melody_role == "shared" and (tune.bar_of(start) // 2) % 2 == 1:
            part = "second"
        pass_events.append((part, pitch + shift, start, duration, 1.0))
        if style.melody_role == "doubled":
            pass_events.append(("second", pitch + shift + doubling, start, duration, 0.7))
    texture = texture_events(tune, style, chords, arrangement.transpose, accomp_range)
    if style.melody_role == "bass":
        texture = [event for event in texture if event[0] != "bass"]  # the tune is the bass line
    pass_events += texture
    if style.counter_line:
        center = accomp_range[1] - 4 if style.melody_role in ("inner", "bass") else accomp_range[1] - 2
        pass_events += counter_events(chords, [(p + shift, s, d) for p, s, d in melody], arrangement.transpose, tune.pulse, center)
    pass_events += groove_events(tune, style.groove)

    total_beats = arrangement.repeats * tune.pass_beats
    seconds = tempo_map(style, arrangement.tempo_bpm, total_beats, rng)
    programs = {
        "melody": melody_program, "second": style.second_program, "counter": style.second_program,
        "texture": style.texture_program, "bass": style.bass_program,
    }  # fmt: skip
    tracks = {part: pretty_midi.Instrument(program=program, name=part) for part, program in programs.items()}
    tracks["drums"] = pretty_midi.Instrument(program=0, is_drum=True, name="drums")
    levels = {"melody": 1.0, "second": 1.0, "counter": COUNTER_LEVEL, "texture": ACCOMP_LEVEL, "bass": ACCOMP_LEVEL, "drums": DRUM_LEVEL}
    for repeat in range(arrangement.repeats):
        offset = repeat * tune.pass_beats
        for part, pitch, start, duration, level in pass_events:
            begin = offset + start
            on = max(0.0, seconds(begin) + float(rng.normal(0.0, style.humanise_s)))
            off = max(on + 0.03, seconds(begin + duration))
            if max_seconds is not None:
                if on >= max_seconds:
                    continue
                off = min(off, max_seconds)
            swell = SWELL[0] + (SWELL[1] - SWELL[0]) * (start / max(tune.pass_beats, 1e-6))
            velocity = arrangement.velocity * levels[part] * level * swell * float(rng.uniform(0.9, 1.1))
            tracks[part].notes.append(pretty_midi.Note(int(np.clip(round(velocity), 1, 127)), int(np.clip(pitch, 0, 127)), on, off))
    midi = pretty_midi.PrettyMIDI(initial_tempo=arrangement.tempo_bpm)
    midi.instruments = [track for track in tracks.values() if track.notes]
    return midi
