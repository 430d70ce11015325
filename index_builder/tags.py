"""Tags of an operator's audio files: title, artist, album and ISRC, whatever the format.

mutagen's "easy" interface names title/artist/album alike for ID3 (MP3), MP4 (M4A/AAC) and
Vorbis comments (FLAC, Ogg, Opus); ISRC and WMA's ASF attributes have their own fields.
A file whose tags cannot be read still indexes, under its file name.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

TAG_FIELDS = ("title", "artist", "album", "isrc")
# Fields that are not in mutagen's easy interface for every format
MP4_ISRC = "----:com.apple.iTunes:ISRC"
ASF_FIELDS = {"title": "Title", "artist": "Author", "album": "WM/AlbumTitle", "isrc": "WM/ISRC"}
MAX_TAG_CHARS = 1000  # a tag longer than this is junk in a broken file, not a title


def _text(value: object) -> str:
    """The first entry of a tag's value list as clean one-line text."""
    if isinstance(value, (list, tuple)):
        value = value[0] if value else ""
    if isinstance(value, bytes):  # MP4 free-form atoms hold raw bytes
        value = value.decode("utf-8", "replace")
    text = " ".join(str(value).split())  # line breaks in a tag would break CSV and one-line logs
    return text[:MAX_TAG_CHARS]


def read_tags(path: Path) -> dict[str, str]:
    """{field: text} for the TAG_FIELDS the file carries (empty ones left out)."""
    try:
        import mutagen
        from mutagen.asf import ASF
        from mutagen.mp4 import MP4

        easy = mutagen.File(path, easy=True)
        if easy is None:
            return {}
        found: dict[str, str] = {}
        if isinstance(easy, ASF):
            for name, key in ASF_FIELDS.items():
                if key in easy:
                    found[name] = _text(easy[key])
        else:
            for name in TAG_FIELDS:
                if name in (easy.tags or {}):
                    found[name] = _text(easy.tags[name])
            if "isrc" not in found and path.suffix.lower() in (".m4a", ".mp4", ".aac", ".m4b"):
                full = MP4(path)
                if full.tags and MP4_ISRC in full.tags:
                    found["isrc"] = _text(full.tags[MP4_ISRC])
    except Exception as exc:  # noqa: BLE001 - mutagen raises many types on damaged files; tags are optional
        log.warning("%s: cannot read tags (%s); indexed under its file name", path, exc)
        return {}
    return {name: text for name, text in found.items() if text}
