"""Which frame spans of a track become vectors: the segmenting that the index builder
applies to references and `identify` to query files, so both cut audio the same way."""

from __future__ import annotations

WHOLE_TRACK_MAX_S = 600.0  # longer tracks are embedded whole only up to this length


def segment_spans(n_frames: int, segment_frames: int, hop_frames: int) -> list[tuple[int, int]]:
    """[start, end) frame spans of segments covering n_frames; the last ends at n_frames.

    A track shorter than one segment gives the single span (0, n_frames).
    """
    if n_frames <= segment_frames:
        return [(0, n_frames)]
    starts = list(range(0, n_frames - segment_frames + 1, hop_frames))
    if starts[-1] + segment_frames < n_frames:
        starts.append(n_frames - segment_frames)
    return [(s, s + segment_frames) for s in starts]
