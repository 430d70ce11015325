"""A catalog past one host (streamer/search/shards.py): songs split over shard servers on
127.0.0.1, each started by the real `coverwatch shard serve`, searched through a catalog file
by the real identify / calibrate / serve commands, and the answers held against one index of
all the songs."""

from __future__ import annotations

import http.client
import io
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile

from coverwatch.streamer.frontend.audio import SAMPLE_RATE
from coverwatch.streamer.search.shards import ShardedCatalog, ShardServer, npz_bytes, parse_shard_spec, shard_of, write_catalog
from coverwatch.streamer.search.store import load_index
from tests.conftest import coverwatch, melody, tune, write_csv

N_SONGS = 8


@pytest.fixture()
def catalog(random_model_dir, tmp_path):
    """(one index of all the songs, the two shard indexes, the song audio)."""
    rows, audio = [], {}
    for i in range(N_SONGS):
        audio[f"song{i}"] = tune(100 + i, 30.0)
        soundfile.write(tmp_path / f"song{i}.wav", audio[f"song{i}"], SAMPLE_RATE)
        rows.append({"song_id": f"song{i}", "title": f"Song {i}", "path": f"song{i}.wav"})
    refs = write_csv(tmp_path / "refs.csv", rows)
    whole = tmp_path / "whole"
    coverwatch("index", "build", "--refs", refs, "--out", whole, "--model", random_model_dir, check=True)
    shards = []
    for i in range(2):
        shards.append(tmp_path / f"shard{i}")
        coverwatch("index", "build", "--refs", refs, "--out", shards[-1], "--shard", f"{i}/2", "--model", random_model_dir, check=True)
    return whole, shards, audio


def start_shard(index_dir: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "coverwatch", "shard", "serve", str(index_dir), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    line = proc.stdout.readline()
    assert line, proc.stderr.read()
    return proc, json.loads(line)["url"]


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.kill()
        proc.communicate()


def test_shard_of_is_stable_and_spreads_songs():
    assert shard_of("song1", 4) == shard_of("song1", 4)  # crc32: the same on every host and run
    counts = np.bincount([shard_of(f"s{i}", 4) for i in range(4000)], minlength=4)
    assert counts.min() > 900
    assert parse_shard_spec("3/4") == (3, 4)
    for bad in ("4/4", "1", "a/b", "-1/2"):
        with pytest.raises(ValueError, match="--shard"):
            parse_shard_spec(bad)


def test_sharded_catalog_answers_as_one_index(catalog, random_model_dir, tmp_path):
    whole, shards, audio = catalog
    counts = [len(load_index(s).songs) for s in shards]
    assert sum(counts) == N_SONGS and min(counts) > 0  # every song in exactly one shard
    procs, urls = zip(*(start_shard(s) for s in shards))
    try:
        catalog_file = tmp_path / "catalog.json"
        made = json.loads(coverwatch("shard", "catalog", *urls, "--out", catalog_file, "--model", random_model_dir, check=True).stdout)
        assert made["songs"] == N_SONGS and made["vectors"] == load_index(whole).n_vectors

        # identify: the same songs with the same scores (alignment re-ranking fetches chroma from the shards)
        queries = []
        for name, seed in (("q3", 3), ("q6", 6)):
            piece = audio[f"song{seed}"][5 * SAMPLE_RATE : 25 * SAMPLE_RATE]
            soundfile.write(tmp_path / f"{name}.wav", piece + 0.01 * melody(seed, 20.0), SAMPLE_RATE)
            queries.append(tmp_path / f"{name}.wav")
        one = [json.loads(x) for x in coverwatch("identify", "--index", whole, "--model", random_model_dir, "--json", "--top-k", "8", *queries, check=True).stdout.splitlines()]
        sharded = [json.loads(x) for x in coverwatch("identify", "--index", catalog_file, "--model", random_model_dir, "--json", "--top-k", "8", *queries, check=True).stdout.splitlines()]
        assert [r["matches"] for r in sharded] == [r["matches"] for r in one]
        assert one[0]["matches"][0]["song_id"] == "song3" and len(one[0]["matches"]) > 3

        # calibrate: the same thresholds, kept in the catalog file
        background = tmp_path / "background.wav"
        soundfile.write(background, np.concatenate([melody(50 + i, 30.0) for i in range(6)]), SAMPLE_RATE)
        short_blocks = tmp_path / "blocks.toml"
        short_blocks.write_text("[index_build]\ncalibration_block_s = 10\n")  # 18 blocks from 3 min of audio
        calibrate = ("--config", short_blocks, "calibrate", "--audio", background, "--model", random_model_dir)
        cal_one = json.loads(coverwatch(*calibrate, "--index", whole, check=True).stdout)
        cal_sharded = json.loads(coverwatch(*calibrate, "--index", catalog_file, check=True).stdout)
        for key in ("start_threshold", "end_threshold", "n_songs", "n_blocks"):
            assert cal_sharded["stream"][key] == pytest.approx(cal_one["stream"][key], abs=1e-6), key
        assert json.loads(catalog_file.read_text())["calibration"]["stream"]["n_songs"] == N_SONGS

        # serve: the same events for a stream playing two catalog songs
        gap = np.zeros(8 * SAMPLE_RATE, np.float32)
        soundfile.write(tmp_path / "station.wav", np.concatenate([gap, audio["song2"], gap, audio["song5"], gap]), SAMPLE_RATE)
        events = {}
        for name, index in (("one", whole), ("sharded", catalog_file)):
            config = tmp_path / f"{name}.toml"
            config.write_text(f'[decision]\nstart_threshold = 0.5\nend_threshold = 0.4\nstart_hops = 1\n[sinks]\nfile = "{tmp_path / name}.jsonl"\n[metrics]\nport = 0\n')
            coverwatch("--config", config, "serve", "--source", f"file:{tmp_path / 'station.wav'}", "--fast", "--index", index, "--model", random_model_dir, check=True)
            events[name] = [
                {k: e[k] for k in ("event", "song_id", "score", "stream_time_s", "reference_offset_s")}
                for e in map(json.loads, (tmp_path / f"{name}.jsonl").read_text().splitlines())
            ]
        assert events["sharded"] == events["one"]
        assert {e["song_id"] for e in events["one"] if e["event"] == "match_start"} >= {"song2", "song5"}

        # a shard down: one line naming it, no answer from half the catalog
        procs[1].kill()
        procs[1].communicate()
        proc = coverwatch("identify", "--index", catalog_file, "--model", random_model_dir, queries[0])
        assert proc.returncode == 1 and urls[1] in proc.stderr and "Traceback" not in proc.stderr

        # a catalog naming one shard twice holds its songs twice: refused
        proc = coverwatch("shard", "catalog", urls[0], urls[0], "--out", tmp_path / "twice.json", "--model", random_model_dir)
        assert proc.returncode == 1 and "is in two shards" in proc.stderr and not (tmp_path / "twice.json").exists()
    finally:
        stop(list(procs))


def serve_in_thread(index_dir: Path) -> ShardServer:
    server = ShardServer(load_index(index_dir), ("127.0.0.1", 0))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_merged_hits_are_one_index_hits_for_every_k(catalog, tmp_path):
    """Per song, the best score over the k best hits of all shards is the best score over the
    k best hits of one index, for any k (each shard's k best, merged, then cut to k), and
    every song's chroma comes back as stored."""
    whole, shards, _ = catalog
    one = load_index(whole)
    servers = [serve_in_thread(s) for s in shards]
    try:
        write_catalog(tmp_path / "catalog.json", [f"http://127.0.0.1:{s.server_port}" for s in servers])
        sharded = ShardedCatalog(tmp_path / "catalog.json", one.model_hash)
        rows = {song.song_id: row for row, song in enumerate(one.songs)}
        rng = np.random.default_rng(0)
        stored = one.faiss_index.reconstruct_n(0, one.n_vectors)
        queries = np.concatenate([stored + 0.05 * rng.standard_normal(stored.shape), rng.standard_normal((20, stored.shape[1]))]).astype(np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        groups = np.arange(len(queries)) % 7
        for k in (1, 2, 5, 40):
            expected = one.best_per_song_grouped(queries, groups, 7, k)
            got = sharded.best_per_song_grouped(queries, groups, 7, k)
            for e, g in zip(expected, got):
                assert {sharded.songs[r].song_id: v for r, v in g.items()} == pytest.approx({one.songs[r].song_id: v for r, v in e.items()}, abs=1e-5), k
        for row, song in enumerate(sharded.songs):
            np.testing.assert_array_equal(sharded.song_chroma(row), one.song_chroma(rows[song.song_id]))
        sharded.close()
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


def test_shard_server_refuses_bad_requests(catalog):
    """Malformed, oversized, pickled or out-of-range requests get a 4xx with a reason, and the
    server goes on answering."""
    _, shards, _ = catalog
    server = serve_in_thread(shards[0])
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=10)

        def post(path: str, body: bytes) -> tuple[int, bytes]:
            conn.request("POST", path, body=body)
            response = conn.getresponse()
            return response.status, response.read()

        dim = server.dim
        pickled = io.BytesIO()
        np.savez(pickled, queries=np.array([{"x": 1}], dtype=object), k=np.array(5))
        for path, body, reason in [
            ("/search", b"not an npz", "not an .npz"),
            ("/search", pickled.getvalue(), "not an .npz"),
            ("/search", npz_bytes(queries=np.zeros((2, dim + 1), np.float32), k=np.array(5)), "queries must be float32"),
            ("/search", npz_bytes(queries=np.zeros((2, dim), np.float64), k=np.array(5)), "queries must be float32"),
            ("/search", npz_bytes(queries=np.zeros((2, dim), np.float32), k=np.array(0)), "k must be in"),
            ("/chroma", npz_bytes(rows=np.array([99])), "rows must be song rows"),
        ]:
            status, answer = post(path, body)
            assert status == 400 and reason in json.loads(answer)["error"], (path, answer)
        status, _ = post("/nowhere", b"")
        assert status == 404
        query = np.zeros((1, dim), np.float32)
        query[0, 0] = 1.0
        status, answer = post("/search", npz_bytes(queries=query, k=np.array(3)))
        assert status == 200
        with np.load(io.BytesIO(answer), allow_pickle=False) as got:
            assert got["scores"].shape == (1, 3) and got["songs"].max() < len(server.store.songs)
    finally:
        server.shutdown()
        server.server_close()
