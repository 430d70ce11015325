"""The `coverwatch` command line: serve, identify, index build|add|info, and the training-side
commands (data, train, export, quantize, evaluate, demo) that need the `train`/`data`/`quantize` extras.

Each command returns a named exit code; errors the user can fix print one line naming the
problem on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import subprocess
import sys
from pathlib import Path

from kafka.errors import KafkaError

from index_builder.refs import RefsError, read_refs
from streamer.artifacts import ArtifactError, resolve_model_dir
from streamer.audio import AudioError
from streamer.config import INDEX_TYPE_CHOICES, Config, ConfigError, load_config, replace_section
from streamer.daemon import ExitCode, Server
from streamer.publish import PublishError

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


def _config(args: argparse.Namespace) -> Config:
    cfg = load_config(args.config)
    if getattr(args, "index", None):
        cfg = replace_section(cfg, "index", path=str(args.index))
    if getattr(args, "model", None):
        cfg = replace_section(cfg, "model", path=str(args.model))
    return cfg


def cmd_serve(args: argparse.Namespace, cfg: Config) -> ExitCode:
    if args.metrics_port is not None:
        cfg = replace_section(cfg, "metrics", port=args.metrics_port)
    return Server(cfg, args.source, fast=args.fast, stream_id=args.stream_id).run()


def cmd_publish(args: argparse.Namespace, cfg: Config) -> ExitCode:
    from streamer.publish import publish
    from streamer.sources import parse_source

    source = parse_source(args.source, mic=cfg.mic, block_s=args.chunk_s or cfg.stream.chunk_s, fast=args.fast, stream_id=args.stream)
    stats = publish(source, args.stream, args.topic or cfg.kafka.audio_topics[0], cfg.kafka, encoding=args.encoding, start_seq=args.start_seq)
    print(json.dumps(dataclasses.asdict(stats)))
    return ExitCode.OK


def _embedder(cfg: Config):
    from streamer.embedder import Embedder

    return Embedder(resolve_model_dir(cfg.model.path), cfg.model.threads)


def cmd_identify(args: argparse.Namespace, cfg: Config) -> ExitCode:
    from index_builder.store import load_index
    from streamer.identify import identify_file

    embedder = _embedder(cfg)
    index = load_index(Path(cfg.index.path), expected_model_hash=embedder.info.model_hash)
    failed = 0
    for path in args.files:
        try:
            record = identify_file(embedder, index, Path(path), args.top_k, max(cfg.stream.windows_s))
        except AudioError as exc:
            failed += 1
            record = {"file": path, "error": str(exc)}
            log.error("%s", exc)
        print(json.dumps(record) if args.json else _format_matches(record), flush=True)
    return ExitCode.FAILURE if failed else ExitCode.OK


def _format_matches(record: dict) -> str:
    if "error" in record:
        return f"{record['file']}: ERROR {record['error']}"
    lines = [f"{record['file']}:"] + [f"  {m['score']:.3f}  {m['song_id']}  {m['title']}" for m in record["matches"]]
    return "\n".join(lines)


def cmd_index(args: argparse.Namespace, cfg: Config) -> ExitCode:
    from index_builder.build import add_to_index, build_index, index_info

    if args.index_command == "info":
        print(json.dumps(index_info(Path(args.index_dir)), indent=2))
        return ExitCode.OK
    refs = read_refs(Path(args.refs))
    embedder = _embedder(cfg)
    if args.index_command == "build":
        build_cfg = cfg.index_build if not args.type else replace_section(cfg, "index_build", index_type=args.type).index_build
        store = build_index(refs, Path(args.out), embedder, build_cfg, cfg.stream)
        target = args.out
    else:
        store = add_to_index(Path(args.index_dir), refs, embedder, cfg.index_build, cfg.stream)
        target = args.index_dir
    print(json.dumps({"index_dir": str(target), "songs": len(store.songs), "vectors": store.n_vectors, "calibration": store.calibration}))
    return ExitCode.OK


def cmd_train(args: argparse.Namespace, cfg: Config) -> ExitCode:
    from model.train import TrainPaths, train

    cache = Path(args.cache) if args.cache else Path(args.out) / "features"
    init = Path(args.init) if args.init else None
    negatives = Path(args.negatives) if args.negatives else None
    metrics = train(cfg.train, TrainPaths(Path(args.manifest), Path(args.out), cache, init, negatives))
    print(json.dumps(metrics))
    return ExitCode.OK


def cmd_export(args: argparse.Namespace, cfg: Config) -> ExitCode:
    from model.export import export_model

    info = export_model(Path(args.checkpoint), Path(args.out))
    print(json.dumps(info.to_dict()))
    return ExitCode.OK


def cmd_quantize(args: argparse.Namespace, cfg: Config) -> ExitCode:
    from model.quantize import quantize_model

    info = quantize_model(Path(args.model_dir), Path(args.out_dir), args.mode)
    print(json.dumps(info.to_dict()))
    return ExitCode.OK


def cmd_data(args: argparse.Namespace, cfg: Config) -> ExitCode:
    from model.dataset import build_cover_dataset, build_demo

    if args.data_command == "build":
        excluded = frozenset()
        if args.hold_out_variants:
            from model.variants import find_variant_groups

            excluded = frozenset(g.family for g in find_variant_groups() if g.heldout)
        path = build_cover_dataset(
            Path(args.out), n_groups=args.groups, versions_per_group=args.versions, seed=args.seed, max_seconds=args.max_seconds,
            degrade_fraction=args.degrade_fraction, exclude_families=excluded,
        )  # fmt: skip
    elif args.data_command == "variants":
        from model.variants import build_variant_dataset, find_variant_groups, trained_families

        groups = [g for g in find_variant_groups() if g.heldout == (args.which == "heldout")]
        trained = frozenset().union(*(trained_families(Path(m)) for m in args.exclude_trained))
        split = "val" if args.which == "heldout" else "train"
        path = build_variant_dataset(Path(args.out), groups, args.groups, args.seed, exclude_families=trained, split=split)
    elif args.data_command == "merge":
        from model.variants import merge_training_manifests

        path = merge_training_manifests(Path(args.covers), Path(args.variants), Path(args.out))
    elif args.data_command == "negatives":
        from model.negatives import build_negative_manifest

        path = build_negative_manifest(Path(args.out))
    else:
        path = build_demo(Path(args.out))
    print(str(path))
    return ExitCode.OK


def cmd_evaluate(args: argparse.Namespace, cfg: Config) -> ExitCode:
    from model.evaluate import evaluate_heldout

    previous = Path(args.previous_model) if args.previous_model else None
    report_path = Path(args.report) if args.report else None
    report = evaluate_heldout(Path(args.manifest), resolve_model_dir(cfg.model.path), report_path, cfg.model.threads, args.split, previous)
    print(json.dumps(report))
    return ExitCode.OK


def cmd_demo(args: argparse.Namespace, cfg: Config) -> ExitCode:
    from streamer.demo import run_demo

    return run_demo(cfg, Path(args.workdir) if args.workdir else None, realtime=args.realtime)


def cmd_simulate(args: argparse.Namespace, cfg: Config) -> ExitCode:
    from model.simulate import simulate

    paths = simulate(
        Path(args.out), args.seeds, args.minutes * 60.0, args.catalog_seed, args.catalog_size, background=args.calibration_audio
    )
    print(json.dumps({"catalog": str(Path(args.out) / "catalog" / "refs.csv"), "streams": [str(p) for p in paths]}))
    return ExitCode.OK


def cmd_evaluate_stream(args: argparse.Namespace, cfg: Config) -> ExitCode:
    from streamer.stream_eval import evaluate_streams

    summary = evaluate_streams(cfg, [Path(p) for p in args.streams], Path(args.out), plots=not args.no_plots, rescore=args.rescore)
    print(json.dumps(summary))
    return ExitCode.OK


def cmd_calibrate(args: argparse.Namespace, cfg: Config) -> ExitCode:
    from index_builder.calibrate import calibrate_index

    calibration = calibrate_index(Path(args.index_dir), [Path(p) for p in args.audio], _embedder(cfg), cfg)
    print(json.dumps(calibration))
    return ExitCode.OK


BENCHMARKS = ("streams", "stream", "model", "index", "store", "kafka", "soak", "separation")


def cmd_bench(args: argparse.Namespace, cfg: Config) -> ExitCode:
    """The benchmark scripts live in the source tree's bench/, beside the packages."""
    script = Path(__file__).resolve().parents[1] / "bench" / f"bench_{args.name}.py"
    if not script.is_file():
        raise OSError(f"{script} not found: `coverwatch bench` runs from a source checkout (git clone), not an installed wheel")
    return ExitCode(subprocess.call([sys.executable, str(script), *args.bench_args]) and ExitCode.FAILURE)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coverwatch", description="Live cover-song identification.")
    parser.add_argument("--config", default=None, help="config.toml (default: built-in defaults)")
    parser.add_argument("--log-level", default=None, choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="monitor a live source and print match events")
    serve.add_argument("--index", help="index folder (overrides [index] path)")
    serve.add_argument("--model", help="model folder (overrides [model] path)")
    serve.add_argument("--source", default="mic", help="kafka ([kafka] audio_topics), file:PATH, mic or mic:DEVICE")
    serve.add_argument("--metrics-port", type=int, default=None, help="Prometheus port (overrides [metrics] port; 0 = off)")
    serve.add_argument("--fast", action="store_true", help="feed files as fast as possible, not at real-time pace")
    serve.add_argument("--stream-id", default=None, help="stream name in events (default: file stem or 'mic')")
    serve.set_defaults(func=cmd_serve)

    publish = sub.add_parser("publish", help="send audio to Kafka as chunks (the capture client)")
    publish.add_argument("--source", required=True, help="file:PATH, mic or mic:DEVICE")
    publish.add_argument("--stream", required=True, help="stream id (the message key)")
    publish.add_argument("--topic", default=None, help="audio topic (default: the first of [kafka] audio_topics)")
    publish.add_argument("--encoding", choices=("s16le", "f32le"), default="s16le")
    publish.add_argument("--chunk-s", type=float, default=None, help="seconds per chunk (default [stream] chunk_s)")
    publish.add_argument("--start-seq", type=int, default=0, help="sequence number of the first chunk")
    publish.add_argument("--fast", action="store_true", help="send files as fast as possible, not at real-time pace")
    publish.set_defaults(func=cmd_publish)

    identify = sub.add_parser("identify", help="rank catalog songs for whole audio files")
    identify.add_argument("--index")
    identify.add_argument("--model")
    identify.add_argument("--top-k", type=int, default=5)
    identify.add_argument("--json", action="store_true", help="one JSON object per file")
    identify.add_argument("files", nargs="+")
    identify.set_defaults(func=cmd_identify)

    index = sub.add_parser("index", help="build, extend or inspect a reference index")
    index_sub = index.add_subparsers(dest="index_command", required=True)
    build = index_sub.add_parser("build")
    build.add_argument("--refs", required=True, help="refs CSV (song_id,title,path) or a folder of audio")
    build.add_argument("--out", required=True)
    build.add_argument("--type", choices=INDEX_TYPE_CHOICES, default=None, help="FAISS index type (default: [index_build] index_type)")
    build.add_argument("--model")
    add = index_sub.add_parser("add")
    add.add_argument("index_dir")
    add.add_argument("--refs", required=True)
    add.add_argument("--model")
    info = index_sub.add_parser("info")
    info.add_argument("index_dir")
    index.set_defaults(func=cmd_index)

    train = sub.add_parser("train", help="train the encoder (needs the train extra)")
    train.add_argument("--manifest", required=True, help="dataset manifest.csv (group_id,path[,split])")
    train.add_argument("--out", required=True, help="run folder: checkpoints, curve")
    train.add_argument("--cache", default=None, help="CQT feature cache (default OUT/features)")
    train.add_argument("--init", default=None, metavar="CHECKPOINT", help="fine-tune: start from this run's encoder (same dims)")
    train.add_argument(
        "--negatives", default=None, metavar="MANIFEST", help="out-of-catalog music (`data negatives`), for [train] outside_per_batch"
    )
    train.set_defaults(func=cmd_train)

    export = sub.add_parser("export", help="export a checkpoint to ONNX + sidecar")
    export.add_argument("--checkpoint", required=True)
    export.add_argument("--out", required=True)
    export.set_defaults(func=cmd_export)

    # A command of its own rather than `export --quantize`: it starts from an exported folder,
    # not a checkpoint, so it runs without torch (onnx + onnxruntime, the `quantize` extra).
    quantize = sub.add_parser("quantize", help="copy a model folder with an int8 or fp16 encoder")
    quantize.add_argument("model_dir", help="exported float32 model folder")
    quantize.add_argument("out_dir", help="new model folder (CQT graph copied, encoder converted)")
    quantize.add_argument("--mode", choices=("int8", "fp16"), default="int8")
    quantize.set_defaults(func=cmd_quantize)

    data = sub.add_parser("data", help="render cover-group datasets (needs the data extra)")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    data_build = data_sub.add_parser("build")
    data_build.add_argument("--out", required=True)
    data_build.add_argument("--groups", type=int, default=1200)
    data_build.add_argument("--versions", type=int, default=4)
    data_build.add_argument("--seed", type=int, default=0)
    data_build.add_argument("--max-seconds", type=float, default=40.0, help="each version is cut at this length")
    data_build.add_argument("--degrade-fraction", type=float, default=0.0, help="share of versions given audio degradations")
    data_build.add_argument("--hold-out-variants", action="store_true", help="never use the held-out real-variant families")
    data_variants = data_sub.add_parser("variants", help="render real tune-variant groups (held-out ones for evaluation)")
    data_variants.add_argument("--out", required=True)
    data_variants.add_argument("--which", choices=("heldout", "train"), default="heldout")
    data_variants.add_argument("--groups", type=int, default=120, help="at most this many groups")
    data_variants.add_argument("--seed", type=int, default=0)
    data_variants.add_argument(
        "--exclude-trained", action="append", default=[], metavar="MANIFEST", help="skip families in this manifest's train split"
    )
    data_merge = data_sub.add_parser("merge", help="one training manifest from a cover dataset and a training variant dataset")
    data_merge.add_argument("--covers", required=True, metavar="MANIFEST", help="manifest.csv of `data build`")
    data_merge.add_argument("--variants", required=True, metavar="MANIFEST", help="manifest.csv of `data variants --which train`")
    data_merge.add_argument("--out", required=True, help="merged manifest.csv (paths relative to its folder)")
    data_negatives = data_sub.add_parser("negatives", help="list installed out-of-catalog training music (model/negatives.py)")
    data_negatives.add_argument("--out", required=True)
    data_demo = data_sub.add_parser("demo")
    data_demo.add_argument("--out", required=True)
    data.set_defaults(func=cmd_data)

    evaluate = sub.add_parser("evaluate", help="held-out retrieval figures vs the chroma baseline")
    evaluate.add_argument("--manifest", required=True)
    evaluate.add_argument("--split", default="val")
    evaluate.add_argument("--model")
    evaluate.add_argument("--report", default=None, help="write a Markdown report (and its plot) here, e.g. bench/MODEL_RESULTS.md")
    evaluate.add_argument("--previous-model", default=None, help="also evaluate this model folder, for comparison")
    evaluate.set_defaults(func=cmd_evaluate)

    demo = sub.add_parser("demo", help="generate the demo catalog and stream, then monitor it")
    demo.add_argument("--workdir", default=None, help="where demo data is cached (default ~/.cache/coverwatch/demo)")
    demo.add_argument("--realtime", action="store_true", help="play the stream at real-time pace")
    demo.set_defaults(func=cmd_demo)

    simulate = sub.add_parser("simulate", help="render broadcast-like streams with a ground-truth timeline (needs the data extra)")
    simulate.add_argument("--out", required=True, help="simulation folder: catalog/ and streams/ (cached)")
    simulate.add_argument("--seeds", type=int, nargs="+", default=[1], help="one stream per seed")
    simulate.add_argument("--minutes", type=float, default=60.0, help="length of each stream")
    simulate.add_argument("--catalog-seed", type=int, default=0)
    simulate.add_argument("--catalog-size", type=int, default=40)
    simulate.add_argument("--calibration-audio", action="store_true", help="streams without plays, from material kept for calibration")
    simulate.set_defaults(func=cmd_simulate)

    evaluate_stream = sub.add_parser("evaluate-stream", help="run the daemon over simulated streams and score it like a broadcast monitor")
    evaluate_stream.add_argument("streams", nargs="+", help="stream audio files with a timeline .json beside each")
    evaluate_stream.add_argument("--index")
    evaluate_stream.add_argument("--model")
    evaluate_stream.add_argument("--out", default="bench/stream_eval", help="report folder (REPORT.md, plots, events)")
    evaluate_stream.add_argument("--no-plots", action="store_true")
    evaluate_stream.add_argument("--rescore", action="store_true", help="score the events a previous run left in --out, without running the daemon")
    evaluate_stream.set_defaults(func=cmd_evaluate_stream)

    calibrate = sub.add_parser("calibrate", help="set an index's thresholds from non-catalog audio for a target false-alarm rate")
    calibrate.add_argument("index_dir")
    calibrate.add_argument("--audio", nargs="+", required=True, help="audio files of music that is NOT in the catalog")
    calibrate.add_argument("--model")
    calibrate.set_defaults(func=cmd_calibrate)

    bench = sub.add_parser("bench", help="run a benchmark from bench/ (source checkout); results go to bench/RESULTS.md")
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
