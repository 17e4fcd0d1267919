"""scripts/finetune_eval.py end to end on a tiny synthetic dataset: trains within the budget, evaluates the untrained
baseline and the trained model in every prompt/mode, prints one JSON report and writes the learning-curve plot."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from _train_data import TINY, write_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def finetune_eval():
    spec = importlib.util.spec_from_file_location("finetune_eval", ROOT / "scripts" / "finetune_eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_finetune_eval_reports_dice_per_prompt_and_mode(tmp_path, tokenizer_dir, finetune_eval, capsys):
    threads = torch.get_num_threads()
    write_dataset(tmp_path / "train", 3, {1: "Brainstem", 2: "Mandible"}, seed=1)
    write_dataset(tmp_path / "val", 2, {1: "Brainstem", 2: "Mandible"}, seed=2, start=10)
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY.to_dict()))
    out = tmp_path / "out"
    try:
        status = finetune_eval.main(["--train", str(tmp_path / "train"), "--val", str(tmp_path / "val"),
                                     "--minutes", "0.15", "--out", str(out), "--config", str(config),
                                     "--tokenizer", str(tokenizer_dir), "--threads", "1",
                                     "--processes", "1", "--val-every", "1", "--mask-prompt"])
    finally:
        torch.set_num_threads(threads)
    assert status == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["data"]["train_cases"] == 3 and report["data"]["val_cases"] == 2
    assert report["training"]["steps"] > 0 and report["minutes_training"] < 0.15 + 0.5
    assert set(report["dice"]) == {"text/zoom_out", "text/zoom_out_zoom_in", "text+box/zoom_out",
                                   "text+box/zoom_out_zoom_in"}
    for variant in (report["dice"], report["baseline_untrained"]):
        for result in variant.values():
            # only brainstem and mandible of the five target organs exist here
            assert set(result["per_organ"]) >= {"brainstem", "bone mandible"}
            assert 0.0 <= result["mean_target"] <= 1.0
    assert report["goal"]["mean_dice_text_box"] == 0.6
    assert report["goal"]["met"] == (report["goal"]["reached_best_mode"] >= 0.6)
    assert (out / "learning_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "run" / "last.pt").is_file()
    # the default 10x rate of the patch embedding reaches the optimizer
    assert report["training"]["patch_lr_scale"] == 10.0
    state = torch.load(out / "run" / "last.pt", map_location="cpu", weights_only=False)
    rates = [group["lr"] for group in state["optimizer"]["param_groups"]]
    assert len(rates) == 2 and rates[1] == pytest.approx(10 * rates[0])
    assert (out / ".gitignore").read_text().strip() == "*"
    # --mask-prompt: the network takes the previous-prediction prompt, and the robot's clicks went through it
    assert report["config"]["mask_prompt"] and state["config"]["mask_prompt"]
    assert report["robot"]["starts"]["box"]["mean"]["structures"] == 4

    # --init: a run that goes on from that checkpoint (its own configuration, though --config is left at its
    # default); its baseline is that model, so it scores what the first run's final model scored
    again = tmp_path / "again"
    try:
        status = finetune_eval.main(["--train", str(tmp_path / "train"), "--val", str(tmp_path / "val"),
                                     "--minutes", "0.05", "--out", str(again), "--init", str(out / "run" / "last.pt"),
                                     "--tokenizer", str(tokenizer_dir), "--threads", "1", "--processes", "1",
                                     "--robot-clicks", "0"])
    finally:
        torch.set_num_threads(threads)
    assert status == 0
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert second["training"]["init"] == str(out / "run" / "last.pt") and second["training"]["steps"] > 0
    assert second["config"]["hidden_size"] == TINY.hidden_size and second["config"]["mask_prompt"]
    for variant, result in second["baseline_untrained"].items():
        for organ, dice in result["per_organ"].items():
            assert dice == pytest.approx(report["dice"][variant]["per_organ"][organ], abs=1e-6)
