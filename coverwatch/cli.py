"""The `coverwatch` command line: serve, identify, index build|add|remove|info, calibrate, shard serve|catalog, report, and the training-side
commands (data, train, export, quantize, evaluate, demo) that need the `train`/`data`/`quantize` extras.

Each command returns a named exit code; errors the user can fix print one line naming the
problem on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import subprocess
import sys
from pathlib import Path

from kafka.errors import KafkaError

import coverwatch
from coverwatch.index_builder.refs import RefsError, keep_shard, read_refs
from coverwatch.streamer.config import INDEX_TYPE_CHOICES, Config, ConfigError, load_config, override, replace_section
from coverwatch.streamer.embed.artifacts import ArtifactError, resolve_model_dir
from coverwatch.streamer.frontend.audio import AudioError
from coverwatch.streamer.service.daemon import ExitCode, Server
from coverwatch.streamer.sources.publish import PublishError

log = logging.getLogger("coverwatch")

# Errors a user can act on: reported as one line, exit 1. Anything else is a bug and keeps its traceback.
# Failures a user can act on: one line on stderr and exit 1, no traceback.
USER_ERRORS = (ConfigError, ArtifactError, AudioError, RefsError, ValueError, OSError, ImportError, KafkaError, PublishError)


def setup_logging(level: str) -> None:
    """Structured one-line logs on stderr (stdout is reserved for events and results)."""
    logging.basicConfig(
        level=getattr(logging, level),
        stream=sys.stderr,
        format="%(asctime)s level=%(levelname)s logger=%(name)s msg=%(message)s",
        force=True,
    )


# The extra that provides each module a command may need, for a missing-module message.
EXTRA_OF_MODULE = {"torch": "train", "nnAudio": "train", "onnxscript": "train", "matplotlib": "train", "onnx": "quantize",
                   "music21": "data", "pretty_midi": "data", "scipy": "data"}  # fmt: skip


class MissingExtra(ImportError):
    """A command's optional dependency is not installed; the message names the extra."""


@contextlib.contextmanager
def needs_extra(command: str):
    """Turn a missing optional module into one line naming the pip extra that installs it."""
    try:
        yield
    except ModuleNotFoundError as exc:
        root = (exc.name or "").split(".")[0]
        if root not in EXTRA_OF_MODULE:
            raise
        extra = EXTRA_OF_MODULE[root]
        raise MissingExtra(f"`coverwatch {command}` needs the {extra!r} extra ({root} is not installed): pip install 'coverwatch[{extra}]'") from None


def _config(args: argparse.Namespace) -> Config:
    """The config file, then the command line's overrides, validated like the file's keys."""
    cfg = load_config(args.config)
    if getattr(args, "index", None):
        cfg = override(cfg, "index", path=str(args.index))
    if getattr(args, "model", None):
        cfg = override(cfg, "model", path=str(args.model))
    if getattr(args, "metrics_port", None) is not None:
        cfg = override(cfg, "metrics", port=args.metrics_port)
    return cfg


def _index_dir(args: argparse.Namespace, cfg: Config) -> Path:
    """INDEX_DIR, else --index, else [index] path."""
    path = getattr(args, "index_dir", None) or cfg.index.path
    if not path:
        raise ValueError("no index folder: give INDEX_DIR, --index DIR or [index] path in the config")
    return Path(path)


def cmd_serve(args: argparse.Namespace, cfg: Config) -> ExitCode:
    return Server(cfg, args.source, fast=args.fast, stream_id=args.stream).run()


def cmd_publish(args: argparse.Namespace, cfg: Config) -> ExitCode:
    from coverwatch.streamer.sources.local import parse_source
    from coverwatch.streamer.sources.publish import publish

    source = parse_source(args.source, mic=cfg.mic, block_s=args.chunk_s or cfg.stream.chunk_s, fast=args.fast, stream_id=args.stream)
    stats = publish(source, args.stream, args.topic or cfg.kafka.audio_topics[0], cfg.kafka, encoding=args.encoding, start_seq=args.start_seq)
    print(json.dumps(dataclasses.asdict(stats)))
    return ExitCode.OK


def _embedder(cfg: Config):
    from coverwatch.streamer.embed.embedder import Embedder

    return Embedder(resolve_model_dir(cfg.model.path), cfg.model.threads)


def cmd_identify(args: argparse.Namespace, cfg: Config) -> ExitCode:
    from coverwatch.streamer.search.identify import identify_file
    from coverwatch.streamer.search.shards import open_catalog

    embedder = _embedder(cfg)
    index = open_catalog(Path(cfg.index.path), expected_model_hash=embedder.info.model_hash)
    failed = 0
    for path in args.files:
        try:
            record = identify_file(embedder, index, Path(path), args.top_k, cfg.stream)
        except AudioError as exc:
            failed += 1
            record = {"file": path, "error": str(exc)}
            log.error("%s", exc)
        print(json.dumps(record) if args.json else _format_matches(record), flush=True)
    return ExitCode.FAILURE if failed else ExitCode.OK


def _format_matches(record: dict) -> str:
    if "error" in record:
        return f"{record['file']}: ERROR {record['error']}"
    lines = [f"{record['file']}:"] + [
        f"  {m['score']:.3f}  {m['song_id']}  {m['title']}" + (f" ({m['metadata']['artist']})" if m["metadata"].get("artist") else "")
        for m in record["matches"]
    ]
    return "\n".join(lines)


def cmd_index(args: argparse.Namespace, cfg: Config) -> ExitCode:
    from coverwatch.index_builder.build import add_to_index, build_index, index_info, remove_from_index

    if args.index_command == "info":
        print(json.dumps(index_info(_index_dir(args, cfg)), indent=2))
        return ExitCode.OK
    embedder = _embedder(cfg)
    skipped = []
    if args.index_command == "remove":
        target = _index_dir(args, cfg)
        store = remove_from_index(target, args.song_ids, embedder, cfg.index_build, cfg.stream)
    else:
        refs = read_refs(Path(args.refs))
        refs = keep_shard(refs, args.shard) if args.shard else refs
    if args.index_command == "build":
        build_cfg = cfg.index_build if not args.type else replace_section(cfg, "index_build", index_type=args.type).index_build
        target = Path(args.out)
        store, skipped = build_index(refs, target, embedder, build_cfg, cfg.stream, args.force, args.skip_errors)
    elif args.index_command == "add":
        target = _index_dir(args, cfg)
        store, skipped = add_to_index(target, refs, embedder, cfg.index_build, cfg.stream, args.replace, args.skip_errors)
    summary = {"index_dir": str(target), "songs": len(store.songs), "vectors": store.n_vectors, "calibration": store.calibration}
    if args.index_command != "remove":
        summary["skipped"] = [dataclasses.asdict(s) for s in skipped]
    print(json.dumps(summary))
    return ExitCode.OK


def cmd_train(args: argparse.Namespace, cfg: Config) -> ExitCode:
    with needs_extra("train"):
        from coverwatch.model.train import TrainPaths, train

    cache = Path(args.cache) if args.cache else Path(args.out) / "features"
    init = Path(args.init) if args.init else None
    negatives = Path(args.negatives) if args.negatives else None
    metrics = train(cfg.train, TrainPaths(Path(args.manifest), Path(args.out), cache, init, negatives))
    print(json.dumps(metrics))
    return ExitCode.OK


def cmd_export(args: argparse.Namespace, cfg: Config) -> ExitCode:
    with needs_extra("export"):
        from coverwatch.model.export import export_model

    info = export_model(Path(args.checkpoint), Path(args.out))
    print(json.dumps(info.to_dict()))
    return ExitCode.OK


def cmd_soup(args: argparse.Namespace, cfg: Config) -> ExitCode:
    with needs_extra("train"):
        from coverwatch.model.soup import make_soup

    cache = Path(args.cache) if args.cache else Path(args.out).parent / "features"
    out = make_soup(Path(args.start), Path(args.tuned), args.alpha, Path(args.manifest), cache, Path(args.out), cfg.train)
    print(json.dumps({"checkpoint": str(out), "alpha": args.alpha}))
    return ExitCode.OK


def cmd_quantize(args: argparse.Namespace, cfg: Config) -> ExitCode:
    with needs_extra("quantize"):
        from coverwatch.model.quantize import quantize_model

    info = quantize_model(Path(args.model_dir), Path(args.out_dir), args.mode)
    print(json.dumps(info.to_dict()))
    return ExitCode.OK


def cmd_data(args: argparse.Namespace, cfg: Config) -> ExitCode:
    with needs_extra("data"):
        from coverwatch.model.dataset import build_cover_dataset, build_demo

    if args.data_command == "build":
        excluded = frozenset()
        if args.hold_out_variants:
            from coverwatch.model.variants import find_variant_groups

            excluded = frozenset(g.family for g in find_variant_groups() if g.heldout)
        path = build_cover_dataset(
            Path(args.out), n_groups=args.groups, versions_per_group=args.versions, seed=args.seed, max_seconds=args.max_seconds,
            degrade_fraction=args.degrade_fraction, exclude_families=excluded, styled_fraction=args.styled_fraction,
            **({"train_soundfonts": tuple(Path(p) for p in args.train_soundfont)} if args.train_soundfont else {}),
        )  # fmt: skip
    elif args.data_command == "variants":
        from coverwatch.model.variants import build_variant_dataset, find_variant_groups, trained_families

        groups = [g for g in find_variant_groups() if g.heldout == (args.which == "heldout")]
        trained = frozenset().union(*(trained_families(Path(m)) for m in args.exclude_trained))
        split = "val" if args.which == "heldout" else "train"
        path = build_variant_dataset(Path(args.out), groups, args.groups, args.seed, exclude_families=trained, split=split)
    elif args.data_command == "merge":
        from coverwatch.model.variants import merge_training_manifests

        path = merge_training_manifests(Path(args.covers), Path(args.variants), Path(args.out))
    elif args.data_command == "leaveout":
        from coverwatch.model.leaveout import build_leaveout_set

        path = build_leaveout_set(Path(args.out), args.groups, args.seed)
    elif args.data_command == "negatives":
        from coverwatch.model.negatives import build_negative_manifest

        path = build_negative_manifest(Path(args.out))
    else:
        path = build_demo(Path(args.out))
    print(str(path))
    return ExitCode.OK


def cmd_evaluate(args: argparse.Namespace, cfg: Config) -> ExitCode:
    with needs_extra("evaluate"):
        from coverwatch.model.evaluate import evaluate_heldout

    previous = Path(args.previous_model) if args.previous_model else None
    report_path = Path(args.report) if args.report else None
    report = evaluate_heldout(Path(args.manifest), resolve_model_dir(cfg.model.path), report_path, cfg.model.threads, args.split, previous)
    print(json.dumps(report))
    return ExitCode.OK


def cmd_demo(args: argparse.Namespace, cfg: Config) -> ExitCode:
    with needs_extra("demo"):
        from coverwatch.evaluation.demo import run_demo

    return run_demo(cfg, Path(args.workdir) if args.workdir else None, realtime=not args.fast)


def cmd_simulate(args: argparse.Namespace, cfg: Config) -> ExitCode:
    with needs_extra("simulate"):
        from coverwatch.evaluation.simulate import simulate

    paths = simulate(
        Path(args.out), args.seeds, args.minutes * 60.0, args.catalog_seed, args.catalog_size, background=args.calibration_audio
    )
    print(json.dumps({"catalog": str(Path(args.out) / "catalog" / "refs.csv"), "streams": [str(p) for p in paths]}))
    return ExitCode.OK


def cmd_evaluate_stream(args: argparse.Namespace, cfg: Config) -> ExitCode:
    from coverwatch.evaluation.stream_eval import evaluate_streams

    summary = evaluate_streams(cfg, [Path(p) for p in args.streams], Path(args.out), plots=not args.no_plots, rescore=args.rescore)
    print(json.dumps(summary))
    return ExitCode.OK


def cmd_calibrate(args: argparse.Namespace, cfg: Config) -> ExitCode:
    from coverwatch.index_builder.calibrate import calibrate_index

    calibration = calibrate_index(_index_dir(args, cfg), [Path(p) for p in args.audio], _embedder(cfg), cfg)
    print(json.dumps(calibration))
    return ExitCode.OK


def cmd_shard(args: argparse.Namespace, cfg: Config) -> ExitCode:
    from coverwatch.streamer.search.shards import ShardedCatalog, serve_shard

    if args.shard_command == "serve":
        import faiss

        faiss.omp_set_num_threads(cfg.index.threads)  # as the daemon: OpenMP threads spinning beside other processes cost more than they give
        server = serve_shard(_index_dir(args, cfg), args.host, args.port)
        print(json.dumps({"url": f"http://{args.host}:{server.server_port}", "songs": len(server.store.songs)}), flush=True)
        try:
            server.serve_forever()
        finally:
            server.server_close()
        return ExitCode.OK
    out = Path(args.out)
    if out.exists() and not args.force:
        raise ValueError(f"{out} exists: pass --force to replace it (its calibration is lost)")
    catalog = ShardedCatalog(out, _embedder(cfg).info.model_hash, urls=args.urls)  # every shard answers, one model, no song twice
    catalog.save_calibration({})  # written only now: a catalog that does not open leaves no file
    print(json.dumps({"catalog": str(out), "shards": len(catalog.urls), "songs": len(catalog.songs), "vectors": catalog.n_vectors}))
    catalog.close()
    return ExitCode.OK


def cmd_report(args: argparse.Namespace, cfg: Config) -> ExitCode:
    from coverwatch.report import write_report

    summary = write_report([Path(p) for p in args.events], Path(args.out), title=args.title)
    print(json.dumps(summary.to_dict()))
    return ExitCode.OK


BENCHMARKS = ("targets", "streams", "stream", "model", "index", "two_stage", "chroma", "shards", "store", "kafka", "soak", "separation")


def cmd_bench(args: argparse.Namespace, cfg: Config) -> ExitCode:
    """The benchmark scripts live in the source tree's bench/, beside the packages."""
    script = Path(__file__).resolve().parents[1] / "bench" / f"bench_{args.name}.py"
    if not script.is_file():
        raise OSError(f"{script} not found: `coverwatch bench` runs from a source checkout (git clone), not an installed wheel")
    return ExitCode(subprocess.call([sys.executable, str(script), *args.bench_args]) and ExitCode.FAILURE)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, but not for flags and options without one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, argparse.SUPPRESS) or isinstance(action, argparse._StoreTrueAction):
            return action.help or ""
        return super()._get_help_string(action)


def _global_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """--config and --log-level, before the command (suppress=False) or after it (True: a value
    given there overrides, an absent one leaves the global one alone)."""
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument("--config", default=default, metavar="FILE", help="config.toml to load (none: the built-in defaults)")
    parser.add_argument("--log-level", default=default, choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="overrides [logging] level")


def _pace(parser: argparse.ArgumentParser, fast_by_default: bool, what: str) -> None:
    """--fast / --realtime for commands that play files."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--fast", dest="fast", action="store_true", help=f"{what} as fast as possible" + (" (the default)" if fast_by_default else ""))
    group.add_argument("--realtime", dest="fast", action="store_false", help=f"{what} at real-time pace" + ("" if fast_by_default else " (the default)"))
    parser.set_defaults(fast=fast_by_default)


def _model_index(parser: argparse.ArgumentParser, index: bool = True) -> None:
    parser.add_argument("--model", metavar="DIR", help="model folder (overrides [model] path; default: the shipped model)")
    if index:
        parser.add_argument("--index", metavar="DIR", help="index folder (overrides [index] path)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coverwatch", description="Live cover-song identification.", formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"coverwatch {coverwatch.__version__}")
    _global_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(subparsers, name: str, help_text: str) -> argparse.ArgumentParser:
        child = subparsers.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        _global_options(child, suppress=True)
        return child

    serve = command(sub, "serve", "monitor a live source and print match events")
    _model_index(serve)
    serve.add_argument("--source", default="mic", help="kafka ([kafka] audio_topics), file:PATH, mic or mic:DEVICE")
    serve.add_argument("--metrics-port", type=int, default=None, metavar="PORT", help="Prometheus port (overrides [metrics] port; 0 = off)")
    _pace(serve, fast_by_default=False, what="play file sources")
    serve.add_argument("--stream", "--stream-id", dest="stream", default=None, metavar="ID", help="stream name in events (default: file stem or 'mic')")
    serve.set_defaults(func=cmd_serve)

    publish = command(sub, "publish", "send audio to Kafka as chunks (the capture client)")
    publish.add_argument("--source", required=True, help="file:PATH, mic or mic:DEVICE")
    publish.add_argument("--stream", "--stream-id", dest="stream", required=True, metavar="ID", help="stream id (the message key)")
    publish.add_argument("--topic", default=None, help="audio topic (default: the first of [kafka] audio_topics)")
    publish.add_argument("--encoding", choices=("s16le", "f32le"), default="s16le", help="PCM encoding of the chunks")
    publish.add_argument("--chunk-s", type=float, default=None, metavar="SECONDS", help="seconds per chunk (default [stream] chunk_s)")
    publish.add_argument("--start-seq", type=int, default=0, metavar="N", help="sequence number of the first chunk")
    _pace(publish, fast_by_default=False, what="send files")
    publish.set_defaults(func=cmd_publish)

    identify = command(sub, "identify", "rank catalog songs for whole audio files")
    _model_index(identify)
    identify.add_argument("--top-k", type=int, default=5, metavar="K", help="songs listed per file")
    identify.add_argument("--json", action="store_true", help="one JSON object per file")
    identify.add_argument("files", nargs="+", help="audio files to identify")
    identify.set_defaults(func=cmd_identify)

    index = command(sub, "index", "build, extend or inspect a reference index")
    index_sub = index.add_subparsers(dest="index_command", required=True, metavar="ACTION")
    build = command(index_sub, "build", "embed a catalog into a new index folder")
    build.add_argument("--refs", required=True, help="refs CSV (song_id,title,path[,metadata...]) or a folder of audio")
    build.add_argument("--out", "--index", dest="out", required=True, metavar="DIR", help="the new index folder")
    build.add_argument("--type", choices=INDEX_TYPE_CHOICES, default=None, help="FAISS index type (default: [index_build] index_type)")
    build.add_argument("--force", action="store_true", help="replace the index already in --out (refused without this)")
    build.add_argument("--skip-errors", action="store_true", help="leave out files that cannot be decoded (listed in the output) instead of failing")
    build.add_argument("--shard", default=None, metavar="I/N", help="keep only the songs of shard I of N (a catalog past one host: `coverwatch shard`)")
    _model_index(build, index=False)
    add = command(index_sub, "add", "add songs to an index (existing vectors untouched)")
    add.add_argument("index_dir", nargs="?", default=None, metavar="INDEX_DIR", help="index folder (or --index, or [index] path)")
    add.add_argument("--refs", required=True, help="refs CSV or a folder of audio with the new songs")
    add.add_argument("--replace", action="store_true", help="a song_id already indexed is replaced by the new file (upsert) instead of refused")
    add.add_argument("--skip-errors", action="store_true", help="leave out files that cannot be decoded (listed in the output) instead of failing")
    add.add_argument("--shard", default=None, metavar="I/N", help="add only the songs of shard I of N (the index is that shard)")
    _model_index(add)
    remove = command(index_sub, "remove", "remove songs from an index (the others are not re-embedded)")
    remove.add_argument("song_ids", nargs="+", metavar="SONG_ID", help="song_id(s) to remove, as `index info` / the events name them")
    remove.add_argument("--from", dest="index_dir", default=None, metavar="INDEX_DIR", help="index folder (or --index, or [index] path)")
    _model_index(remove)
    info = command(index_sub, "info", "print an index's songs, vectors, thresholds and files")
    info.add_argument("index_dir", nargs="?", default=None, metavar="INDEX_DIR", help="index folder (or --index, or [index] path)")
    info.add_argument("--index", metavar="DIR", help="index folder (overrides [index] path)")
    index.set_defaults(func=cmd_index)

    calibrate = command(sub, "calibrate", "set an index's thresholds from non-catalog audio for a target false-alarm rate")
    calibrate.add_argument("index_dir", nargs="?", default=None, metavar="INDEX_DIR", help="index folder (or --index, or [index] path)")
    calibrate.add_argument("--audio", nargs="+", required=True, metavar="FILE", help="audio files of music that is NOT in the catalog")
    _model_index(calibrate)
    calibrate.set_defaults(func=cmd_calibrate)

    shard = command(sub, "shard", "a catalog past one host: serve an index shard, or join shards into a catalog file")
    shard_sub = shard.add_subparsers(dest="shard_command", required=True, metavar="ACTION")
    shard_serve = command(shard_sub, "serve", "serve one index (a shard built with `index build --shard I/N`) to daemons over HTTP")
    shard_serve.add_argument("index_dir", nargs="?", default=None, metavar="INDEX_DIR", help="index folder (or --index, or [index] path)")
    shard_serve.add_argument("--index", metavar="DIR", help="index folder (overrides [index] path)")
    shard_serve.add_argument("--host", default="127.0.0.1", help="address to bind (a private interface: no TLS, no auth)")
    shard_serve.add_argument("--port", type=int, default=7700, help="port to bind (0: any free one, printed)")
    shard_catalog = command(shard_sub, "catalog", "write a catalog file naming shard servers (then `coverwatch calibrate FILE`; serve with --index FILE)")
    shard_catalog.add_argument("urls", nargs="+", metavar="URL", help="shard servers, http://HOST:PORT")
    shard_catalog.add_argument("--out", required=True, metavar="FILE", help="the catalog file")
    shard_catalog.add_argument("--force", action="store_true", help="replace an existing catalog file")
    shard_catalog.add_argument("--model", metavar="DIR", help="model folder the shards must have been built with (default: the shipped model)")
    shard.set_defaults(func=cmd_shard)

    demo = command(sub, "demo", "generate the demo catalog and stream, then monitor it")
    demo.add_argument("--workdir", default=None, metavar="DIR", help="where demo data is cached (default ~/.cache/coverwatch/demo)")
    _pace(demo, fast_by_default=True, what="play the stream")
    demo.set_defaults(func=cmd_demo)

    train = command(sub, "train", "train the encoder (needs the train extra)")
    train.add_argument("--manifest", required=True, help="dataset manifest.csv (group_id,path[,split])")
    train.add_argument("--out", required=True, metavar="DIR", help="run folder: checkpoints, curve")
    train.add_argument("--cache", default=None, metavar="DIR", help="CQT feature cache (default OUT/features)")
    train.add_argument(
        "--init", default=None, metavar="CHECKPOINT",
        help="fine-tune: start from this run's encoder (a .pt checkpoint) or an exported model folder (encoder.onnx + model.json; same dims)",
    )  # fmt: skip
    train.add_argument("--negatives", default=None, metavar="MANIFEST", help="out-of-catalog music (`data negatives`), for [train] outside_per_batch")
    train.set_defaults(func=cmd_train)

    export = command(sub, "export", "export a checkpoint to ONNX + sidecar (needs the train extra)")
    export.add_argument("--checkpoint", required=True, help="a run's best.pt or last.pt")
    export.add_argument("--out", required=True, metavar="DIR", help="model folder to write (cqt.onnx, encoder.onnx, model.json)")
    export.set_defaults(func=cmd_export)

    soup = command(sub, "soup", "interpolate two encoders of one lineage in weight space (needs the train extra)")
    soup.add_argument("--start", required=True, help="the starting point: a .pt checkpoint or an exported model folder")
    soup.add_argument("--tuned", required=True, help="the fine-tuned end: a .pt checkpoint or an exported model folder")
    soup.add_argument("--alpha", type=float, default=0.5, help="0 = start, 1 = tuned (default 0.5)")
    soup.add_argument("--manifest", required=True, help="training manifest whose batches re-measure the norms")
    soup.add_argument("--cache", default=None, metavar="DIR", help="CQT feature cache (default beside OUT)")
    soup.add_argument("--out", required=True, metavar="PT", help="checkpoint to write, for `coverwatch export`")
    soup.set_defaults(func=cmd_soup)

    # A command of its own rather than `export --quantize`: it starts from an exported folder,
    # not a checkpoint, so it runs without torch (onnx + onnxruntime, the `quantize` extra).
    quantize = command(sub, "quantize", "copy a model folder with an int8 or fp16 encoder (needs the quantize extra)")
    quantize.add_argument("model_dir", help="exported float32 model folder")
    quantize.add_argument("out_dir", help="new model folder (CQT graph copied, encoder converted)")
    quantize.add_argument("--mode", choices=("int8", "fp16"), default="int8", help="encoder precision")
    quantize.set_defaults(func=cmd_quantize)

    data = command(sub, "data", "render cover-group datasets (needs the data extra)")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    data_build = command(data_sub, "build", "render cover groups from the music21 corpus")
    data_build.add_argument("--out", required=True, metavar="DIR", help="dataset folder (audio/ and manifest.csv)")
    data_build.add_argument("--groups", type=int, default=1200, help="cover groups to render")
    data_build.add_argument("--versions", type=int, default=4, help="versions per group")
    data_build.add_argument("--seed", type=int, default=0, help="random seed (same seed, same dataset)")
    data_build.add_argument("--max-seconds", type=float, default=40.0, help="each version is cut at this length")
    data_build.add_argument("--degrade-fraction", type=float, default=0.0, help="share of versions given audio degradations")
    data_build.add_argument("--hold-out-variants", action="store_true", help="never use the held-out real-variant families")
    data_build.add_argument(
        "--styled-fraction", type=float, default=0.0,
        help="share of training versions played by the second arranger (model/styles.py: re-harmonised, other textures, tune in other voices)",
    )  # fmt: skip
    data_build.add_argument(
        "--train-soundfont", action="append", default=[], metavar="SF2",
        help="synthesise training versions with these soundfonts (repeat; default: TimGM6mb from pretty_midi); FluidR3 is refused",
    )  # fmt: skip
    data_variants = command(data_sub, "variants", "render real tune-variant groups (held-out ones for evaluation)")
    data_variants.add_argument("--out", required=True, metavar="DIR", help="dataset folder")
    data_variants.add_argument("--which", choices=("heldout", "train"), default="heldout", help="which families")
    data_variants.add_argument("--groups", type=int, default=120, help="at most this many groups")
    data_variants.add_argument("--seed", type=int, default=0, help="random seed")
    data_variants.add_argument("--exclude-trained", action="append", default=[], metavar="MANIFEST", help="skip families in this manifest's train split")
    data_merge = command(data_sub, "merge", "one training manifest from a cover dataset and a training variant dataset")
    data_merge.add_argument("--covers", required=True, metavar="MANIFEST", help="manifest.csv of `data build`")
    data_merge.add_argument("--variants", required=True, metavar="MANIFEST", help="manifest.csv of `data variants --which train`")
    data_merge.add_argument("--out", required=True, metavar="MANIFEST", help="merged manifest.csv (paths relative to its folder)")
    data_leaveout = command(data_sub, "leaveout", "render the leave-out cover set (unused collection, arranger, synth and effects; model/leaveout.py)")
    data_leaveout.add_argument("--out", required=True, metavar="DIR", help="dataset folder (audio/ and manifest.csv)")
    data_leaveout.add_argument("--groups", type=int, default=120, help="tunes, one group of 4 versions each")
    data_leaveout.add_argument("--seed", type=int, default=0, help="random seed (same seed, same set)")
    data_negatives = command(data_sub, "negatives", "list installed out-of-catalog training music (model/negatives.py)")
    data_negatives.add_argument("--out", required=True, metavar="DIR", help="folder for the negatives manifest")
    data_demo = command(data_sub, "demo", "render the demo catalog and stream")
    data_demo.add_argument("--out", required=True, metavar="DIR", help="demo folder")
    data.set_defaults(func=cmd_data)

    evaluate = command(sub, "evaluate", "held-out retrieval figures vs the chroma baseline")
    evaluate.add_argument("--manifest", required=True, help="dataset manifest.csv to evaluate on")
    evaluate.add_argument("--split", default="val", help="manifest split to use")
    _model_index(evaluate, index=False)
    evaluate.add_argument("--report", default=None, metavar="FILE", help="write a Markdown report (and its plot) here, e.g. bench/MODEL_RESULTS.md")
    evaluate.add_argument("--previous-model", default=None, metavar="DIR", help="also evaluate this model folder, for comparison")
    evaluate.set_defaults(func=cmd_evaluate)

    simulate = command(sub, "simulate", "render broadcast-like streams with a ground-truth timeline (needs the data extra)")
    simulate.add_argument("--out", required=True, metavar="DIR", help="simulation folder: catalog/ and streams/ (cached)")
    simulate.add_argument("--seeds", type=int, nargs="+", default=[1], help="one stream per seed")
    simulate.add_argument("--minutes", type=float, default=60.0, help="length of each stream")
    simulate.add_argument("--catalog-seed", type=int, default=0, help="seed of the catalog's tunes")
    simulate.add_argument("--catalog-size", type=int, default=40, help="songs in the catalog")
    simulate.add_argument("--calibration-audio", action="store_true", help="streams without plays, from material kept for calibration")
    simulate.set_defaults(func=cmd_simulate)

    evaluate_stream = command(sub, "evaluate-stream", "run the daemon over simulated streams and score it like a broadcast monitor")
    evaluate_stream.add_argument("streams", nargs="+", help="stream audio files with a timeline .json beside each")
    _model_index(evaluate_stream)
    evaluate_stream.add_argument("--out", default="bench/stream_eval", metavar="DIR", help="report folder (REPORT.md, plots, events)")
    evaluate_stream.add_argument("--no-plots", action="store_true", help="skip the timeline plots")
    evaluate_stream.add_argument("--rescore", action="store_true", help="score the events a previous run left in --out, without running the daemon")
    evaluate_stream.set_defaults(func=cmd_evaluate_stream)

    report = command(sub, "report", "write an as-run log (CSV, and an HTML page with a timeline) from match events")
    report.add_argument("events", nargs="+", metavar="EVENTS", help="match-event JSON-lines files (a replayed file's duplicates are dropped)")
    report.add_argument("--out", required=True, metavar="DIR", help="folder for as-run.csv and as-run.html")
    report.add_argument("--title", default="As-run log", help="the page's title")
    report.set_defaults(func=cmd_report)

    bench = command(sub, "bench", "run a benchmark from bench/ (source checkout); results go to bench/RESULTS.md")
    bench.add_argument("name", choices=BENCHMARKS, help="bench/bench_NAME.py")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="passed to the script (see its --help)")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = _config(args)
    except ConfigError as exc:
        print(f"coverwatch: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    setup_logging(args.log_level or cfg.logging.level)
    try:
        return int(args.func(args, cfg))
    except USER_ERRORS as exc:
        print(f"coverwatch: error: {exc}", file=sys.stderr)
        return ExitCode.FAILURE
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED
