"""SegVol Label: the MONAI Label app serving SegVol to OHIF, 3D Slicer and the Python client.

MONAI Label rebuilds this app in every train and scoring subprocess, so nothing heavy happens in the constructor:
the network is loaded on the first inference (``lib.service.SegVolService``).

Configuration (``--conf key value``): ``weights``, ``tokenizer``, ``device``, ``precision``, ``zoom``, ``labels``,
``cache_mb``, ``auto_labels``, ``max_labels``, ``auto_scoring``, ``segment_name_free_text``, ``retrain_threshold``,
``train_*``; the server's own (``segvol_server.py``): ``cors_origins``, ``auth_token_file``, ``allow_local_paths`` and
the ``max_*`` request limits (the README's configuration table).
"""
from __future__ import annotations

import logging
import os
import time
from typing import Dict, Iterator

from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask

from lib.activelearning import ClassEntropyStrategy, DisagreementStrategy, FHNoveltyStrategy, RandomForegroundStrategy
from lib.http_errors import http_error
from lib.infers import SegVolAutoInfer, SegVolInteractiveInfer, SegVolPromptInfer, SegVolScribblesInfer
from lib.scoring import ClassEntropyScoring, DisagreementScoring, FHNoveltyScoring, ForegroundScoring
from lib.service import SegVolService
from lib.validation import check_image, check_model, parse_bool
from segvol.accel import PRECISIONS
from segvol.memory import keep_large_arrays
from segvol.modes import DEFAULT_MODE, Mode
from segvol.vocabulary import Vocabulary

logger = logging.getLogger(__name__)

APP_DIR = os.path.dirname(os.path.abspath(__file__))
PROJECT_DIR = os.path.dirname(os.path.dirname(APP_DIR))
DEFAULT_MODELS_DIR = os.path.join(PROJECT_DIR, "models")
DEVICES = ("auto", "cpu", "cuda")


def _last_train_task(model: str):
    """{id, status, start_ts, end_ts} of this server's last MONAI Label train task for ``model``, or None."""
    from monailabel.utils.async_tasks.utils import tasks

    mine = [t for t in tasks("train") if (t.get("request") or {}).get("model") in (model, None)]
    if not mine:
        return None
    return {k: mine[-1].get(k) for k in ("id", "status", "start_ts", "end_ts")}


class SegVolApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        mode = Mode.parse(conf.get("zoom", DEFAULT_MODE), "--conf zoom").value  # a ValueError when unknown
        device = conf.get("device", "auto")
        if device not in DEVICES and not device.startswith("cuda:"):
            raise ValueError(f"--conf device must be one of {DEVICES} (or cuda:N), got {device!r}")
        precision = conf.get("precision", "auto").strip().lower()
        if precision not in ("auto", *PRECISIONS):
            raise ValueError(f"--conf precision must be one of auto, {', '.join(PRECISIONS)}, got {precision!r}")
        vocabulary = Vocabulary.load(conf.get("labels") or None)
        self.service = SegVolService(
            weights=conf.get("weights", DEFAULT_MODELS_DIR),
            tokenizer=conf.get("tokenizer", ""),
            device=device,
            mode=mode,
            cache_mb=int(conf.get("cache_mb", 2048)),
            precision=precision,
            vocabulary=vocabulary,
            published=os.path.join(app_dir, "model", "segvol_finetuned.pt"),
            calibration_images=self._calibration_images,  # called once the datastore exists
        )
        if parse_bool(conf.get("keep_large_arrays"), "--conf keep_large_arrays", True):
            keep_large_arrays()  # clicks reuse freed CT-sized arrays instead of faulting fresh memory in (memory.py)
        auto_labels = conf.get("auto_labels", "")
        self.auto_labels = [n.strip() for n in auto_labels.split(",") if n.strip()] if auto_labels else None
        self.max_labels = int(conf.get("max_labels", 40))
        # Slicer's segment name is used as free text (not only a vocabulary name) when this is on
        self.segment_name_free_text = parse_bool(conf.get("segment_name_free_text"), "--conf segment_name_free_text",
                                                 False)
        # Scoring methods MONAI Label re-runs on its own (at start, after training and after each next-sample);
        # segvol_disagreement runs SegVol on every unlabelled image, so it only runs when asked for by default.
        auto_scoring = conf.get("auto_scoring", "fg_fraction,fh_novelty")
        self.auto_scoring = [m.strip() for m in auto_scoring.split(",") if m.strip()]
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="SegVol Label",
            description="Universal volumetric CT segmentation with text, point and box prompts (SegVol)",
            version="0.1.0",
            labels=vocabulary.labels(),
        )
        if not self.service.available():
            logger.warning("SegVol weights not found at %s: infer requests will be refused until they are there",
                           self.service.weights)

    def _calibration_images(self) -> Iterator[str]:
        """The datastore's images, in listing order: what ``--conf precision int8`` calibrates on (the first four
        that read)."""
        datastore = self.datastore()  # lazily: a DICOMweb datastore downloads each series it is asked for
        return (datastore.get_image_uri(image_id) for image_id in datastore.list_images())

    def init_infers(self) -> Dict[str, InferTask]:
        auto = SegVolAutoInfer(self.service, self.auto_labels)
        return {
            "segvol": SegVolPromptInfer(self.service, auto.auto_labels, self.max_labels),
            "segvol_interactive": SegVolInteractiveInfer(self.service, self.segment_name_free_text),
            "segvol_auto": auto,
            "segvol_scribbles": SegVolScribblesInfer(self.service, segment_name_free_text=self.segment_name_free_text),
        }

    def init_strategies(self) -> Dict[str, Strategy]:
        from lib.activelearning import FirstStrategy

        return {  # the first is Slicer's default
            "random_fg": RandomForegroundStrategy(),
            "disagreement": DisagreementStrategy(),
            "fh_novelty": FHNoveltyStrategy(),
            "class_entropy": ClassEntropyStrategy(),
            # MONAI Label's stock names: OHIF's Next Sample always posts "random" (its default), MONAI Label's own
            # clients and tests "random" and "first"
            "random": RandomForegroundStrategy("Same as random_fg (the name OHIF's Next Sample sends)"),
            "first": FirstStrategy(),
        }

    def next_sample(self, request):
        """An unknown strategy is a 404 listing the available ones (MONAI Label answers a bare 500)."""
        check_model(request.get("strategy") or "random", self._strategies, "strategy")
        return super().next_sample(request)

    def init_scoring_methods(self) -> Dict[str, ScoringMethod]:
        return {
            "fg_fraction": ForegroundScoring(),
            "segvol_disagreement": DisagreementScoring(self.service, self._scoring_structures()),
            "class_entropy": ClassEntropyScoring(self.service, self._scoring_structures()),
            "fh_novelty": FHNoveltyScoring(),
        }

    def _scoring_structures(self):
        """What the model-based scoring prompts until the datastore has final labels: ``--conf auto_labels`` when
        given, else seven abdominal organs."""
        from lib.scoring.disagreement import DEFAULT_LABELS

        return self.auto_labels or list(DEFAULT_LABELS)

    def async_scoring(self, method, params=None):
        """MONAI Label calls this with ``method=None`` to refresh every score (at start, after a next-sample and, in
        the train subprocess, after a run): only the ``auto_scoring`` methods run then, and the refresh never fails
        its caller. -> ``{method: task or None}``.

        MONAI Label's ``async_scoring(m)`` answers the task, or None when it was not started (a scoring run is
        already going: HTTP 429 when asked from a subprocess; or the server cannot be reached). Such a method is
        skipped and logged: the run already going refreshes the scores. (Reading ``None`` used to raise in the train
        subprocess, so a run that had finished and published was reported ERROR.)"""
        if method:
            return super().async_scoring(method, params)
        started = {}
        for name in self.auto_scoring:
            if name not in self._scoring_methods:
                continue
            try:
                started[name] = super().async_scoring(name, params)
            except Exception as error:  # e.g. the server went away while a train subprocess finishes
                logger.warning("scoring %s not started: %s: %s", name, type(error).__name__, error)
                started[name] = None
                continue
            if started[name] is None:
                logger.info("scoring %s not started now (a scoring run is already going)", name)
        return started

    def init_datastore(self):
        """Local folders get ``lib.datastore.SegVolDatastore`` (atomic writes, an index rebuilt when damaged, label
        sidecars, upload checks); ``http(s)://`` studies keep MONAI Label's dispatch to ``init_remote_datastore``."""
        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()
        from monailabel.config import settings

        from lib.datastore import SegVolDatastore

        return SegVolDatastore(self.studies, extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
                               auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
                               read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY)

    def init_remote_datastore(self):
        """DICOMweb datastore (``--studies http(s)://...``), offline and failing clearly.

        dcmqi's ``itkimage2segimage`` (the ``dcmqi`` package of requirements.txt, in this Python's bin folder) goes on
        PATH, so MONAI Label finds it and never tries to download dcmqi;
        a save the DICOMweb server refuses is answered 502 with the reason (nothing stored, the client keeps the
        label); ``/info`` (also called by ``/infer``) survives an unreachable server with the last known status.
        """
        import shutil
        import sys

        if not shutil.which("itkimage2segimage"):
            os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
        from monailabel.datastore.dicom import DICOMWebDatastore

        from lib.dicomweb import SegVolDICOMwebDatastore

        def pacs_labels_arrived(arrived):  # SEGs other viewers stored into the PACS: each counts once (lib.dicomweb)
            retrain = getattr(self, "retrain", None)
            if retrain is not None and retrain.enabled:
                from lib.trainers.retrain import train_pending

                retrain.on_external_labels(arrived, queue=lambda: self.async_training(retrain.model, enqueue=True),
                                           pending=lambda: train_pending(retrain.model))

        # SEG names kept, the newest SEG of a series wins, SEGs from other viewers counted (server process only)
        datastore = super().init_remote_datastore()
        if not isinstance(datastore, DICOMWebDatastore):
            return datastore
        record = os.path.join(self.app_dir, "model", "pacs_segs.json")
        return SegVolDICOMwebDatastore.like(datastore, record_path=record, on_new_labels=pacs_labels_arrived,
                                            active=lambda: self._server_mode)

    def info(self):
        """``/info`` with the app-level ``labels`` as a list of names in index order (each model keeps its
        ``{name: index}`` dict). OHIF v3's MONAI Label panel (the build shipped in monailabel 0.8.5) does
        ``response.data.labels.push(...)`` when Connect is pressed, so a dict there crashes the whole panel
        (``TypeError: all_labels.push is not a function``); tests/e2e/test_ohif_e2e.py covers it."""
        meta = super().info()
        labels = meta.get("labels")
        if isinstance(labels, dict):
            meta["labels"] = [name for name, _ in sorted(labels.items(), key=lambda item: item[1])]
        # the checkpoint serving, the one wanted, a fallback and the last load error (lib.service.status)
        meta["model_status"] = self.service.status()
        # the retrain counter (count toward --conf retrain_threshold, total, a queued run), shown without a save
        retrain = getattr(self, "retrain", None)
        if retrain is not None:
            from lib.trainers.retrain import train_pending

            meta["retrain"] = retrain.status(pending=lambda: train_pending(retrain.model))
        # each trainer's stats (dead runs already FAILED there) plus the state of its last task in this server
        for name, stats in (meta.get("train_stats") or {}).items():
            task = _last_train_task(name)
            if task is not None and isinstance(stats, dict) and stats:
                stats["task"] = task
        return meta

    def on_init_complete(self):
        """Server start (the server process only, not the train/scoring subprocesses): training runs left RUNNING by
        a process that is gone become FAILED and the temp files of interrupted writes are removed; the label writer is
        warmed on a background thread so the first request does not pay ITK's start-up."""
        import threading

        from lib.infers.base import warm_label_writer
        from lib.trainers.state import recover

        threading.Thread(target=warm_label_writer, name="segvol-warm-writer", daemon=True).start()
        try:
            recover(os.path.join(self.app_dir, "model"))
        except Exception:  # never keep the server from starting
            logger.exception("training state recovery failed")
        super().on_init_complete()

    def init_trainers(self) -> Dict[str, TrainTask]:
        from lib.trainers import RetrainCounter, SegVolFinetune

        model_dir = os.path.join(self.app_dir, "model")
        self.retrain = RetrainCounter(os.path.join(model_dir, "retrain_state.json"),
                                      int(self.conf.get("retrain_threshold", 0)), SegVolFinetune.NAME)
        return {SegVolFinetune.NAME: SegVolFinetune(self.service, model_dir, self.conf, self.labels)}

    def on_save_label(self, image_id, label_id):
        """Final labels count toward ``--conf retrain_threshold``; reaching it queues one training run."""
        super().on_save_label(image_id, label_id)
        retrain = getattr(self, "retrain", None)
        if retrain is None or not retrain.enabled:
            return {}
        from lib.trainers.retrain import train_pending

        return retrain.on_save_label(self.datastore(), image_id, label_id,
                                     queue=lambda: self.async_training(retrain.model, enqueue=True),
                                     pending=lambda: train_pending(retrain.model))

    def infer(self, request, datastore=None):
        """MONAI Label's infer, with bad input answered 4xx (it would otherwise be a bare 500). The response's
        ``latencies.total`` is the whole time spent here (image lookup, model load, inference, writing); the task's
        own is ``latencies.task``."""
        started = time.perf_counter()
        try:
            check_model(request.get("model"), self._infers)
            image = request.get("image")
            if not (isinstance(image, str) and os.path.exists(image)):  # an uploaded or server-side file: no id
                check_image(datastore or self.datastore(), image)
            result = super().infer(request, datastore)
        except Exception as error:
            answer = http_error(error)
            if answer is None:
                raise
            raise answer from None
        latencies = (result.get("params") or {}).get("latencies")
        if isinstance(latencies, dict):
            latencies["task"] = latencies.get("total")
            latencies["total"] = round(time.perf_counter() - started, 3)
        return result
