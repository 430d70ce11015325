"""Reference catalogs: a CSV manifest (song_id,title,path[,extra columns]) or a folder of audio."""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path

from coverwatch.index_builder.tags import read_tags
from coverwatch.streamer.search.shards import parse_shard_spec, shard_of

log = logging.getLogger(__name__)

# libsndfile's formats, then those decoded through PyAV (streamer/frontend/decode.py)
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff",
                  ".m4a", ".aac", ".mp4", ".m4b", ".wma", ".asf", ".mka", ".webm", ".ac3", ".ape", ".wv")  # fmt: skip
REQUIRED_COLUMNS = ("song_id", "title", "path")


class RefsError(ValueError):
    """A reference list that cannot be used; the message names the file, row and problem."""


@dataclass(frozen=True)
class Reference:
    song_id: str
    title: str
    path: Path
    metadata: dict[str, str] = field(default_factory=dict)


def _is_file(path: Path) -> bool:
    """Path.is_file, but False (not OSError) for names the OS refuses, such as over-long ones."""
    try:
        return path.is_file()
    except OSError:
        return False


def read_refs_csv(csv_path: Path) -> list[Reference]:
    """Parse and check a refs CSV; relative paths are relative to the CSV's folder."""
    try:  # utf-8-sig: spreadsheet programs start their UTF-8 exports with a byte-order mark
        with csv_path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = reader.fieldnames or []
            missing = [c for c in REQUIRED_COLUMNS if c not in columns]
            if missing:
                raise RefsError(f"{csv_path}: missing column(s) {', '.join(missing)} (header must include song_id,title,path)")
            rows = list(reader)
    except FileNotFoundError:
        raise RefsError(f"{csv_path}: refs file not found") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise RefsError(f"{csv_path}: not a readable CSV ({exc})") from None
    except OSError as exc:  # a directory, no permission, an I/O error
        raise RefsError(f"{csv_path}: cannot read the refs file ({exc.strerror or exc})") from None
    refs, seen = [], {}
    for line, row in enumerate(rows, start=2):
        song_id = (row.get("song_id") or "").strip()
        if not song_id:
            raise RefsError(f"{csv_path}:{line}: empty song_id")
        if song_id in seen:
            raise RefsError(f"{csv_path}:{line}: duplicate song_id {song_id!r} (first on line {seen[song_id]})")
        seen[song_id] = line
        raw_path = (row.get("path") or "").strip()
        path = Path(raw_path) if Path(raw_path).is_absolute() else csv_path.parent / raw_path
        if not raw_path or not _is_file(path):
            raise RefsError(f"{csv_path}:{line}: audio file not found: {raw_path[:200]!r}")
        extra = {k: v for k, v in row.items() if k not in REQUIRED_COLUMNS and k is not None and v is not None}
        refs.append(Reference(song_id, (row.get("title") or song_id).strip(), path, extra))
    if not refs:
        raise RefsError(f"{csv_path}: no references listed")
    return refs


def read_refs_folder(folder: Path) -> list[Reference]:
    """Every audio file under `folder`; song_id is the path relative to it, without suffix;
    title, artist, album and ISRC from the file's tags (the title falls back to the file name)."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
    if not files:
        raise RefsError(f"{folder}: no audio files ({', '.join(AUDIO_SUFFIXES)}) found")
    refs, seen = [], {}
    for path in files:
        song_id = str(path.relative_to(folder).with_suffix(""))
        if song_id in seen:  # song.mp3 beside song.flac: the same song twice, or two songs? the operator decides
            raise RefsError(f"{folder}: {seen[song_id].name} and {path.name} would both be song_id {song_id!r}; rename or remove one")
        seen[song_id] = path
        tags = read_tags(path)
        title = tags.pop("title", path.stem)
        refs.append(Reference(song_id, title, path, tags))
    return refs


def read_refs(source: Path) -> list[Reference]:
    """References from a CSV file or a folder of audio files."""
    if source.is_dir():
        return read_refs_folder(source)
    return read_refs_csv(source)


def keep_shard(refs: list[Reference], spec: str) -> list[Reference]:
    """The references of shard 'I/N' (streamer/search/shards.py, `shard_of`)."""
    shard, n_shards = parse_shard_spec(spec)
    kept = [r for r in refs if shard_of(r.song_id, n_shards) == shard]
    log.info("shard %d/%d: %d of %d references", shard, n_shards, len(kept), len(refs))
    return kept
