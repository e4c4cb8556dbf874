"""The loss plot: a run shorter than `training.log_every` still shows its loss, without matplotlib warnings."""

import json
import warnings

from helpers import toy_rows, write_jsonl, write_recipe

from finetune import artifacts

BLUE = (0x1F / 255, 0x77 / 255, 0xB4 / 255)  # matplotlib's first line colour, the train loss


def blue_pixels(png) -> int:
    import matplotlib.image
    import numpy as np

    img = matplotlib.image.imread(png)[..., :3]
    return int((np.abs(img - np.array(BLUE)).max(axis=-1) < 0.08).sum())


def test_two_step_run_with_log_every_10_plots_its_loss(cli, tmp_path, tiny):
    data = write_jsonl(tmp_path / "t.jsonl", toy_rows(8))
    r = write_recipe(tmp_path / "r.yaml", {"model": {"base": str(tiny), "quantization": "none", "dtype": "fp32"}, "lora": {"r": 4},
                                           "data": {"train": str(data), "max_length": 64},
                                           "training": {"max_steps": 2, "batch_size": 2, "log_every": 10},
                                           "output": {"dir": str(tmp_path / "out")}})
    res = cli("sft", r)
    assert res.code == 0, res.text
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert not any("loss" in row for row in rows)  # the case this is about: no per-step loss logged
    final = next(row["train_loss"] for row in rows if "train_loss" in row)
    assert blue_pixels(tmp_path / "out" / "loss.png") > 20  # the point is drawn

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        series = artifacts.plot_loss(tmp_path / "again.png", rows, "t")
    assert [str(w.message) for w in caught] == []
    assert series == {"train loss (average of the run)": [(2, final)]}


def test_per_step_losses_and_eval_points(tmp_path):
    rows = [{"step": s, "loss": 3.0 - s / 10} for s in range(1, 31)] + [{"step": 30, "train_loss": 2.0, "eval_loss": 2.5}]
    series = artifacts.plot_loss(tmp_path / "loss.png", rows, "t")
    assert series["train loss"] == [(s, 3.0 - s / 10) for s in range(1, 31)]  # the per-step curve, not the average
    assert series["eval loss"] == [(30, 2.5)]
    assert blue_pixels(tmp_path / "loss.png") > 100


def test_nothing_logged_is_said_not_warned(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        series = artifacts.plot_loss(tmp_path / "loss.png", [{"step": 0, "train_runtime": 0.1}], "t")
    assert series == {} and [str(w.message) for w in caught] == []
    assert (tmp_path / "loss.png").stat().st_size > 0 and blue_pixels(tmp_path / "loss.png") == 0
