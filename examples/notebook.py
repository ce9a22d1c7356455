"""The notebook path, as a script: values from a model (or from arrays), a report, a
selection, a saved subset.

    python examples/notebook.py             # with examples/llava-smollm2 (build_model.py): scores
                                            # the mixture; without it: the synthetic demo arrays
"""

from pathlib import Path

import numpy as np

import tive

HERE = Path(__file__).resolve().parent / "llava_mini"
MODEL = Path(__file__).resolve().parent / "llava-smollm2"

if (MODEL / "config.json").exists():
    # Warm-up, then every record's gradient features (resumes if interrupted; reuses both
    # when run again with the same settings). The 17-record warm-up sample of this example is
    # smaller than the authors' global batch of 128: smaller steps at LLaVA's LoRA rate give
    # it 5 steps (README, Quick start).
    report = tive.value_estimate(data=HERE / "mix.json", model=str(MODEL), run="tive-notebook",
                                 score={"batch_size": 8, "max_length": 512},
                                 warmup={"global_batch": 4, "lr": 2e-4})
else:
    # Features computed elsewhere (here: the synthetic demo arrays of build_example.py).
    report = tive.value_estimate(
        features=np.load(HERE / "demo_features.npy"),
        norms=np.load(HERE / "demo_norms.npy"),
        data=HERE / "mix.json",  # tasks are inferred from the records; subsets keep their format
    )
print(report)  # tasks, records, task values
print("most representative llava_instruct record:",
      report.mixture[int(np.nanargmax(np.where(report.tasks == "llava_instruct",
                                               report.instance_values, np.nan)))].id)

selection = report.select(budget=0.15, strategy="soft", temperature=1000, seed=0,
                          exclude=["textcaps"], oversample=True)
print(selection)  # per task: value, quota, selected, share before → after
print("quotas:", selection.quotas)
paths = selection.save(Path("tive-notebook") / "subset-tive-0.15.json")
print({k: str(v) for k, v in paths.items()})
