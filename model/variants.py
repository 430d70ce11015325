"""Real tune-variant families of the folk corpus: settings of one tune collected apart.

The Essen collections hold many tunes under one title (a ballad type such as "Graf und
Nonne" was written down in dozens of villages). A shared title is a hint, not proof:
the same text is often sung to unrelated melodies. So a *variant group* is a set of
tunes that share a title family (`coverwatch.model.render.title_family`) and whose melodies match:

1. each melody becomes its interval sequence (`melody_intervals`: repeated pitches
   merged, so re-struck notes and rhythm splits do not count, then semitone steps
   clipped to an octave; key-invariant by construction);
2. two melodies are compared by local alignment of those sequences
   (`melody_similarity`: Smith-Waterman, +1 match, -1 mismatch, -1 gap, best score
   divided by the shorter sequence's length, so 1.0 = one melody contains the other);
3. pairs at or above `SIMILARITY_THRESHOLD` are linked; each connected component of
   a title family with >= 2 tunes is a group. Exact duplicates (the same interval
   sequence, e.g. one tune printed in two collections) keep only their first copy,
   so every group holds melodies that really differ.

The threshold was set from the score distribution of unrelated pairs (tunes of
different title families): see the note at `SIMILARITY_THRESHOLD`. Melodies that recur
under unrelated titles are not searched for.

Held-out split: a title family is held out when `_unit_hash("variant-heldout", family)
< HELDOUT_FRACTION`, independent of any seed or corpus order, so the set never drifts.
Held-out groups are for evaluation only; the others are marked usable for training.
Demo-reserved families (`coverwatch.model.dataset.is_demo_family`) are left out entirely.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from coverwatch.model.dataset import (
    MANIFEST_COLUMNS,
    Row,
    _csv_text,
    _Job,
    _rng,
    _unit_hash,
    _with_repeats,
    group_id_of,
    is_demo_family,
    read_manifest,
    render_missing,
)
from coverwatch.model.render import (
    DEFAULT_COLLECTIONS,
    HELD_OUT_SOUNDFONT,
    TRAIN_SOUNDFONT,
    Arrangement,
    Tune,
    TuneSkipped,
    cache_dir,
    parse_tune,
    random_arrangement,
    scan_corpus,
    title_family,
    write_text_atomic,
)

log = logging.getLogger(__name__)

MAX_INTERVAL = 12  # semitones; larger leaps are clipped (octave displacement is a common variant)
MATCH, MISMATCH, GAP = 1.0, -1.0, -1.0  # local-alignment scores per interval
SIMILARITY_THRESHOLD = 0.6  # melody_similarity at or above this links two tunes of a title family
# How the threshold was chosen (measured 2026-11-29 on the 2679 parsed tunes of multi-tune
# title families): 5000 seeded random pairs from different title families score median
# 0.14, 99th percentile 0.39, 99.9th 0.56, max 0.64; 3 in 5000 (6e-4) reach 0.6. Tunes
# sharing a title are far likelier variants than random pairs, so 0.6 keeps false links rare.
HELDOUT_FRACTION = 0.4  # share of variant title families kept for evaluation only
MAX_VARIANTS_PER_GROUP = 4  # rendered variants per held-out group (the first in corpus order)
VARIANT_MIN_SECONDS = 60.0  # renders play whole passes until at least this long, so 60 s excerpts fit
VARIANT_MAX_SECONDS = 75.0  # and are cut (with a fade) here
FAMILIES_CACHE_VERSION = 1  # bump when matching rules or constants change


@dataclass(frozen=True)
class VariantGroup:
    """Tunes of one title family whose melodies match; `tune_ids` in corpus order."""

    group_id: str  # "variants_" + group id of the first tune
    family: str  # title family
    title: str  # title of the first tune
    tune_ids: tuple[str, ...]
    heldout: bool  # evaluation only, never training
    min_similarity: float  # weakest link used to join the component (>= threshold)


def melody_intervals(notes: Sequence[tuple[int, float, float]]) -> np.ndarray:
    """(N,) notes (pitch, start, duration) -> (M,) int8 semitone steps between distinct pitches.

    Repeated pitches are merged first, so variants that re-strike or split a note
    compare equal; steps are clipped to +-MAX_INTERVAL.
    """
    pitches = [int(p) for p, _, _ in notes]
    merged = [p for i, p in enumerate(pitches) if i == 0 or p != pitches[i - 1]]
    return np.clip(np.diff(np.array(merged, dtype=np.int16)), -MAX_INTERVAL, MAX_INTERVAL).astype(np.int8)


def local_alignment_score(a: np.ndarray, b: np.ndarray) -> float:
    """Best Smith-Waterman score of (M,) and (K,) integer sequences (MATCH/MISMATCH/GAP).

    One DP row at a time: the diagonal and vertical moves are vectorised, and the
    horizontal (gap) chain is H[j] = max_k<=j (D[k] - GAP_COST * (j - k)), a running max.
    """
    assert a.ndim == 1 and b.ndim == 1
    if len(a) == 0 or len(b) == 0:
        return 0.0
    cost = -GAP
    offsets = cost * np.arange(len(b) + 1)
    previous = np.zeros(len(b) + 1)
    best = 0.0
    for symbol in a:
        substitution = np.where(b == symbol, MATCH, MISMATCH)
        diagonal = np.maximum(0.0, np.maximum(previous[:-1] + substitution, previous[1:] - cost))
        row = np.concatenate(([0.0], diagonal))
        row = np.maximum.accumulate(row + offsets) - offsets
        best = max(best, float(row.max()))
        previous = row
    return best


def melody_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Local-alignment score of two interval sequences / the shorter length, in [0, 1]."""
    shorter = min(len(a), len(b))
    return local_alignment_score(a, b) / shorter if shorter else 0.0


def _components(n: int, links: Sequence[tuple[int, int, float]]) -> list[tuple[list[int], float]]:
    """Connected components (>= 2 members, sorted) of n nodes and their weakest link."""
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j, _ in links:
        parent[root(i)] = root(j)
    members: dict[int, list[int]] = defaultdict(list)
    for i in range(n):
        members[root(i)].append(i)
    weakest: dict[int, float] = {}
    for i, _, score in links:
        r = root(i)
        weakest[r] = min(weakest.get(r, 1.0), score)
    return [(sorted(m), weakest[r]) for r, m in members.items() if len(m) >= 2]


def _corpus_order(tune: Tune) -> tuple[str, int]:
    """Sort key of a tune id "collection/file/index": file, then numeric position."""
    head, _, index = tune.tune_id.rpartition("/")
    return head, int(index) if index.isdigit() else -1


def is_heldout_family(family: str) -> bool:
    """Whether a variant title family is kept for evaluation only (seed-independent)."""
    return _unit_hash("variant-heldout", family) < HELDOUT_FRACTION


def group_tunes(tunes: Sequence[Tune], threshold: float = SIMILARITY_THRESHOLD) -> list[VariantGroup]:
    """Variant groups among `tunes` (any order; members sorted by corpus position): same title
    family and melody links >= threshold.

    Pure: no corpus access. Groups are sorted by their first tune id.
    """
    by_family: dict[str, list[Tune]] = defaultdict(list)
    for tune in tunes:
        by_family[title_family(tune.title) or tune.tune_id].append(tune)
    groups = []
    for family, members in by_family.items():
        if len(members) < 2 or is_demo_family(family):
            continue
        members.sort(key=_corpus_order)
        seen: set[bytes] = set()
        unique = []
        for tune in members:  # a melody copied note for note into two collections is no variant
            key = melody_intervals(tune.notes).tobytes()
            if key not in seen:
                seen.add(key)
                unique.append(tune)
        members = unique
        intervals = [melody_intervals(t.notes) for t in members]
        links = []
        for i in range(len(members)):
            for j in range(i + 1, len(members)):
                score = melody_similarity(intervals[i], intervals[j])
                if score >= threshold:
                    links.append((i, j, score))
        for component, weakest in _components(len(members), links):
            chosen = [members[k] for k in component]
            groups.append(
                VariantGroup(
                    group_id="variants_" + group_id_of(chosen[0]),
                    family=family,
                    title=chosen[0].title,
                    tune_ids=tuple(t.tune_id for t in chosen),
                    heldout=is_heldout_family(family),
                    min_similarity=round(weakest, 3),
                )
            )
    return sorted(groups, key=lambda g: g.tune_ids[0])


def _parse_family_members(collections: Sequence[str]) -> list[Tune]:
    """Parsed tunes of every title family with >= 2 tunes (through the parse cache)."""
    sources = scan_corpus(collections)
    sizes = Counter(source.family for source in sources)
    tunes, skipped = [], Counter()
    for source in tqdm([s for s in sources if sizes[s.family] >= 2], desc="parse variants", unit="tune"):
        try:
            tunes.append(parse_tune(source))
        except TuneSkipped as exc:
            skipped[exc.reason] += 1
    log.info("variant candidates: %d tunes parsed, skipped %s", len(tunes), dict(skipped) or "none")
    return tunes


def find_variant_groups(collections: Sequence[str] = DEFAULT_COLLECTIONS, cache: Path | None = None) -> list[VariantGroup]:
    """All variant groups of `collections`, cached as JSON (keyed by collections and rules).

    The first run parses ~2.8k tunes (cached by `parse_tune`) and aligns ~20k pairs.
    """
    key = f"v{FAMILIES_CACHE_VERSION}_{'+'.join(collections)}_{SIMILARITY_THRESHOLD}_{HELDOUT_FRACTION}"
    path = (cache or cache_dir() / "variants") / f"groups_{key}.json"
    try:
        return [VariantGroup(**{**g, "tune_ids": tuple(g["tune_ids"])}) for g in json.loads(path.read_text(encoding="utf-8"))]
    except (OSError, ValueError):
        pass
    groups = group_tunes(_parse_family_members(collections))
    write_text_atomic(path, json.dumps([dataclasses.asdict(g) for g in groups], ensure_ascii=False, indent=1) + "\n")
    log.info(
        "variant groups: %d (%d held out), %d tunes", len(groups), sum(g.heldout for g in groups), sum(len(g.tune_ids) for g in groups)
    )
    return groups


def trained_families(manifest: Path) -> set[str]:
    """Title families of the `train` rows of a dataset manifest: what a model trained on."""
    return {title_family(row.title) or row.group_id for row in read_manifest(manifest) if row.split == "train"}


def build_variant_dataset(
    out_dir: Path,
    groups: Sequence[VariantGroup],
    max_groups: int,
    seed: int = 0,
    *,
    collections: Sequence[str] = DEFAULT_COLLECTIONS,
    exclude_families: frozenset[str] = frozenset(),
    split: str = "val",
) -> Path:
    """Render up to `max_groups` variant groups to out_dir/audio/<group_id>/v<k>.flac; return manifest.csv.

    Groups are taken in an order fixed by `seed`, skipping `exclude_families`. Each
    group renders its first `MAX_VARIANTS_PER_GROUP` tunes, each with its own
    arrangement (program, key, tempo, accompaniment drawn as for the cover datasets
    and kept distinct within the group; the held-out soundfont for split "val", the
    training one otherwise), so versions differ both in melody (the real variants)
    and in arrangement. Whole passes play until at
    least `VARIANT_MIN_SECONDS`, cut at `VARIANT_MAX_SECONDS`. Rows get `split`.
    Resumable and atomic like `build_cover_dataset`; failed renders are left out.
    """
    out_dir = Path(out_dir)
    sources = {s.tune_id: s for s in scan_corpus(collections)}
    soundfont = HELD_OUT_SOUNDFONT if split == "val" else TRAIN_SOUNDFONT
    chosen = sorted((g for g in groups if g.family not in exclude_families), key=lambda g: _unit_hash("variant-order", seed, g.group_id))
    rows: list[Row] = []
    jobs: list[_Job] = []
    for group in chosen[:max_groups]:
        rng = _rng("variant-arrangement", seed, group.group_id)
        arrangements: list[Arrangement] = []
        for version, tune_id in enumerate(group.tune_ids[:MAX_VARIANTS_PER_GROUP]):
            tune = parse_tune(sources[tune_id])
            arrangement = random_arrangement(rng, soundfont, tune.base_tempo_bpm, arrangements)
            arrangements.append(arrangement)
            arrangement = _with_repeats(tune, arrangement, VARIANT_MIN_SECONDS)
            relative = Path("audio") / group.group_id / f"v{version}.flac"
            rows.append(
                Row(group.group_id, version, relative.as_posix(), tune.title, split, soundfont.name,
                    arrangement.transpose, arrangement.tempo_bpm, arrangement.program, arrangement.accompaniment)
            )  # fmt: skip
            jobs.append(_Job(tune, arrangement, VARIANT_MAX_SECONDS, out_dir / relative))
    attempted, failed = render_missing(jobs, desc="render variants")
    kept = [row for row in rows if out_dir / row.path not in failed]
    sizes = Counter(row.group_id for row in kept)
    kept = sorted((row for row in kept if sizes[row.group_id] >= 2), key=lambda r: (r.group_id, r.version))
    manifest = out_dir / "manifest.csv"
    write_text_atomic(manifest, _csv_text(MANIFEST_COLUMNS, [dataclasses.astuple(row) for row in kept]))
    n_groups, rendered = len({row.group_id for row in kept}), attempted - len(failed)
    log.info("variant dataset %s: %d groups, %d files (%d rendered, %d failed)", out_dir, n_groups, len(kept), rendered, len(failed))
    return manifest


def merge_training_manifests(covers_manifest: Path, variants_manifest: Path, out: Path) -> Path:
    """One training manifest from a cover dataset and a `--which train` variant dataset.

    A cover group is the first tune of a title family; a variant group whose first tune
    is that same tune ("variants_<cover group id>") is the same song, so its versions
    join the cover group (two labels for one song would teach the model that its covers
    are strangers). A variant group of a title family that has a cover group in the
    validation split is left out, joined or not, so that validation stays unseen (title
    families decide splits). Paths are rewritten relative to `out`'s folder; all rows keep
    `MANIFEST_COLUMNS`.
    """
    out = Path(out)
    covers, variants = read_manifest(covers_manifest), read_manifest(variants_manifest)
    split_of_group = {row.group_id: row.split for row in covers}
    val_families = {title_family(row.title) or row.group_id for row in covers if row.split == "val"}
    merged: list[Row] = []
    joined, dropped = set(), set()
    for source, rows in ((Path(covers_manifest), covers), (Path(variants_manifest), variants)):
        for row in rows:
            group_id, version = row.group_id, row.version
            if rows is variants:
                cover_id = group_id.removeprefix("variants_")
                if split_of_group.get(cover_id) == "val" or (title_family(row.title) or group_id) in val_families:
                    dropped.add(group_id)
                    continue
                if cover_id in split_of_group:
                    joined.add(group_id)
                    group_id = cover_id
                    version += 100  # keeps (group_id, version) unique: cover versions are 0..n-1
            path = os.path.relpath((source.parent / row.path).resolve(), out.parent.resolve())
            merged.append(dataclasses.replace(row, group_id=group_id, version=version, path=path))
    write_text_atomic(out, _csv_text(MANIFEST_COLUMNS, [dataclasses.astuple(row) for row in merged]))
    log.info(
        "merged %s + %s -> %s: %d rows, %d variant groups joined their cover group, %d left out (title family in val)",
        covers_manifest, variants_manifest, out, len(merged), len(joined), len(dropped),
    )  # fmt: skip
    return out
