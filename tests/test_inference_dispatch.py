"""predict dispatches through the task's inference only: a task unknown to apps/predict (here a made-up
"brightness" task with its own Inference and Result) runs through Predictor, predict_source and the
writers without any of them naming it."""

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from apps.predict.predictor import Predictor
from apps.predict.writers import JsonlWriter, count_outputs, write_csv
from apps.tasks import LoadedModel
from apps.tasks.inference.base import Inference, Result, as_is, csv_head, rows_or_blank


@dataclass
class BrightnessResult(Result):
    level: str
    image_size: tuple[int, int]

    csv_columns = ["file", "width", "height", "level"]
    counts_key = "images_per_level"

    def record(self) -> dict[str, Any]:
        return {"level": self.level}

    def draw(self, image: np.ndarray, scale: float = 1.0) -> np.ndarray:
        return np.full_like(image, 255 if self.level == "bright" else 0)

    @classmethod
    def csv_rows(cls, record: dict[str, Any]) -> Iterator[list[Any]]:
        return rows_or_blank(csv_head(record), [[record["level"]]], len(cls.csv_columns))

    @classmethod
    def counted(cls, record: dict[str, Any]) -> list[str]:
        return [record["level"]]


class BrightnessInference(Inference):
    task = "brightness"
    result_type = BrightnessResult
    label_offset = 0

    def input_transform(self, preprocess: dict[str, Any]):
        return as_is

    def result(self, output: torch.Tensor, valid, size) -> BrightnessResult:
        return BrightnessResult("bright" if float(output) > 0.5 else "dark", size)

    @classmethod
    def export_spec(cls, loaded, model, metadata):
        raise NotImplementedError


class MeanModel(nn.Module):
    def forward(self, images, targets=None):
        return images.mean(dim=(1, 2, 3)), {}


class BrightnessTask:
    name = "brightness"
    inference = BrightnessInference


def test_a_new_task_predicts_and_writes_through_its_own_inference(tmp_path):
    loaded = LoadedModel(BrightnessTask(), MeanModel(), [{"id": 1, "name": "level"}], {}, {}, Path("m.pt"))
    predictor = Predictor(loaded, "cpu")
    assert predictor.task == "brightness"
    light, dark = np.full((8, 6, 3), 230, np.uint8), np.full((5, 9, 3), 10, np.uint8)
    assert [r.level for r in predictor.predict([light, dark])] == ["bright", "dark"]
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(light).save(folder / "a.png")
    Image.fromarray(dark).save(folder / "b.png")
    out = tmp_path / "out"
    with JsonlWriter(out / "predictions.jsonl") as journal:
        for item in predictor.predict_source(folder, batch_size=2, workers=0):
            h, w = item.result.image_size
            journal.write({"file": item.file.name, "width": w, "height": h, **item.result.record()})
    write_csv(out, predictor.inference.result_type)
    lines = (out / "predictions.csv").read_text().splitlines()
    assert lines == ["file,width,height,level", "a.png,6,8,bright", "b.png,9,5,dark"]
    counts = count_outputs(out, predictor.inference.result_type)
    assert counts["images_per_level"] == {"bright": 1, "dark": 1}


def test_the_inference_checks_thresholds_and_class_filters_for_every_task():
    loaded = LoadedModel(BrightnessTask(), MeanModel(), [{"id": 1, "name": "level"}], {}, {}, Path("m.pt"))
    with pytest.raises(ValueError, match="score threshold 1.5 outside"):
        Predictor(loaded, "cpu", score_thresh=1.5)
    with pytest.raises(ValueError, match="'purple' is not one of the checkpoint's classes"):
        Predictor(loaded, "cpu", classes=["purple"])
