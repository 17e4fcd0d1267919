"""scripts/benchmark.py curation: the simulated annotation loop's bookkeeping on a tiny configuration, and its
summaries against brute-force versions."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from _train_data import TINY, write_dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from benchmark import main as benchmark_main  # noqa: E402
from benchmarks import curation  # noqa: E402

NAMES = {1: "liver", 2: "Larynx"}  # one vocabulary name, one the vocabulary does not know (free text)


def test_area_under_curve_is_the_mean_over_the_budget():
    xs, ys = [2, 4, 6, 10], [0.1, 0.3, 0.2, 0.6]
    fine = np.linspace(2, 10, 80001)
    brute = float(np.mean(np.interp(fine, xs, ys)))  # the piecewise-linear curve's mean value
    assert curation.area_under_curve(xs, ys) == pytest.approx(brute, abs=1e-4)
    assert curation.area_under_curve([3], [0.5]) == 0.5


def test_summaries_average_over_seeds():
    def run(seed, dice):
        rounds = [{"labelled": n, "mean_dice": d, "foreground_voxels": 1_000_000 * n, "dice": {"a": d},
                   "scoring_seconds_per_image": 0.5 if i else None} for i, (n, d) in enumerate(zip((1, 3), dice))]
        return {"strategy": "x", "seed": seed, "rounds": rounds}

    summary = curation.summarise([run(0, (0.2, 0.4)), run(1, (0.4, 0.8))])["x"]
    assert summary["dice_mean"] == [0.3, 0.6] and summary["dice_std"] == [0.1, 0.2]
    assert summary["auc_per_seed"] == [0.3, 0.6] and summary["auc_mean"] == 0.45
    assert summary["auc_std"] == pytest.approx(0.15)
    assert summary["auc_per_million_foreground_voxels"] == pytest.approx((0.3 / 3 + 0.6 / 3) / 2, abs=1e-4)
    assert summary["final_dice_per_structure"] == {"a": 0.6} and summary["scoring_seconds_per_image"] == 0.5


def test_the_loop_labels_exactly_the_picks_and_never_trains_on_the_test_set(tmp_path, tokenizer_dir, capsys):
    data = write_dataset(tmp_path / "data", 8, NAMES, seed=3)
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY.to_dict()))
    out = tmp_path / "out"
    status = benchmark_main(["curation", "--data", str(data), "--config", str(config), "--test-cases", "2",
                             "--initial", "1", "--per-round", "2", "--rounds", "2", "--steps-initial", "3",
                             "--steps-round", "2", "--seeds", "0,1", "--eval-mode", "zoom_out",
                             "--strategies", "random,random_fg,class_entropy", "--tokenizer", str(tokenizer_dir),
                             "--out", str(out)])
    assert status == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    test_ids = set(report["test"])
    assert test_ids == {"case_6", "case_7"} and report["pool"] == 6
    runs = json.loads(Path(report["runs"]).read_text())
    assert len(runs) == 6  # 3 strategies x 2 seeds
    for run in runs:
        labelled = []
        for number, row in enumerate(run["rounds"]):
            assert len(row["added"]) == (1 if number == 0 else 2)
            assert not set(row["added"]) & set(labelled), "a strategy picked a labelled case"
            assert not set(row["added"]) & test_ids, "a test case entered training"
            labelled += row["added"]
            assert row["labelled"] == len(labelled)
            assert set(row["dice"]) == {"liver", "Larynx"}
        # the initial set is the seed's, whatever the strategy
        assert run["rounds"][0]["added"] == next(r for r in runs if r["seed"] == run["seed"])["rounds"][0]["added"]
        store = out / f"seed{run['seed']}" / run["strategy"] / "datastore"
        finals = {p.name.replace(".nii.gz", "") for p in (store / "labels" / "final").glob("*.nii.gz")}
        assert finals == set(labelled), "the final labels are not exactly the picks"
        images = {p.name.replace(".nii.gz", "") for p in store.glob("*.nii.gz")}
        assert not images & test_ids, "a test image is in the datastore"
        curation.use_app_package()
        from lib.datastore import SegVolDatastore

        info = SegVolDatastore(str(store), extensions=("*.nii.gz",)).get_label_info(labelled[-1], "final")
        assert {(e["name"], e["idx"]) for e in info["label_info"]} == {("liver", 1), ("Larynx", 2)}
    scores = report["strategies"]
    assert set(scores) == {"random", "random_fg", "class_entropy"}
    for row in scores.values():
        assert row["labelled"] == [1, 3, 5] and len(row["auc_per_seed"]) == 2
        assert all(0.0 <= value <= 1.0 for value in row["dice_mean"])
    assert scores["class_entropy"]["scoring_seconds_per_image"] > 0  # a model-based score, timed
    assert (out / "curation.png").stat().st_size > 0
