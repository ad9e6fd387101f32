"""`ditserve generate`: output, defaults, and one-line errors for bad input."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from services.cli import EXIT_BAD_INPUT, main


def _run(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_generate_writes_the_image(flux_dev_dir, tmp_path):
    out = tmp_path / "img.png"
    proc = _run(
        "generate", "--model-path", str(flux_dev_dir), "--prompt", "a red circle", "--seed", "5",
        "--height", "48", "--width", "32", "--num-inference-steps", "2", "--output", str(out),
    )
    assert proc.returncode == 0, proc.stderr
    assert "seed=5" in proc.stdout and "Traceback" not in proc.stderr
    img = Image.open(out)
    assert img.size == (32, 48) and img.mode == "RGB"
    assert np.asarray(img).std() > 5


def test_embedded_default_model_needs_no_path(tmp_path):
    out = tmp_path / "default.webp"
    code = main(["generate", "--prompt", "a red circle on a white background", "--height", "64", "--width", "64",
                 "--num-inference-steps", "2", "--seed", "0", "--output", str(out), "--no-progress"])
    assert code == 0
    assert Image.open(out).size == (64, 64)


def test_several_images_get_numbered_files(flux_dev_dir, tmp_path):
    out = tmp_path / "batch.jpg"
    code = main(["generate", "--model-path", str(flux_dev_dir), "--prompt", "a dog", "--num-images", "2",
                 "--height", "32", "--width", "32", "--num-inference-steps", "1", "--seed", "9",
                 "--output", str(out), "--no-progress"])
    assert code == 0
    a, b = (np.asarray(Image.open(tmp_path / f"batch-{i}.jpg")) for i in range(2))
    assert a.shape == b.shape == (32, 32, 3)
    assert not np.array_equal(a, b)


def test_same_seed_same_file(flux_dev_dir, tmp_path):
    args = ["generate", "--model-path", str(flux_dev_dir), "--prompt", "a cat", "--height", "32", "--width", "32",
            "--num-inference-steps", "2", "--seed", "42", "--no-progress"]
    assert main([*args, "--output", str(tmp_path / "a.png")]) == 0
    assert main([*args, "--output", str(tmp_path / "b.png")]) == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def _bad_model_dirs(tmp_path, flux_dev_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    dirs = {"missing": tmp_path / "nope", "empty": empty}
    # an unknown class; a diffusers class whose components are not in the directory
    for case, cls in (("unsupported", "NoSuchPipeline"), ("mismatched", "StableDiffusion3Pipeline")):
        dirs[case] = tmp_path / case
        shutil.copytree(flux_dev_dir, dirs[case])
        index = json.loads((dirs[case] / "model_index.json").read_text())
        index["_class_name"] = cls
        (dirs[case] / "model_index.json").write_text(json.dumps(index))
    return dirs


@pytest.mark.parametrize(
    "case,extra,message",
    [
        ("missing", [], "model path does not exist"),
        ("empty", [], "no model_index.json"),
        ("unsupported", [], "unsupported pipeline class 'NoSuchPipeline'"),
        ("mismatched", [], "StableDiffusion3Pipeline needs components text_encoder_3, tokenizer_3"),
        (None, ["--height", "100"], "height 100 is not a multiple of 16"),
        (None, ["--width", "24"], "width 24 is not a multiple of 16"),
        (None, ["--num-inference-steps", "0"], "num_inference_steps"),
        (None, ["--prompt", "   "], "prompt must not be empty"),
        (None, ["--output", "/nonexistent-dir/x.png"], "output directory does not exist"),
        (None, ["--output", "out.gif"], "unsupported output extension '.gif'"),
        (None, ["--max-sequence-length", "600"], "max_sequence_length 600 exceeds 512"),
        (None, ["--device", "quantum"], "unknown device 'quantum'"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(case, extra, message, flux_dev_dir, tmp_path, capsys):
    model = str(_bad_model_dirs(tmp_path, flux_dev_dir)[case]) if case else str(flux_dev_dir)
    args = ["generate", "--model-path", model, "--prompt", "x", "--output", str(tmp_path / "o.png"), *extra]
    assert main(args) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert message in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_one_line(flux_dev_dir, tmp_path, capsys):
    args = ["generate", "--model-path", str(flux_dev_dir), "--prompt", "x", "--device", "cuda", "--output", str(tmp_path / "o.png")]
    assert main(args) == EXIT_BAD_INPUT
    assert "no CUDA device is available" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_non_root(flux_dev_dir, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    assert main(["generate", "--model-path", str(flux_dev_dir), "--prompt", "x", "--output", str(ro / "o.png")]) == 2
    assert "not writable" in capsys.readouterr().err


def test_unwritable_output_is_one_line(flux_dev_dir, tmp_path):
    # A path under a regular file cannot be created by anyone, root included.
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = _run("generate", "--model-path", str(flux_dev_dir), "--prompt", "x", "--output", str(blocker / "o.png"))
    assert proc.returncode == EXIT_BAD_INPUT
    assert proc.stderr.strip().startswith("ditserve: error: output directory does not exist")
    assert "Traceback" not in proc.stderr


def test_subprocess_error_has_no_traceback(tmp_path):
    proc = _run("generate", "--model-path", str(tmp_path / "missing"), "--prompt", "x")
    assert proc.returncode == EXIT_BAD_INPUT
    assert proc.stderr.strip() == f"ditserve: error: model path does not exist: {tmp_path / 'missing'}"


def test_parallel_layout_the_model_cannot_take_is_one_line(flux_dev_dir, tmp_path, capsys):
    # The tiny model has 2 heads: tensor parallelism 3 cannot split them; refused before any rank starts.
    args = ["generate", "--model-path", str(flux_dev_dir), "--prompt", "x", "--tp-size", "3",
            "--output", str(tmp_path / "o.png")]
    assert main(args) == EXIT_BAD_INPUT
    assert "--tp-size 3 does not divide the model's 2 attention heads" in capsys.readouterr().err
