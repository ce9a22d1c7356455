"""The user guide's tables of defaults (docs/models.md), read and compared with the code (no drift), and the
defaults pinned to the TIVE authors' values (their finetune_lora.sh and select_data_TIVE.py)."""

from __future__ import annotations

import re
from pathlib import Path

from tive.scoring.settings import AUTHORS as SCORE_AUTHORS, ScoreConfig
from tive.selection.settings import AUTHORS_EXCLUDE, DEFAULTS, AUTHORS as SELECT_AUTHORS
from tive.warmup import plan
from tive.warmup import training as wu
from tive.warmup.settings import AUTHORS as WARMUP_AUTHORS, WarmupConfig

README = Path(__file__).resolve().parents[1] / "docs" / "models.md"  # the user guide's page


def readme_rows() -> dict[str, tuple[str, str]]:
    """setting → (tive default, the authors' value), from the tables under "Warm-up recipe"."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("### Warm-up recipe"):text.index("### `--paper`")]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0] not in ("setting",) and not set(cells[0]) <= {"-"}:
            rows[cells[0]] = (cells[1], cells[2])
    return rows


def num(x: float) -> str:
    """2e-05 → 2e-5, 0.0 → 0, as the README writes numbers."""
    return re.sub(r"e-0(\d)", r"e-\1", f"{x:g}")


def code_rows() -> dict[str, tuple[str, str]]:
    """The same rows built from the code's defaults and its record of the authors' values."""
    c, a, s = WarmupConfig(), WARMUP_AUTHORS, ScoreConfig()

    def layers(targets: tuple[str, ...]) -> str:
        return "every linear layer of the language model" if not targets else ",".join(targets)

    return {
        "warm-up sample": (num(c.fraction), f"{num(a['fraction'])} (⌊0.08·N/T⌋ per task)"),
        "LoRA r / alpha / dropout": (f"{c.r} / {c.alpha} / {num(c.dropout)}",
                                     f"{a['r']} / {a['alpha']} / {num(a['dropout'])}"),
        "LoRA layers": (layers(c.targets), layers(a["targets"])),
        "learning rate": (num(c.lr), num(a["lr"])),
        "multimodal projector": (f"trained (LLaVA, Bunny), lr {num(c.projector_lr)}",
                                 f"trained, `mm_projector_lr` {num(a['projector_lr'])}"),
        "optimizer": (f"AdamW, weight decay {num(wu.WEIGHT_DECAY)}",
                      f"AdamW, weight decay {num(wu.WEIGHT_DECAY)}"),
        "schedule": (f"{wu.SCHEDULE}, warm-up ratio {num(plan.WARMUP_RATIO)}",
                     f"{wu.SCHEDULE}, warm-up ratio {num(plan.WARMUP_RATIO)}"),
        "epochs": (str(c.epochs), str(a["epochs"])),
        "global batch": (f"{a['global_batch']} where that gives ≥ {plan.MIN_STEPS} steps, else the "
                         f"largest batch that does (down to {plan.MIN_BATCH})",
                         f"{a['global_batch']} (16 per GPU × 8 GPUs)"),
        "records of a step": ("all-image or all-text" if c.group_by_modality else "mixed",
                              "all-image or all-text (`group_by_modality_length`)"
                              if a["group_by_modality"] else "mixed"),
        "per-device batch": (str(c.batch_size), "16"),
        "precision": ("no autocast" if not c.bf16 else "bf16 autocast",
                      "bf16" if a["bf16"] else "fp32"),
        "projector (scoring)": (s.projector, SCORE_AUTHORS["projector"]),
        "features": (f"{s.proj_dim} × {s.feature_dtype}",
                     f"{SCORE_AUTHORS['proj_dim']} × {SCORE_AUTHORS['feature_dtype']}"),
        "projection seed": (str(s.seed), str(SCORE_AUTHORS["seed"])),
        "quotas": ("largest remainder (exactly B)", "int() of each share (short of B)"),
        "textcaps": ("selected like any task (a note says the authors excluded it)",
                     "excluded" if AUTHORS_EXCLUDE == "textcaps" else "?"),
        "within-task draw": (f"{DEFAULTS['strategy']}, τ = {num(DEFAULTS['temperature'])}",
                             f"{SELECT_AUTHORS['strategy']}, τ = "
                             f"{num(SELECT_AUTHORS['temperature'])} (q = 0.001)"),
    }


def test_readme_tables_state_the_codes_defaults_and_the_authors_values():
    readme, code = readme_rows(), code_rows()
    assert readme.keys() == code.keys()
    for setting, (tive_default, authors) in code.items():
        written = readme[setting]
        # the precision cell explains the weights' type after the checked words
        assert written[0].startswith(tive_default), (setting, written[0], tive_default)
        assert written[1] == authors, (setting, written[1], authors)


def test_defaults_are_pinned_to_the_authors_recipe():
    """The values of the issue's table, written here once more by hand: a change to a default
    must change this test too."""
    c = WarmupConfig()
    assert (c.lr, c.projector_lr, c.epochs, c.fraction) == (2e-5, 2e-5, 1, 0.08)
    assert c.global_batch is None and WarmupConfig(paper=True).global_batch == 128
    assert (plan.MIN_STEPS, plan.MIN_BATCH, c.group_by_modality) == (100, 8, True)
    assert (c.r, c.alpha, c.dropout, c.targets) == (128, 256, 0.05, ())
    assert (wu.SCHEDULE, plan.WARMUP_RATIO, wu.WEIGHT_DECAY) == ("cosine", 0.03, 0.0)
    assert SCORE_AUTHORS == {"projector": "trak", "proj_dim": 8192, "seed": 0,
                             "feature_dtype": "float16"}
    assert SELECT_AUTHORS["temperature"] == 1000.0 and SELECT_AUTHORS["oversample"] is True
    assert AUTHORS_EXCLUDE == "textcaps"
