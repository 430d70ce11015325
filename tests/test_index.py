import io
import json
import shutil

import numpy as np
import pytest
import soundfile

from coverwatch.index_builder.build import add_to_index, build_index, index_info
from coverwatch.index_builder.refs import RefsError, read_refs
from coverwatch.streamer.config import IndexBuildConfig, StreamConfig
from coverwatch.streamer.decide.alignment import chroma
from coverwatch.streamer.embed.artifacts import ArtifactError, canonical_sha256, sha256_file
from coverwatch.streamer.embed.embedder import Embedder
from coverwatch.streamer.frontend.audio import SAMPLE_RATE, AudioError
from coverwatch.streamer.frontend.decode import load_audio
from coverwatch.streamer.search.segments import segment_spans
from coverwatch.streamer.search.store import CHROMA_LEVELS, MANIFEST, VECTOR_TABLE_DTYPE, decode_chroma, encode_chroma, load_index, save_index
from tests.conftest import melody


@pytest.fixture()
def embedder(random_model_dir):
    return Embedder(random_model_dir, threads=1)


def test_segment_spans_cover_track_and_end_aligned():
    assert segment_spans(100, 40, 20) == [(0, 40), (20, 60), (40, 80), (60, 100)]
    assert segment_spans(90, 40, 20) == [(0, 40), (20, 60), (40, 80), (50, 90)]
    assert segment_spans(30, 40, 20) == [(0, 30)]


def test_build_info_and_search_returns_the_song_itself(refs_csv, embedder, tmp_path):
    store, _ = build_index(read_refs(refs_csv), tmp_path / "idx", embedder, IndexBuildConfig())
    # 30-s songs: segments at 0-20, 10-30 (end-aligned), plus the whole track
    assert len(store.songs) == 3 and store.n_vectors == 9
    info = index_info(tmp_path / "idx")
    assert info["songs"] == 3 and info["model_hash"] == embedder.info.model_hash
    assert info["calibration"]["start_threshold"] >= info["calibration"]["end_threshold"]
    assert store.songs[1].metadata == {"artist": "artist1"}
    loaded = load_index(tmp_path / "idx", expected_model_hash=embedder.info.model_hash)
    frames = embedder.cqt(melody(1, 30.0))
    scores, ids = loaded.search(embedder.embed(frames[None]), 1)
    assert loaded.vector_song[ids[0, 0]] == 1 and scores[0, 0] == pytest.approx(1.0, abs=1e-4)


def test_add_appends_without_touching_existing_vectors(refs_csv, embedder, tmp_path):
    idx = tmp_path / "idx"
    before, _ = build_index(read_refs(refs_csv), idx, embedder, IndexBuildConfig())
    old_vectors = before.faiss_index.reconstruct_n(0, before.n_vectors)
    soundfile.write(tmp_path / "new.wav", melody(9, 45.0), SAMPLE_RATE)
    more = tmp_path / "more.csv"
    more.write_text("song_id,title,path\nnew,New song,new.wav\n")
    after, _ = add_to_index(idx, read_refs(more), embedder, IndexBuildConfig())
    assert [s.song_id for s in after.songs] == ["song0", "song1", "song2", "new"]
    reloaded = load_index(idx)
    assert np.array_equal(reloaded.faiss_index.reconstruct_n(0, before.n_vectors), old_vectors)
    assert reloaded.n_vectors > before.n_vectors
    assert len(list(idx.glob("vectors-*.faiss"))) == 1  # the superseded FAISS file is gone
    with pytest.raises(ValueError, match="already in the index: new"):
        add_to_index(idx, read_refs(more), embedder, IndexBuildConfig())


def test_index_from_another_model_is_refused(refs_csv, embedder, tmp_path):
    build_index(read_refs(refs_csv), tmp_path / "idx", embedder, IndexBuildConfig())
    with pytest.raises(ArtifactError, match="built with model .* rebuild the index"):
        load_index(tmp_path / "idx", expected_model_hash="0123456789abcdef")


def test_corrupt_index_files_are_refused(refs_csv, embedder, tmp_path):
    idx = tmp_path / "idx"
    build_index(read_refs(refs_csv), idx, embedder, IndexBuildConfig())
    good = tmp_path / "good"
    shutil.copytree(idx, good)
    faiss_file = next(idx.glob("vectors-*.faiss"))
    faiss_file.write_bytes(faiss_file.read_bytes()[:100])
    with pytest.raises(ArtifactError, match="sha256 does not match"):
        load_index(idx)
    faiss_file.unlink()
    with pytest.raises(ArtifactError, match="named by the manifest is missing"):
        load_index(idx)
    (idx / MANIFEST).write_text('{"format_version": 1')
    with pytest.raises(ArtifactError, match="corrupt index manifest"):
        load_index(idx)
    (idx / MANIFEST).unlink()
    with pytest.raises(ArtifactError, match="manifest not found"):
        load_index(idx)
    manifest = json.loads((good / MANIFEST).read_text())
    manifest["n_vectors"] = 8
    manifest["manifest_sha256"] = canonical_sha256(manifest, "manifest_sha256")  # consistent, so the count check is what refuses it
    (good / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="9 rows but the manifest counts 8 vectors"):
        load_index(good)


def test_vector_table_is_checked_and_never_unpickled(refs_csv, embedder, tmp_path):
    idx = tmp_path / "idx"
    build_index(read_refs(refs_csv), idx, embedder, IndexBuildConfig())
    table_file = next(idx.glob("table-*.npy"))
    table = np.load(table_file, allow_pickle=False)
    assert table.dtype == VECTOR_TABLE_DTYPE and len(table) == 9
    assert sorted(set(table["song"].tolist())) == [0, 1, 2] and (table["end"] > table["start"]).all()
    pristine = table_file.read_bytes()

    def resign(data: bytes) -> None:
        """Write `data` as the table and record its sha256, so only the content check can refuse it."""
        table_file.write_bytes(data)
        manifest = json.loads((idx / MANIFEST).read_text())
        manifest["table_sha256"] = sha256_file(table_file)
        manifest["manifest_sha256"] = canonical_sha256(manifest, "manifest_sha256")
        (idx / MANIFEST).write_text(json.dumps(manifest))

    table_file.write_bytes(pristine[:-4])
    with pytest.raises(ArtifactError, match=r"table-.*\.npy: sha256 does not match the manifest"):
        load_index(idx)
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"song": 0}] * 9, dtype=object), allow_pickle=True)  # a pickle inside an .npy
    resign(buffer.getvalue())
    with pytest.raises(ArtifactError, match="not a readable vector table"):
        load_index(idx)
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((9, 3), dtype=np.float64))
    resign(buffer.getvalue())
    with pytest.raises(ArtifactError, match="vector table has dtype float64"):
        load_index(idx)
    resign(pristine)
    assert len(load_index(idx).songs) == 3


def test_chroma_is_stored_per_song_kept_by_add_and_checked(refs_csv, embedder, tmp_path):
    """Each song's chroma (for the daemon's alignment check) survives save/load and `index add`;
    a damaged chroma file or offsets that do not fit are refused."""
    idx = tmp_path / "idx"
    store, _ = build_index(read_refs(refs_csv), idx, embedder, IndexBuildConfig())
    expected = chroma(embedder.cqt_whole(load_audio(tmp_path / "song1.wav")))
    loaded = load_index(idx)
    assert loaded.chroma_offsets.tolist() == store.chroma_offsets.tolist() and len(loaded.chroma_offsets) == 4
    # sqrt-coded in 8 bits, scaled to a maximum of 1: |error| <= 2 * (0.5 / 255) on values <= 1
    np.testing.assert_allclose(loaded.song_chroma(1), expected / expected.max(), rtol=0, atol=1.0001 / CHROMA_LEVELS)
    assert loaded.chroma.dtype == np.uint8 and isinstance(loaded.chroma, np.memmap)  # only the candidates' rows are read
    assert loaded.calibration["align_weight"] == StreamConfig().align_weight  # the impostor scores include the alignment term

    soundfile.write(tmp_path / "new.wav", melody(9, 45.0), SAMPLE_RATE)
    (tmp_path / "more.csv").write_text("song_id,title,path\nnew,New song,new.wav\n")
    add_to_index(idx, read_refs(tmp_path / "more.csv"), embedder, IndexBuildConfig())
    grown = load_index(idx)
    np.testing.assert_array_equal(grown.song_chroma(1), loaded.song_chroma(1))  # old songs untouched
    assert len(grown.song_chroma(3)) == len(chroma(embedder.cqt_whole(load_audio(tmp_path / "new.wav"))))
    assert len(list(idx.glob("chroma-*.npy"))) == 1  # the superseded chroma file is gone

    chroma_file = next(idx.glob("chroma-*.npy"))
    pristine = chroma_file.read_bytes()
    chroma_file.write_bytes(pristine[:-6])
    with pytest.raises(ArtifactError, match=r"chroma-.*\.npy: sha256 does not match"):
        load_index(idx)
    chroma_file.write_bytes(pristine)
    manifest = json.loads((idx / MANIFEST).read_text())
    manifest["chroma_offsets"][-1] += 1
    manifest["manifest_sha256"] = canonical_sha256(manifest, "manifest_sha256")
    (idx / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="chroma_offsets do not describe 4 songs"):
        load_index(idx)


def test_chroma_codes_round_trip_exactly_and_keep_direction():
    """decode then encode gives the same codes (songs copied into a grown index keep theirs), and
    the coded chroma keeps each step's direction, what the alignment check compares."""
    rng = np.random.default_rng(3)
    steps = (rng.random((200, 12)) ** 4 * 7.0).astype(np.float32)  # a few loud pitch classes, many quiet ones
    codes = encode_chroma(steps)
    assert codes.dtype == np.uint8 and codes.max() == CHROMA_LEVELS
    np.testing.assert_array_equal(encode_chroma(decode_chroma(codes)), codes)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
    assert np.min(np.sum(unit(decode_chroma(codes)) * unit(steps), axis=1)) > 0.999
    assert not encode_chroma(np.zeros((5, 12), np.float32)).any() and encode_chroma(np.zeros((0, 12), np.float32)).shape == (0, 12)


def test_format_3_index_with_float16_chroma_still_loads_and_is_rewritten_compact(refs_csv, embedder, tmp_path):
    """An index written before the chroma codes (format 3, float16 rows) serves as it is; the
    next write (index add, calibrate) stores its chroma as codes, in format 4."""
    idx = tmp_path / "idx"
    build_index(read_refs(refs_csv), idx, embedder, IndexBuildConfig())
    current = load_index(idx, mmap=False)
    manifest = json.loads((idx / MANIFEST).read_text())
    chroma_file = idx / manifest["chroma_file"]
    old_rows = np.concatenate([current.song_chroma(r) for r in range(len(current.songs))]).astype(np.float16)
    with chroma_file.open("wb") as fh:
        np.save(fh, old_rows, allow_pickle=False)
    manifest.update(format_version=3, chroma_sha256=sha256_file(chroma_file))
    manifest["manifest_sha256"] = canonical_sha256(manifest, "manifest_sha256")
    (idx / MANIFEST).write_text(json.dumps(manifest))
    old = load_index(idx)
    assert old.chroma.dtype == np.float16
    np.testing.assert_allclose(old.song_chroma(2), current.song_chroma(2), atol=1e-3)
    save_index(idx, old, embedder.info)
    rewritten = load_index(idx)
    assert json.loads((idx / MANIFEST).read_text())["format_version"] == 4 and rewritten.chroma.dtype == np.uint8
    np.testing.assert_array_equal(rewritten.song_chroma(2), current.song_chroma(2))


def test_index_of_an_older_format_asks_for_a_rebuild(refs_csv, embedder, tmp_path):
    idx = tmp_path / "idx"
    build_index(read_refs(refs_csv), idx, embedder, IndexBuildConfig())
    manifest = json.loads((idx / MANIFEST).read_text())
    manifest["format_version"] = 1
    (idx / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="unsupported index format 1 .* rebuild the index"):
        load_index(idx)


def test_failed_build_leaves_previous_index_intact(refs_csv, embedder, tmp_path):
    idx = tmp_path / "idx"
    build_index(read_refs(refs_csv), idx, embedder, IndexBuildConfig())
    before = sorted(p.name for p in idx.iterdir())
    (tmp_path / "broken.wav").write_bytes(b"RIFF....WAVEfmt garbage")
    bad = tmp_path / "bad.csv"
    bad.write_text("song_id,title,path\nsong0,S,song0.wav\nbroken,B,broken.wav\n")
    with pytest.raises(AudioError, match="broken.wav"):
        build_index(read_refs(bad), idx, embedder, IndexBuildConfig(), force=True)
    assert sorted(p.name for p in idx.iterdir()) == before
    assert len(load_index(idx).songs) == 3


@pytest.mark.parametrize(
    "content, message",
    [
        ("song_id,path\nx,a.wav\n", "missing column(s) title"),
        ("song_id,title,path\nx,X,nowhere.wav\n", "audio file not found: 'nowhere.wav'"),
        ("song_id,title,path\nx,X,song0.wav\nx,Y,song1.wav\n", "duplicate song_id 'x' (first on line 2)"),
        ("song_id,title,path\n,X,song0.wav\n", "empty song_id"),
        ("song_id,title,path\n", "no references listed"),
    ],
)
def test_malformed_refs_csv(refs_csv, content, message):
    bad = refs_csv.parent / "bad.csv"
    bad.write_text(content)
    with pytest.raises(RefsError) as err:
        read_refs(bad)
    assert message in str(err.value)


def test_refs_from_folder(tmp_path):
    (tmp_path / "album").mkdir()
    soundfile.write(tmp_path / "album" / "a.flac", melody(1, 5.0), SAMPLE_RATE)
    soundfile.write(tmp_path / "b.wav", melody(2, 5.0), SAMPLE_RATE)
    (tmp_path / "notes.txt").write_text("not audio")
    refs = read_refs(tmp_path)
    assert [r.song_id for r in refs] == ["album/a", "b"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(RefsError, match="no audio files"):
        read_refs(tmp_path / "empty")


def test_ivf_and_hnsw_types_build(refs_csv, embedder, tmp_path):
    for kind in ("ivf", "hnsw"):
        store, _ = build_index(read_refs(refs_csv), tmp_path / kind, embedder, IndexBuildConfig(index_type=kind))
        assert load_index(tmp_path / kind).n_vectors == store.n_vectors == 9
