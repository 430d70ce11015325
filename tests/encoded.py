"""Compressed audio fixtures written in the test itself: PyAV (FFmpeg's encoders) for the
audio, mutagen for the tags an operator's files carry (title, artist, album, ISRC)."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np

# suffix -> (container format, codec); each is a format a station's music library holds
ENCODINGS = {
    ".mp3": ("mp3", "libmp3lame"),
    ".m4a": ("ipod", "aac"),
    ".wma": ("asf", "wmav2"),
    ".flac": ("flac", "flac"),
    ".ogg": ("ogg", "libopus"),
}


def encode(path: Path, audio: np.ndarray, rate: int, tags: dict[str, str] | None = None) -> Path:
    """(N,) float32 mono -> a compressed file at `path` (format from its suffix), tagged."""
    container_format, codec = ENCODINGS[path.suffix]
    out_rate = 48000 if codec == "libopus" else rate
    with av.open(str(path), "w", format=container_format) as container:
        stream = container.add_stream(codec, rate=out_rate, layout="mono")
        stream.bit_rate = 64000  # wmav2 refuses to open without one
        if codec == "libopus" and out_rate != rate:
            raise ValueError("opus needs 48 kHz input")
        frame_size = stream.codec_context.frame_size or 1024
        samples = np.asarray(audio, dtype=np.float32)
        sample_format = stream.codec_context.format.name
        for start in range(0, len(samples), frame_size):
            piece = samples[start : start + frame_size]
            if sample_format == "s16":
                frame = av.AudioFrame.from_ndarray((np.clip(piece, -1, 1) * 32767).astype(np.int16)[None], format="s16", layout="mono")
            else:
                frame = av.AudioFrame.from_ndarray(piece[None], format="fltp", layout="mono")
            frame.sample_rate = out_rate
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    if tags:
        write_tags(path, tags)
    return path


def write_tags(path: Path, tags: dict[str, str]) -> None:
    """title/artist/album/isrc in each format's own tag fields."""
    import mutagen
    from mutagen.asf import ASF
    from mutagen.easyid3 import EasyID3
    from mutagen.mp4 import MP4, MP4FreeForm

    if path.suffix == ".mp3":
        easy = EasyID3()
        for key, value in tags.items():
            easy[key] = value
        easy.save(path)
    elif path.suffix == ".m4a":
        mp4 = MP4(path)
        names = {"title": "\xa9nam", "artist": "\xa9ART", "album": "\xa9alb"}
        for key, value in tags.items():
            if key == "isrc":
                mp4["----:com.apple.iTunes:ISRC"] = [MP4FreeForm(value.encode())]
            else:
                mp4[names[key]] = [value]
        mp4.save()
    elif path.suffix == ".wma":
        asf = ASF(path)
        names = {"title": "Title", "artist": "Author", "album": "WM/AlbumTitle", "isrc": "WM/ISRC"}
        for key, value in tags.items():
            asf[names[key]] = [value]
        asf.save()
    else:  # FLAC and Ogg: Vorbis comments, named as the keys are
        handle = mutagen.File(path)
        for key, value in tags.items():
            handle[key] = value
        handle.save()
