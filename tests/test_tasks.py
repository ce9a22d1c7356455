"""Stage 2 (tive.data.tasks): LLaVA-1.5 665K task inference, explicit fields, counts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tive.data.mixture import load_mixture
from tive.data.schemas import Record, Turn
from tive.data.tasks import TaskLabels, infer_task, label_tasks

SHORT = "Answer the question using a single word or phrase."
LETTER = "Answer with the option's letter from the given choices directly."


def conv(*pairs: tuple[str, str]) -> list[dict]:
    turns = []
    for q, a in pairs:
        turns += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return turns


# Records shaped like llava_v1_5_mix665k.json, one (or two) per task, with their real prompts.
REAL = {
    "llava_instruct": {
        "id": "000000033471", "image": "coco/train2017/000000033471.jpg",
        "conversations": conv(
            ("<image>\nWhat are the colors of the bus in the image?",
             "The bus in the image is white and red."),
            ("What feature can be seen on the back of the bus?",
             "The back of the bus features an advertisement."))},
    "llava_instruct_detail": {
        "id": "000000052846", "image": "coco/train2017/000000052846.jpg",
        "conversations": conv(("Describe the following image.\n<image>",
                               "The image shows a kitchen with a region of tiles ..."))},
    "sharegpt": {
        "id": "i6IyJda_0",
        "conversations": conv((("How to tell if a customer segment is well segmented? In 3 "
                               "bullet points."), "1. Homogeneity ...\n2. Distinctiveness ..."))},
    "ocrvqa": {
        "id": "71ZFuzTBIDL", "image": "ocr_vqa/images/71ZFuzTBIDL.jpg",
        "conversations": conv(("<image>\nWho wrote this book?\n" + SHORT, "Kathy Kelly"),
                              ("What is the title of this book?", "Mother Daughter Book"),
                              ("Is this a sociopolitical book?", "No"))},
    "gqa": {
        "id": "2354786", "image": "gqa/images/2354786.jpg",
        "conversations": conv(("<image>\nIs the sky dark?\n" + SHORT, "Yes"),
                              ("What is on the white wall?\n" + SHORT, "Pipe"))},
    "textcaps": {
        "id": "0054c91397f2fe05", "image": "textvqa/train_images/0054c91397f2fe05.jpg",
        "conversations": conv((("<image>\nProvide a one-sentence caption for the provided image."
                               "\nReference OCR token: MAGNUM, CHOCOLATE"),
                               "A box of Magnum chocolate ice cream bars."))},
    "vg": {
        "id": "VG_100K_2/1", "image": "vg/VG_100K_2/1.jpg",
        "conversations": conv((("<image>\nPlease provide the bounding box coordinate of the region"
                               " this sentence describes: white clouds in blue sky."),
                               "[0.0, 0.0, 0.99, 0.41]"),
                              (("Please provide a short description for this region: "
                               "[0.3, 0.7, 0.51, 0.95]"), "Green leaves on a tree."))},
    "refcoco_box": {
        "id": "1887", "image": "coco/train2017/000000580837.jpg",
        "conversations": conv((("<image>\nPlease provide the bounding box coordinate of the region"
                               " this sentence describes: a man."), "[0.41, 0.36, 0.55, 0.73]"),
                              (("Please provide the bounding box coordinate of the region this "
                               "sentence describes: woman in red."), "[0.1, 0.2, 0.3, 0.9]"))},
    "refcoco_desc": {
        "id": "1888", "image": "coco/train2017/000000580838.jpg",
        "conversations": conv((("<image>\nPlease provide a short description for this region: "
                               "[0.1, 0.2, 0.5, 0.6]"), "Man on the left."))},
    "aokvqa": {
        "id": "JbQ6nLhLq6hgqTF5Y6Bxyy", "image": "coco/train2017/000000299207.jpg",
        "conversations": conv(("<image>\nWhat is the man by the bags awaiting?\nA. skateboarder"
                               "\nB. train\nC. delivery\nD. cab\n" + LETTER, "D"))},
    "okvqa": {
        "id": "2971475", "image": "coco/train2017/000000297147.jpg",
        "conversations": conv(("<image>\nWhat sport can you use this for?\n" + SHORT,
                               "Racing"))},
    "vqav2": {
        "id": "000000458752", "image": "coco/train2017/000000458752.jpg",
        "conversations": conv(("<image>\nWhat is this?\n" + SHORT, "Train"),
                              ("What color?\n" + SHORT, "Red"),
                              ("Is it moving?\n" + SHORT, "No"))},
}
EXPECTED = {name: name.split("_")[0] if name.startswith("refcoco") else name for name in REAL}
EXPECTED["llava_instruct_detail"] = "llava_instruct"


def load(tmp_path: Path, records: list[dict], name: str = "mix.json", **kw):
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    else:
        path.write_text(json.dumps(records), encoding="utf-8")
    return load_mixture(path, **kw)


def task_of(tmp_path: Path, record: dict) -> str:
    labels = label_tasks(load(tmp_path, [record]))
    assert labels.inferred.tolist() == [record.get("task", record.get("dataset")) is None]
    return str(labels.tasks[0])


def rec(image: str | list | None, first: str, *more: tuple[str, str], answer: str = "ok",
        **extra) -> dict:
    r = {"id": "x", "conversations": conv((first, answer), *more), **extra}
    if image is not None:
        r["image"] = image
    return r


# --------------------------------------------------------------------------------------------
# the rules, on realistic records


def test_real_records_all_tasks(tmp_path):
    names = list(REAL)
    labels = label_tasks(load(tmp_path, [REAL[n] for n in names]))
    assert labels.tasks.tolist() == [EXPECTED[n] for n in names]
    assert labels.inferred.tolist() == [True] * len(names)
    assert labels.tasks.shape == (len(names),) and labels.inferred.dtype == bool


@pytest.mark.parametrize("name", list(REAL))
def test_real_record(tmp_path, name):
    assert task_of(tmp_path, REAL[name]) == EXPECTED[name]


@pytest.mark.parametrize("image, expected", [
    ("ocr_vqa/images/1.jpg", "ocrvqa"), ("gqa/images/1.jpg", "gqa"),
    ("textvqa/train_images/1.jpg", "textcaps"), ("vg/VG_100K/1.jpg", "vg"),
    ("vg/VG_100K_2/1.jpg", "vg"), ("coco/train2017/1.jpg", "llava_instruct"),
    ("/data/llava/gqa/images/1.jpg", "gqa"), ("/data/llava/ocr_vqa/images/1.jpg", "ocrvqa"),
    ("./textvqa/train_images/1.jpg", "textcaps"), ("C:\\data\\vg\\VG_100K\\1.jpg", "vg"),
    ("/mnt/playground/data/coco/train2017/1.jpg", "llava_instruct"),
    ("sam/images/sa_1.jpg", "sam"), ("share_textvqa/images/1.jpg", "share_textvqa"),
    ("wikiart/images/1.jpg", "wikiart"), ("1.jpg", "unknown"),
])
def test_folder_rules(tmp_path, image, expected):
    assert task_of(tmp_path, rec(image, "<image>\nWhat is shown here?")) == expected


def test_no_image_is_sharegpt(tmp_path):
    assert task_of(tmp_path, rec(None, "Write a poem about the sea.")) == "sharegpt"
    # the prompt does not matter without an image
    assert task_of(tmp_path, rec(None, "Name it.\n" + SHORT)) == "sharegpt"
    assert task_of(tmp_path, rec([], "Name it.\n" + LETTER)) == "sharegpt"


@pytest.mark.parametrize("prompt", [
    "<image>\nPlease provide a short description for this region: [0.1, 0.2, 0.5, 0.6]",
    ("<image>\nPlease provide the bounding box coordinate of the region this sentence "
    "describes: a man"),
    "<image>\nPLEASE PROVIDE A SHORT DESCRIPTION FOR THIS REGION: [0.1, 0.2, 0.5, 0.6]",
    ("Please provide the Bounding Box Coordinate of the Region this sentence describes: dog\n"
    "<image>"),
])
def test_coco_region_prompts_are_refcoco(tmp_path, prompt):
    assert task_of(tmp_path, rec("coco/train2017/1.jpg", prompt)) == "refcoco"


@pytest.mark.parametrize("suffix", [
    "Answer with the option's letter from the given choices directly.",
    "Answer with the option\u2019s letter from the given choices directly.",
    "ANSWER WITH THE OPTION'S LETTER FROM THE GIVEN CHOICES DIRECTLY.",
    "answer with the Option\u2018s Letter from the given choices directly.",
])
def test_coco_letter_prompt_is_aokvqa(tmp_path, suffix):
    first = "<image>\nWhat is the man doing?\nA. running\nB. sitting\nC. eating\nD. sleeping\n"
    assert task_of(tmp_path, rec("coco/train2017/1.jpg", first + suffix, answer="B")) == "aokvqa"


def test_coco_short_answer_one_pair_is_okvqa_several_vqav2(tmp_path):
    first = "<image>\nWhat is this?\n" + SHORT
    one = rec("coco/train2017/1.jpg", first, answer="Train")
    two = rec("coco/train2017/1.jpg", first, ("What color?\n" + SHORT, "Red"), answer="Train")
    five = rec("coco/train2017/1.jpg", first, *[(f"Q{i}?\n" + SHORT, "a") for i in range(4)])
    upper = rec("coco/train2017/1.jpg", "<image>\nWhat is this?\n" + SHORT.upper())
    assert [task_of(tmp_path, r) for r in (one, two, five, upper)] == [
        "okvqa", "vqav2", "vqav2", "okvqa"]


def test_okvqa_counts_assistant_turns_not_all_turns(tmp_path):
    r = {"image": "coco/train2017/1.jpg", "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "<image>\nWhat is this?\n" + SHORT},
        {"from": "gpt", "value": "Train"}]}
    assert task_of(tmp_path, r) == "okvqa"
    r["conversations"].append({"from": "human", "value": "And?"})
    assert task_of(tmp_path, r) == "okvqa"  # one assistant answer: still one QA pair


@pytest.mark.parametrize("record, expected", [
    # folder rules come before the prompt rules
    (rec("vg/VG_100K/1.jpg", "<image>\nPlease provide a short description for this region: "
         "[0.1, 0.2, 0.5, 0.6]"), "vg"),
    (rec("gqa/images/1.jpg", "<image>\nWhat is this?\n" + SHORT), "gqa"),
    (rec("ocr_vqa/images/1.jpg", "<image>\nGenre?\nA. a\nB. b\n" + LETTER), "ocrvqa"),
    (rec("textvqa/train_images/1.jpg", "<image>\nPlease provide the bounding box coordinate of "
         "the region this sentence describes: sign"), "textcaps"),
    # region before letter before short answer
    (rec("coco/train2017/1.jpg", "<image>\nPlease provide a short description for this region:"
         " [0.1, 0.2, 0.3, 0.4]\n" + LETTER), "refcoco"),
    (rec("coco/train2017/1.jpg", "<image>\nPick one.\nA. x\nB. y\n" + LETTER + "\n" + SHORT),
     "aokvqa"),
    # only the first user turn counts
    (rec("coco/train2017/1.jpg", "<image>\nDescribe the image.",
         ("Please provide a short description for this region: [0.1, 0.2, 0.3, 0.4]", "x")),
     "llava_instruct"),
    (rec("coco/train2017/1.jpg", "<image>\nWhat is happening?", ("What color?\n" + SHORT, "Red")),
     "llava_instruct"),
    # the first image decides
    (rec(["gqa/images/1.jpg", "coco/train2017/1.jpg"], "<image>\n" + LETTER), "gqa"),
    (rec(["coco/train2017/1.jpg", "vg/VG_100K/1.jpg"], "<image>\n" + LETTER), "aokvqa"),
    # a prompt that merely mentions a region is not a region prompt
    (rec("coco/train2017/1.jpg", "<image>\nWhat is in the region near the bounding box of the "
         "table?"), "llava_instruct"),
])
def test_first_match_wins(tmp_path, record, expected):
    assert task_of(tmp_path, record) == expected


def test_absolute_coco_path_uses_prompt_rules(tmp_path):
    assert task_of(tmp_path, rec("/data/llava/coco/train2017/1.jpg",
                                 "<image>\nQ?\nA. a\nB. b\n" + LETTER)) == "aokvqa"
    assert task_of(tmp_path, rec("/data/llava/coco/train2017/1.jpg",
                                 "<image>\nWhat is this?\n" + SHORT)) == "okvqa"


def test_openai_records_use_content_part_images(tmp_path):
    records = [
        {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "coco/train2017/1.jpg"}},
            {"type": "text", "text": "What is this?\n" + SHORT}]},
            {"role": "assistant", "content": "Train"}]},
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": [
                          {"type": "image", "image": "gqa/images/2.jpg"},
                          {"type": "text", "text": "Where?"}]},
                      {"role": "assistant", "content": "Outside"}]},
        {"messages": [{"role": "user", "content": "No image here.\n" + SHORT},
                      {"role": "assistant", "content": "ok"}]},
    ]
    labels = label_tasks(load(tmp_path, records, "m.jsonl"))
    assert labels.tasks.tolist() == ["okvqa", "gqa", "sharegpt"]


def test_infer_task_on_bare_records():
    def r(images, *turns):
        return Record(0, "0", tuple(Turn(*t) for t in turns), tuple(images), None)

    assert infer_task(r((), ("user", "hi"))) == "sharegpt"
    assert infer_task(r(("coco/a.jpg",), ("system", ("Please provide a short description for "
                                          "this region: [0, 0, 1, 1]")),
                        ("user", "Describe."))) == "llava_instruct"
    assert infer_task(r(("coco/a.jpg",), ("assistant", "x"))) == "llava_instruct"
    assert infer_task(r(("<embedded>",), ("user", "x"))) == "unknown"


# --------------------------------------------------------------------------------------------
# explicit fields and counts


def test_explicit_field_wins(tmp_path):
    records = [
        {**REAL["vqav2"], "dataset": "foo"},
        {**REAL["refcoco_box"], "task": "bar"},
        {**REAL["sharegpt"], "source": "gqa"},
        REAL["aokvqa"],
        {**REAL["okvqa"], "dataset": ""},
    ]
    labels = label_tasks(load(tmp_path, records))
    assert labels.tasks.tolist() == ["foo", "bar", "gqa", "aokvqa", "okvqa"]
    assert labels.inferred.tolist() == [False, False, False, True, True]


def test_task_field_option(tmp_path):
    records = [{**REAL["vqav2"], "category": "vqa", "dataset": "ignored"},
               {**REAL["gqa"], "dataset": "ignored"},
               {**REAL["sharegpt"], "category": "chat"}]
    labels = label_tasks(load(tmp_path, records, task_field="category"))
    assert labels.tasks.tolist() == ["vqa", "gqa", "chat"]
    assert labels.inferred.tolist() == [False, True, False]
    default = label_tasks(load(tmp_path, records))
    assert default.tasks.tolist() == ["ignored", "ignored", "sharegpt"]
    assert default.inferred.tolist() == [False, False, True]


def test_mixed_file_counts(tmp_path):
    records = (
        [REAL["llava_instruct"]] * 3 + [REAL["llava_instruct_detail"]]
        + [REAL["gqa"]] * 2 + [{**REAL["sharegpt"], "dataset": "gqa"}]
        + [REAL["vqav2"]] * 3
        + [{**REAL["aokvqa"], "dataset": "foo"}, {**REAL["vg"], "task": "foo"}]
        + [REAL["aokvqa"]] + [REAL["sharegpt"]]
    )
    labels = label_tasks(load(tmp_path, records, "m.jsonl"))
    assert list(labels.counts().items()) == [
        ("llava_instruct", 4), ("gqa", 3), ("vqav2", 3), ("foo", 2), ("aokvqa", 1),
        ("sharegpt", 1)]
    assert labels.inferred_counts() == {"llava_instruct": 4, "gqa": 2, "vqav2": 3,
                                        "aokvqa": 1, "sharegpt": 1}
    assert int(labels.inferred.sum()) == 11 and len(labels.tasks) == 14


def test_counts_order_and_types():
    labels = TaskLabels(np.array(["b", "a", "c", "a", "b", "d", "c", "c"], dtype=object),
                        np.array([True, False, True, True, False, False, False, True]))
    counts = labels.counts()
    assert list(counts.items()) == [("c", 3), ("a", 2), ("b", 2), ("d", 1)]
    assert all(type(k) is str and type(v) is int for k, v in counts.items())
    inferred = labels.inferred_counts()
    assert inferred == {"a": 1, "b": 1, "c": 2}
    assert all(type(k) is str and type(v) is int for k, v in inferred.items())


def test_no_inferred_labels():
    labels = TaskLabels(np.array(["x", "y"], dtype=object), np.array([False, False]))
    assert labels.inferred_counts() == {}
    assert list(labels.counts().items()) == [("x", 1), ("y", 1)]


def test_665k_like_mixture(tmp_path):
    """A small mixture in the 665K's proportions: every label and count comes back exactly."""
    plan = {"llava_instruct": 16, "vg": 9, "vqav2": 8, "ocrvqa": 8, "gqa": 7, "aokvqa": 7,
            "refcoco_box": 3, "refcoco_desc": 2, "sharegpt": 4, "textcaps": 2, "okvqa": 1}
    records = []
    for name, n in plan.items():
        for j in range(n):
            r = json.loads(json.dumps(REAL[name]))
            r["id"] = f"{name}-{j}"
            if "image" in r:
                r["image"] = r["image"].replace(".jpg", f"_{j}.jpg")
            records.append(r)
    order = np.random.default_rng(0).permutation(len(records))
    mixed = [records[i] for i in order]
    labels = label_tasks(load(tmp_path, mixed))
    assert labels.tasks.tolist() == [EXPECTED[r["id"].rsplit("-", 1)[0]] for r in mixed]
    assert list(labels.counts().items()) == [
        ("llava_instruct", 16), ("vg", 9), ("ocrvqa", 8), ("vqav2", 8), ("aokvqa", 7),
        ("gqa", 7), ("refcoco", 5), ("sharegpt", 4), ("textcaps", 2), ("okvqa", 1)]
    assert labels.inferred_counts() == dict(labels.counts())


@pytest.mark.parametrize("image", ["https://example.org/coco/x.jpg", "data:image/png;base64,AAAA"])
def test_urls_and_inline_images_have_no_folder_task(image):
    record = Record(0, "0", (Turn("user", "<image>\nq"), Turn("assistant", "a")), (image,), None)
    assert infer_task(record) == "unknown"


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(["vqa", "gqa", "Gqa", "ocr_vqa", "é", "日本", "", None, 3]),
                max_size=30))
def test_factorize_is_numpy_unique(labels):
    from tive.data.tasks import factorize

    tasks = np.array(labels, dtype=object)
    names, codes = factorize(tasks)
    want_names, want_codes = np.unique(tasks.astype(str), return_inverse=True)
    assert names == [str(t) for t in want_names]
    assert codes.tolist() == want_codes.reshape(-1).tolist()
