"""`coverwatch evaluate` end to end on a tiny manifest: report, plot, the comparison row, and no
files when no report is asked for."""

from __future__ import annotations

import numpy as np
import soundfile

from coverwatch.model.evaluate import EXCERPT_SECONDS, evaluate_heldout
from coverwatch.streamer.frontend.audio import SAMPLE_RATE
from tests.conftest import tune


def test_evaluate_writes_report_and_plot_with_a_previous_model(random_model_dir, tmp_path):
    rows = ["group_id,version,path,split"]
    for group in range(3):
        for version, (transpose, gain) in enumerate([(0, 1.0), (2, 0.5)]):
            audio = tune(group, 35.0) * gain
            if transpose:  # a crude cover: every sample index stretched, pitch up by resampling
                audio = np.interp(np.arange(0, len(audio), 2 ** (transpose / 12)), np.arange(len(audio)), audio).astype(np.float32)
            path = tmp_path / f"g{group}v{version}.wav"
            soundfile.write(path, audio, SAMPLE_RATE)
            rows.append(f"g{group},{version},{path},val")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n")
    report = tmp_path / "RESULTS.md"
    results = evaluate_heldout(manifest, random_model_dir, report, threads=1, previous_model_dir=random_model_dir)
    assert results["tracks"] == 6 and results["groups"] == 3
    methods = results["methods"]
    aligned = "model + alignment (identify)"
    assert set(methods) == {"model", aligned, f"previous model {results['model_hash']}", "chroma_2dftm", "random"}
    # the untrained model ranks at chance; the melody alignment finds each tune's other version
    assert methods[aligned]["whole_track"]["top1"] == 1.0 > methods["model"]["whole_track"]["top1"]
    assert methods["model"] == methods[f"previous model {results['model_hash']}"]  # the same model twice
    assert set(methods["model"]["excerpts"]) == {f"{s:g}s" for s in EXCERPT_SECONDS}
    assert all(0.0 <= m["whole_track"]["mAP"] <= 1.0 for m in methods.values())
    text = report.read_text()
    assert "| chroma_2dftm |" in text and "5s excerpts" in text and "30s excerpts" in text
    assert (tmp_path / "RESULTS_excerpts.png").stat().st_size > 1000
    before = sorted(tmp_path.iterdir())
    quiet = evaluate_heldout(manifest, random_model_dir, None, threads=1)  # no report asked for: nothing written
    assert sorted(tmp_path.iterdir()) == before
    assert quiet["methods"]["model"] == methods["model"]
