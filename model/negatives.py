"""Out-of-catalog music for training: recordings that are no cover of anything we train on.

The live threshold is set on the far tail of the scores that non-catalog audio reaches
against a catalog (index_builder/calibrate.py), and cover groups alone never show the
network such audio. These recordings join training batches as negatives of every cover
group (model/train.py, model/losses.py), so the tail itself gets a gradient.

The sources are Debian game-music packages that nothing else in coverwatch uses: not the
packages reserved for held-out evaluation, and not asc-music, hyperrogue-music and
drascula-music, which the simulated broadcast streams and the demo play as
out-of-catalog music and calibrate on (coverwatch/evaluation/simulate.py `GAME_MUSIC_DIRS`). So no
detection figure is measured on music the network saw as a negative.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import soundfile as sf

log = logging.getLogger(__name__)

NEGATIVE_MUSIC_DIRS = {  # Debian package -> its music folder
    "colobot-common-sounds": Path("/usr/share/games/colobot/music"),
    "lincity-ng-data": Path("/usr/share/games/lincity-ng/music"),
    "extremetuxracer-data": Path("/usr/share/games/etr/music"),
    "marsshooter-data": Path("/usr/share/games/marsshooter/audio/music"),
}
AUDIO_SUFFIXES = (".ogg", ".flac", ".wav", ".mp3")
MIN_NEGATIVE_S = 20.0  # shorter files are jingles and stingers, not music a station plays
NEGATIVE_COLUMNS = ("path", "package", "seconds")


def negative_music_files(dirs: dict[str, Path] = NEGATIVE_MUSIC_DIRS) -> list[tuple[str, Path, float]]:
    """Sorted (package, path, seconds) of the installed negative music at least MIN_NEGATIVE_S long.

    Raises FileNotFoundError naming the packages to install when none is installed.
    """
    found = []
    for package, folder in sorted(dirs.items()):
        if not folder.is_dir():
            log.warning("negative music: %s not installed (%s missing)", package, folder)
            continue
        for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES):
            try:
                seconds = sf.info(str(path)).duration
            except (RuntimeError, sf.LibsndfileError) as exc:
                log.warning("negative music: skipping unreadable %s: %s", path, exc)
                continue
            if seconds >= MIN_NEGATIVE_S:
                found.append((package, path, float(seconds)))
    if not found:
        raise FileNotFoundError(f"no negative music installed; apt-get install {' '.join(sorted(dirs))}")
    return found


def build_negative_manifest(out: Path, dirs: dict[str, Path] = NEGATIVE_MUSIC_DIRS) -> Path:
    """Write out/manifest.csv (absolute path, package, seconds) and return its path."""
    # Here, not at the top: coverwatch.model.render needs the data extra, and training (which reads
    # these manifests) must run with the train extra alone.
    from coverwatch.model.dataset import _csv_text
    from coverwatch.model.render import write_text_atomic

    files = negative_music_files(dirs)
    manifest = Path(out) / "manifest.csv"
    write_text_atomic(
        manifest, _csv_text(NEGATIVE_COLUMNS, [(str(path.resolve()), package, f"{seconds:.1f}") for package, path, seconds in files])
    )
    log.info(
        "negative music: %d files, %.0f min, from %d package(s)",
        len(files),
        sum(s for _, _, s in files) / 60,
        len({p for p, _, _ in files}),
    )
    return manifest


def read_negative_manifest(manifest: Path) -> list[Path]:
    """Audio paths of a negative manifest (CSV with a `path` column: absolute, or relative to its folder)."""
    with Path(manifest).open(newline="") as fh:
        reader = csv.DictReader(fh)
        if "path" not in (reader.fieldnames or []):
            raise ValueError(f"{manifest}: missing column path")
        paths = [Path(manifest).parent / row["path"] for row in reader]
    if not paths:
        raise ValueError(f"{manifest}: no rows")
    return paths
