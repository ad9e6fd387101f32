"""Quality of the embedded model under a serving configuration, read by the shape classifier:
prompt adherence (shape, color and background all as asked), the share of pictures drawn in the
outlined style, and the pixel distance to a reference configuration's pictures (same prompts,
same seeds). Shared by benchmarks/quality.py (the table) and tests/cpu/test_quality.py."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass

import numpy as np
import torch

from training.classifier import ShapeClassifier
from training.shapes import eval_prompts


@dataclass
class EvalSet:
    pixels: np.ndarray  # [N, H, W, 3] uint8, prompt-major: prompt i, seeds 0..S-1
    wanted: list[dict[str, str]]
    computed_steps: float  # DiT steps computed per request, on average (the cache skips some)


def generate_eval_set(router, seeds: int = 2, base_seed: int = 0, prompts: int | None = None, **request) -> EvalSet:
    """The 24 evaluation prompts (or the first `prompts` of them) x `seeds` through a ditserve
    router, concurrently (the router batches them as a server would); image j of prompt i has
    seed base_seed + seeds * i + j whatever `prompts` is. `request`: extra GenerateRequest fields
    (cache, lora, ...)."""
    from services.runtime.config import GenerateRequest

    prompts = eval_prompts()[:prompts]

    async def run():
        return await asyncio.gather(*(
            router.generate(GenerateRequest(prompt=p, n=seeds, seed=base_seed + seeds * i, **request))
            for i, (p, _) in enumerate(prompts)))

    results = asyncio.run(run())
    pixels = np.stack([img.pixels for r in results for img in r.images])
    steps = [r.cache_stats.computed_steps if r.cache_stats else r.request.num_inference_steps for r in results]
    return EvalSet(pixels, [w for _, w in prompts for _ in range(seeds)], sum(steps) / len(steps))


def adherence(classifier: ShapeClassifier, eval_set: EvalSet) -> dict[str, float]:
    return score(classifier, torch.from_numpy(eval_set.pixels).permute(0, 3, 1, 2).float() / 255, eval_set.wanted)


def score(classifier: ShapeClassifier, pixels: torch.Tensor, wanted: list[dict[str, str]]) -> dict[str, float]:
    """pixels [N, 3, H, W] in [0, 1] -> the share read as asked (all attributes, then each) and
    the share read as outlined."""
    read = classifier.predict(pixels)
    right = [all(r[k] == w[k] for k in w) for r, w in zip(read, wanted)]
    out = {"adherence": sum(right) / len(right)}
    for k in ("shape", "color", "background"):
        out[k] = sum(r[k] == w[k] for r, w in zip(read, wanted)) / len(read)
    out["outlined"] = sum(r["style"] == "outlined" for r in read) / len(read)
    return out


def pixel_distance(a: EvalSet, b: EvalSet) -> dict[str, float]:
    """Mean absolute error (0-255 scale) and PSNR (dB; inf when identical) of a against b."""
    diff = a.pixels.astype(np.float64) - b.pixels.astype(np.float64)
    mse = float((diff**2).mean())
    return {"mae": float(np.abs(diff).mean()), "psnr": math.inf if mse == 0 else 10 * math.log10(255**2 / mse)}
