"""The selection-quality benchmark's mixtures: text tasks from data that ships in Python packages
(scikit-learn's datasets, the Unicode database, the time-zone database and the calendar module
of the standard library) or generated with a seed, in LLaVA JSON format with a ``task`` per
record, and a disjoint held-out set per task. Three shapes (:data:`SHAPES`, ``build(folder,
shape=...)``):

- **a** — unequal sizes (10×) and unequal difficulty, one task beyond a 135M model's reach: a
  large near-duplicate task (eight Greek-letter facts in many phrasings, like VQAv2's many
  questions per image), exact arithmetic, table classification (iris, wine, breast cancer),
  8×8 digit images drawn as text, a lookup task (time-zone city → region), sorting and string
  reversal (the task nothing learns here).
- **b** — LLaVA-665K's shape: three very large templated near-duplicate tasks (few facts ×
  many phrasings, as VQAv2, GQA and OCR-VQA are templated questions over few kinds of answer)
  hold most of the records, next to six small, diverse tasks.
- **c** — every task learnable in one epoch, with graded difficulty (copying, capitals, first
  letters, templated facts, one-digit sums, a table, a lookup, two-digit sums); no impossible
  task.

Every answer is short and checked exactly.
"""

from __future__ import annotations

import calendar
import functools
import itertools
import json
import unicodedata
import zoneinfo
from collections.abc import Callable
from pathlib import Path

import numpy as np

QA = tuple[str, str]  # (question, answer)

# task → (training records, held-out records) of each shape (see the README for the sizes'
# cost), and of --quick (a small shape a)
SIZES_A = {"greek": (300, 40), "arithmetic": (200, 40), "breast_cancer": (150, 40),
           "timezone": (100, 40), "digits": (80, 40), "sort": (60, 40), "reverse": (45, 40),
           "iris": (35, 40), "wine": (30, 40)}
SIZES_B = {"greek": (320, 40), "month": (280, 40), "numword": (240, 40),
           "arithmetic": (40, 40), "timezone": (40, 40), "breast_cancer": (30, 40),
           "sort": (30, 40), "iris": (25, 40), "wine": (25, 40)}
SIZES_C = {"copy": (80, 40), "upper": (100, 40), "first_letter": (100, 40), "greek": (140, 40),
           "month": (120, 40), "add1": (140, 40), "iris": (90, 40), "timezone": (110, 40),
           "add2": (120, 40)}
SHAPES = {"a": SIZES_A, "b": SIZES_B, "c": SIZES_C}
SIZES = SIZES_A
QUICK_SIZES = {"greek": (30, 8), "arithmetic": (20, 8), "breast_cancer": (15, 8),
               "timezone": (10, 8), "digits": (8, 8), "sort": (6, 8), "reverse": (5, 8),
               "iris": (4, 8), "wine": (3, 8)}

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


MONTH_FORMS = ["What is the number of the month {n}?", "Which month number is {n}?",
               "{N} is which month of the year, as a number?", "Give the month number of {n}.",
               "In the calendar, {n} is month number what?", "Write {n} as a month number.",
               "How many months into the year is {n}?", "Convert the month {n} to a number."]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
                "seventeen", "eighteen", "nineteen"]
NUMWORD_FORMS = ["Write the number {n} in digits.", "What is {n} as a numeral?",
                 "Convert the word {n} to digits.", "{N}: which number is that?",
                 "Give the digits for {n}.", "How is {n} written with digits?",
                 "Spell {n} as a number.", "Turn {n} into a numeral."]


def templated(facts: list[tuple[str, str]], forms: list[str],
              rng: np.random.Generator) -> list[QA]:
    """Near-duplicates: few facts (name, answer) × phrasings (leads × forms × tails), shuffled."""
    out = [(lead + form.format(n=name, N=name.capitalize()) + tail, answer)
           for (name, answer), form, lead, tail in itertools.product(facts, forms, GREEK_LEADS,
                                                                     GREEK_TAILS)]
    return [out[i] for i in rng.permutation(len(out))]


def month(rng: np.random.Generator) -> list[QA]:
    """The calendar module's 12 month names → their numbers, in 144 phrasings each."""
    return templated([(calendar.month_name[m], str(m)) for m in range(1, 13)], MONTH_FORMS, rng)


def numword(rng: np.random.Generator) -> list[QA]:
    """Number words zero … nineteen → their digits, in 144 phrasings each."""
    return templated([(w, str(i)) for i, w in enumerate(NUMBER_WORDS)], NUMWORD_FORMS, rng)


def _words(rng: np.random.Generator, n: int, low: int = 4, high: int = 7) -> list[str]:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    return ["".join(rng.choice(letters, int(rng.integers(low, high)))) for _ in range(n)]


def copy_word(rng: np.random.Generator, n: int = 1000) -> list[QA]:
    """Repeat a 4–6-letter string (the easiest task: a format)."""
    return [(f"Repeat exactly: {w}", w) for w in _words(rng, n)]


def upper(rng: np.random.Generator, n: int = 1000) -> list[QA]:
    """A 4–6-letter string in capitals."""
    return [(f"Write '{w}' in capital letters.", w.upper()) for w in _words(rng, n)]


def first_letter(rng: np.random.Generator, n: int = 1000) -> list[QA]:
    """The first letter of a 4–6-letter string."""
    return [(f"What is the first letter of '{w}'?", w[0]) for w in _words(rng, n)]


ADD1_FORMS = ["What is {0} + {1}?", "{0} + {1} =", "Add {0} and {1}.", "What is the sum of {0} "
              "and {1}?", "Compute {0} plus {1}."]


def add1(rng: np.random.Generator) -> list[QA]:
    """One-digit sums (100 facts) in five phrasings, shuffled."""
    out = [(form.format(a, b), str(a + b)) for a in range(10) for b in range(10)
           for form in ADD1_FORMS]
    return [out[i] for i in rng.permutation(len(out))]


def add2(rng: np.random.Generator, n: int = 2000) -> list[QA]:
    """Two-digit sums (no differences: the hardest task of shape c)."""
    a, b = rng.integers(10, 100, n), rng.integers(10, 100, n)
    return [(f"What is {x} + {y}?", str(x + y)) for x, y in zip(a.tolist(), b.tolist())]


GENERATORS = {"greek": greek, "arithmetic": arithmetic,
              "breast_cancer": functools.partial(table, "breast_cancer"),
              "timezone": timezone, "digits": digits, "sort": sort_numbers, "reverse": reverse,
              "iris": functools.partial(table, "iris"), "wine": functools.partial(table, "wine"),
              "month": month, "numword": numword, "copy": copy_word, "upper": upper,
              "first_letter": first_letter, "add1": add1, "add2": add2}


def record(task: str, j: int, split: str, qa: QA) -> dict:
    """One LLaVA-format text record with its task."""
    return {"id": f"{task}-{split}-{j}", "task": task,
            "conversations": [{"from": "human", "value": qa[0]}, {"from": "gpt", "value": qa[1]}]}


def build(folder: Path, sizes: dict[str, tuple[int, int]] | None = None, seed: int = 0,
          shape: str = "a") -> tuple[Path, Path]:
    """Write ``mix.json`` and ``eval.json`` into ``folder`` (disjoint questions per task).

    Args:
        sizes: task → (training records, held-out records); default: the shape's
            (:data:`SHAPES`).
        shape: ``"a"``, ``"b"`` or ``"c"`` (see the module's docstring).

    Returns:
        the two paths.
    """
    if sizes is None:
        if shape not in SHAPES:
            raise ValueError(f"shape {shape!r}: expected one of {', '.join(SHAPES)}")
        sizes = SHAPES[shape]
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
    for path, rows in ((mix, train), (ev, held)):
        text = json.dumps(rows, ensure_ascii=False, indent=1)
        if not path.exists() or path.read_text(encoding="utf-8") != text:  # kept if the same
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(path)
    return mix, ev


def _distinct(pool: list[QA]) -> list[QA]:
    """Questions in order of first appearance, each once (held-out questions never trained)."""
    seen: dict[str, QA] = {}
    for q, a in pool:
        seen.setdefault(q, (q, a))
    return list(seen.values())
