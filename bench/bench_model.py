"""Encoder cost against window length: float32 vs quantised encoders, threads, session options.

Measures onnxruntime latency of encoder.onnx alone (the CQT is shared by all variants and
benchmarked by bench_stream.py) for windows of 5-60 s at batch 1, 8 and 32 (the daemon
batches due windows across streams), each model variant at 1 and 2 intra-op threads; then
session options (graph optimisation level, intra/inter threads, parallel execution) for one
representative case. The CPU is shared with other jobs, so every configuration is timed in
round-robin passes (load drift hits all alike), the median over passes is reported, and the
load average before and after is recorded. Besides wall time each call's process CPU time is
recorded: other jobs inflate latency but hardly the CPU a call needs, so CPU time is the
steadier measure of cost (with 2 threads it includes the pool's spin-waiting).

With --evaluation (the JSON `coverwatch evaluate --model Q --previous-model FP32` prints),
the section also tabulates the accuracy change and the ship/no-ship decision by the rule
"ship only if mAP drops by at most MAX_MAP_DROP at every query length".

Input frames are random log-CQT-like values: onnxruntime's cost does not depend on them.

Usage: python bench/bench_model.py [--quantized runs/model_int8 ...] [--passes 7] [--evaluation runs/eval_int8/stdout.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from report import write_section  # bench/report.py, beside this script

from coverwatch.streamer.config import StreamConfig
from coverwatch.streamer.embed.artifacts import DEFAULT_MODEL_DIR, MODEL_FILES, load_model_info
from coverwatch.streamer.frontend.audio import N_BINS, seconds_to_frames

SECTION = "## Encoder cost vs window length (bench/bench_model.py)"
PLOT = Path(__file__).resolve().parent / "model_cost.png"
WINDOWS_S = (5.0, 10.0, 20.0, 40.0, 60.0)
BATCHES = (1, 8, 32)
THREADS = (1, 2)
OPTIONS_CASE = (8, 20.0)  # (batch, window s) for the session-option sweep
MIN_MEASURE_S = 0.05  # one measurement repeats a short case back to back for at least this long
MAX_RUNS = 20
MAX_MAP_DROP = 0.01  # the shipping rule: quantised mAP may fall at most this much at any length
GRAPH_LEVELS = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


@dataclass(frozen=True)
class SessionSpec:
    intra: int = 2
    inter: int = 1
    level: str = "all"
    parallel: bool = False  # ORT_PARALLEL runs independent graph branches on the inter-op pool
    spin: bool = True  # intra-op threads busy-wait for work (onnxruntime's default)

    @property
    def label(self) -> str:
        mode = "parallel" if self.parallel else "sequential"
        return f"intra {self.intra}, inter {self.inter}, opt {self.level}, {mode}{'' if self.spin else ', no spinning'}"


# The embedder's settings first (intra = [model] threads, inter 1, all optimisations), then one change at a time.
OPTION_SPECS = (
    SessionSpec(),
    SessionSpec(level="disabled"),
    SessionSpec(level="basic"),
    SessionSpec(level="extended"),
    SessionSpec(inter=2, parallel=True),
    SessionSpec(intra=1, inter=2, parallel=True),
    SessionSpec(spin=False),
    SessionSpec(intra=1),
)


def make_session(path: Path, spec: SessionSpec) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = spec.intra
    options.inter_op_num_threads = spec.inter
    options.graph_optimization_level = GRAPH_LEVELS[spec.level]
    options.execution_mode = ort.ExecutionMode.ORT_PARALLEL if spec.parallel else ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    if not spec.spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def frames_input(batch: int, window_s: float, seed: int = 0) -> np.ndarray:
    """(B, T, F) float32 random frames around typical log-CQT values."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((batch, seconds_to_frames(window_s), N_BINS)) * 2.0 - 6.0).astype(np.float32)


def time_runs(session: ort.InferenceSession, frames: np.ndarray, runs: int) -> tuple[float, float]:
    """(wall, process CPU) seconds per run, averaged over `runs` back-to-back runs."""
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for _ in range(runs):
        session.run(None, {"frames": frames})
    return (time.perf_counter() - wall0) / runs, (time.process_time() - cpu0) / runs


def round_robin(cases: dict, passes: int) -> dict:
    """{key: (session, frames)} -> {key: (median wall s, median CPU s)} over `passes` round-robin passes.

    The warm-up run sizes each measurement to about MIN_MEASURE_S of back-to-back runs, so
    millisecond cases are not at the mercy of one scheduler tick on the shared CPU.
    """
    runs = {key: max(1, min(MAX_RUNS, round(MIN_MEASURE_S / time_runs(*case, 1)[0]))) for key, case in cases.items()}
    times: dict = {key: [] for key in cases}
    for _ in range(passes):
        for key, (session, frames) in cases.items():
            times[key].append(time_runs(session, frames, runs[key]))
    return {key: tuple(np.median(np.array(values), axis=0)) for key, values in times.items()}


def sweep_windows(models: dict[str, Path], passes: int) -> list[dict]:
    """Latency of every (model, threads, batch, window) at the embedder's default options."""
    sessions = {
        (name, t): make_session(path / MODEL_FILES["encoder"], SessionSpec(intra=t)) for name, path in models.items() for t in THREADS
    }
    inputs = {(b, w): frames_input(b, w) for b in BATCHES for w in WINDOWS_S}
    cases = {(*key, *shape): (session, inputs[shape]) for key, session in sessions.items() for shape in inputs}
    medians = round_robin(cases, passes)
    return [
        {
            "model": m,
            "threads": t,
            "batch": b,
            "window_s": w,
            "ms": wall * 1e3,
            "ms_per_window": wall * 1e3 / b,
            "cpu_ms_per_window": cpu * 1e3 / b,
        }
        for (m, t, b, w), (wall, cpu) in medians.items()
    ]


def sweep_options(models: dict[str, Path], passes: int) -> list[dict]:
    batch, window_s = OPTIONS_CASE
    frames = frames_input(batch, window_s)
    cases = {(m, spec): (make_session(path / MODEL_FILES["encoder"], spec), frames) for m, path in models.items() for spec in OPTION_SPECS}
    return [
        {"model": m, "options": spec.label, "ms": wall * 1e3, "cpu_ms": cpu * 1e3}
        for (m, spec), (wall, cpu) in round_robin(cases, passes).items()
    ]


def streams_per_core(rows: list[dict], model: str, threads: int, batch: int) -> float:
    """Streams one CPU core's encoder work keeps up with: each stream embeds every configured window once per hop."""
    stream = StreamConfig()
    cost = {r["window_s"]: r["cpu_ms_per_window"] for r in rows if (r["model"], r["threads"], r["batch"]) == (model, threads, batch)}
    per_stream_ms = sum(np.interp(w, sorted(cost), [cost[k] for k in sorted(cost)]) for w in stream.windows_s)
    return stream.hop_s * 1e3 / per_stream_ms


def accuracy_deltas(results: dict) -> tuple[list[dict], bool]:
    """Rows (query length, mAP/top-1 of both models, deltas) from `coverwatch evaluate` JSON, and the ship verdict."""
    methods = results["methods"]
    base_name = next(name for name in methods if name.startswith("previous model"))
    new, base = methods["model"], methods[base_name]
    lengths = [("whole", new["whole_track"], base["whole_track"])]
    lengths += [(k, new["excerpts"][k], base["excerpts"][k]) for k in base["excerpts"]]
    rows = [
        {
            "query": label,
            "mAP": (b["mAP"], n["mAP"], n["mAP"] - b["mAP"]),
            "top1": (b["top1"], n["top1"], n["top1"] - b["top1"]),
        }
        for label, n, b in lengths
    ]
    return rows, all(r["mAP"][2] >= -MAX_MAP_DROP for r in rows)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows}, key=lambda m: m != "fp32")
    colours = dict(zip(models, ("tab:blue", "tab:orange", "tab:green", "tab:red")))
    fig, axes = plt.subplots(2, len(BATCHES), figsize=(4.2 * len(BATCHES), 7.0))
    for row, (key, ylabel) in enumerate((("ms_per_window", "wall ms per window"), ("cpu_ms_per_window", "CPU ms per window"))):
        for ax, batch in zip(axes[row], BATCHES):
            for model in models:
                for threads, style in zip(THREADS, ("--", "-")):
                    mine = [r for r in rows if (r["model"], r["threads"], r["batch"]) == (model, threads, batch)]
                    pts = sorted((r["window_s"], r[key]) for r in mine)
                    ax.plot(*zip(*pts), style, marker="o", color=colours[model], label=f"{model}, {threads} thr")
            ax.set(title=f"batch {batch}", xlabel="window (s)", ylabel=ylabel, xticks=WINDOWS_S)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("encoder cost per window (median over round-robin passes)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _window_table(rows: list[dict], batch: int) -> list[str]:
    keys = sorted({(r["model"], r["threads"]) for r in rows}, key=lambda k: (k[0] != "fp32", k))
    lines = [
        f"Batch {batch}: wall ms per call (wall / CPU ms per window in brackets)",
        "",
        "| model, threads | " + " | ".join(f"{w:g} s" for w in WINDOWS_S) + " |",
        "|---|" + "---|" * len(WINDOWS_S),
    ]
    for model, threads in keys:
        cells = {r["window_s"]: r for r in rows if (r["model"], r["threads"], r["batch"]) == (model, threads, batch)}
        lines.append(
            f"| {model}, {threads} | "
            + " | ".join(f"{c['ms']:.1f} ({c['ms_per_window']:.2f} / {c['cpu_ms_per_window']:.2f})" for c in map(cells.get, WINDOWS_S))
            + " |"
        )
    return lines + [""]


def markdown(result: dict) -> str:
    rows, models = result["windows"], result["models"]
    lines = [
        SECTION,
        "",
        (
            f"Date: {result['date']} · machine: {platform.machine()}, {os.cpu_count()} CPUs (shared with other jobs), "
            f"onnxruntime {ort.__version__} · load average (1 min) before / after: {result['load'][0]:.2f} / {result['load'][1]:.2f}"
        ),
        f"Command: `python bench/bench_model.py {result['argv']}` · {result['passes']} round-robin passes, median",
        "",
        "Models: " + ", ".join(f"{name} = {info}" for name, info in models.items()),
        "",
        (
            "Encoder only (cqt.onnx is identical in all variants), default session options of streamer/embed/embedder.py "
            "(intra-op threads = [model] threads, inter-op 1, all graph optimisations). Plot: [model_cost.png](model_cost.png)."
        ),
        "",
    ]
    for batch in BATCHES:
        lines += _window_table(rows, batch)
    lines += [
        (
            "Streams per CPU core, encoder only (each stream embeds 10, 20 and 40 s windows every 2.5 s; "
            "CPU time per window at batch 8; the CQT costs about as much again, see the streaming section):"
        ),
        "",
        "| model | 1 thread | 2 threads |",
        "|---|---|---|",
    ]
    for model in models:
        lines.append(f"| {model} | {streams_per_core(rows, model, 1, 8):.0f} | {streams_per_core(rows, model, 2, 8):.0f} |")
    batch, window_s = OPTIONS_CASE
    lines += ["", f"Session options, batch {batch} x {window_s:g} s windows (wall / CPU ms per call):", ""]
    lines += ["| options | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    for spec in OPTION_SPECS:
        cells = {r["model"]: r for r in result["options"] if r["options"] == spec.label}
        lines.append(f"| {spec.label} | " + " | ".join(f"{cells[m]['ms']:.1f} / {cells[m]['cpu_ms']:.1f}" for m in models) + " |")
    if result.get("accuracy"):
        acc = result["accuracy"]
        lines += [
            "",
            f"Accuracy of {acc['model']} against float32 (`coverwatch evaluate`, {acc['tracks']} val tracks, {acc['groups']} groups):",
            "",
            "| query | mAP fp32 | mAP quantised | ΔmAP | top-1 fp32 | top-1 quantised | Δtop-1 |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in acc["rows"]:
            (mb, mn, md), (tb, tn, td) = r["mAP"], r["top1"]
            lines.append(f"| {r['query']} | {mb:.3f} | {mn:.3f} | {md:+.4f} | {tb:.3f} | {tn:.3f} | {td:+.4f} |")
        verdict = "ship" if acc["ship"] else "do not ship"
        lines += ["", f"Rule: ship only if mAP drops by at most {MAX_MAP_DROP} at every query length → **{verdict}**."]
    return "\n".join(lines) + "\n"


def _describe(model_dir: Path) -> str:
    info = load_model_info(model_dir)
    mode = info.quantization.get("mode", "float32")
    return f"`{model_dir}` ({mode}, model {info.model_hash})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL_DIR), help="float32 model folder")
    parser.add_argument("--quantized", nargs="*", default=["runs/model_int8"], help="quantised model folders (coverwatch quantize)")
    parser.add_argument("--passes", type=int, default=7)
    parser.add_argument("--evaluation", default=None, help="JSON printed by coverwatch evaluate --model Q --previous-model FP32")
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md and the plot alone")
    args = parser.parse_args()
    models = {"fp32": Path(args.model)}
    for folder in map(Path, args.quantized):
        models[load_model_info(folder).quantization["mode"]] = folder
    load_before = os.getloadavg()[0]
    result = {
        "date": datetime.date.today().isoformat(),
        "argv": " ".join(sys.argv[1:]),
        "passes": args.passes,
        "models": {name: _describe(path) for name, path in models.items()},
        "windows": sweep_windows(models, args.passes),
        "options": sweep_options(models, args.passes),
    }
    result["load"] = (load_before, os.getloadavg()[0])
    if args.evaluation:
        evaluation = json.loads(Path(args.evaluation).read_text())
        rows, ship = accuracy_deltas(evaluation)
        result["accuracy"] = {
            "model": evaluation["model_hash"],
            "tracks": evaluation["tracks"],
            "groups": evaluation["groups"],
            "rows": rows,
            "ship": ship,
        }
    text = markdown(result)
    print(text)
    if not args.no_write:
        plot(result["windows"], PLOT)
        write_section(SECTION, text)


if __name__ == "__main__":
    main()
