"""The two_stage index: song-level HNSW, then the candidates' segments from 8-bit residual codes."""

import json

import numpy as np
import pytest
import soundfile

from coverwatch.index_builder.build import add_to_index, build_index, remove_from_index
from coverwatch.index_builder.refs import read_refs
from coverwatch.streamer.config import IndexBuildConfig
from coverwatch.streamer.embed.artifacts import ArtifactError
from coverwatch.streamer.embed.embedder import Embedder
from coverwatch.streamer.frontend.audio import SAMPLE_RATE
from coverwatch.streamer.search.index_types import spec_for, two_stage_params
from coverwatch.streamer.search.store import load_index, read_manifest
from coverwatch.streamer.search.two_stage import ResidualQuantizer, TwoStageIndex, TwoStageParams
from tests.conftest import coverwatch, melody

DIM = 64
PER_SONG = 6


def catalog(n_songs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n_songs * PER_SONG, DIM) unit vectors clustered by song, and their (V,) song rows."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_songs, DIM)).astype(np.float32)
    x = np.repeat(centres, PER_SONG, axis=0) + 0.4 * rng.standard_normal((n_songs * PER_SONG, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True), np.repeat(np.arange(n_songs), PER_SONG).astype(np.int32)


def exact_top(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = queries @ vectors.T
    ids = np.argsort(-scores, axis=1)[:, :k]
    return np.take_along_axis(scores, ids, 1), ids


def noisy_queries(vectors: np.ndarray, step: int) -> np.ndarray:
    q = vectors[::step] + 0.3 * np.random.default_rng(5).standard_normal((len(vectors[::step]), DIM)).astype(np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


@pytest.fixture()
def embedder(random_model_dir):
    return Embedder(random_model_dir, threads=1)


PARAMS = TwoStageParams(hnsw_m=16, ef_construction=80, ef_search=64, candidates=30)


def test_finds_the_exact_neighbours_with_near_exact_scores():
    vectors, songs = catalog(500, seed=1)
    index = TwoStageIndex.build(vectors, songs, 500, PARAMS)
    queries = noisy_queries(vectors, 11)
    scores, ids = index.search(queries, 10)
    exact_scores, exact_ids = exact_top(vectors, queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact_ids)])
    assert recall >= 0.95
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first
    found = ids == exact_ids
    assert np.abs(scores[found] - exact_scores[found]).max() < 2e-3  # the 8-bit residual rounding
    assert np.abs(index.reconstruct_n(0, index.ntotal) - vectors).max() < 2e-3


def test_residual_codes_are_finer_than_raw_codes():
    """The reason for residuals: the same 8 bits over a narrower range."""
    vectors, songs = catalog(200, seed=2)
    index = TwoStageIndex.build(vectors, songs, 200, PARAMS)
    raw = ResidualQuantizer.fit(vectors)
    raw_error = np.abs(raw.decode(raw.encode(vectors)) - vectors).max()
    residual_error = np.abs(index.reconstruct_n(0, index.ntotal) - vectors).max()
    assert residual_error < raw_error / 2


def test_pads_when_candidates_hold_fewer_segments_than_k():
    vectors, songs = catalog(3, seed=3)
    index = TwoStageIndex.build(vectors, songs, 3, TwoStageParams(16, 40, 16, candidates=2))
    scores, ids = index.search(vectors[:2], 20)
    assert scores.shape == ids.shape == (2, 20)
    assert np.all(ids[:, : 2 * PER_SONG] >= 0) and np.all(ids[:, 2 * PER_SONG :] == -1)
    assert np.all(np.isneginf(scores[:, 2 * PER_SONG :]))
    assert ids[0, 0] == 0 and ids[1, 0] == 1  # a stored vector finds itself first
    empty_scores, empty_ids = index.search(np.zeros((0, DIM), np.float32), 5)
    assert empty_scores.shape == empty_ids.shape == (0, 5)


def test_added_songs_are_found_like_built_ones():
    vectors, songs = catalog(300, seed=4)
    built = TwoStageIndex.build(vectors, songs, 300, PARAMS)
    grown = TwoStageIndex.build(vectors[: 200 * PER_SONG], songs[: 200 * PER_SONG], 200, PARAMS)
    grown.add_songs(vectors[200 * PER_SONG :], songs[200 * PER_SONG :])
    assert grown.ntotal == built.ntotal and grown.n_songs == 300
    queries = noisy_queries(vectors[200 * PER_SONG :], 5)
    _, exact_ids = exact_top(vectors, queries, 10)
    for index in (built, grown):
        _, ids = index.search(queries, 10)
        assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact_ids)]) >= 0.95
    with pytest.raises(ValueError, match="new songs only"):
        grown.add_songs(vectors[:PER_SONG], songs[:PER_SONG])


def test_refuses_segments_of_unknown_songs():
    vectors, songs = catalog(10, seed=6)
    index = TwoStageIndex.build(vectors, songs, 10, PARAMS)
    with pytest.raises(ValueError, match="outside the 10 songs"):
        TwoStageIndex(index.song_index, index.codes, index.quantizer, songs + 1, 5)


def test_spec_records_its_parameters():
    spec = spec_for("two_stage", 512, 10_000_000)
    assert spec.index_type == "two_stage" and spec.candidates > 0 and spec.ef_search >= spec.candidates
    assert two_stage_params(spec).candidates == spec.candidates


def test_cli_builds_identifies_adds_removes_and_refuses_damage(random_model_dir, refs_csv, embedder, tmp_path):
    """Through the real CLI and index store: same answer as exact search, codes memory-mapped."""
    out, flat = tmp_path / "two", tmp_path / "flat"
    coverwatch("index", "build", "--model", random_model_dir, "--refs", refs_csv, "--out", out, "--type", "two_stage", check=True)
    build_index(read_refs(refs_csv), flat, embedder, IndexBuildConfig(index_type="flat"))
    manifest = read_manifest(out)
    assert manifest["settings"]["index_type"] == "two_stage" and manifest["two_stage"]["codes_file"].startswith("codes-")
    store = load_index(out)
    assert isinstance(store.faiss_index, TwoStageIndex) and isinstance(store.faiss_index.codes, np.memmap)
    assert store.n_vectors == load_index(flat).n_vectors == 9
    query = tmp_path / "query.wav"
    soundfile.write(query, melody(1, 30.0, transpose=1)[SAMPLE_RATE * 3 :], SAMPLE_RATE)
    answers = [json.loads(coverwatch("identify", "--json", "--model", random_model_dir, "--index", i, query, check=True).stdout.splitlines()[0]) for i in (out, flat)]
    assert [m["song_id"] for m in answers[0]["matches"]] == [m["song_id"] for m in answers[1]["matches"]]
    assert abs(answers[0]["matches"][0]["score"] - answers[1]["matches"][0]["score"]) < 5e-3

    soundfile.write(tmp_path / "new.wav", melody(9, 45.0), SAMPLE_RATE)
    (tmp_path / "more.csv").write_text("song_id,title,path\nnew,New song,new.wav\n")
    added, _ = add_to_index(out, read_refs(tmp_path / "more.csv"), embedder, IndexBuildConfig())
    assert isinstance(added.faiss_index, TwoStageIndex) and added.faiss_index.n_songs == 4
    reloaded = load_index(out)
    new_row = reloaded.song_rows()["new"]
    own_ids = np.flatnonzero(reloaded.vector_song == new_row)
    # (a random model's songs all look alike, so rank alone says little: check each added segment's own score)
    scores, ids = reloaded.search(reloaded.faiss_index.reconstruct_n(0, reloaded.n_vectors)[own_ids], reloaded.n_vectors)
    own_scores = [row_scores[list(row_ids).index(own)] for own, row_scores, row_ids in zip(own_ids, scores, ids)]
    # Segments added after the quantiser was fitted may fall outside its per-dimension range and are clipped,
    # so their own scores drift a little further from 1 than the fitted ones (0.988-1.002 seen here).
    assert np.allclose(own_scores, 1.0, atol=0.02)
    removed = remove_from_index(out, ["song0"], embedder, IndexBuildConfig())
    assert [s.song_id for s in removed.songs] == ["song1", "song2", "new"] and load_index(out).faiss_index.n_songs == 3
    assert len(list(out.glob("codes-*.npy"))) == 1  # the replaced codes file is gone

    codes = out / read_manifest(out)["two_stage"]["codes_file"]
    data = bytearray(codes.read_bytes())
    data[-1] ^= 0xFF
    codes.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="codes-.*sha256 does not match"):
        load_index(out)
