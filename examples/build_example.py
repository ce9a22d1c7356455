"""Build ``examples/llava_mini``: a 210-record mixture in LLaVA-1.5 format, with images.

Images come from packages, never from the network: scikit-learn's handwritten digits (8×8,
shown at 32×32) and crops of its two sample photographs. Records follow the prompts and image
folders of ``llava_v1_5_mix665k.json``, so ``tive tasks`` infers ten tasks from them.

It also writes ``demo_features.npy`` and ``demo_norms.npy``: **synthetic** gradient features
(each task a direction plus noise, task-dependent norms) standing in for the output of a
gradient computation, so that ``tive import`` and ``tive select`` can be tried at once.

    python examples/build_example.py            # rewrites examples/llava_mini
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits, load_sample_images

OUT = Path(__file__).resolve().parent / "llava_mini"
SHORT = "Answer the question using a single word or phrase."
LETTER = "Answer with the option's letter from the given choices directly."
WORDS = "zero one two three four five six seven eight nine".split()


def save_images(out: Path) -> dict[str, list[str]]:
    """Write the images; return image paths (relative to ``out``) per folder."""
    digits = load_digits()
    photos = load_sample_images().images
    paths: dict[str, list[str]] = {}
    for folder, count in (("gqa", 12), ("ocr_vqa", 12), ("textvqa", 6), ("vg", 10)):
        offset = len(sum(paths.values(), []))
        for j in range(count):
            img = (digits.images[offset + j] * 16).clip(0, 255).astype(np.uint8)
            rel = f"{folder}/images/{folder}_{j:03d}.png"
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).resize((32, 32), Image.NEAREST).save(out / rel)
            paths.setdefault(folder, []).append(rel)
    for j in range(24):
        photo = photos[j % 2]
        y, x = 40 * (j // 2 % 8), 60 * (j // 2 // 2)
        rel = f"coco/train2017/{j:012d}.jpg"
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo[y:y + 128, x:x + 128]).resize((64, 64)).save(out / rel, quality=80)
        paths.setdefault("coco", []).append(rel)
    return paths


def turn(human: str, gpt: str) -> list[dict]:
    return [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]


def build_records(paths: dict[str, list[str]], rng: np.random.Generator) -> list[dict]:
    digits = load_digits()
    records: list[dict] = []

    def add(task_id: str, image: str | None, conv: list[dict]) -> None:
        record = {"id": f"{task_id}-{len(records):04d}"}
        if image is not None:
            record["image"] = image
        record["conversations"] = conv
        records.append(record)

    coco = paths["coco"]
    for j in range(40):
        add("llava", coco[j % 24], turn(
            "<image>\nWhat do you see in this picture? Describe it in detail.",
            "The picture shows " + " ".join(rng.choice(
                ["a building", "a flower", "petals", "a roof", "the sky", "trees", "stone"],
                size=rng.integers(3, 9))) + "."))
    for j in range(30):
        conv = turn(f"<image>\nIs there a flower in the image?\n{SHORT}", "Yes" if j % 2 else "No")
        for _ in range(rng.integers(1, 4)):
            conv += turn(f"What colour dominates?\n{SHORT}", str(rng.choice(["Red", "Blue"])))
        add("vqav2", coco[j % 24], conv)
    for j in range(8):
        add("okvqa", coco[(j * 5) % 24], turn(
            f"<image>\nWhat season is this likely to be?\n{SHORT}", "Spring"))
    for j in range(15):
        add("aokvqa", coco[(j * 7) % 24], turn(
            f"<image>\nWhat is the main object?\nA. A car\nB. A flower\nC. A dog\n{LETTER}", "B"))
    for j in range(12):
        box = [round(float(v), 2) for v in sorted(rng.uniform(0, 1, 4))]
        ask = (f"<image>\nPlease provide a short description for this region: {box}"
               if j % 2 else
               "<image>\nPlease provide the bounding box coordinate of the region this "
               "sentence describes: the flower")
        add("refcoco", coco[(j * 3) % 24], turn(ask, "A flower." if j % 2 else str(box)))
    for folder, task, n in (("gqa", "gqa", 25), ("ocr_vqa", "ocrvqa", 30),
                            ("textvqa", "textcaps", 10), ("vg", "vg", 20)):
        for j in range(n):
            k = j % len(paths[folder])
            label = WORDS[digits.target[sum(len(paths[f]) for f in paths if f < folder) + k] % 10]
            if task == "gqa":
                conv = turn(f"<image>\nIs the digit round?\n{SHORT}", "Yes" if j % 3 else "No")
            elif task == "ocrvqa":
                conv = turn("<image>\nWhat number is written on this cover?", label.title())
                conv += turn("Is this a book about numbers?", "Yes")
            elif task == "textcaps":
                conv = turn("<image>\nProvide a one-sentence caption for the provided image.",
                            f"A handwritten digit {label}.")
            else:
                conv = turn("<image>\nPlease provide a short description for this region: "
                            "[0.1, 0.1, 0.9, 0.9]", f"A digit {label}")
            add(task, paths[folder][k], conv)
    for j in range(20):
        add("sharegpt", None, turn(f"Write a short note about the number {WORDS[j % 10]}.",
                                   f"The number {WORDS[j % 10]} " + "is interesting. " * (j % 5 + 1)))
    return records


def demo_features(records: list[dict], dim: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic features: per task a direction plus noise; norms set per task."""
    rng = np.random.default_rng(seed)
    tasks = [r["id"].rsplit("-", 1)[0] for r in records]
    names = sorted(set(tasks))
    centers = {t: rng.normal(size=dim) for t in names}
    spread = {t: 0.5 + 2.0 * rng.uniform() for t in names}
    level = {t: rng.uniform(0.5, 3.0) for t in names}
    feats = np.stack([centers[t] + spread[t] * rng.normal(size=dim) for t in tasks])
    norms = np.array([level[t] * rng.lognormal(0, 0.3) for t in tasks])
    return feats.astype(np.float32), norms


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    records = build_records(save_images(OUT), rng)
    (OUT / "mix.json").write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    feats, norms = demo_features(records)
    np.save(OUT / "demo_features.npy", feats)
    np.save(OUT / "demo_norms.npy", norms)
    print(f"wrote {len(records)} records, {sum(1 for _ in OUT.rglob('*.*g'))} images to {OUT}")


if __name__ == "__main__":
    main()
