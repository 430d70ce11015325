import json

import faiss
import numpy as np
import pytest
import soundfile

from coverwatch.index_builder.build import add_to_index
from coverwatch.index_builder.refs import read_refs
from coverwatch.streamer.config import INDEX_TYPE_CHOICES, IndexBuildConfig
from coverwatch.streamer.embed.embedder import Embedder
from coverwatch.streamer.frontend.audio import SAMPLE_RATE
from coverwatch.streamer.search.index_types import (
    AUTO_FLAT_MAX_VECTORS,
    AUTO_HNSW_MAX_VECTORS,
    INDEX_TYPES,
    IVF_MAX_LISTS,
    add_vectors,
    build_faiss_index,
    ivf_lists,
    make_index,
    spec_for,
    training_sample,
)
from coverwatch.streamer.search.store import load_index, read_manifest
from tests.conftest import coverwatch, melody

DIM = 64  # a multiple of 8, so PQ gets 8 sub-quantisers


def clustered(n_songs: int, per_song: int, seed: int) -> np.ndarray:
    """(n_songs * per_song, DIM) unit vectors: tight clusters around random song centres."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_songs, DIM)).astype(np.float32)
    x = np.repeat(centres, per_song, axis=0) + 0.3 * rng.standard_normal((n_songs * per_song, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def catalog() -> np.ndarray:
    return clustered(400, 10, seed=1)


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(found, exact)]))


FAISS_TYPES = tuple(t for t in INDEX_TYPES if t != "two_stage")  # two_stage: tests/test_two_stage.py


@pytest.mark.parametrize("index_type", FAISS_TYPES)
def test_each_type_builds_searches_and_round_trips(index_type, catalog, tmp_path):
    spec = spec_for(index_type, DIM, len(catalog))
    assert spec.index_type == index_type and spec.chosen_by == "config"
    index = build_faiss_index(spec, catalog)
    assert index.ntotal == len(catalog)
    queries = catalog[::37] + 0.05 * np.random.default_rng(2).standard_normal((len(catalog[::37]), DIM)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    exact = faiss.IndexFlatIP(DIM)
    exact.add(catalog)
    _, exact_ids = exact.search(queries, 10)
    scores, ids = index.search(queries, 10)
    # approximate types must still find most true neighbours of clustered data; PQ codes are coarsest
    assert recall(ids, exact_ids) >= (0.5 if "pq" in index_type else 0.9)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first
    # a saved file reloads (read and memory-mapped) with the same results: nprobe / efSearch travel with it
    path = tmp_path / "index.faiss"
    faiss.write_index(index, str(path))
    for flags in (0, faiss.IO_FLAG_MMAP):
        loaded = faiss.read_index(str(path), flags)
        again_scores, again_ids = loaded.search(queries, 10)
        assert np.array_equal(again_ids, ids) and np.allclose(again_scores, scores)
    if spec.nprobe:
        assert faiss.extract_index_ivf(faiss.read_index(str(path))).nprobe == spec.nprobe > 1
    if spec.ef_search:
        assert faiss.downcast_index(faiss.read_index(str(path))).hnsw.efSearch == spec.ef_search


def test_auto_picks_by_catalog_size():
    picks = {
        n: spec_for("auto", 512, n) for n in (9, AUTO_FLAT_MAX_VECTORS, AUTO_FLAT_MAX_VECTORS + 1, AUTO_HNSW_MAX_VECTORS + 1, 10_000_000)
    }
    assert [s.index_type for s in picks.values()] == ["flat", "flat", "hnsw", "two_stage", "two_stage"]
    assert all(s.chosen_by.startswith("auto (") for s in picks.values())
    # a 1M-song catalog gets the wider stage-1 beam it was measured with (bench/RESULTS.md "Two-stage search")
    mid, big = picks[AUTO_HNSW_MAX_VECTORS + 1], picks[10_000_000]
    assert (mid.ef_search, mid.candidates) == (256, 100) and (big.ef_search, big.candidates) == (320, 120)


def test_ivf_lists_stay_trainable_and_pq_refuses_tiny_catalogs():
    assert ivf_lists(9) == 1  # a 3-song index still builds as IVF
    assert ivf_lists(100_000) * 39 <= 100_000
    assert ivf_lists(10_000_000) == IVF_MAX_LISTS
    with pytest.raises(ValueError, match="PQ index needs at least"):
        spec_for("ivf_pq", DIM, 100)
    with pytest.raises(ValueError, match="unknown index type 'annoy'"):
        spec_for("annoy", DIM, 100)


def test_numpy_list_assignment_matches_faiss(catalog):
    """add_vectors assigns IVF lists with numpy; the lists must equal FAISS's own add."""
    spec = spec_for("ivf_sq8", DIM, len(catalog))
    ours, theirs = make_index(spec, DIM), make_index(spec, DIM)
    ours.train(training_sample(catalog, spec))
    theirs.train(training_sample(catalog, spec))
    add_vectors(ours, catalog)
    theirs.add(catalog)
    ours_lists, theirs_lists = faiss.extract_index_ivf(ours).invlists, faiss.extract_index_ivf(theirs).invlists
    for list_no in range(spec.nlist):
        assert ours_lists.list_size(list_no) == theirs_lists.list_size(list_no)
    assert np.array_equal(ours.search(catalog[:50], 5)[1], theirs.search(catalog[:50], 5)[1])


def test_config_and_cli_accept_every_type():
    assert INDEX_TYPE_CHOICES == ("auto", *INDEX_TYPES)
    assert IndexBuildConfig().index_type == "auto"


@pytest.mark.parametrize(
    ("index_type", "expected_type", "chosen_by"), [(None, "flat", "auto (9 vectors)"), ("ivf_sq8", "ivf_sq8", "config")]
)
def test_manifest_records_choice_and_parameters(index_type, expected_type, chosen_by, random_model_dir, refs_csv, tmp_path):
    out = tmp_path / "idx"
    args = ["index", "build", "--model", random_model_dir, "--refs", refs_csv, "--out", out]
    proc = coverwatch(*args, *(["--type", index_type] if index_type else []), check=True)
    assert json.loads(proc.stdout)["vectors"] == 9
    settings = read_manifest(out)["settings"]
    assert settings["index_type"] == expected_type
    assert settings["index"]["index_type"] == expected_type and settings["index"]["chosen_by"] == chosen_by
    assert settings["index"] == spec_for(index_type or "auto", _dim(random_model_dir), 9).to_settings()
    info = json.loads(coverwatch("index", "info", out, check=True).stdout)
    assert info["settings"]["index"]["factory"] == settings["index"]["factory"]


def _dim(model_dir) -> int:
    return json.loads((model_dir / "model.json").read_text())["embedding_dim"]


def test_ivf_index_loads_mapped_and_still_accepts_added_songs(random_model_dir, refs_csv, tmp_path):
    """load_index maps IVF lists read-only; `index add` must load them writable."""
    out = tmp_path / "idx"
    coverwatch("index", "build", "--model", random_model_dir, "--refs", refs_csv, "--out", out, "--type", "ivf_sq8", check=True)
    mapped = load_index(out)
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(mapped.faiss_index).invlists)
    assert isinstance(lists, faiss.OnDiskInvertedLists)  # memory-mapped
    soundfile.write(tmp_path / "new.wav", melody(9, 45.0), SAMPLE_RATE)
    (tmp_path / "more.csv").write_text("song_id,title,path\nnew,New song,new.wav\n")
    after, _ = add_to_index(out, read_refs(tmp_path / "more.csv"), Embedder(random_model_dir, threads=1), IndexBuildConfig())
    assert after.n_vectors > mapped.n_vectors and load_index(out).settings["index"]["index_type"] == "ivf_sq8"
