"""``segvol_finetune``: the MONAI Label train task, running the project trainer (``segvol.training``) on the
datastore's final labels.

Request keys (shown to clients by ``config()``, defaults from ``--conf train_*``): ``max_epochs``, ``learning_rate``,
``train_batch_size``, ``val_split``, ``freeze`` (comma list of image_encoder, text_encoder, dim_align,
prompt_encoder, mask_decoder; "none" trains everything), ``mode`` (full | decoder | lora: overrides ``freeze``;
``segvol.training.options.MODE_FREEZE``), ``lora_rank``, ``keep`` (comma list of structures the starting model knows
and must keep: cases without them get its predictions as replay labels), ``distill_weight`` (the distillation term
toward the starting model for those structures; empty: 1.0 with ``keep``), ``checkpointing`` (gradient checkpointing),
``init`` ("auto": the published fine-tuned checkpoint when
there is one, else the served weights; "official"; "scratch"; or a checkpoint path), ``scratch_config`` (small |
official), ``device``, ``amp``, ``minutes`` (time budget, 0 = none), ``val_mode``, ``val_prompt``, ``pseudo_weight``,
``loss_resolution`` (full | low), ``corrective_prob`` and ``corrective_rounds`` (clicks on the model's own errors in
that share of the steps, so a fine-tuned model follows corrections; ``segvol.training.step``), ``window_box_prob``
(share of the crops' box prompts that are the box a zoom-in window gets), ``mask_prompt`` (give
the network the previous-prediction prompt, so its clicks correct the answer before them),
``resume`` ("auto" continues an interrupted run), ``multi_gpu`` + ``gpus`` (MONAI Label's options: one DDP process
per GPU), ``name`` (run folder under ``<app>/model/``).

Label names come from each label's info (``label_info`` as Slicer and DICOM SEG store them), else from the app's
/info indices (``value -> vocabulary name``, what the app's own results use). FH pseudo labels under the datastore's
``fh`` label tag are used when present (``scripts/pseudo_labels.py --input <datastore>``).

The best checkpoint is published to ``<app>/model/segvol_finetuned.pt``; the infer tasks switch to it on their next
request (the service watches the file's mtime) without a restart.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import time
from typing import Any, Dict, Optional

from monailabel.interfaces.tasks.train import TrainTask

logger = logging.getLogger(__name__)

TRUE = ("1", "true", "yes", "on")


def _bool(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in TRUE


def _first(value: Any) -> Any:
    """MONAI Label clients send the chosen element of a list option."""
    return value[0] if isinstance(value, (list, tuple)) and value else value


class SegVolFinetune(TrainTask):
    NAME = "segvol_finetune"

    def __init__(self, service, model_dir: str, conf: Optional[Dict[str, str]] = None,
                 labels: Optional[Dict[str, int]] = None):
        super().__init__("Fine-tune SegVol on the final labels (text, box and point prompts; Dice + BCE)")
        conf = conf or {}
        self.service = service
        self.model_dir = model_dir
        self.labels = dict(labels or service.vocabulary.labels())
        self.defaults = {
            "name": conf.get("train_name", self.NAME),
            "max_epochs": int(conf.get("train_epochs", 10)),
            "learning_rate": float(conf.get("train_lr", 1e-4)),
            "train_batch_size": int(conf.get("train_batch_size", 1)),
            "val_split": float(conf.get("train_val_split", 0.2)),
            "freeze": conf.get("train_freeze", "image_encoder,text_encoder"),
            "mode": conf.get("train_mode", ""),
            "lora_rank": int(conf.get("train_lora_rank", 8)),
            "keep": conf.get("train_keep", ""),
            "distill_weight": conf.get("train_distill_weight", ""),
            "checkpointing": _bool(conf.get("train_checkpointing", "false")),
            "init": conf.get("train_init", "auto"),
            "scratch_config": conf.get("train_scratch_config", "small"),
            "device": conf.get("train_device", conf.get("device", "auto")),
            "amp": _bool(conf.get("train_amp", "true")),
            "minutes": float(conf.get("train_minutes", 0)),
            "val_mode": conf.get("train_val_mode", "zoom_out_zoom_in"),
            "val_prompt": conf.get("train_val_prompt", "text+box"),
            "pseudo_weight": float(conf.get("train_pseudo_weight", 0.1)),
            "loss_resolution": conf.get("train_loss_resolution", "full"),
            "corrective_prob": float(conf.get("train_corrective_prob", 0.5)),
            "corrective_rounds": int(conf.get("train_corrective_rounds", 5)),
            "window_box_prob": float(conf.get("train_window_box_prob", 0.0)),
            "mask_prompt": _bool(conf.get("train_mask_prompt", "false")),
            "pseudo_tag": conf.get("train_pseudo_tag", "fh"),
            "repeats": int(conf.get("train_repeats", 1)),
            "seed": int(conf.get("train_seed", 0)),
            "resume": conf.get("train_resume", "auto"),
            "multi_gpu": _bool(conf.get("train_multi_gpu", "true")),
            "gpus": conf.get("train_gpus", "all"),
        }

    # ------------------------------------------------------------------------------------------------------------
    # what MONAI Label clients see
    # ------------------------------------------------------------------------------------------------------------
    def config(self) -> Dict[str, Any]:
        return {k: v for k, v in self.defaults.items()}

    @property
    def output_dir_root(self) -> str:
        return self.model_dir

    def stats_path(self, name: Optional[str] = None) -> str:
        return os.path.join(self.model_dir, name or self.defaults["name"], "train_stats.json")

    def latest_stats_path(self) -> str:
        """The stats of the run started last, whatever its ``name`` (the default run's path when none ran yet)."""
        from .state import read_stats

        runs = []
        for path in glob.glob(os.path.join(self.model_dir, "*", "train_stats.json")):
            started = read_stats(path).get("start_ts")
            if isinstance(started, (int, float)):
                runs.append((started, os.path.getmtime(path), path))
        return max(runs)[2] if runs else self.stats_path()

    def stats(self) -> Dict[str, Any]:
        """What clients poll, for the run started last (a run with a ``name`` of its own included): name, epoch,
        total_epochs, best_metric (validation Dice), timings, status (RUNNING, FINISHED, STOPPED, ERROR with
        ``reason``, or FAILED with ``reason`` when the training process died)."""
        from .state import mark_failed, read_stats, run_is_dead

        path = self.latest_stats_path()
        stats = read_stats(path)
        if stats and stats.get("status") == "RUNNING" and _stopped_by_request(self.NAME):
            # MONAI Label has killed the run's process tree (the process may take a moment to be gone)
            stopped = {**mark_failed(stats, "stopped by a client request (DELETE /train)"), "status": "STOPPED"}
            self._persist_if_unchanged(path, stats, stopped)  # a restart must not turn it into FAILED
            return stopped
        if stats and run_is_dead(stats):
            return mark_failed(stats)
        return stats

    # ------------------------------------------------------------------------------------------------------------
    # the run
    # ------------------------------------------------------------------------------------------------------------
    def options(self, request: Dict[str, Any]):
        from segvol.training import TrainOptions

        values = {**self.defaults, **{k: _first(v) for k, v in request.items() if k in self.defaults}}
        name = str(values["name"])
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"invalid run name {name!r}")
        init = str(values["init"])
        if init == "auto":
            init = "published" if os.path.isfile(self.service.published) else "official"
            if init == "published" and not _intact(self.service.published):
                # a damaged publish: continue the last good fine-tuned checkpoint (what inference falls back to)
                last_good = getattr(self.service, "last_good", "")
                init = last_good if last_good and _intact(last_good) else "official"
                logger.warning("segvol_finetune: %s is damaged; init %s instead", self.service.published, init)
        weights = None
        if init == "published":
            if not os.path.isfile(self.service.published):
                raise ValueError(f"init 'published': there is no {self.service.published} yet")
            init = self.service.published
        elif init == "official":
            from segvol.checkpoint import resolve_weights_file

            weights = resolve_weights_file(self.service.weights)  # the served base weights (--conf weights)
        # segvol.checkpoint.find_tokenizer: --conf tokenizer, else beside the served weights (a file or a folder)
        tokenizer = self.service.tokenizer or self.service.weights
        resume = values["resume"]
        resume = "auto" if str(resume).lower() == "auto" else _bool(resume)
        minutes = float(values["minutes"] or 0)
        distill = str(values["distill_weight"] if values["distill_weight"] is not None else "").strip()
        world = 1
        if _bool(values["multi_gpu"]):
            import torch

            if torch.cuda.is_available() and str(values["device"]).split(":")[0] in ("auto", "cuda"):
                gpus = str(values["gpus"] or "all")
                world = torch.cuda.device_count() if gpus == "all" else len([g for g in gpus.split(",") if g.strip()])
        return TrainOptions(
            output_dir=os.path.join(self.model_dir, name),
            init=init, weights=weights, tokenizer=tokenizer, config=values["scratch_config"],
            epochs=int(values["max_epochs"]), batch_size=int(values["train_batch_size"]),
            repeats=int(values["repeats"]), lr=float(values["learning_rate"]), freeze=str(values["freeze"]),
            mode=str(values["mode"] or ""), lora_rank=int(values["lora_rank"]), keep=str(values["keep"] or ""),
            distill_weight=float(distill) if distill else None,  # empty: the trainer's default
            checkpointing=_bool(values["checkpointing"]),
            amp=_bool(values["amp"]), device=str(values["device"]), seed=int(values["seed"]),
            val_mode=str(values["val_mode"]), val_prompt=str(values["val_prompt"]),
            pseudo_weight=float(values["pseudo_weight"]), time_budget_s=minutes * 60 if minutes > 0 else None,
            loss_resolution=str(values["loss_resolution"]),
            corrective_prob=float(values["corrective_prob"]), corrective_rounds=int(values["corrective_rounds"]),
            window_box_prob=float(values["window_box_prob"]),
            mask_prompt=_bool(values["mask_prompt"]), resume=resume, publish_path=self.service.published,
            publish="best",
            publish_if_better_than_init=init in (self.service.published, getattr(self.service, "last_good", None)),
            world_size=max(world, 1),
            progress=False,
        ), values

    def __call__(self, request, datastore):
        from segvol.training import cases_from_datastore, run_training, split_cases

        from .state import process_identity

        started = time.time()
        options, values = self.options(request)
        default_names = {index: name for name, index in self.labels.items()}
        cases = cases_from_datastore(datastore, default_names, pseudo_tag=str(values["pseudo_tag"]))
        if not cases:
            raise ValueError("no final labels in the datastore: save some labels (tag 'final') before training")
        train_cases, val_cases = split_cases(cases, float(values["val_split"]), seed=int(values["seed"]))
        logger.info("segvol_finetune: %d final labels -> %d train / %d validation; init %s; output %s", len(cases),
                    len(train_cases), len(val_cases), options.init, options.output_dir)
        stats = {"name": values["name"], "status": "RUNNING", "epoch": 0, "total_epochs": options.epochs,
                 "best_metric": None, "start_ts": int(started), "train_cases": len(train_cases),
                 "val_cases": len(val_cases), **process_identity()}
        os.makedirs(options.output_dir, exist_ok=True)
        self._write_stats(values["name"], stats)

        def on_event(event, info):
            if event == "epoch":
                stats.update({"epoch": info["epoch"], "loss": info.get("loss"),
                              "total_time": round(time.time() - started, 1)})
                if info.get("val"):
                    stats["val_dice"] = info["val"]["per_label"]
                    if stats["best_metric"] is None or info["val"]["mean"] > stats["best_metric"]:
                        stats["best_metric"], stats["best_metric_epoch"] = info["val"]["mean"], info["epoch"]
                self._write_stats(values["name"], stats)

        try:
            result = run_training(options, train_cases, val_cases, callback=on_event)
        except BaseException as error:
            stats.update({"status": "ERROR", "total_time": round(time.time() - started, 1),
                          "reason": f"{type(error).__name__}: {error}"[:1000]})
            self._write_stats(values["name"], stats)
            raise
        stats.update({
            "status": result.status.upper(), "epoch": result.epoch, "total_epochs": result.total_epochs,
            "best_metric": result.best_metric, "best_metric_epoch": result.best_epoch, "steps": result.steps,
            "total_time": round(time.time() - started, 1), "published": result.published,
            "vocabulary": result.vocabulary, "resumed_from": result.resumed_from,
        })
        last = next((h for h in reversed(result.history) if h.get("val")), None)
        if last:
            stats["val_dice"] = last["val"]["per_label"]
        self._write_stats(values["name"], stats)
        logger.info("segvol_finetune finished: %s", json.dumps(stats, default=str))
        return stats

    def _persist_if_unchanged(self, path: str, seen: Dict[str, Any], new: Dict[str, Any]) -> None:
        from .state import read_stats, write_stats

        current = read_stats(path)
        if current.get("pid") == seen.get("pid") and current.get("start_ts") == seen.get("start_ts"):
            try:
                write_stats(path, new)
            except OSError as error:
                logger.warning("could not record %s: %s", path, error)

    def _write_stats(self, name: str, stats: Dict[str, Any]) -> None:
        from .state import write_stats

        write_stats(self.stats_path(name), stats)


def _intact(path: str) -> bool:
    """A cheap integrity check of a checkpoint before a run starts from it: the zip container ``torch.save`` writes
    is complete and every member's CRC matches (catches truncation and corruption without building the model)."""
    import zipfile

    try:
        if not zipfile.is_zipfile(path):
            return path.endswith(".safetensors") and os.path.getsize(path) > 8
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (OSError, zipfile.BadZipFile, ValueError, RuntimeError, EOFError):
        return False


def _stopped_by_request(model: str) -> bool:
    """True when MONAI Label's last train task of ``model`` in this server was stopped by a client."""
    try:
        from monailabel.utils.async_tasks.utils import tasks
    except ImportError:
        return False
    mine = [t for t in tasks("train") if (t.get("request") or {}).get("model") in (model, None)]
    return bool(mine) and mine[-1].get("status") == "STOPPED"
