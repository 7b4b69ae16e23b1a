"""A broken data set stops training with a clear error instead of training on the few samples that still load."""

import os

import pytest

from recipe.train_data import DataError, ReplacementGuard

from helpers.launch import deepspeed_launch
from helpers.runs import write_config


class _Step:
    def __init__(self, samples, corrupt=0, too_long=0, bad=0, skipped=()):
        self.totals = {"num_samples": samples, "num_corrupt_images": corrupt, "num_too_long": too_long,
                       "num_bad_records": bad}
        self.skipped = list(skipped)


def test_guard_allows_a_few_and_stops_many():
    guard = ReplacementGuard(0.1)
    guard.update(_Step(256, corrupt=3), step=1)  # 1.2%: skipped and logged, training goes on
    guard.update(_Step(256, bad=10), step=2)     # 2.5% so far
    with pytest.raises(DataError, match=r"100 of the 768 samples of steps 1..3 .*corrupt or missing images: 90, "
                                        r"malformed records: 10.*max_replaced_fraction=0.1"):
        guard.update(_Step(256, corrupt=87, skipped=["corrupt_image at data.jsonl:7, image a.png: truncated"]), 3)


@pytest.mark.slow
def test_training_with_every_image_missing_stops(run_inputs, tmp_path):
    empty = tmp_path / "no_images"
    os.makedirs(empty)
    inputs = {**run_inputs, "image_root": str(empty)}
    cfg = write_config(tmp_path / "cfg.json", inputs, tmp_path / "save")
    proc = deepspeed_launch(4, ["--deepspeed", cfg], str(tmp_path / "run.log"), check=False)
    text = open(tmp_path / "run.log").read()
    assert proc.returncode != 0
    assert "had to be replaced (corrupt or missing images:" in text and "max_replaced_fraction=0.1" in text
    assert not os.path.exists(tmp_path / "save" / "latest")  # nothing was trained or saved
