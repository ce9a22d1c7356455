"""The selection-quality benchmark's mixture: nine text tasks from data that ships in Python
packages (scikit-learn's datasets, the Unicode database and the time-zone database of the
standard library) or generated with a seed, in LLaVA JSON format with a ``task`` per record,
and a disjoint held-out set per task.

Sizes differ 10× (as in LLaVA-665K a few large tasks dominate), and so does difficulty: a
large near-duplicate task (eight Greek-letter facts in many phrasings, like VQAv2's many
questions per image), exact arithmetic, table classification (iris, wine, breast cancer),
8×8 digit images drawn as text, a lookup task (time-zone city → region) and string tasks.
Every answer is short and checked exactly.
"""

from __future__ import annotations

import functools
import itertools
import json
import unicodedata
import zoneinfo
from collections.abc import Callable
from pathlib import Path

import numpy as np

QA = tuple[str, str]  # (question, answer)

# task → (training records, held-out records) of the default run, and of --quick
SIZES = {"greek": (120, 16), "arithmetic": (80, 16), "breast_cancer": (60, 16),
         "timezone": (40, 16), "digits": (32, 16), "sort": (24, 16), "reverse": (18, 16),
         "iris": (14, 16), "wine": (12, 16)}
QUICK_SIZES = {"greek": (30, 3), "arithmetic": (20, 3), "breast_cancer": (15, 3),
               "timezone": (10, 3), "digits": (8, 3), "sort": (6, 3), "reverse": (5, 3),
               "iris": (4, 3), "wine": (3, 3)}

GREEK = ["alpha", "beta", "gamma", "delta", "lamda", "pi", "sigma", "omega"]
GREEK_FORMS = ["Which Greek letter is named {n}?", "What is the symbol of the Greek letter {n}?",
               "Write the Greek letter {n}.", "Give the lowercase Greek letter called {n}.",
               "{N} is a Greek letter. Which symbol is it?", "Show me the letter {n}.",
               "How is the Greek letter {n} written?", "Type the small Greek letter {n}."]
GREEK_LEADS = ["", "Quick question: ", "Please help. ", "Hi! ", "I wonder: ", "Tell me: "]
GREEK_TAILS = ["", " Reply with the symbol only.", " One character, please."]
REGIONS = ("Africa", "America", "Antarctica", "Asia", "Atlantic", "Australia", "Europe",
           "Indian", "Pacific")
SHADES = " .:-=+*#%@"  # digits' pixel values 0–16 drawn as characters


def greek(rng: np.random.Generator) -> list[QA]:
    """Near-duplicates: 8 facts × 144 phrasings (leads × forms × tails), shuffled."""
    out = []
    for name, form, lead, tail in itertools.product(GREEK, GREEK_FORMS, GREEK_LEADS,
                                                    GREEK_TAILS):
        letter = unicodedata.lookup(f"GREEK SMALL LETTER {name.upper()}")
        shown = "lambda" if name == "lamda" else name  # Unicode spells it LAMDA
        q = lead + form.format(n=shown, N=shown.capitalize()) + tail
        out.append((q, letter))
    return [out[i] for i in rng.permutation(len(out))]


def arithmetic(rng: np.random.Generator, n: int = 2000) -> list[QA]:
    """Two-digit sums and differences."""
    a, b = rng.integers(10, 100, n), rng.integers(10, 100, n)
    plus = rng.random(n) < 0.5
    return [(f"What is {x} {'+' if p else '-'} {y}?", str(x + y if p else x - y))
            for x, y, p in zip(a.tolist(), b.tolist(), plus.tolist())]


# scikit-learn table → (loader, four columns, question with {0}…{3} their values, answer from
# the target's index and the class names)
TABLES: dict[str, tuple[str, list[str], str, Callable[[int, list[str]], str]]] = {
    "iris": ("load_iris",
             ["sepal length (cm)", "sepal width (cm)", "petal length (cm)", "petal width (cm)"],
             "An iris has sepal length {0:.1f} cm, sepal width {1:.1f} cm, petal length {2:.1f} "
             "cm and petal width {3:.1f} cm. Which species is it: setosa, versicolor or "
             "virginica?", lambda t, names: names[t]),
    "wine": ("load_wine", ["alcohol", "flavanoids", "color_intensity", "proline"],
             "A wine has alcohol {0:.1f}%, flavanoids {1:.2f}, colour intensity {2:.1f} and "
             "proline {3:.0f}. Which cultivar is it: 1, 2 or 3?", lambda t, names: str(t + 1)),
    "breast_cancer": ("load_breast_cancer",
                      ["mean radius", "mean texture", "mean concavity", "worst area"],
                      "A tumour has mean radius {0:.1f}, mean texture {1:.1f}, mean concavity "
                      "{2:.3f} and worst area {3:.0f}. Is it malignant or benign?",
                      lambda t, names: names[t]),
}


def table(name: str, rng: np.random.Generator) -> list[QA]:
    """A classification question per row of one of scikit-learn's tables (:data:`TABLES`)."""
    import sklearn.datasets

    loader, columns, question, answer = TABLES[name]
    data = getattr(sklearn.datasets, loader)()
    at = [list(data.feature_names).index(c) for c in columns]
    out = [(question.format(*(row[i] for i in at)), answer(int(target), list(data.target_names)))
           for row, target in zip(data.data, data.target)]
    return [out[i] for i in rng.permutation(len(out))]


def digits(rng: np.random.Generator) -> list[QA]:
    """scikit-learn's 8×8 handwritten digits, each pixel a character of :data:`SHADES`."""
    from sklearn.datasets import load_digits

    data = load_digits()
    out = []
    for image, target in zip(data.images, data.target):
        rows = ["".join(SHADES[min(int(v) * len(SHADES) // 17, len(SHADES) - 1)] for v in r)
                for r in image]
        grid = "\n".join(f"|{r}|" for r in rows)
        out.append((f"Which digit is drawn here?\n{grid}", str(int(target))))
    return [out[i] for i in rng.permutation(len(out))]


def timezone(rng: np.random.Generator) -> list[QA]:
    """Lookup in the time-zone database: a zone's city → its region."""
    out = []
    for name in sorted(zoneinfo.available_timezones()):
        parts = name.split("/")
        if len(parts) == 2 and parts[0] in REGIONS:
            city = parts[1].replace("_", " ")
            out.append((f"In which region of the time-zone database is {city}? Answer with one "
                        f"of: {', '.join(REGIONS)}.", parts[0]))
    return [out[i] for i in rng.permutation(len(out))]


def sort_numbers(rng: np.random.Generator, n: int = 1000) -> list[QA]:
    out = []
    for _ in range(n):
        xs = rng.choice(100, int(rng.integers(3, 6)), replace=False).tolist()
        out.append((f"Sort in increasing order: {' '.join(map(str, xs))}",
                    " ".join(map(str, sorted(xs)))))
    return out


def reverse(rng: np.random.Generator, n: int = 1000) -> list[QA]:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    out = []
    for _ in range(n):
        word = "".join(rng.choice(letters, int(rng.integers(4, 7))))
        out.append((f"Write the letters of '{word}' in reverse order.", word[::-1]))
    return out


GENERATORS = {"greek": greek, "arithmetic": arithmetic,
              "breast_cancer": functools.partial(table, "breast_cancer"),
              "timezone": timezone, "digits": digits, "sort": sort_numbers, "reverse": reverse,
              "iris": functools.partial(table, "iris"), "wine": functools.partial(table, "wine")}


def record(task: str, j: int, split: str, qa: QA) -> dict:
    """One LLaVA-format text record with its task."""
    return {"id": f"{task}-{split}-{j}", "task": task,
            "conversations": [{"from": "human", "value": qa[0]}, {"from": "gpt", "value": qa[1]}]}


def build(folder: Path, sizes: dict[str, tuple[int, int]] = SIZES,
          seed: int = 0) -> tuple[Path, Path]:
    """Write ``mix.json`` and ``eval.json`` into ``folder`` (disjoint questions per task).

    Returns:
        the two paths.
    """
    rng = np.random.default_rng(seed)
    train, held = [], []
    for task, (n_train, n_eval) in sizes.items():
        pool = _distinct(GENERATORS[task](rng))
        if len(pool) < n_train + n_eval:
            raise ValueError(f"task {task}: {len(pool)} distinct questions, fewer than "
                             f"{n_train} + {n_eval}")
        train += [record(task, j, "train", qa) for j, qa in enumerate(pool[:n_train])]
        held += [record(task, j, "eval", qa)
                 for j, qa in enumerate(pool[n_train:n_train + n_eval])]
    folder.mkdir(parents=True, exist_ok=True)
    mix, ev = folder / "mix.json", folder / "eval.json"
    mix.write_text(json.dumps(train, ensure_ascii=False, indent=1), encoding="utf-8")
    ev.write_text(json.dumps(held, ensure_ascii=False, indent=1), encoding="utf-8")
    return mix, ev


def _distinct(pool: list[QA]) -> list[QA]:
    """Questions in order of first appearance, each once (held-out questions never trained)."""
    seen: dict[str, QA] = {}
    for q, a in pool:
        seen.setdefault(q, (q, a))
    return list(seen.values())
