"""Stage 1 (tive.data.mixture): reading every container x schema, verbatim subsets, keys, images, errors."""

from __future__ import annotations

import base64
import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tive.data.mixture as tdata
import tive.data.readers
from tive.data.mixture import load_mixture
from tive.data.schemas import EMBEDDED, Turn
from tive.errors import DataError, TiveError

datasets = pytest.importorskip("datasets")

FAST = settings(max_examples=25, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
INDICES = [3, 0, 3, 1]  # out of order, with a repeat


# --------------------------------------------------------------------------------------------
# helpers


def llava(i: int, **extra) -> dict:
    record = {"id": f"r{i}", "image": f"coco/train2017/{i:012d}.jpg",
              "conversations": [{"from": "human", "value": f"<image>\nWhat is in picture {i}?"},
                                {"from": "gpt", "value": f"Picture {i} shows a cat."}]}
    record.update(extra)
    return record


LLAVA_RECORDS = [
    llava(0),
    llava(1, meta={"nested": [1, {"deep": None}], "flag": True}, score=0.5),
    {"id": 7, "conversations": [{"from": "system", "value": "Be terse."},
                                {"from": "human", "value": "Ünïcödé ☃ 日本語 \u2028 line-sep"},
                                {"from": "gpt", "value": "🙂 ok\n\tdone"}]},
    llava(3, images=["vg/VG_100K/1.jpg", "gqa/images/2.jpg"], unknown_field="keep me"),
    llava(4, conversations=[{"from": "human", "value": "<image>\nQ?"},
                            {"from": "gpt", "value": "A."},
                            {"from": "human", "value": "Q2?"},
                            {"from": "gpt", "value": "A2."}]),
]

OPENAI_RECORDS = [
    {"messages": [{"role": "system", "content": "You are helpful."},
                  {"role": "user", "content": "Hello ✓"},
                  {"role": "assistant", "content": "Hi."}]},
    {"id": "p1", "messages": [
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "coco/train2017/1.jpg"}},
            {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A dog."}]}]},
    {"id": "p2", "messages": [
        {"role": "user", "content": [{"type": "image", "image": "gqa/images/2.jpg"},
                                     {"type": "text", "text": "Where?"},
                                     {"type": "image_url", "image_url": "vg/VG_100K/3.jpg"}]},
        {"role": "assistant", "content": "Outside."}]},
    {"id": "p3", "extra": {"k": [1, 2]}, "messages": [
        {"role": "developer", "content": "Rules."},
        {"role": "user", "content": "Just text"},
        {"role": "assistant", "content": "Fine."}]},
]

ALPACA_RECORDS = [
    {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
    {"instruction": "Name a colour.", "input": "", "output": "Blue"},
    {"instruction": "Sum.", "input": "2 + 2", "output": "4", "system": "Be exact.",
     "id": "a2"},
    {"instruction": "Say hi ☃", "output": "hi", "extra": [1, {"x": "y"}]},
]


def write_json(path: Path, records, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, ensure_ascii=False, **kw), encoding="utf-8")
    return path


def write_lines(path: Path, lines: list[str], ending: str = "\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write("".join(line + ending for line in lines))
    return path


def odd_lines(records: list[dict]) -> list[str]:
    """JSONL lines in varied styles: key order, whitespace, escaping, trailing tabs."""
    styles = [{"ensure_ascii": False}, {"ensure_ascii": True, "separators": (",", ":")},
              {"ensure_ascii": False, "separators": (" ,  ", "\t:\t")},
              {"ensure_ascii": True, "sort_keys": True}]
    out = []
    for i, r in enumerate(records):
        if i % 2:
            r = dict(reversed(list(r.items())))
        text = json.dumps(r, **styles[i % len(styles)])
        out.append((" \t" if i % 3 == 0 else "") + text + ("\t  " if i % 2 else ""))
    return out


def ds_rows(ds) -> list[dict]:
    return [ds[i] for i in range(len(ds))]


def png_bytes(color=(255, 0, 0)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (2, 2), color).save(buf, format="PNG")
    return buf.getvalue()


def one_line(message: str) -> bool:
    return "\n" not in message and "\r" not in message


def leftovers(folder: Path, keep: set[str]) -> set[str]:
    return {p.name for p in folder.iterdir()} - keep


# --------------------------------------------------------------------------------------------
# round trips: JSON and JSONL


@pytest.mark.parametrize("records, schema", [(LLAVA_RECORDS, "llava"),
                                             (ALPACA_RECORDS + [ALPACA_RECORDS[0]], "alpaca")])
def test_json_list_round_trip(tmp_path, records, schema):
    src = write_json(tmp_path / "mix.json", records, indent=3)
    m = load_mixture(src)
    assert (m.container, m.schema, len(m)) == ("json", schema, len(records))
    assert [m.raw(i) for i in range(len(m))] == records
    out = m.write_subset(INDICES, tmp_path / "out" / "sub.json")
    assert out == tmp_path / "out" / "sub.json"
    back = json.loads(out.read_text(encoding="utf-8"))
    assert back == [records[i] for i in INDICES]
    assert "\\u" not in out.read_text(encoding="utf-8")  # unicode written as itself
    again = load_mixture(out)
    assert (again.container, again.schema, len(again)) == ("json", schema, len(INDICES))
    assert again.content_keys.tolist() == [int(m.content_keys[i]) for i in INDICES]
    assert again.ids == (["r3", "r0", "r3", "r1"] if schema == "llava" else ["0", "1", "2", "3"])
    assert sorted(p.name for p in out.parent.iterdir()) == ["sub.json"]


@pytest.mark.parametrize("records, schema", [(LLAVA_RECORDS, "llava"), (OPENAI_RECORDS, "openai"),
                                             (ALPACA_RECORDS, "alpaca")])
@pytest.mark.parametrize("ending", ["\n", "\r\n"])
def test_jsonl_round_trip_bytes(tmp_path, records, schema, ending):
    lines = odd_lines(records)
    src = write_lines(tmp_path / "mix.jsonl", lines, ending)
    m = load_mixture(src)
    assert (m.container, m.schema, len(m)) == ("jsonl", schema, len(records))
    assert [m.raw(i) for i in range(len(m))] == lines
    idx = [len(records) - 1, 0, len(records) - 1, 1]
    out = m.write_subset(idx, tmp_path / "sub.jsonl")
    expected = b"".join((lines[i] + "\n").encode("utf-8") for i in idx)
    assert out.read_bytes() == expected
    assert [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()] == [
        records[i] for i in idx]
    again = load_mixture(out)
    assert (again.container, again.schema) == ("jsonl", schema)
    assert [again.raw(i) for i in range(len(again))] == [lines[i] for i in idx]
    assert again.content_keys.tolist() == [int(m.content_keys[i]) for i in idx]


def test_jsonl_blank_lines_and_no_final_newline(tmp_path):
    lines = odd_lines(LLAVA_RECORDS[:3])
    text = "\n" + lines[0] + "\n   \n\n" + lines[1] + "\n\t\n" + lines[2]  # no trailing newline
    src = tmp_path / "mix.jsonl"
    src.write_bytes(text.encode("utf-8"))
    m = load_mixture(src)
    assert [m.raw(i) for i in range(3)] == lines
    assert m.ids == ["r0", "r1", "7"]
    out = m.write_subset([2, 2, 0], tmp_path / "o.jsonl")
    assert out.read_bytes() == (lines[2] + "\n" + lines[2] + "\n" + lines[0] + "\n").encode()


def test_jsonl_without_jsonl_suffix_is_sniffed(tmp_path):
    lines = odd_lines(OPENAI_RECORDS)
    src = write_lines(tmp_path / "mix.txt", lines)
    m = load_mixture(src)
    assert (m.container, m.schema, len(m)) == ("jsonl", "openai", 4)
    assert m.default_suffix() == ".jsonl"


def test_json_list_without_json_suffix_is_sniffed(tmp_path):
    src = tmp_path / "mix.data"
    src.write_text("  \n" + json.dumps(LLAVA_RECORDS), encoding="utf-8")
    m = load_mixture(src)
    assert (m.container, m.schema, len(m)) == ("json", "llava", 5)
    assert m.default_suffix() == ".json"


# hypothesis: arbitrary unicode, extra fields, random indices

SAFE_KEYS = st.text(min_size=1, max_size=8).filter(
    lambda k: k not in {"id", "conversations", "messages", "instruction", "output", "input",
                        "image", "images", "task", "dataset", "source", "system"})
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**60, 2**60) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                 max_size=3),
    max_leaves=8)
TURN = st.fixed_dictionaries({"from": st.sampled_from(["human", "gpt", "system", "Human", "GPT"]),
                              "value": st.text(max_size=30)})
LLAVA_RECORD = st.builds(
    lambda rid, conv, image, extra: {**extra, **({"id": rid} if rid is not None else {}),
                                     "conversations": conv,
                                     **({"image": image} if image is not None else {})},
    st.none() | st.text(max_size=10),
    st.lists(TURN, min_size=1, max_size=4),
    st.none() | st.text(min_size=1, max_size=20) | st.lists(st.text(min_size=1, max_size=10),
                                                             max_size=2),
    st.dictionaries(SAFE_KEYS, JSON_VALUES, max_size=3))


@st.composite
def mixture_and_indices(draw):
    records = draw(st.lists(LLAVA_RECORD, min_size=1, max_size=8))
    n = len(records)
    indices = draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=12))
    return records, indices


@FAST
@given(data=mixture_and_indices(), ascii_=st.booleans(), indent=st.none() | st.integers(0, 3))
def test_json_round_trip_property(data, ascii_, indent):
    records, indices = data
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "mix.json"
        src.write_text(json.dumps(records, ensure_ascii=ascii_, indent=indent), encoding="utf-8")
        m = load_mixture(src)
        assert len(m) == len(records)
        assert m.ids == [str(r["id"]) if "id" in r else str(i) for i, r in enumerate(records)]
        out = m.write_subset(indices, Path(d) / "sub.json")
        assert json.loads(out.read_text(encoding="utf-8")) == [records[i] for i in indices]
        again = load_mixture(out)
        assert (again.container, again.schema) == ("json", "llava")
        assert again.content_keys.tolist() == [int(m.content_keys[i]) for i in indices]
        assert sorted(os.listdir(d)) == ["mix.json", "sub.json"]


@FAST
@given(data=mixture_and_indices(), seed=st.integers(0, 2**16),
       ending=st.sampled_from(["\n", "\r\n"]))
def test_jsonl_round_trip_property(data, seed, ending):
    records, indices = data
    rng = np.random.default_rng(seed)
    lines = []
    for r in records:
        keys = list(r)
        rng.shuffle(keys)
        seps = [(",", ":"), (", ", ": "), (" ,\t", " : ")][rng.integers(3)]
        text = json.dumps({k: r[k] for k in keys}, ensure_ascii=bool(rng.integers(2)),
                          separators=seps)
        lines.append(" " * int(rng.integers(3)) + text + "\t" * int(rng.integers(2)))
    with tempfile.TemporaryDirectory() as d:
        src = write_lines(Path(d) / "mix.jsonl", lines, ending)
        m = load_mixture(src)
        assert [m.raw(i) for i in range(len(m))] == lines
        out = m.write_subset(indices, Path(d) / "sub.jsonl")
        assert out.read_bytes() == "".join(lines[i] + "\n" for i in indices).encode("utf-8")
        again = load_mixture(out)
        assert (again.container, again.schema, len(again)) == ("jsonl", "llava", len(indices))
        assert again.content_keys.tolist() == [int(m.content_keys[i]) for i in indices]


def test_json_subset_copies_each_record_byte_for_byte(tmp_path):
    """A JSON list's records are written as the file has them (key order, spacing, escapes),
    not re-serialised."""
    texts = ['{"id": "a", "conversations": [{"from": "human", "value": "caf\\u00e9 \\/ [x]"}]}',
             '{ "conversations":[ {"value":"q\\"}{", "from":"human"} ],"id":"b" }',
             '{"id":"c","conversations":[{"from":"human","value":"\\\\"}]}']
    src = tmp_path / "m.json"
    src.write_bytes(("\ufeff[\n  " + " ,\n\t".join(texts) + "\n]").encode("utf-8"))
    m = load_mixture(src)
    assert [m.raw(i)["id"] for i in range(3)] == ["a", "b", "c"]
    out = m.write_subset([2, 0, 2, 1], tmp_path / "sub.json")
    assert out.read_text() == "[\n" + ",\n".join(texts[i] for i in [2, 0, 2, 1]) + "\n]\n"


def test_json_subset_without_spans_is_written_from_the_parsed_records(tmp_path, monkeypatch):
    monkeypatch.setattr(tive.data.readers, "record_spans", lambda source: None)
    src = write_json(tmp_path / "m.json", LLAVA_RECORDS, indent=1)
    m = load_mixture(src)
    assert m.spans is None
    out = m.write_subset([4, 0], tmp_path / "sub.json")
    assert json.loads(out.read_text()) == [LLAVA_RECORDS[4], LLAVA_RECORDS[0]]


def test_json_subset_after_the_file_changed_is_the_records_as_read(tmp_path):
    """Spans are only used on the bytes they were found in: a file changed between reading and
    writing gives the records as they were read, not bytes of the new file."""
    src = write_json(tmp_path / "m.json", LLAVA_RECORDS, indent=1)
    m = load_mixture(src)
    assert m.spans is not None
    src.write_text(json.dumps([{"id": "other"}] * 9))
    out = m.write_subset([1, 0], tmp_path / "sub.json")
    assert json.loads(out.read_text()) == [LLAVA_RECORDS[1], LLAVA_RECORDS[0]]


def test_record_spans_with_many_escaped_quotes_and_backslashes():
    records = [{"code": 'print("a\\\\") \\" ' * (i + 1), "q": '\\"' * i, "b": "\\" * i}
               for i in range(40)]
    source = json.dumps(records).encode()
    spans = tive.data.readers.record_spans(source)
    assert [json.loads(source[a:b]) for a, b in spans] == records


JSON_TEXT = st.text(alphabet=st.sampled_from(list('ab"\\[]{},: \n\u00e9\u2028/')), max_size=12)
JSON_VALUE = st.recursive(st.none() | st.booleans() | st.integers() | JSON_TEXT,
                          lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(JSON_TEXT, inner, max_size=3), max_leaves=8)


@FAST
@given(records=st.lists(st.dictionaries(JSON_TEXT, JSON_VALUE, max_size=4), max_size=6),
       indent=st.none() | st.integers(0, 2), ascii_=st.booleans())
def test_record_spans_are_the_records(records, indent, ascii_):
    """Spans found by scanning bytes parse back to exactly the records, whatever quotes,
    backslashes and brackets their strings hold."""
    source = json.dumps(records, indent=indent, ensure_ascii=ascii_).encode("utf-8")
    spans = tive.data.readers.record_spans(source)
    assert spans is not None and spans.shape == (len(records), 2)
    assert [json.loads(source[a:b]) for a, b in spans] == records
    assert tive.data.readers.record_spans(source.replace(b"[", b"", 1)) is None  # not a list
    assert tive.data.readers.record_spans(source + b"[]") is None  # two lists


@pytest.mark.parametrize("name", ["mix.json", "mix.jsonl"])
def test_lone_surrogate_escape(tmp_path, name):
    line = '{"id": "s1", "conversations": [{"from": "human", "value": "bad \\ud800 text"}]}'
    src = tmp_path / name
    src.write_text(line + "\n" if name.endswith("l") else f"[{line}]", encoding="utf-8")
    try:
        m = load_mixture(src)
    except DataError as e:  # refusing it cleanly is acceptable too
        assert one_line(str(e)) and str(src) in str(e)
        return
    out = m.write_subset([0, 0], tmp_path / ("sub" + src.suffix))
    back = load_mixture(out)
    assert len(back) == 2 and back[0].turns[0].text == "bad \ud800 text"


# --------------------------------------------------------------------------------------------
# round trips: parquet and datasets folders

ROWS = [
    {"id": f"h{i}", "image": f"coco/train2017/{i}.jpg" if i % 2 else None,
     "conversations": [{"from": "human", "value": f"<image>\nQ{i} ünï ☃?"},
                       {"from": "gpt", "value": f"A{i}"}],
     "score": float(i) / 3, "tags": [f"t{i}", "x"]}
    for i in range(6)
]


def make_ds(rows=ROWS):
    return datasets.Dataset.from_list(rows)


def test_parquet_file_round_trip(tmp_path):
    src = tmp_path / "train.parquet"
    make_ds().to_parquet(str(src))
    m = load_mixture(src)
    assert (m.container, m.schema, len(m)) == ("parquet", "llava", 6)
    assert m.ids == [f"h{i}" for i in range(6)]
    assert m.default_suffix() == ".parquet"
    original = ds_rows(datasets.Dataset.from_parquet(str(src)))
    assert original[1] == ROWS[1]
    idx = [5, 0, 5, 2]
    out = m.write_subset(idx, tmp_path / "sub.parquet")
    assert ds_rows(datasets.Dataset.from_parquet(str(out))) == [original[i] for i in idx]
    again = load_mixture(out)
    assert (again.container, again.schema, len(again)) == ("parquet", "llava", 4)
    assert again.content_keys.tolist() == [int(m.content_keys[i]) for i in idx]


def test_parquet_folder_round_trip(tmp_path):
    folder = tmp_path / "pq"
    folder.mkdir()
    make_ds(ROWS[3:]).to_parquet(str(folder / "b-00001.parquet"))
    make_ds(ROWS[:3]).to_parquet(str(folder / "a-00000.parquet"))
    (folder / "README.md").write_text("not data")
    m = load_mixture(folder)
    assert (m.container, m.schema, len(m)) == ("parquet", "llava", 6)
    assert m.ids == [f"h{i}" for i in range(6)]  # files in name order
    idx = [4, 1, 4, 0, 5]
    out = m.write_subset(idx, tmp_path / "sub.parquet")
    assert ds_rows(datasets.Dataset.from_parquet(str(out))) == [ROWS[i] for i in idx]
    again = load_mixture(out)
    assert (again.container, len(again), again.ids) == ("parquet", 5, [f"h{i}" for i in idx])


@pytest.mark.parametrize("as_dict", [False, True])
def test_hf_disk_round_trip(tmp_path, as_dict):
    ds = make_ds()
    src = tmp_path / "saved"
    (datasets.DatasetDict({"train": ds}) if as_dict else ds).save_to_disk(str(src))
    m = load_mixture(src)
    assert (m.container, m.schema, len(m)) == ("hf-disk", "llava", 6)
    assert m.default_suffix() == ""
    idx = [3, 3, 0, 5]
    out = m.write_subset(idx, tmp_path / "subset")
    assert out.is_dir()
    back = datasets.load_from_disk(str(out))
    assert ds_rows(back) == [ROWS[i] for i in idx]
    again = load_mixture(out)
    assert (again.container, again.schema, again.ids) == ("hf-disk", "llava",
                                                          [f"h{i}" for i in idx])
    assert again.content_keys.tolist() == [int(m.content_keys[i]) for i in idx]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved", "subset"]


def test_hf_disk_write_replaces_existing_folder(tmp_path):
    src = tmp_path / "saved"
    make_ds().save_to_disk(str(src))
    m = load_mixture(src)
    m.write_subset([0, 1, 2], tmp_path / "subset")
    m.write_subset([4], tmp_path / "subset")
    assert load_mixture(tmp_path / "subset").ids == ["h4"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved", "subset"]


def image_dataset():
    feats = datasets.Features({
        "id": datasets.Value("string"), "image": datasets.Image(),
        "conversations": datasets.List({"from": datasets.Value("string"),
                                        "value": datasets.Value("string")})})
    conv = [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red"}]
    return datasets.Dataset.from_dict(
        {"id": ["e0", "e1", "e2"],
         "image": [{"bytes": png_bytes(), "path": None},
                   {"bytes": png_bytes((0, 0, 255)), "path": "blue.png"}, None],
         "conversations": [conv] * 3}, features=feats)


@pytest.mark.parametrize("kind", ["parquet", "hf-disk"])
def test_embedded_image_rows_round_trip(tmp_path, kind):
    ds = image_dataset()
    src = tmp_path / ("in.parquet" if kind == "parquet" else "in")
    ds.to_parquet(str(src)) if kind == "parquet" else ds.save_to_disk(str(src))
    m = load_mixture(src)
    assert [r.images for r in m] == [(EMBEDDED,), (EMBEDDED,), ()]
    assert m.missing_images().tolist() == [False, False, False]
    out = m.write_subset([1, 0, 1], tmp_path / ("out.parquet" if kind == "parquet" else "out"))
    back = (datasets.Dataset.from_parquet(str(out)) if kind == "parquet"
            else datasets.load_from_disk(str(out)))
    raw = back.cast_column("image", datasets.Image(decode=False))
    assert [r["image"]["bytes"] for r in raw] == [png_bytes((0, 0, 255)), png_bytes(),
                                                  png_bytes((0, 0, 255))]
    assert [r["id"] for r in raw] == ["e1", "e0", "e1"]
    again = load_mixture(out)
    assert again.content_keys.tolist() == [int(m.content_keys[i]) for i in [1, 0, 1]]


@pytest.mark.parametrize("kind", ["parquet", "hf-disk"])
def test_embedded_image_features_preserved(tmp_path, kind):
    ds = image_dataset()
    src = tmp_path / ("in.parquet" if kind == "parquet" else "in")
    ds.to_parquet(str(src)) if kind == "parquet" else ds.save_to_disk(str(src))
    out = load_mixture(src).write_subset([1, 0], tmp_path / ("o.parquet" if kind == "parquet"
                                                              else "o"))
    back = (datasets.Dataset.from_parquet(str(out)) if kind == "parquet"
            else datasets.load_from_disk(str(out)))
    assert back.features == ds.features
    assert back[0]["image"].size == (2, 2)


# --------------------------------------------------------------------------------------------
# normalisation


def test_llava_roles_images_ids(tmp_path):
    records = [
        {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "U"},
                           {"from": "gpt", "value": "A"}], "image": "a/1.jpg"},
        {"id": "x", "conversations": [{"from": "Human", "value": "u"},
                                      {"from": "GPT", "value": "a"},
                                      {"from": "user", "value": "u2"},
                                      {"from": "assistant", "value": "a2"}],
         "image": ["b/1.jpg", "b/2.jpg"]},
        {"id": 12, "conversations": [{"from": "gpt", "value": "only"}], "images": ["c/1.png"]},
        {"id": None, "conversations": [{"from": "human", "value": "q"}],
         "image": "d/1.jpg", "images": ["d/2.jpg"]},
    ]
    m = load_mixture(write_json(tmp_path / "m.json", records))
    assert m.ids == ["0", "x", "12", "3"]
    assert m[0].turns == (Turn("system", "S"), Turn("user", "U"), Turn("assistant", "A"))
    assert [t.role for t in m[1].turns] == ["user", "assistant", "user", "assistant"]
    assert [r.images for r in m] == [("a/1.jpg",), ("b/1.jpg", "b/2.jpg"), ("c/1.png",),
                                     ("d/1.jpg", "d/2.jpg")]
    assert [r.first_user_text for r in m] == ["U", "u", "", "q"]
    assert [r.index for r in m] == [0, 1, 2, 3]
    assert m.explicit_tasks == [None] * 4


def test_openai_normalisation(tmp_path):
    m = load_mixture(write_lines(tmp_path / "m.jsonl",
                                 [json.dumps(r) for r in OPENAI_RECORDS]))
    assert m.schema == "openai"
    assert m.ids == ["0", "p1", "p2", "p3"]
    assert m[0].turns == (Turn("system", "You are helpful."), Turn("user", "Hello ✓"),
                          Turn("assistant", "Hi."))
    assert m[1].turns == (Turn("user", "<image>What is this?"), Turn("assistant", "A dog."))
    assert m[2].turns == (Turn("user", "<image>Where?<image>"), Turn("assistant", "Outside."))
    assert m[3].turns[0] == Turn("system", "Rules.")
    assert [r.images for r in m] == [(), ("coco/train2017/1.jpg",),
                                     ("gqa/images/2.jpg", "vg/VG_100K/3.jpg"), ()]


def test_openai_images_field_and_parts_combine(tmp_path):
    rec = {"images": ["top.jpg"], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": "yo"}]}
    m = load_mixture(write_lines(tmp_path / "m.jsonl", [json.dumps(rec)]))
    assert m[0].images == ("top.jpg",)
    assert m[0].turns[0] == Turn("user", "<image>hi")


def test_alpaca_normalisation(tmp_path):
    m = load_mixture(write_lines(tmp_path / "a.jsonl", [json.dumps(r) for r in ALPACA_RECORDS]))
    assert (m.container, m.schema) == ("jsonl", "alpaca")
    assert m.ids == ["0", "1", "a2", "3"]
    assert m[0].turns == (Turn("user", "Translate to French.\n\nGood morning"),
                          Turn("assistant", "Bonjour"))
    assert m[1].turns == (Turn("user", "Name a colour."), Turn("assistant", "Blue"))
    assert m[2].turns == (Turn("system", "Be exact."), Turn("user", "Sum.\n\n2 + 2"),
                          Turn("assistant", "4"))
    assert m[3].turns == (Turn("user", "Say hi ☃"), Turn("assistant", "hi"))
    assert all(r.images == () for r in m)


def test_explicit_task_fields(tmp_path):
    base = {"conversations": [{"from": "human", "value": "q"}]}
    records = [
        {**base, "task": "t1", "dataset": "d1", "source": "s1"},
        {**base, "dataset": "d2", "source": "s2"},
        {**base, "source": "s3"},
        {**base},
        {**base, "task": "", "dataset": "d5"},
        {**base, "dataset": 42},
        {**base, "category": "c7", "task": "t7"},
    ]
    src = write_json(tmp_path / "m.json", records)
    assert load_mixture(src).explicit_tasks == ["t1", "d2", "s3", None, "d5", "42", "t7"]
    assert load_mixture(src, task_field="category").explicit_tasks == [None] * 6 + ["c7"]
    assert load_mixture(src, task_field="source").explicit_tasks == [
        "s1", "s2", "s3", None, None, None, None]


def test_explicit_task_must_be_a_name(tmp_path):
    src = write_json(tmp_path / "m.json", [{"conversations": [{"from": "human", "value": "q"}],
                                            "id": "z", "task": ["a", "b"]}])
    with pytest.raises(DataError) as e:
        load_mixture(src)
    msg = str(e.value)
    assert one_line(msg) and str(src) in msg and "record 0 (id z)" in msg and "`task`" in msg


# --------------------------------------------------------------------------------------------
# keys and fingerprint


def test_keys_ignore_position_whitespace_key_order(tmp_path):
    rec = LLAVA_RECORDS[1]
    variants = [json.dumps(rec), json.dumps(rec, separators=(",", ":"), ensure_ascii=True),
                json.dumps(dict(reversed(list(rec.items()))), sort_keys=False) + "  ",
                json.dumps({**rec, "meta": dict(reversed(list(rec["meta"].items())))})]
    other = json.dumps(LLAVA_RECORDS[0])
    m = load_mixture(write_lines(tmp_path / "m.jsonl", [other] + variants))
    assert m.content_keys.dtype == np.uint64 and m.content_keys.shape == (5,)
    assert len(set(m.content_keys[1:].tolist())) == 1
    assert m.content_keys[0] != m.content_keys[1]
    as_list = load_mixture(write_json(tmp_path / "m.json", [rec, LLAVA_RECORDS[0]], indent=4))
    assert as_list.content_keys.tolist() == [int(m.content_keys[1]), int(m.content_keys[0])]


def test_fingerprint_tracks_content_and_order(tmp_path):
    base = load_mixture(write_json(tmp_path / "a.json", LLAVA_RECORDS))
    same = load_mixture(write_json(tmp_path / "b.json", LLAVA_RECORDS, indent=2))
    assert isinstance(base.fingerprint, str) and len(base.fingerprint) == 32
    assert same.fingerprint == base.fingerprint
    changed = json.loads(json.dumps(LLAVA_RECORDS))
    changed[2]["conversations"][1]["value"] += "!"
    ch = load_mixture(write_json(tmp_path / "c.json", changed))
    assert ch.fingerprint != base.fingerprint
    assert (ch.content_keys != base.content_keys).tolist() == [False, False, True, False, False]
    reordered = load_mixture(write_json(tmp_path / "d.json", LLAVA_RECORDS[::-1]))
    assert reordered.fingerprint != base.fingerprint
    assert sorted(reordered.content_keys.tolist()) == sorted(base.content_keys.tolist())
    assert reordered.content_keys.tolist() == base.content_keys.tolist()[::-1]


def test_duplicate_records_share_a_content_key_but_draw_independently(tmp_path):
    m = load_mixture(write_json(tmp_path / "a.json", [LLAVA_RECORDS[0]] * 3 + [LLAVA_RECORDS[1]]))
    assert len(set(m.content_keys[:3].tolist())) == 1 and m.content_keys[3] != m.content_keys[0]
    assert len(set(m.keys.tolist())) == 4 and m.keys[0] == m.content_keys[0]


@FAST
@given(data=mixture_and_indices(), seed=st.integers(0, 2**16))
def test_keys_are_a_per_record_function(data, seed):
    records, _ = data
    perm = np.random.default_rng(seed).permutation(len(records))
    with tempfile.TemporaryDirectory() as d:
        a = load_mixture(write_json(Path(d) / "a.json", records))
        b = load_mixture(write_json(Path(d) / "b.json", [records[i] for i in perm], indent=1))
        assert b.content_keys.tolist() == [int(a.content_keys[i]) for i in perm]
        if b.content_keys.tolist() == a.content_keys.tolist():
            assert b.fingerprint == a.fingerprint
        else:
            assert b.fingerprint != a.fingerprint


# --------------------------------------------------------------------------------------------
# missing images


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG")
    return path


def test_missing_images_default_root_and_image_root(tmp_path, monkeypatch):
    data = tmp_path / "data"
    touch(data / "coco" / "a.jpg")
    touch(data / "gqa" / "both.jpg")
    other = tmp_path / "imgs"
    touch(other / "coco" / "b.jpg")
    touch(other / "gqa" / "both.jpg")
    absolute = touch(tmp_path / "abs" / "x.jpg")
    (data / "coco" / "dir.jpg").mkdir()
    conv = [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]
    records = [
        {"image": "coco/a.jpg"}, {"image": "coco/b.jpg"}, {"image": str(absolute)},
        {"image": str(tmp_path / "abs" / "nope.jpg")},
        {"image": "data:image/png;base64," + base64.b64encode(b"xx").decode()},
        {"image": "http://example.com/x.jpg"}, {"image": "https://example.com/y.jpg"},
        {"images": ["gqa/both.jpg", "coco/a.jpg"]}, {"images": ["gqa/both.jpg", "coco/b.jpg"]},
        {}, {"image": "coco/dir.jpg"},
    ]
    src = write_json(data / "mix.json", [{**r, "conversations": conv} for r in records])
    m = load_mixture(src)
    assert m.missing_images().tolist() == [False, True, False, True, False, True, True,
                                           False, True, False, True]
    assert m.missing_images(other).tolist() == [True, False, False, True, False, True, True,
                                                True, False, False, True]
    assert m.missing_images(str(other)).tolist() == m.missing_images(other).tolist()
    monkeypatch.chdir(tmp_path)  # relative image_root resolves against the working directory
    assert m.missing_images("imgs").tolist() == m.missing_images(other).tolist()


def test_missing_images_openai_parts(tmp_path):
    touch(tmp_path / "coco" / "train2017" / "1.jpg")
    m = load_mixture(write_lines(tmp_path / "m.jsonl", [json.dumps(r) for r in OPENAI_RECORDS]))
    assert m.missing_images().tolist() == [False, False, True, False]
    touch(tmp_path / "gqa" / "images" / "2.jpg")
    touch(tmp_path / "vg" / "VG_100K" / "3.jpg")
    assert m.missing_images().tolist() == [False, False, False, False]
    assert m.missing_images(tmp_path / "elsewhere").tolist() == [False, True, True, False]


def test_missing_images_parquet_paths_resolve_beside_file(tmp_path):
    folder = tmp_path / "pq"
    folder.mkdir()
    make_ds().to_parquet(str(folder / "a.parquet"))
    touch(folder / "coco" / "train2017" / "1.jpg")
    touch(tmp_path / "coco" / "train2017" / "3.jpg")
    by_file = load_mixture(folder / "a.parquet").missing_images()
    by_folder = load_mixture(folder).missing_images()
    assert by_file.tolist() == [False, False, False, True, False, True]
    assert by_folder.tolist() == by_file.tolist()
    assert load_mixture(folder).missing_images(tmp_path).tolist() == [
        False, True, False, False, False, True]


def test_missing_images_hf_disk_root_is_the_folder(tmp_path):
    src = tmp_path / "saved"
    make_ds().save_to_disk(str(src))
    touch(src / "coco" / "train2017" / "5.jpg")
    assert load_mixture(src).missing_images().tolist() == [False, True, False, True, False,
                                                           False]


# --------------------------------------------------------------------------------------------
# bad input: always DataError, one line, names the file and the place


def raises_data_error(path, **kw) -> str:
    with pytest.raises(DataError) as e:
        load_mixture(path, **kw)
    msg = str(e.value)
    assert type(e.value) is DataError and isinstance(e.value, TiveError)
    assert one_line(msg), msg
    assert str(path) in msg, msg
    return msg


def test_invalid_json_list_names_line(tmp_path):
    src = tmp_path / "m.json"
    src.write_text('[\n  {"conversations": []},\n  {"id": 1,, }\n]\n', encoding="utf-8")
    msg = raises_data_error(src)
    assert f"{src}:3:" in msg and "invalid JSON" in msg and "expected" in msg


def test_invalid_jsonl_line_names_line(tmp_path):
    good = json.dumps(LLAVA_RECORDS[0])
    src = write_lines(tmp_path / "m.jsonl", [good, "", good, '{"conversations": [}'])
    msg = raises_data_error(src)
    assert f"{src}:4:" in msg and "invalid JSON" in msg and "expected" in msg


def test_jsonl_line_not_an_object(tmp_path):
    src = write_lines(tmp_path / "m.jsonl", [json.dumps(LLAVA_RECORDS[0]), "[1, 2]"])
    msg = raises_data_error(src)
    assert f"{src}:2:" in msg and "list" in msg and "expected a JSON object" in msg


@pytest.mark.parametrize("content, words", [
    ('{"conversations": []}', ["top-level", "dict", "expected a list"]),
    ('"text"', ["top-level", "str", "expected a list"]),
])
def test_top_level_not_a_list(tmp_path, content, words):
    src = tmp_path / "m.json"
    src.write_text(content, encoding="utf-8")
    msg = raises_data_error(src)
    assert all(w in msg for w in words), msg


def test_record_not_an_object(tmp_path):
    src = write_json(tmp_path / "m.json", [LLAVA_RECORDS[0], LLAVA_RECORDS[1], "oops"])
    msg = raises_data_error(src)
    assert "record 2" in msg and "str" in msg and "expected a JSON object" in msg


@pytest.mark.parametrize("bad, words", [
    ({"id": "b1", "image": "x.jpg"}, ["`conversations`", "missing", "expected a non-empty"]),
    ({"id": "b1", "conversations": []}, ["`conversations`", "empty list", "expected a non-empty"]),
    ({"id": "b1", "conversations": "hi"}, ["`conversations`", "expected a non-empty"]),
    ({"id": "b1", "conversations": [{"from": "human", "value": "q"},
                                    {"from": "robot", "value": "beep"}]},
     ["turn 1", "unknown role 'robot'", "expected one of", "`from`"]),
    ({"id": "b1", "conversations": [{"from": "human", "value": 3}]},
     ["turn 0", "expected"]),
    ({"id": "b1", "conversations": [{"from": "human", "value": "a\nb"}, "line\ntwo"]},
     ["turn 1", "expected"]),
])
@pytest.mark.parametrize("container", ["json", "jsonl"])
def test_bad_llava_record(tmp_path, bad, words, container):
    records = [LLAVA_RECORDS[0], bad]
    src = (write_json(tmp_path / "m.json", records) if container == "json"
           else write_lines(tmp_path / "m.jsonl", [json.dumps(r) for r in records]))
    msg = raises_data_error(src)
    assert "record 1 (id b1)" in msg, msg
    assert all(w in msg for w in words), msg


def test_missing_conversations_in_first_record_names_formats(tmp_path):
    src = write_json(tmp_path / "m.json", [{"id": 1, "text": "hi"}])
    msg = raises_data_error(src)
    assert "record 0" in msg and "['id', 'text']" in msg
    assert all(w in msg for w in ["`conversations`", "`messages`", "`instruction`"])


@pytest.mark.parametrize("bad, words", [
    ({"id": "o1", "messages": [{"role": "user", "content": "q"},
                               {"role": "robot", "content": "x"}]},
     ["message 1", "unknown role 'robot'", "expected one of"]),
    ({"id": "o1", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "q"}, {"type": "audio", "audio": "a.wav"}]}]},
     ["message 0", "content part", "audio", "expected type `text`, `image` or `image_url`"]),
    ({"id": "o1", "messages": [{"role": "user", "content": ["plain string part"]}]},
     ["message 0", "content part", "expected type"]),
    ({"id": "o1", "messages": [{"role": "user", "content": 5}]},
     ["message 0", "content", "expected a string or a list"]),
    ({"id": "o1", "messages": []}, ["`messages`", "empty list", "expected a non-empty"]),
    ({"id": "o1", "messages": ["hi"]}, ["message 0", "expected {role, content}"]),
])
def test_bad_openai_record(tmp_path, bad, words):
    src = write_lines(tmp_path / "m.jsonl", [json.dumps(OPENAI_RECORDS[0]), json.dumps(bad)])
    msg = raises_data_error(src)
    assert "record 1 (id o1)" in msg, msg
    assert all(w in msg for w in words), msg


@pytest.mark.parametrize("bad", [
    {"id": "q1", "instruction": "Do it.", "input": "", "output": ""},
    {"id": "q1", "instruction": "Do it.", "input": "", "output": "  \n "},
    {"id": "q1", "instruction": None, "output": "x"},
    {"id": "q1", "instruction": "Do it.", "output": 3},
])
@pytest.mark.parametrize("container", ["json", "jsonl"])
def test_bad_alpaca_record(tmp_path, bad, container):
    records = [ALPACA_RECORDS[0], bad]
    src = (write_json(tmp_path / "m.json", records) if container == "json"
           else write_lines(tmp_path / "m.jsonl", [json.dumps(r) for r in records]))
    msg = raises_data_error(src)
    assert "record 1 (id q1)" in msg and "`instruction`/`output`" in msg
    assert "output non-empty" in msg


@pytest.mark.parametrize("name", ["m.json", "m.jsonl", "m.txt"])
def test_non_utf8(tmp_path, name):
    src = tmp_path / name
    src.write_bytes(json.dumps(LLAVA_RECORDS[:1]).encode("utf-8")[:-2] + "é\"]".encode("latin-1"))
    msg = raises_data_error(src)
    assert "not UTF-8" in msg and "byte" in msg and "expected" in msg


@pytest.mark.parametrize("name, content, words", [
    ("m.json", "", ["invalid JSON"]),
    ("m.json", "   \n", ["invalid JSON"]),
    ("m.json", "[]", ["no records"]),
    ("m.json", " [ ]\n", ["no records"]),
    ("m.jsonl", "", ["no records"]),
    ("m.jsonl", "\n  \n\t\n", ["no records"]),
])
def test_empty_inputs(tmp_path, name, content, words):
    src = tmp_path / name
    src.write_text(content, encoding="utf-8")
    msg = raises_data_error(src)
    assert all(w in msg for w in words) and "expected" in msg, msg


def test_empty_parquet_is_a_data_error(tmp_path):
    src = tmp_path / "e.parquet"
    make_ds().select([]).to_parquet(str(src))
    raises_data_error(src)


def test_empty_parquet_says_no_records(tmp_path):
    src = tmp_path / "e.parquet"
    make_ds().select([]).to_parquet(str(src))
    msg = raises_data_error(src)
    assert "no records" in msg and "cannot read" not in msg


@pytest.mark.parametrize("content", [b"", b"not parquet at all" * 3])
def test_damaged_parquet(tmp_path, content):
    src = tmp_path / "bad.parquet"
    src.write_bytes(content)
    msg = raises_data_error(src)
    assert "cannot read parquet" in msg


def test_nonexistent_path(tmp_path):
    msg = raises_data_error(tmp_path / "nope" / "mix.json")
    assert "no such file or folder" in msg and "expected a mixture" in msg


def test_folder_without_parquet(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    write_json(folder / "mix.json", LLAVA_RECORDS)  # a JSON file inside does not count
    msg = raises_data_error(folder)
    assert "neither parquet files nor a datasets save_to_disk copy" in msg


def test_hf_disk_dataset_dict_with_two_splits(tmp_path):
    src = tmp_path / "dd"
    datasets.DatasetDict({"train": make_ds(), "test": make_ds()}).save_to_disk(str(src))
    msg = raises_data_error(src)
    assert "splits" in msg and "expected one split" in msg


@pytest.mark.parametrize("container", ["json", "jsonl"])
def test_task_field_absent_everywhere(tmp_path, container):
    records = [{**r, "dataset": "d"} for r in LLAVA_RECORDS]
    src = (write_json(tmp_path / "m.json", records) if container == "json"
           else write_lines(tmp_path / "m.jsonl", [json.dumps(r) for r in records]))
    msg = raises_data_error(src, task_field="category")
    assert "'category'" in msg and "absent from every record" in msg
    assert load_mixture(src, task_field="dataset").explicit_tasks == ["d"] * 5


def test_unreadable_file(tmp_path, monkeypatch):
    src = write_json(tmp_path / "m.json", LLAVA_RECORDS)

    def deny(self, *a, **k):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", deny)
    monkeypatch.setattr(Path, "read_bytes", deny)
    msg = raises_data_error(src)
    assert "cannot read" in msg and "Permission denied" in msg


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file_chmod(tmp_path):
    src = write_json(tmp_path / "m.json", LLAVA_RECORDS)
    src.chmod(0)
    try:
        msg = raises_data_error(src)
        assert "cannot read" in msg
    finally:
        src.chmod(0o644)


# --------------------------------------------------------------------------------------------
# failed writes leave nothing behind


def test_write_into_a_file_parent_fails_cleanly(tmp_path):
    m = load_mixture(write_json(tmp_path / "m.json", LLAVA_RECORDS))
    blocker = tmp_path / "blocker"
    blocker.write_text("i am a file")
    with pytest.raises(TiveError, match="cannot write there") as e:
        m.write_subset([0, 1], blocker / "sub.json")
    assert "\n" not in str(e.value)
    assert blocker.read_text() == "i am a file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker", "m.json"]


def break_json_writer(m, monkeypatch, writer, partial, error):
    """Make the JSON writer ``writer`` ("spans": records copied from the file's bytes;
    "parsed": ``json.dump`` of the parsed records) write ``partial`` and fail."""
    if writer == "parsed":
        m._rows.spans = None

        def broken_dump(obj, f, **kw):
            f.write(partial)
            raise RuntimeError(error)

        monkeypatch.setattr(tdata.json, "dump", broken_dump)
    else:
        assert m.spans is not None

        def broken_spans(source, chosen, path):
            Path(path).write_text(partial)
            raise RuntimeError(error)

        monkeypatch.setattr(tdata, "_write_spans", broken_spans)


@pytest.mark.parametrize("writer", ["spans", "parsed"])
def test_json_dump_failing_midway_leaves_nothing(tmp_path, monkeypatch, writer):
    m = load_mixture(write_json(tmp_path / "m.json", LLAVA_RECORDS))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("x")
    break_json_writer(m, monkeypatch, writer, '[{"partial": ', "disk full")
    with pytest.raises(RuntimeError, match="disk full"):
        m.write_subset([0, 1], out_dir / "sub.json")
    assert sorted(os.listdir(out_dir)) == ["keep.txt"]


@pytest.mark.parametrize("writer", ["spans", "parsed"])
def test_json_failure_keeps_previous_target(tmp_path, monkeypatch, writer):
    m = load_mixture(write_json(tmp_path / "m.json", LLAVA_RECORDS))
    target = tmp_path / "sub.json"
    target.write_text("previous")
    break_json_writer(m, monkeypatch, writer, "[", "boom")
    with pytest.raises(RuntimeError):
        m.write_subset([0], target)
    assert target.read_text() == "previous"
    assert sorted(os.listdir(tmp_path)) == ["m.json", "sub.json"]


def test_jsonl_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    m = load_mixture(write_lines(tmp_path / "m.jsonl", [json.dumps(r) for r in LLAVA_RECORDS]))
    written = []

    class FailingRows(list):
        """The third row read for writing fails, after two lines are already written."""

        def __getitem__(self, i):
            written.append(i)
            if len(written) == 3:
                raise OSError(28, "No space left on device")
            return super().__getitem__(i)

    monkeypatch.setattr(m, "_rows", FailingRows(m._rows))
    with pytest.raises(TiveError, match="No space left"):
        m.write_subset([0, 1, 2, 3], tmp_path / "sub.jsonl")
    assert len(written) == 3
    assert sorted(os.listdir(tmp_path)) == ["m.jsonl"]


def test_parquet_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    src = tmp_path / "in.parquet"
    make_ds().to_parquet(str(src))
    m = load_mixture(src)
    out_dir = tmp_path / "out"

    def broken(self, path, *a, **k):
        Path(path).write_bytes(b"PAR1 partial")
        raise RuntimeError("killed")

    monkeypatch.setattr(datasets.Dataset, "to_parquet", broken)
    with pytest.raises(RuntimeError, match="killed"):
        m.write_subset([0, 1], out_dir / "sub.parquet")
    assert os.listdir(out_dir) == []


def test_hf_disk_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    src = tmp_path / "saved"
    make_ds().save_to_disk(str(src))
    m = load_mixture(src)
    m.write_subset([2], tmp_path / "subset")

    def broken(self, path, *a, **k):
        Path(path).mkdir()
        (Path(path) / "data-00000-of-00001.arrow").write_bytes(b"partial")
        raise RuntimeError("killed")

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", broken)
    with pytest.raises(RuntimeError, match="killed"):
        m.write_subset([0, 1], tmp_path / "subset")
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["saved", "subset"]
    assert load_mixture(tmp_path / "subset").ids == ["h2"]  # previous output intact


def test_json_lines_in_a_json_file_and_a_bom_are_read(tmp_path):
    lines = ['{"id": "a", "conversations": [{"from": "human", "value": "q"}, '
             '{"from": "gpt", "value": "r"}]}',
             '{"id": "b", "conversations": [{"from": "human", "value": "q2"}, '
             '{"from": "gpt", "value": "r2"}]}']
    src = tmp_path / "lines.json"
    src.write_text("\ufeff" + "\n".join(lines) + "\n", encoding="utf-8")
    m = load_mixture(src)
    assert (m.container, m.ids) == ("jsonl", ["a", "b"])
    out = m.write_subset([1], tmp_path / "sub.json")
    assert out.read_text(encoding="utf-8") == lines[1] + "\n"


def test_write_subset_refuses_rows_out_of_range(tmp_path):
    src = tmp_path / "m.jsonl"
    src.write_text('{"id": "a", "conversations": [{"from": "human", "value": "q"}]}\n')
    m = load_mixture(src)
    for bad in (-1, 1):
        with pytest.raises(IndexError, match="outside 0..0"):
            m.write_subset([0, bad], tmp_path / "o.jsonl")
    assert not (tmp_path / "o.jsonl").exists()


def test_check_images_names_the_missing_image_of_a_multi_image_record(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a/1.jpg").write_bytes(b"x")
    src = tmp_path / "m.json"
    src.write_text(json.dumps([{"id": "r", "images": ["a/1.jpg", "a/2.jpg"], "conversations": [
        {"from": "human", "value": "<image><image>q"}, {"from": "gpt", "value": "a"}]}]))
    m = load_mixture(src)
    with pytest.raises(DataError, match=r"1 records reference images .*record 0 \(id r\): a/2.jpg"):
        m.check_images()
    assert m.check_images(skip_missing=True).tolist() == [True]
    assert m.check_images(tmp_path / "nowhere", skip_missing=True).tolist() == [True]


@pytest.mark.parametrize("record, fragment", [
    ({"image": 5}, "`image` holds 5"),
    ({"images": ["a.jpg", None]}, "`images` holds missing"),
    ({"task": True}, "task field `task` is true"),
])
def test_malformed_image_and_task_fields(tmp_path, record, fragment):
    base = {"id": "x", "conversations": [{"from": "human", "value": "q"},
                                         {"from": "gpt", "value": "a"}]}
    src = write_json(tmp_path / "m.json", [{**base, **record}])
    msg = raises_data_error(src)
    assert fragment in msg and "record 0 (id x)" in msg
