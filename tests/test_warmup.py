"""Warm-up sample: equal per task, seeded, order-free; the adapter is saved whole or not at all."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from conftest import assert_close_to_scale

from tive.errors import ConfigError
from tive.warmup.settings import WarmupConfig
from tive.warmup.training import warmup_sample


def tasks_of(sizes: dict[str, int]) -> np.ndarray:
    return np.array([t for t, n in sizes.items() for _ in range(n)], dtype=object)


def test_equal_count_per_task_small_tasks_give_all_they_have():
    tasks = tasks_of({"a": 500, "b": 300, "c": 10, "d": 190})  # N = 1000, 8% = 80
    keys = np.arange(len(tasks), dtype=np.uint64)
    rows = warmup_sample(tasks, keys, 0.08, seed=0)
    counts = Counter(tasks[rows].tolist())
    assert len(rows) == 80 and len(set(rows.tolist())) == 80
    # c gives its 10; 70 left over a, b, d: 23⅓ each, the leftover unit to the first tie (a)
    assert counts == {"a": 24, "b": 23, "c": 10, "d": 23}


def test_sample_is_seeded_and_independent_of_row_order():
    tasks = tasks_of({"a": 200, "b": 100, "c": 50})
    keys = np.random.default_rng(0).integers(0, 2**63, size=len(tasks)).astype(np.uint64)
    a = warmup_sample(tasks, keys, 0.2, seed=1)
    assert a.tolist() == warmup_sample(tasks, keys, 0.2, seed=1).tolist()
    assert a.tolist() != warmup_sample(tasks, keys, 0.2, seed=2).tolist()
    perm = np.random.default_rng(3).permutation(len(tasks))
    b = warmup_sample(tasks[perm], keys[perm], 0.2, seed=1)
    assert sorted(keys[a].tolist()) == sorted(keys[perm][b].tolist())


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(fraction=0), "--fraction 0"), (dict(batch_size=0), "--batch-size 0"),
    (dict(lr=0.0), "--lr 0.0")])
def test_bad_settings_are_refused(kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment):
        WarmupConfig(**kwargs)


def image_mixture(folder, n_per_task=6):
    """A small LLaVA mixture with real (tiny) images, three tasks."""
    import json

    from PIL import Image

    records = []
    for task, colour, answer in (("coco", (200, 30, 30), "Red."), ("gqa", (30, 30, 200), "Blue."),
                                 (None, None, "The quick brown fox.")):
        for j in range(n_per_task):
            r = {"id": f"{task}-{j}", "conversations": [
                {"from": "human", "value": ("<image>\n" if task else "") + "What colour dominates?"},
                {"from": "gpt", "value": answer}]}
            if task:
                path = folder / task / f"{j}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (30 + j, 20), colour).save(path)
                r["image"] = f"{task}/{j}.png"
            records.append(r)
    (folder / "mix.json").write_text(json.dumps(records))
    return folder / "mix.json"


def test_warmup_lowers_the_loss_and_the_saved_adapter_reloads_identically(tmp_path):
    import json

    import torch
    from click.testing import CliRunner
    from peft import PeftModel
    from zoo import save_llava_folder

    from tive.cli.commands import main
    from tive.data.mixture import load_mixture
    from tive.models.encoding import collate, pad_id
    from tive.models.load import load_model
    from tive.models.registry import resolve
    from tive.warmup.training import item_batches

    model_dir = tmp_path / "model"
    save_llava_folder(model_dir)
    data = image_mixture(tmp_path / "data")
    run = tmp_path / "run"
    args = ["warmup", "--model", str(model_dir), "--data", str(data), "--run", str(run),
            "--fraction", "1.0", "--epochs", "10", "--lr", "0.03", "--lora-r", "8",
            "--lora-alpha", "16", "--lora-dropout", "0", "--batch-size", "6", "--quiet"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output + str(res.exception)
    ref = run / "reference"
    assert {"adapter_config.json", "adapter_model.safetensors", "reference.json"} <= \
        {p.name for p in ref.iterdir()}
    info = json.loads((ref / "reference.json").read_text())
    assert info["sample"]["per_task"] == {"llava_instruct": 6, "gqa": 6, "sharegpt": 6}
    adapter_cfg = json.loads((ref / "adapter_config.json").read_text())
    assert not [t for t in adapter_cfg["target_modules"] if "vision" in t or "projector" in t]

    mixture = load_mixture(data)
    rows = np.arange(len(mixture))

    def mean_loss(model, loaded):
        losses = []
        with torch.no_grad():
            for items in item_batches(loaded, mixture, rows, 6, 2048):
                losses.append(float(model(**collate(items, pad_id(loaded.tokenizer))).loss))
        return float(np.mean(losses))

    loaded = load_model(resolve(str(model_dir)), dtype="fp32", device="cpu")
    before = mean_loss(loaded.model, loaded)
    tuned = PeftModel.from_pretrained(loaded.model, str(ref)).eval()
    after = mean_loss(tuned, loaded)
    assert after < 0.8 * before, (before, after)
    # rerunning with the same settings does not retrain; other settings are refused
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0 and "already trained" in res.output
    res = CliRunner().invoke(main, args[:-1] + ["--seed", "1", "--quiet"])
    assert res.exit_code == 2 and "--force" in res.stderr


def test_reloaded_adapter_gives_identical_outputs(tmp_path):
    import torch
    from peft import PeftModel
    from zoo import save_llava_folder

    from tive.data.mixture import load_mixture
    from tive.models.encoding import collate, pad_id
    from tive.models.load import load_model
    from tive.models.registry import resolve
    from tive.warmup.reference import save_reference
    from tive.warmup.training import item_batches, train

    save_llava_folder(tmp_path / "model")
    mixture = load_mixture(image_mixture(tmp_path / "data", n_per_task=2))
    rows = np.arange(len(mixture))
    loaded = load_model(resolve(str(tmp_path / "model")), dtype="fp32", device="cpu")
    config = WarmupConfig(fraction=1.0, r=4, alpha=8, dropout=0.0, lr=0.01, global_batch=3,
                          batch_size=3)
    result = train(loaded, mixture, rows, config, progress=False)
    assert len(result["losses"]) == 2 and result["skipped"] == {}
    save_reference(tmp_path / "run", result["model"], {"test": True})
    batch = collate(next(item_batches(loaded, mixture, rows, 6, 2048)), pad_id(loaded.tokenizer))
    with torch.no_grad():
        trained = result["model"](**batch).logits
    fresh = load_model(resolve(str(tmp_path / "model")), dtype="fp32", device="cpu")
    reloaded = PeftModel.from_pretrained(fresh.model, str(tmp_path / "run/reference")).eval()
    with torch.no_grad():
        again = reloaded(**batch).logits
    assert torch.equal(trained, again)


def test_text_only_batches_of_a_visual_model_train(tmp_path):
    from zoo import save_llava_folder

    from tive.data.mixture import load_mixture
    from tive.models.load import load_model
    from tive.models.registry import resolve
    from tive.warmup.training import train

    save_llava_folder(tmp_path / "model")
    mixture = load_mixture(image_mixture(tmp_path / "data", n_per_task=2))
    text_rows = np.array([i for i in range(len(mixture)) if not mixture[i].images])
    loaded = load_model(resolve(str(tmp_path / "model")), dtype="fp32", device="cpu")
    config = WarmupConfig(fraction=1.0, r=2, alpha=4, dropout=0.0, batch_size=2, global_batch=2)
    result = train(loaded, mixture, text_rows, config, progress=False)
    assert len(text_rows) == 2 and len(result["losses"]) == 1 and result["skipped"] == {}


def test_interrupted_save_leaves_no_reference_that_looks_complete(tmp_path):
    from tive.errors import TiveError
    from tive.warmup.reference import save_reference

    class Dying:
        def save_pretrained(self, path):
            from pathlib import Path
            Path(path).mkdir()
            (Path(path) / "adapter_config.json").write_text("{}")
            raise OSError(28, "No space left on device")

    with pytest.raises(TiveError, match="No space left"):
        save_reference(tmp_path / "run", Dying(), {"x": 1})
    assert list((tmp_path / "run").iterdir()) == []


def test_lora_targets_option_restricts_layers_and_names_unknown_ones(tmp_path):
    from zoo import llava_clip_llama

    from tive.warmup.lora import warmup_targets

    model = llava_clip_llama()
    chosen = warmup_targets(model, ("q_proj", "v_proj"))
    assert chosen and {c.rsplit(".", 1)[-1] for c in chosen} == {"q_proj", "v_proj"}
    assert all(c.startswith("model.language_model.") for c in chosen)
    with pytest.raises(ConfigError, match="'qkv': no such linear layer .* choose among down_proj"):
        warmup_targets(model, ("qkv",))


def _bunny_folder(folder):
    from test_bunny import write_bunny

    write_bunny(folder)


def _qwen2_vl_folder(folder):
    from test_encode import qwen_tok
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )
    from zoo import qwen2_vl

    qwen2_vl().save_pretrained(folder)
    qwen_tok().save_pretrained(folder)
    Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112).save_pretrained(folder)


@pytest.mark.parametrize("family, build", [("bunny", _bunny_folder), ("qwen2-vl", _qwen2_vl_folder)])
def test_warmup_runs_for_each_visual_family_from_a_model_folder(tmp_path, family, build):
    import json

    from click.testing import CliRunner

    from tive.cli.commands import main
    from tive.models.registry import resolve

    build(tmp_path / "model")
    assert resolve(str(tmp_path / "model")).family == family
    data = image_mixture(tmp_path / "data", n_per_task=2)
    res = CliRunner().invoke(main, ["warmup", "--model", str(tmp_path / "model"), "--data",
                                    str(data), "--run", str(tmp_path / "run"), "--fraction", "1",
                                    "--lora-r", "2", "--lora-alpha", "4", "--global-batch", "3",
                                    "--quiet"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    info = json.loads((tmp_path / "run/reference/reference.json").read_text())
    assert info["skipped"] == {} and info["loss"]["steps"] == 2
    assert info["key_parameters"]["gradient_dim"] > 0
    assert all(".self_attn." in m["name"] and "language_model" in m["name"]
               for m in info["key_parameters"]["matrices"])


def test_nothing_encodable_is_an_error_and_nothing_is_saved(tmp_path):
    from click.testing import CliRunner
    from zoo import save_llava_folder

    from tive.cli.commands import main

    save_llava_folder(tmp_path / "model")
    data = image_mixture(tmp_path / "data", n_per_task=2)
    base = ["warmup", "--model", str(tmp_path / "model"), "--data", str(data), "--run",
            str(tmp_path / "run"), "--fraction", "1", "--lora-r", "2", "--lora-alpha", "4",
            "--quiet"]
    res = CliRunner().invoke(main, base + ["--max-length", "5", "--epochs", "3"])  # all cut away
    assert res.exit_code == 2 and ("none of the 6 sampled records could be encoded (4 too-long-"
                                   "for-image, 2 no-supervised-token)") in res.stderr
    assert not (tmp_path / "run" / "reference").exists()
    res = CliRunner().invoke(main, base + ["--lora-targets", "gate_proj,up_proj"])
    assert res.exit_code == 2 and "self_attn.q_proj: has no LoRA adapter" in res.stderr
    assert not (tmp_path / "run" / "reference").exists()
    for p in (tmp_path / "data").glob("*/*.png"):
        p.unlink()
    res = CliRunner().invoke(main, base + ["--skip-missing-images"])
    assert res.exit_code == 0, res.stderr  # the text-only records remain
    res = CliRunner().invoke(main, base + ["--skip-missing-images", "--force", "--task-field",
                                           "id"])
    assert res.exit_code == 0 and "trained on 2 records" in res.output


def test_a_text_model_samples_only_text_records(tmp_path):
    from tive.data.mixture import load_mixture
    from tive.errors import DataError
    from tive.warmup.training import usable_rows

    mixture = load_mixture(image_mixture(tmp_path / "data", n_per_task=2))
    none_missing = np.zeros(len(mixture), dtype=bool)
    assert usable_rows(mixture, none_missing, "causal-lm").tolist() == [4, 5]
    assert usable_rows(mixture, none_missing, "llava").tolist() == list(range(6))
    with pytest.raises(DataError, match="none of the 6 records can be used"):
        usable_rows(mixture, np.ones(6, dtype=bool), "llava")


def test_defaults_are_the_authors_recipe():
    """The TIVE authors' finetune_lora.sh: r 128, alpha 256, dropout 0.05, lr 2e-5 (projector
    2e-5), cosine after 3% warm-up, weight decay 0, one epoch, 16 × 8 GPUs = 128 per step."""
    from tive.warmup import training as wu
    from tive.warmup.settings import AUTHORS

    config = WarmupConfig()
    assert (config.r, config.alpha, config.dropout) == (128, 256, 0.05)
    assert (config.lr, config.projector_lr, config.epochs) == (2e-5, 2e-5, 1)
    assert config.global_batch is None  # the authors' 128 where it trains enough (tive.warmup.plan)
    assert WarmupConfig(paper=True).global_batch == 128 and config.group_by_modality is True
    assert config.fraction == 0.08 and config.targets == () and config.train_projector is None
    assert (wu.WARMUP_RATIO, wu.WEIGHT_DECAY, wu.SCHEDULE) == (0.03, 0.0, "cosine")
    assert {k: getattr(config, k) for k in AUTHORS if k not in ("bf16", "global_batch")} == \
        {k: v for k, v in AUTHORS.items() if k not in ("bf16", "global_batch")}


def test_recipe_reaches_the_global_batch_by_accumulation():
    from tive.warmup.plan import Recipe, plan_recipe

    config = WarmupConfig()  # 128 per step where it trains enough, 4 per forward
    assert plan_recipe(config, 53_223, 1, None) == Recipe(128, 416, 13, 32, None)
    assert plan_recipe(config, 53_223, 8, "p").accumulation == 4  # 16 per GPU: 4 × 4
    assert plan_recipe(config, 53_223, 1, None).notice(53_223, config) is None
    given = WarmupConfig(global_batch=128)
    one = plan_recipe(given, 17, 1, None)
    assert (one.global_batch, one.steps, one.warmup_steps, one.accumulation) == (128, 1, 1, 5)
    assert "warm-up: 1 optimizer step of 17 records" in one.notice(17, given)
    assert "fewer than 100 steps" in one.notice(17, given)
    assert "a smaller --global-batch (--warmup-global-batch in tive score) or more epochs" in \
        one.notice(17, given)
    big = plan_recipe(given, 5_000, 1, None)  # 40 steps of 128; 50 would give 100
    assert "fix: leave out --global-batch (--warmup-global-batch in tive score) to have it " \
           "chosen (50 here)" in big.notice(5_000, given)


def test_the_authors_batch_is_kept_where_it_trains_enough_and_scaled_below():
    """The criterion is optimizer steps (docs/design.md, "The warm-up's steps"): the authors'
    128 where it gives ≥ 100 steps, else the largest batch that does, down to 8."""
    from tive.warmup.plan import MIN_STEPS, chosen_batch, lr_sum, plan_recipe

    config = WarmupConfig()
    assert chosen_batch(53_223, 1) == 128 and chosen_batch(12_800, 1) == 128
    assert chosen_batch(12_672, 1) == 127  # 128 would give 99 steps, 127 gives 100
    assert chosen_batch(4_000, 1) == 40 and chosen_batch(4_000, 2) == 81
    assert chosen_batch(160, 1) == 8  # a 2,000-record mixture: 20 steps of 8
    assert chosen_batch(9, 1) == 5 and chosen_batch(1, 1) == 1  # two steps where it can
    for sample in (10, 160, 799, 800, 801, 5_000, 12_672, 12_800, 40_000):
        batch = chosen_batch(sample, 1)
        steps = -(-sample // batch)
        assert steps >= MIN_STEPS or batch <= 8
        assert batch == 128 or -(-sample // (batch + 1)) < MIN_STEPS  # the largest that does
    authors = plan_recipe(WarmupConfig(paper=True), 53_223, 1, None)
    assert authors.lr_sum == pytest.approx(208, abs=1)  # the count for their 665K run
    assert lr_sum(1, 1) == 0 and lr_sum(2, 1) == 1  # the first step's rate is 0
    small = plan_recipe(config, 160, 1, None)
    assert (small.global_batch, small.steps, small.scaled) == (8, 20, True)
    line = small.notice(160, config)
    assert line.startswith("warm-up: global batch 8 instead of the authors' 128, so that the "
                           "160-record sample trains: 20 optimizer steps of 8 records")
    assert "--paper keeps their batch" in line and "\n" not in line
    paper = plan_recipe(WarmupConfig(paper=True), 160, 1, None)
    assert (paper.global_batch, paper.steps, paper.scaled) == (128, 2, False)
    assert paper.notice(160, WarmupConfig(paper=True)).startswith(
        "warm-up (--paper, the authors' recipe) on a 160-record sample: 2 optimizer steps of 128 "
        "records, learning rate summed over them 1 × the peak (the authors' 665,298-record run: "
        "416 steps, 208)")


def test_steps_are_all_image_or_all_text_as_llavas_group_by_modality_length():
    from tive.warmup.plan import modality_order

    rows = np.arange(1000, 1350)
    has_image = np.random.default_rng(0).random(350) < 0.7
    image = set(rows[has_image].tolist())
    for seed in range(5):
        order = modality_order(rows, has_image, 32, np.random.default_rng(seed))
        assert sorted(order.tolist()) == rows.tolist()
        steps = [order[i:i + 32] for i in range(0, len(order), 32)]
        n_image, n_text = int(has_image.sum()), int((~has_image).sum())
        full = n_image // 32 + n_text // 32
        for step in steps[:full]:  # every full step one modality; the leftovers last
            assert len({int(r) in image for r in step}) == 1
        assert {int(r) for s in steps[full:] for r in s} == \
            set(order[full * 32:].tolist()) and len(order) - full * 32 == n_image % 32 + n_text % 32
        kinds = [int(s[0]) in image for s in steps[:full]]
        assert kinds != sorted(kinds) or seed > 0  # the full steps of both are shuffled together
    one = modality_order(rows, np.ones(350, dtype=bool), 32, np.random.default_rng(0))
    assert sorted(one.tolist()) == rows.tolist()


def _trained(tmp_path, batch_size):
    from zoo import save_llava_folder

    from tive.data.mixture import load_mixture
    from tive.models.load import load_model
    from tive.models.registry import resolve
    from tive.warmup.training import train

    if not (tmp_path / "model").exists():
        save_llava_folder(tmp_path / "model")
        image_mixture(tmp_path / "data", n_per_task=2)
    mixture = load_mixture(tmp_path / "data" / "mix.json")
    loaded = load_model(resolve(str(tmp_path / "model")), dtype="fp32", device="cpu")
    original = {k: v.clone() for k, v in loaded.model.state_dict().items()
                if "multi_modal_projector" in k}
    config = WarmupConfig(fraction=1.0, r=4, alpha=8, dropout=0.0, lr=0.01, projector_lr=0.01,
                          epochs=2, global_batch=6, batch_size=batch_size)
    result = train(loaded, mixture, np.arange(len(mixture)), config, progress=False)
    return result, original, mixture, config


def test_projector_is_trained_saved_and_restored_for_scoring(tmp_path):
    import json

    import torch
    from peft import PeftModel

    from tive.models.load import load_model
    from tive.models.registry import resolve
    from tive.warmup.reference import recipe_info, save_reference

    result, original, _, config = _trained(tmp_path, 3)
    assert result["recipe"].projector == "model.multi_modal_projector"
    trained = {k.replace("base_model.model.", "").replace(".modules_to_save.default", ""):
               v.detach().clone() for k, v in result["model"].state_dict().items()
               if "multi_modal_projector" in k and "modules_to_save" in k}
    assert trained.keys() == original.keys() and len(trained) == 4
    assert max(float((trained[k] - original[k]).abs().max()) for k in trained) > 1e-3
    info = recipe_info(config, result["recipe"], 1, result["model"])
    save_reference(tmp_path / "run", result["model"], {"recipe": info})
    saved = json.loads((tmp_path / "run/reference/adapter_config.json").read_text())
    assert saved["modules_to_save"] == ["model.multi_modal_projector"]
    fresh = load_model(resolve(str(tmp_path / "model")), dtype="fp32", device="cpu").model
    assert all(torch.equal(fresh.state_dict()[k], original[k]) for k in original)
    reloaded = PeftModel.from_pretrained(fresh, str(tmp_path / "run/reference")).eval()
    again = {k.replace("base_model.model.", "").replace(".modules_to_save.default", ""): v
             for k, v in reloaded.state_dict().items()
             if "multi_modal_projector" in k and "modules_to_save" in k}
    assert again.keys() == trained.keys()
    assert all(torch.equal(again[k], trained[k]) for k in trained)
    assert info["global_batch"] == 6 and info["per_device_batch"] == 3
    assert info["accumulation"] == 2 and info["processes"] == 1 and info["steps"] == 2
    assert info["lr"] == 0.01 and info["schedule"] == "cosine" and info["warmup_ratio"] == 0.03
    assert info["projector"] == "model.multi_modal_projector" and info["lora"]["r"] == 4


def test_a_step_does_not_depend_on_the_per_device_batch(tmp_path):
    """Global batch 6 as 6, 3 + 3 or 4 + 2 records per forward: the same step (no dropout)."""
    import torch

    results = [_trained(tmp_path, b)[0] for b in (6, 3, 4)]
    states = [{k: v.detach() for k, v in r["model"].state_dict().items()
               if "lora_" in k or "modules_to_save" in k} for r in results]
    moved = max(float(v.abs().max()) for k, v in states[0].items() if "lora_B" in k)
    assert moved > 1e-3
    for other, r in zip(states[1:], results[1:]):
        assert other.keys() == states[0].keys()
        for k in states[0]:
            assert_close_to_scale(other[k], states[0][k])
        assert r["losses"] == pytest.approx(results[0]["losses"], rel=1e-5)
    assert len(results[0]["losses"]) == 2  # one loss per optimizer step


def test_small_sample_says_it_is_one_step_and_text_models_have_no_projector(tmp_path):
    from click.testing import CliRunner
    from zoo import save_llava_folder

    from tive.cli.commands import main
    from tive.warmup.lora import trained_projector

    save_llava_folder(tmp_path / "model")
    data = image_mixture(tmp_path / "data", n_per_task=2)
    res = CliRunner().invoke(main, ["warmup", "--model", str(tmp_path / "model"), "--data",
                                    str(data), "--run", str(tmp_path / "run"), "--fraction",
                                    "1", "--lora-r", "2", "--lora-alpha", "4", "--quiet"])
    assert res.exit_code == 0, res.output
    # a 6-record sample: 2 steps of 3 (the first at learning rate 0), said in one line
    assert res.output.count("warm-up: global batch 3 instead of the authors' 128") == 1
    from zoo import text_llama

    model = text_llama()
    assert trained_projector(model, "causal-lm", None) is None
    with pytest.raises(ConfigError, match="--train-projector: this causal-lm model has no"):
        trained_projector(model, "causal-lm", True)
    from zoo import llava_clip_llama

    assert trained_projector(llava_clip_llama(), "llava", False) is None
    assert trained_projector(llava_clip_llama(), "llava", None) == "model.multi_modal_projector"


def big_mixture(folder, n=2000):
    """``n`` short LLaVA records in four tasks, half with one of a few tiny images."""
    import json

    from PIL import Image

    for task, colour in (("coco", (200, 30, 30)), ("gqa", (30, 30, 200))):
        (folder / task).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (28, 28), colour).save(folder / task / "0.png")
    records = []
    for j in range(n):
        task = ("coco", "gqa", None, None)[j % 4]
        r = {"id": f"r{j}", "conversations": [
            {"from": "human", "value": ("<image>\n" if task else "") + f"Say {j % 7}."},
            {"from": "gpt", "value": "Red." if task == "coco" else f"Number {j % 7}."}]}
        if task:
            r["image"] = f"{task}/0.png"
        elif j % 8 == 2:
            r["id"] = f"sharegpt-{j}"  # a second text task
        records.append(r)
    (folder / "mix.json").write_text(json.dumps(records))
    return folder / "mix.json"


def test_a_default_warmup_on_2000_records_trains_and_paper_keeps_the_authors_batch(tmp_path):
    """The issue's case: the authors' batch gives a 160-record sample 2 steps (the first at
    learning rate 0); the default takes 20 steps of 8 and the adapter moves."""
    import json

    from click.testing import CliRunner
    from safetensors.torch import load_file
    from zoo import save_llava_folder

    from tive.cli.commands import main

    save_llava_folder(tmp_path / "model")
    data = big_mixture(tmp_path / "data")
    lines = {}
    for name, extra in (("default", []), ("paper", ["--paper"])):
        run = tmp_path / name
        res = CliRunner().invoke(main, ["warmup", "--model", str(tmp_path / "model"), "--data",
                                        str(data), "--run", str(run), "--quiet", "--batch-size",
                                        "16", *extra])
        assert res.exit_code == 0, res.output + str(res.exception)
        info = json.loads((run / "reference/reference.json").read_text())
        weights = load_file(run / "reference/adapter_model.safetensors")
        b = [v for k, v in weights.items() if "lora_B" in k]
        lines[name] = (info, max(float(v.abs().max()) for v in b), res.output)
    info, moved, out = lines["default"]
    assert info["sample"]["trained"] == 160 and info["recipe"]["steps"] == 20 >= 10
    assert info["recipe"]["global_batch"] == 8 and info["recipe"]["global_batch_scaled"] is True
    assert info["loss"]["steps"] == 20 and moved > 0
    assert info["recipe"]["group_by_modality"] is True and info["recipe"]["lr_sum"] > 9
    assert out.count("warm-up: global batch 8 instead of the authors' 128") == 1
    info, moved, out = lines["paper"]
    assert info["recipe"]["steps"] == 2 and info["recipe"]["global_batch"] == 128
    assert info["recipe"]["global_batch_scaled"] is False and info["recipe"]["bf16"] is True
    assert info["recipe"]["lr_sum"] == 1
    assert out.count("warm-up (--paper, the authors' recipe) on a 160-record sample: 2 "
                     "optimizer steps of 128 records") == 1


def test_warmup_steps_are_one_modality_each(tmp_path, monkeypatch):
    """What the training loop feeds each optimizer step: all-image or all-text but the last."""
    from zoo import save_llava_folder

    from tive.data.mixture import load_mixture
    from tive.models.load import load_model
    from tive.models.registry import resolve
    from tive.warmup import training

    seen = []
    original = training._StepRunner.__call__

    def spy(self, step, bar):
        seen.append([item.images > 0 for item in step])
        return original(self, step, bar)

    monkeypatch.setattr(training._StepRunner, "__call__", spy)
    save_llava_folder(tmp_path / "model")
    mixture = load_mixture(image_mixture(tmp_path / "data", n_per_task=5))  # 10 image, 5 text
    loaded = load_model(resolve(str(tmp_path / "model")), dtype="fp32", device="cpu")
    config = WarmupConfig(fraction=1.0, r=2, alpha=4, dropout=0.0, global_batch=4, epochs=2)
    training.train(loaded, mixture, np.arange(15), config, progress=False)
    assert [len(s) for s in seen] == [4, 4, 4, 3] * 2  # 2 image + 1 text full steps, 2+1 left
    for epoch in (seen[:4], seen[4:]):
        assert sorted(len(set(s)) for s in epoch[:3]) == [1, 1, 1]
        assert sum(all(s) for s in epoch[:3]) == 2 and sorted(epoch[3]) == [False, True, True]
    seen.clear()
    config = WarmupConfig(fraction=1.0, r=2, alpha=4, dropout=0.0, global_batch=4,
                          group_by_modality=False)
    loaded = load_model(resolve(str(tmp_path / "model")), dtype="fp32", device="cpu")
    training.train(loaded, mixture, np.arange(15), config, progress=False)
    assert [len(s) for s in seen] == [4, 4, 4, 3]


def test_a_reference_from_before_grouped_steps_keeps_its_identity(tmp_path):
    """References saved before ``group_by_modality`` existed drew their steps as one
    permutation: their identity (no such setting) is that of --no-warmup-group-by-modality,
    as is one saved since with the setting false; the default (grouped) is another."""
    from dataclasses import replace

    from zoo import save_llava_folder

    from tive.data.mixture import load_mixture
    from tive.data.tasks import label_tasks
    from tive.models.registry import resolve
    from tive.warmup.reference import ensure_reference

    save_llava_folder(tmp_path / "model")
    mixture = load_mixture(image_mixture(tmp_path / "data", n_per_task=2))
    source, labels = resolve(str(tmp_path / "model")), label_tasks(mixture)
    ungrouped = WarmupConfig(fraction=1.0, r=2, alpha=4, dropout=0.0, global_batch=4,
                             group_by_modality=False)

    def reference(config):
        return ensure_reference(tmp_path / "run", source, mixture, labels, config,
                                device="cpu", progress=False)

    reference(ungrouped)
    path = tmp_path / "run/reference/reference.json"
    info = json.loads(path.read_text())
    settings = info["identity"]["settings"]
    assert "group_by_modality" not in settings and "checkpoints" not in settings
    for saved in (settings, {**settings, "group_by_modality": False, "checkpoints": 1}):
        path.write_text(json.dumps({**info, "identity": {**info["identity"], "settings": saved}}))
        assert "already trained" in reference(ungrouped).message
        with pytest.raises(ConfigError, match="other settings"):
            reference(replace(ungrouped, group_by_modality=True))
    path.write_text(json.dumps({**info, "identity": {
        **info["identity"], "settings": {**settings, "group_by_modality": True}}}))
    with pytest.raises(ConfigError, match="other settings"):  # saved grouped, asked ungrouped
        reference(ungrouped)
