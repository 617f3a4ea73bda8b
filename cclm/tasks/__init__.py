"""IGLUE tasks (XVNLI, xGQA, MaRVL, xFlickr&CO, WIT), Multi30K and MSCOCO retrieval, and easy-VQA: one small
module per task says how to read its annotations (``read``) and which head it needs (``KIND``: single image, image
pair, or retrieval); the kind decides the metric (accuracy, or recall of image and text retrieval). Fine-tuning,
evaluation and the protocols are shared (``loop``, ``protocols``).
"""

from __future__ import annotations

import importlib
from types import ModuleType

TASKS = {
    "xvnli": "cclm.tasks.xvnli",
    "xgqa": "cclm.tasks.xgqa",
    "marvl": "cclm.tasks.marvl",
    "nlvr2": "cclm.tasks.marvl",
    "xflickrco": "cclm.tasks.xflickrco",
    "flickr30k": "cclm.tasks.xflickrco",
    "wit": "cclm.tasks.wit",
    "multi30k": "cclm.tasks.retrieval_json",
    "mscoco": "cclm.tasks.retrieval_json",
    "easy_vqa": "cclm.tasks.easy_vqa",
}


def get_task(name: str) -> ModuleType:
    if name not in TASKS:
        raise ValueError(f"unknown task '{name}' (expected one of {sorted(TASKS)})")
    return importlib.import_module(TASKS[name])
