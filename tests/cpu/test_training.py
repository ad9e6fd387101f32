"""The embedded model's trainer runs end to end (a few steps of every phase, on CPU) and writes
what ditserve loads: a FluxPipeline directory, a diffusers-format LoRA, the classifier."""

import json
import subprocess
import sys

import torch

from training.shapes import SHAPES, render, sample_scenes


def test_renderer_draws_what_the_caption_says():
    scenes = sample_scenes(64, torch.Generator().manual_seed(0))
    pictures = render(scenes, generator=torch.Generator().manual_seed(1))
    assert pictures.shape == (64, 3, 64, 64) and 0 <= pictures.min() and pictures.max() <= 1
    for scene, picture in zip(scenes, pictures):
        corner = picture[:, 0, 0]  # shapes keep a margin: the corner is background
        assert torch.allclose(corner, torch.ones(3) if scene.background == 0 else torch.zeros(3))
        assert SHAPES[scene.shape] in scene.caption
    filled = (pictures - pictures[:, :, :1, :1]).abs().sum(1).gt(0.5).float().mean()
    outlined = render(scenes, outlined=True, generator=torch.Generator().manual_seed(1))
    assert (outlined - outlined[:, :, :1, :1]).abs().sum(1).gt(0.5).float().mean() < filled


def test_trainer_smoke_run_writes_a_servable_model(tmp_path):
    out = tmp_path / "model"
    report = tmp_path / "report.json"
    subprocess.run(
        [sys.executable, "-m", "training.train_default", "--device", "cpu", "--scale", "0.001", "--batch", "8", "--judge-seeds", "1",
         "--work-dir", str(tmp_path / "work"), "--model-out", str(out),
         "--lora-out", str(tmp_path / "loras" / "style.safetensors"),
         "--classifier-out", str(tmp_path / "cls.safetensors"), "--grid", str(tmp_path / "grid.png"),
         "--report", str(report)],
        check=True, capture_output=True, timeout=600)
    assert json.loads(report.read_text())["default"]["n"] == 24
    from services.runtime.registry import resolve

    model, spec = resolve(out)
    d = spec.defaults(model)
    assert (d.height, d.max_sequence_length) == (64, 32)
    assert (tmp_path / "loras" / "style.safetensors").is_file() and (tmp_path / "grid.png").is_file()
