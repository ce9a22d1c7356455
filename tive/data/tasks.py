"""Task labels: every record labelled with its task (source dataset).

An explicit field (``task``, ``dataset``, ``source`` or ``--task-field``) always wins. Records
without one are labelled by the rules for LLaVA-1.5's ``llava_v1_5_mix665k.json``
(docs/design.md, "Task inference for LLaVA-1.5 665K"), first match wins, on the first user turn (lower-cased,
curly quotes straightened):

==========================================================  ==================
no image                                                    ``sharegpt``
image under ``ocr_vqa/`` · ``gqa/`` · ``textvqa/`` · ``vg/``  ``ocrvqa`` · ``gqa`` · ``textcaps`` · ``vg``
``coco/`` + a region prompt                                 ``refcoco``
``coco/`` + "answer with the option's letter"               ``aokvqa``
``coco/`` + "answer the question using a single word…"      ``okvqa`` if the record has one QA pair, else ``vqav2`` (heuristic)
any other ``coco/``                                         ``llava_instruct``
any other image folder                                      that folder's name (e.g. ``sam``)
==========================================================  ==================
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tive.data.mixture import Mixture
from tive.data.schemas import Record

FOLDER_TASKS = {"ocr_vqa": "ocrvqa", "gqa": "gqa", "textvqa": "textcaps", "vg": "vg"}
REGION_PROMPTS = ("short description for this region", "bounding box coordinate of the region")
LETTER_PROMPT = "answer with the option's letter"
SHORT_ANSWER_PROMPT = "answer the question using a single word or phrase"
HEURISTIC_TASKS = frozenset({"okvqa", "vqav2"})
# every task the rules give LLaVA-1.5 665K; any other inferred name is an image folder's
LLAVA_TASKS = frozenset({*FOLDER_TASKS.values(), "sharegpt", "refcoco", "aokvqa", "okvqa",
                         "vqav2", "llava_instruct"})
_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"'})


@dataclass(frozen=True)
class TaskLabels:
    """Task of every record of a mixture.

    Attributes:
        tasks: ``(N,)`` array of task names (str objects).
        inferred: ``(N,)`` bool, True where the label came from the rules, not a field.
    """

    tasks: np.ndarray
    inferred: np.ndarray

    def counts(self) -> dict[str, int]:
        """Records per task, largest first (ties by name)."""
        names, counts = np.unique(self.tasks.astype(str), return_counts=True)
        order = sorted(range(len(names)), key=lambda i: (-counts[i], names[i]))
        return {str(names[i]): int(counts[i]) for i in order}

    def inferred_counts(self) -> dict[str, int]:
        """Records per task whose label was inferred (tasks with none inferred are left out)."""
        names, counts = np.unique(self.tasks[self.inferred].astype(str), return_counts=True)
        return {str(n): int(c) for n, c in zip(names, counts)}


def label_tasks(mixture: Mixture) -> TaskLabels:
    """Label each record: its explicit task field if any, else :func:`infer_task`."""
    tasks = np.empty(len(mixture), dtype=object)
    inferred = np.zeros(len(mixture), dtype=bool)
    for i, record in enumerate(mixture):
        if record.task is not None:
            tasks[i] = record.task
        else:
            tasks[i] = infer_task(record)
            inferred[i] = True
    return TaskLabels(tasks, inferred)


def infer_task(record: Record) -> str:
    """The LLaVA-1.5 665K task of a record without a task field (rules in the module doc)."""
    if not record.images:
        return "sharegpt"
    folder = _top_folder(record.images[0])
    if folder in FOLDER_TASKS:
        return FOLDER_TASKS[folder]
    if folder != "coco":
        return folder or "unknown"
    prompt = record.first_user_text.lower().translate(_QUOTES)
    if any(p in prompt for p in REGION_PROMPTS):
        return "refcoco"
    if LETTER_PROMPT in prompt:
        return "aokvqa"
    if SHORT_ANSWER_PROMPT in prompt:
        answers = sum(t.role == "assistant" for t in record.turns)
        return "okvqa" if answers == 1 else "vqav2"
    return "llava_instruct"


def _top_folder(path: str) -> str:
    """The image's dataset folder: ``coco/train2017/x.jpg`` -> ``coco``.

    For a longer path (``/data/llava/gqa/images/x.jpg``) the first folder that a rule knows
    wins; otherwise the first folder of the path.
    """
    if "://" in path or path.startswith("data:"):
        return ""  # a URL or inline image: no folder to go by
    folders = [p.lower() for p in path.replace("\\", "/").split("/") if p not in ("", ".")][:-1]
    known = [f for f in folders if f in FOLDER_TASKS or f == "coco"]
    return known[0] if known else (folders[0] if folders else "")


def factorize(tasks: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Task names and each row's code: ``np.unique(tasks.astype(str), return_inverse=True)``
    by a hash table instead of a sort (a few times faster on 665K labels).

    Returns:
        the sorted distinct names, and ``(N,)`` int64 codes indexing them.
    """
    labels = [str(t) for t in np.asarray(tasks).tolist()]
    names = sorted(set(labels))
    index = {t: i for i, t in enumerate(names)}
    return names, np.fromiter((index[t] for t in labels), dtype=np.int64, count=len(labels))
