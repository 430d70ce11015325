"""The incremental CQT equals the offline CQT of the same signal, whatever the chunking."""

import numpy as np
import pytest

from coverwatch.streamer.embed.embedder import Embedder
from coverwatch.streamer.frontend.audio import HOP_LENGTH
from coverwatch.streamer.frontend.decode import StreamResampler
from coverwatch.streamer.frontend.rolling import FrameRing, IncrementalCqt
from tests.conftest import melody, relative_magnitude_error

# Both sides run the same ONNX graph on the same samples; only the span passed per call
# differs, so results agree to float32 rounding of the convolution. Compared in magnitude
# relative to the peak, as in test_export_parity (log values magnify rounding in silence).
STREAM_TOL = 1e-5


@pytest.mark.parametrize("chunk", [1000, 4410, 22050, 100_000])
def test_streaming_frames_equal_offline(random_model_dir, chunk):
    embedder = Embedder(random_model_dir, threads=1)
    audio = melody(7, 12.0)
    offline = embedder.cqt(audio)
    rolling = IncrementalCqt(embedder.cqt, embedder.kernel_length)
    pieces, energies = [], []
    for start in range(0, len(audio), chunk):
        frames, energy = rolling.push(audio[start : start + chunk])
        pieces.append(frames)
        energies.append(energy)
    streamed = np.concatenate(pieces)
    # The tail (< MIN_FRAMES_PER_CALL frames) may still be pending; everything emitted must match.
    assert len(offline) - 8 < len(streamed) <= len(offline)
    diff = relative_magnitude_error(offline[: len(streamed)], streamed)
    print(f"chunk={chunk}: {len(streamed)} frames, max diff {diff:.2e}")
    assert diff < STREAM_TOL
    energy = np.concatenate(energies)
    t = 5
    expected = np.var(audio[t * HOP_LENGTH + embedder.kernel_length - HOP_LENGTH : t * HOP_LENGTH + embedder.kernel_length])
    assert energy[t] == pytest.approx(expected, rel=1e-4)


def test_ring_latest_returns_copies_of_the_newest_frames():
    ring = FrameRing(capacity=10, n_bins=2)
    seen = []
    for size in [3, 4, 7, 1, 12, 5]:
        block = np.arange(len(seen), len(seen) + size, dtype=np.float32)
        seen.extend(block)
        ring.append(np.stack([block, block], axis=1), block)
        for n in range(1, min(10, len(seen)) + 1):
            frames, energy = ring.latest(n)
            assert frames[:, 0].tolist() == seen[-n:] and energy.tolist() == seen[-n:]
            assert ring.mean_energy(n) == pytest.approx(np.mean(seen[-n:]))
    assert ring.filled == 10
    frames, _ = ring.latest(4)
    ring.append(np.full((3, 2), -1.0, np.float32), np.full(3, -1.0, np.float32))
    assert frames[:, 0].tolist() == seen[-4:]  # a window read earlier is not overwritten by later frames


def test_stream_resampler_matches_across_chunkings():
    audio = melody(2, 3.0, rate=44100)
    whole = StreamResampler(44100)
    one = np.concatenate([whole.process(audio), whole.process(np.zeros(0, np.float32), last=True)])
    chunked = StreamResampler(44100)
    parts = [chunked.process(audio[i : i + 777]) for i in range(0, len(audio), 777)]
    parts.append(chunked.process(np.zeros(0, np.float32), last=True))
    two = np.concatenate(parts)
    assert len(one) == len(two) == pytest.approx(len(audio) / 2, abs=2)
    assert np.abs(one - two).max() < 1e-5
