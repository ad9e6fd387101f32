"""Quality of the embedded default model under each serving configuration, measured by the shape
classifier (training/classifier.py) instead of guessed.

    python benchmarks/quality.py                               # every configuration, CPU
    python benchmarks/quality.py --device cuda --configs default fp8 cache-fast

For each configuration: the 24 evaluation prompts ("a {color} {shape} on a {background}
background") x --seeds through ditserve's in-process router, then prompt adherence (all three
attributes read back as asked), the share drawn outlined (the example LoRA's style), and the
mean absolute pixel error / PSNR against the default configuration on the same prompts and
seeds. Parallel layouts run their ranks as CPU processes (gloo) without CUDA."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.cli import build_in_process_router  # noqa: E402
from services.runtime.config import StageConfig  # noqa: E402
from services.runtime.errors import DitserveError  # noqa: E402
from services.runtime.registry import DEFAULT_MODEL_PATH  # noqa: E402
from training.classifier import load_classifier  # noqa: E402
from training.quality import adherence, generate_eval_set, pixel_distance  # noqa: E402

LORA = DEFAULT_MODEL_PATH.parent / "loras" / "outlined.safetensors"


def _lora(strength: float) -> dict:
    return {"lora": [{"name": "outlined", "path": str(LORA), "strength": strength}]}


# name -> (denoiser options, request fields)
CONFIGS: dict[str, tuple[dict, dict]] = {
    "default": ({}, {}),
    **{f"cache-{p}": ({}, {"cache": {"preset": p}}) for p in ("slow", "medium", "fast", "ultra")},
    "fp8": ({"precision": "fp8"}, {}),
    "ulysses2": ({"ulysses_degree": 2}, {}),
    "ring2": ({"ring_degree": 2}, {}),
    "tp2": ({"tp_size": 2}, {}),
    "cfg2": ({"cfg_parallel": True}, {}),
    **{f"lora-{s:g}": ({}, _lora(s)) for s in (0.0, 0.5, 1.0)},
}


def run(name: str, seeds: int, device: str, model_path: str | None) -> dict:
    options, fields = CONFIGS[name]
    router = build_in_process_router(StageConfig(model_path=model_path, device=device), denoiser_options=options)
    try:
        return generate_eval_set(router, seeds, **fields)
    finally:
        close = getattr(router.denoiser.stage, "close", None)
        if close is not None:
            close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    ap.add_argument("--seeds", type=int, default=4, help="pictures per prompt (24 prompts)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model-path", help="default: the embedded model")
    args = ap.parse_args()

    classifier = load_classifier()
    reference = run("default", args.seeds, args.device, args.model_path)
    print("| config | DiT steps computed | adherence | shape | color | background | outlined | MAE vs default "
          "| PSNR vs default |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.configs:
        try:
            got = reference if name == "default" else run(name, args.seeds, args.device, args.model_path)
        except DitserveError as exc:  # a configuration this machine refuses (e.g. more ranks than GPUs)
            print(f"| {name} | not run: {exc} ||||||||")
            continue
        a, d = adherence(classifier, got), pixel_distance(got, reference)
        print(f"| {name} | {got.computed_steps:.1f} | {a['adherence']:.1%} | {a['shape']:.1%} | {a['color']:.1%} | {a['background']:.1%} "
              f"| {a['outlined']:.1%} | {d['mae']:.2f} | {d['psnr']:.1f} dB |", flush=True)
    print(f"\n{len(reference.wanted)} pictures per configuration (24 prompts x {args.seeds} seeds), "
          f"device {args.device}; classifier: training/classifier.py")


if __name__ == "__main__":
    main()
