"""Train ditserve's embedded default model: a tiny Flux.1-dev-architecture text-to-image model
for 64x64 pictures of colored shapes (training/shapes.py), plus the quality judge and the example
style LoRA. Everything is made here, from fixed seeds: the CLIP tokenizer (byte-level BPE) is
trained on the captions, the T5 one is a Unigram model over the grammar's words (training one on
so few distinct words keeps only characters), and five phases train the rest:

  1. the judge: a CNN reading (shape, color, background, style) back from a picture;
  2. the VAE (AutoencoderKL, 4x downsampling, 4 latent channels; its shift / scale are then set
     from the latents' statistics, as Flux's were);
  3. the DiT together with both text encoders (CLIP and T5 learn from the DiT's loss), rectified
     flow as Flux trains, the caption dropped 10% of the time so there is an unconditional model;
  4. guidance distillation, as Flux.1-dev is distilled: a copy of the model learns, from its
     guidance embedding, to predict what classifier-free guidance at that scale would give
     (teacher: the phase-3 model with and without the caption), so one DiT pass per step at
     `guidance_scale` does what two would;
  5. a rank-8 LoRA (PEFT, diffusers' format) that draws the shapes outlined instead of filled.

    python -m training.train_default --device cuda   # ~14 minutes on one H100

writes services/assets/tiny-flux (the model, bf16), services/assets/loras/outlined.safetensors,
tests/assets/shape_classifier.safetensors and a sample grid, and prints the trained model's
prompt adherence as the classifier reads it (diffusers' FluxPipeline on the saved files)."""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from training.classifier import HEADS, ShapeClassifier, augment
from training.classifier import WEIGHTS as CLASSIFIER_WEIGHTS
from training.quality import score
from training.shapes import all_captions, eval_prompts, render, sample_scenes
from training.tokenizers import clip_tokenizer, t5_word_tokenizer

ROOT = Path(__file__).resolve().parent.parent
MODEL_OUT = ROOT / "services" / "assets" / "tiny-flux"
LORA_OUT = ROOT / "services" / "assets" / "loras" / "outlined.safetensors"

SIZE = 64  # pixels per side
TEXT_TOKENS = 32  # T5 tokens: the longest caption is 10 with </s>; the tokenizer's model_max_length says 32


@dataclass
class Phases:
    # Steps and batch per phase. The models are so small that a step costs launch / Python
    # overhead, about the same whatever the batch (DiT phase: ~100 ms on an H200, ~120 ms on an
    # H100, at batch 1024), so the DiT phases take big batches.
    classifier_steps: int = 1000
    classifier_batch: int = 256
    vae_steps: int = 3000
    vae_batch: int = 128
    dit_steps: int = 3000
    distill_steps: int = 1500
    lora_steps: int = 800
    batch: int = 1024  # DiT phases. fp32 (TF32 matmuls) throughout: under bf16 autocast the DiT
    # phase went to NaN within 1000 steps on an H200, and at this size bf16 would buy no speed.
    seed: int = 0


def _log(phase: str, step: int, total: int, loss: float, t0: float) -> None:
    if not math.isfinite(loss):  # stop at once rather than spend the rest of a GPU run on NaNs
        raise FloatingPointError(f"{phase}: loss is {loss} at step {step}")
    print(f"[{phase}] step {step}/{total} loss {loss:.4f} ({time.time() - t0:.0f}s)", flush=True)


def _lr(step: int, total: int, peak: float, warmup: int = 200) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _set_lr(opt, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


class Optimizer:
    """AdamW under a warm-up + cosine learning rate, optionally with gradient clipping and an
    exponential moving average of the weights (`ema_after`: the step from which it averages; before
    it the average just follows). `finish()` leaves the average in the model."""

    def __init__(self, params, peak_lr: float, total: int, *, warmup: int = 200, weight_decay: float = 0.0,
                 betas=(0.9, 0.999), clip: float | None = None, ema_after: int | None = None, ema_decay: float = 0.998):
        self.params, self.peak_lr, self.total, self.warmup = list(params), peak_lr, total, warmup
        self.opt = torch.optim.AdamW(self.params, lr=peak_lr, weight_decay=weight_decay, betas=betas)
        self.clip, self.ema_after, self.ema_decay = clip, ema_after, ema_decay
        self.ema = [q.detach().clone() for q in self.params] if ema_after is not None else None

    def step(self, step: int, loss: torch.Tensor) -> None:
        _set_lr(self.opt, _lr(step, self.total, self.peak_lr, self.warmup))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        if self.ema is not None:
            decay = self.ema_decay if step > self.ema_after else 0.0
            torch._foreach_lerp_(self.ema, [q.detach() for q in self.params], 1 - decay)

    @torch.no_grad()
    def finish(self) -> None:
        for q, e in zip(self.params, self.ema or []):
            q.copy_(e)


def _batch(n: int, gen: torch.Generator, device, outlined: bool = False):
    scenes = sample_scenes(n, gen)
    return scenes, render(scenes, SIZE, outlined=outlined, generator=gen, device=device)


# --- phase 1: the judge ------------------------------------------------------------------------

def train_classifier(p: Phases, model: ShapeClassifier, device) -> ShapeClassifier:
    gen = torch.Generator().manual_seed(p.seed + 1)
    opt = Optimizer(model.parameters(), 2e-3, p.classifier_steps, weight_decay=1e-4)
    t0 = time.time()
    for step in range(p.classifier_steps):
        outlined = step % 2 == 1
        scenes, pixels = _batch(p.classifier_batch, gen, device, outlined)
        labels = _labels(scenes, outlined, device)
        logits = model(augment(pixels, gen))
        loss = sum(F.cross_entropy(logits[k], labels[k]) for k in HEADS)
        opt.step(step, loss)
        if step % 500 == 0 or step == p.classifier_steps - 1:
            _log("classifier", step, p.classifier_steps, loss.item(), t0)
    return model.eval()


def _labels(scenes, outlined: bool, device) -> dict[str, torch.Tensor]:
    def t(xs: list[int]) -> torch.Tensor:
        return torch.tensor(xs, device=device)

    return {"shape": t([s.shape for s in scenes]), "color": t([s.color for s in scenes]),
            "background": t([s.background for s in scenes]), "style": t([int(outlined)] * len(scenes))}


# --- phase 2: the VAE --------------------------------------------------------------------------

def build_vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
        block_out_channels=[32, 64, 64], layers_per_block=1, latent_channels=4, norm_num_groups=16,
        sample_size=SIZE, use_quant_conv=False, use_post_quant_conv=False,
    )


def train_vae(p: Phases, vae, device):
    gen = torch.Generator().manual_seed(p.seed + 2)
    opt = Optimizer(vae.parameters(), 1e-3, p.vae_steps)
    t0 = time.time()
    for step in range(p.vae_steps):
        _, pixels = _batch(p.vae_batch, gen, device, outlined=step % 4 == 3)  # the LoRA's pictures too
        x = pixels * 2 - 1
        posterior = vae.encode(x).latent_dist
        rec = vae.decode(posterior.sample()).sample
        kl = posterior.kl().mean() / posterior.mean[0].numel()  # per latent element
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-3 * kl
        opt.step(step, loss)
        if step % 1000 == 0 or step == p.vae_steps - 1:
            _log("vae", step, p.vae_steps, loss.item(), t0)
    vae.eval().requires_grad_(False)
    set_latent_scale(vae, device)
    return vae


def set_latent_scale(vae, device, seed: int = 20) -> None:
    gen = torch.Generator().manual_seed(seed)
    # Normalize latents to zero mean, unit variance (the pipeline decodes latents / scale + shift).
    with torch.no_grad():
        z = torch.cat([vae.encode(_batch(256, gen, device)[1] * 2 - 1).latent_dist.mean for _ in range(8)])
    vae.register_to_config(shift_factor=round(z.mean().item(), 4), scaling_factor=round(1 / z.std().item(), 4))


# --- phases 3-5: text encoders + DiT -----------------------------------------------------------

class TextTable:
    """Every caption of the grammar (and "" for dropout), tokenized once."""

    def __init__(self, clip_tok, t5_tok, device):
        self.captions = [*all_captions(), ""]
        self.index = {c: i for i, c in enumerate(self.captions)}
        self.clip_ids = clip_tok(self.captions, padding="max_length", max_length=clip_tok.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids.to(device)
        self.t5_ids = t5_tok(self.captions, padding="max_length", max_length=TEXT_TOKENS, truncation=True,
                             return_tensors="pt").input_ids.to(device)
        self.empty = self.index[""]

    def encode(self, clip, t5, idx: torch.Tensor):
        """As FluxPipeline encodes: CLIP's pooled output, T5's hidden states, no attention mask."""
        return t5(self.t5_ids[idx])[0], clip(self.clip_ids[idx]).pooler_output


def build_text_encoders(clip_tok, t5_tok, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=64, bos_token_id=clip_tok.bos_token_id,
        eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.pad_token_id))
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tok), d_model=128, d_kv=32, d_ff=256, num_layers=2, num_heads=4,
        relative_attention_num_buckets=16, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
        dropout_rate=0.0, pad_token_id=t5_tok.pad_token_id, eos_token_id=t5_tok.eos_token_id))
    return clip, t5


def build_transformer(seed: int):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=3, num_single_layers=6, attention_head_dim=32,
        num_attention_heads=4, joint_attention_dim=128, pooled_projection_dim=64, guidance_embeds=True,
        axes_dims_rope=[8, 12, 12])


class FlowBatch:
    """Latents of rendered pictures, packed as FluxPipeline packs them, at a random noise level."""

    def __init__(self, vae, device):
        from diffusers import FluxPipeline

        self.vae, self.device, self.pipe = vae, device, FluxPipeline
        self.h = SIZE // 2 ** (len(vae.config.block_out_channels) - 1)  # latent side: one 2x per VAE block
        self.img_ids = FluxPipeline._prepare_latent_image_ids(1, self.h // 2, self.h // 2, device, torch.float32)
        self.txt_ids = torch.zeros(TEXT_TOKENS, 3, device=device)

    @torch.no_grad()
    def latents(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        z = vae.encode(pixels * 2 - 1).latent_dist.sample()
        z = (z - vae.config.shift_factor) * vae.config.scaling_factor
        return self.pipe._pack_latents(z, z.shape[0], z.shape[1], self.h, self.h)

    def noised(self, x0: torch.Tensor, gen: torch.Generator):
        n = x0.shape[0]
        sigma = torch.sigmoid(torch.randn(n, generator=gen)).to(self.device)  # logit-normal, as SD3 / Flux
        noise = torch.randn(x0.shape, generator=gen).to(self.device)
        xt = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
        return xt, sigma, noise - x0  # the velocity the DiT predicts

    def predict(self, transformer, xt, sigma, guidance, embeds, pooled):
        return transformer(hidden_states=xt, timestep=sigma, guidance=guidance, pooled_projections=pooled,
                           encoder_hidden_states=embeds, txt_ids=self.txt_ids, img_ids=self.img_ids,
                           return_dict=False)[0]


def train_dit(p: Phases, transformer, vae, table: TextTable, clip, t5, device):
    transformer.train()
    clip.to(device).train()
    t5.to(device).train()
    flow = FlowBatch(vae, device)
    modules = [transformer, clip, t5]
    opt = Optimizer([q for m in modules for q in m.parameters()], 5e-4, p.dit_steps, betas=(0.9, 0.99), clip=1.0,
                    ema_after=500)
    gen = torch.Generator().manual_seed(p.seed + 3)
    t0 = time.time()
    for step in range(p.dit_steps):
        scenes, pixels = _batch(p.batch, gen, device)
        idx = torch.tensor([table.index[s.caption] for s in scenes])
        idx[torch.rand(len(idx), generator=gen) < 0.1] = table.empty
        x0 = flow.latents(pixels)
        xt, sigma, target = flow.noised(x0, gen)
        embeds, pooled = table.encode(clip, t5, idx.to(device))
        ones = torch.ones(len(idx), device=device)
        pred = flow.predict(transformer, xt, sigma, ones, embeds, pooled)
        loss = F.mse_loss(pred, target)
        opt.step(step, loss)
        if step % 500 == 0 or step == p.dit_steps - 1:
            _log("dit", step, p.dit_steps, loss.item(), t0)
    opt.finish()
    for m in modules:
        m.eval().requires_grad_(False)
    return transformer


def distill_guidance(p: Phases, teacher, student, vae, table: TextTable, clip, t5, device, max_guidance: float = 6.0):
    """Student(x, t, c, g) <- teacher(x, t, "") + g * (teacher(x, t, c) - teacher(x, t, "")), g in [1, 6]."""
    student.train().requires_grad_(True)
    flow = FlowBatch(vae, device)
    opt = Optimizer(student.parameters(), 2e-4, p.distill_steps, warmup=100, betas=(0.9, 0.99), clip=1.0,
                    ema_after=300)
    gen = torch.Generator().manual_seed(p.seed + 4)
    t0 = time.time()
    for step in range(p.distill_steps):
        scenes, pixels = _batch(p.batch, gen, device)
        idx = torch.tensor([table.index[s.caption] for s in scenes], device=device)
        x0 = flow.latents(pixels)
        xt, sigma, _ = flow.noised(x0, gen)
        g = (1 + (max_guidance - 1) * torch.rand(len(idx), generator=gen)).to(device)
        ones = torch.ones_like(g)
        with torch.no_grad():
            embeds, pooled = table.encode(clip, t5, idx)
            e_null, p_null = table.encode(clip, t5, torch.full_like(idx, table.empty))
            cond = flow.predict(teacher, xt, sigma, ones, embeds, pooled)
            uncond = flow.predict(teacher, xt, sigma, ones, e_null, p_null)
            target = uncond + g[:, None, None] * (cond - uncond)
        pred = flow.predict(student, xt, sigma, g, embeds, pooled)
        loss = F.mse_loss(pred, target)
        opt.step(step, loss)
        if step % 500 == 0 or step == p.distill_steps - 1:
            _log("distill", step, p.distill_steps, loss.item(), t0)
    opt.finish()
    return student.eval().requires_grad_(False)


LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp"]


def train_style_lora(p: Phases, transformer, vae, table: TextTable, clip, t5, device):
    """A rank-8 LoRA on the distilled model that draws outlines. The model is guidance-distilled,
    so the LoRA is trained at random guidance scales on plain rectified flow: it moves the
    conditional prediction towards outlined pictures at every scale."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer = copy.deepcopy(transformer)
    torch.manual_seed(p.seed + 5)
    transformer.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
    flow = FlowBatch(vae, device)
    opt = Optimizer([q for q in transformer.parameters() if q.requires_grad], 1e-3, p.lora_steps, warmup=100)
    gen = torch.Generator().manual_seed(p.seed + 5)
    t0 = time.time()
    for step in range(p.lora_steps):
        scenes, pixels = _batch(p.batch, gen, device, outlined=True)
        idx = torch.tensor([table.index[s.caption] for s in scenes], device=device)
        x0 = flow.latents(pixels)
        xt, sigma, target = flow.noised(x0, gen)
        g = (1 + 5 * torch.rand(len(idx), generator=gen)).to(device)
        with torch.no_grad():
            embeds, pooled = table.encode(clip, t5, idx)
        pred = flow.predict(transformer, xt, sigma, g, embeds, pooled)
        loss = F.mse_loss(pred, target)
        opt.step(step, loss)
        if step % 500 == 0 or step == p.lora_steps - 1:
            _log("lora", step, p.lora_steps, loss.item(), t0)
    return get_peft_model_state_dict(transformer)


class PhaseStore:
    """Each finished phase's weights under work_dir (none: keep nothing), so a rerun after an
    interruption resumes after the last finished phase instead of starting over."""

    def __init__(self, root: Path | None):
        self.root = root

    def restore(self, phase: str, **modules) -> bool:
        f = self.root / f"{phase}.pt" if self.root else None
        if f is None or not f.is_file():
            return False
        state = torch.load(f, map_location="cpu")
        for name, module in modules.items():
            module.load_state_dict(state[name])
        print(f"[{phase}] restored from {f}", flush=True)
        return True

    def tokenizers(self):
        """The CLIP and T5 tokenizers, trained on the grammar's captions. Their training is not
        bit-reproducible across processes (ties in merge order), and the text encoders' embedding
        rows follow their vocabularies, so a resumed run must reuse the first run's."""
        from transformers import CLIPTokenizer, T5TokenizerFast

        saved = self.root / "tokenizer" if self.root else None
        if saved is not None and (saved / "clip").is_dir():
            return CLIPTokenizer.from_pretrained(saved / "clip"), T5TokenizerFast.from_pretrained(saved / "t5")
        captions = all_captions()
        # 256 byte-level symbols + enough merges for every word of the grammar to be one token.
        clip_tok = clip_tokenizer(captions * 4, vocab_size=400)
        t5_tok = t5_word_tokenizer([w for c in captions for w in c.split()], model_max_length=TEXT_TOKENS)
        if saved is not None:
            clip_tok.save_pretrained(saved / "clip")
            t5_tok.save_pretrained(saved / "t5")
        return clip_tok, t5_tok

    def save(self, phase: str, **modules) -> None:
        if self.root:
            self.root.mkdir(parents=True, exist_ok=True)
            torch.save({name: m.state_dict() for name, m in modules.items()}, self.root / f"{phase}.pt")


# --- saving and judging ------------------------------------------------------------------------

def save_model(out: Path, transformer, vae, clip, t5, clip_tok, t5_tok) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    # Dynamic shifting as Flux.1's scheduler, anchored so that 64x64 (64 image tokens) gets
    # mu = base_shift: the noise schedule the DiT was trained for (logit-normal around 0.5).
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=64, max_image_seq_len=1024)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5,
                        tokenizer_2=t5_tok, transformer=transformer)
    pipe.to(torch.bfloat16)
    pipe.save_pretrained(out, safe_serialization=True)
    pipe.to(torch.float32)


def save_lora(path: Path, lora_state: dict) -> None:
    from diffusers import FluxPipeline

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in lora_state.items()}
    FluxPipeline.save_lora_weights(path.parent, transformer_lora_layers=state, weight_name=path.name,
                                   safe_serialization=True)


@torch.no_grad()
def judge(model_dir: Path, classifier: ShapeClassifier, device, *, seeds: int = 4, lora: Path | None = None,
          lora_scale: float = 1.0, grid: Path | None = None) -> dict:
    """diffusers' FluxPipeline on the saved files, 24 prompts x `seeds`: share of pictures the
    classifier reads as the prompt (all three attributes), and as outlined."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(model_dir, torch_dtype=torch.float32).to(device)
    if lora is not None:
        pipe.load_lora_weights(lora.parent, weight_name=lora.name, adapter_name="style")
        pipe.set_adapters(["style"], adapter_weights=[lora_scale])
    prompts = eval_prompts()
    pictures, wanted = [], []
    for seed in range(seeds):
        gens = [torch.Generator().manual_seed(seed * 1000 + i) for i in range(len(prompts))]
        out = pipe([p for p, _ in prompts], height=SIZE, width=SIZE, num_inference_steps=28, guidance_scale=3.5,
                   max_sequence_length=TEXT_TOKENS, generator=gens, output_type="pt").images
        pictures.append(out.float().cpu())
        wanted += [w for _, w in prompts]
    pixels = torch.cat(pictures)
    if grid is not None:
        from PIL import Image

        g = pixels[: len(prompts)].view(3, 8, 3, SIZE, SIZE).permute(0, 3, 1, 4, 2).reshape(3 * SIZE, 8 * SIZE, 3)
        grid.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((g * 255).round().byte().numpy()).save(grid)
    got = score(classifier.cpu(), pixels, wanted)
    return {"adherence": got["adherence"], "outlined": got["outlined"], "n": len(wanted)}


def main() -> None:
    ap = argparse.ArgumentParser(description="Train the embedded default model (see the module docstring).")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model-out", type=Path, default=MODEL_OUT)
    ap.add_argument("--lora-out", type=Path, default=LORA_OUT)
    ap.add_argument("--classifier-out", type=Path, default=CLASSIFIER_WEIGHTS)
    ap.add_argument("--grid", type=Path, default=ROOT / "docs" / "default-model.png",
                    help="where to write one sample per evaluation prompt (the README shows it)")
    ap.add_argument("--work-dir", type=Path, help="keep each finished phase's weights here; a rerun resumes "
                    "after the last finished phase (each phase seeds itself, so it follows the recipe of one run)")
    ap.add_argument("--stop-after", choices=("dit", "distill"),
                    help="stop once this phase is saved in --work-dir (to split a run over several sessions)")
    ap.add_argument("--report", type=Path, help="write the phases' timings and the judged adherence here (JSON)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every phase's step count (e.g. 0.01 to smoke-test)")
    ap.add_argument("--judge-seeds", type=int, default=4, help="seeds per evaluation prompt in the final judgement")
    ap.add_argument("--batch", type=int, help="the DiT phases' batch (default 1024; smaller to smoke-test on CPU)")
    args = ap.parse_args()
    from safetensors.torch import save_file

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    device = torch.device(args.device)
    phases = Phases()
    for f in ("classifier_steps", "vae_steps", "dit_steps", "distill_steps", "lora_steps"):
        setattr(phases, f, max(2, int(getattr(phases, f) * args.scale)))
    phases.batch = args.batch or phases.batch
    timings, t_all = {}, time.time()
    store = PhaseStore(args.work_dir)

    t = time.time()
    classifier = ShapeClassifier().to(device)
    if args.stop_after and not args.work_dir:
        ap.error("--stop-after needs --work-dir")
    if not store.restore("classifier", classifier=classifier):
        train_classifier(phases, classifier, device)
        store.save("classifier", classifier=classifier)
    args.classifier_out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in classifier.state_dict().items()}, str(args.classifier_out))
    timings["classifier_s"] = time.time() - t

    t = time.time()
    vae = build_vae(phases.seed + 2).to(device)
    if store.restore("vae", vae=vae):
        vae.eval().requires_grad_(False)
        set_latent_scale(vae, device)
    else:
        train_vae(phases, vae, device)
        store.save("vae", vae=vae)
    timings["vae_s"] = time.time() - t

    clip_tok, t5_tok = store.tokenizers()
    table = TextTable(clip_tok, t5_tok, device)
    clip, t5 = build_text_encoders(clip_tok, t5_tok, phases.seed + 6)
    clip, t5 = clip.to(device), t5.to(device)

    t = time.time()
    student = build_transformer(phases.seed + 3).to(device)
    if store.restore("distill", transformer=student, clip=clip, t5=t5):
        for m in (student, clip, t5):
            m.eval().requires_grad_(False)
    else:
        teacher = student
        if store.restore("dit", transformer=teacher, clip=clip, t5=t5):
            for m in (teacher, clip, t5):
                m.eval().requires_grad_(False)
        else:
            train_dit(phases, teacher, vae, table, clip, t5, device)
            store.save("dit", transformer=teacher, clip=clip, t5=t5)
        timings["dit_s"] = time.time() - t
        if args.stop_after == "dit":
            return
        t = time.time()
        student = copy.deepcopy(teacher)
        distill_guidance(phases, teacher, student, vae, table, clip, t5, device)
        store.save("distill", transformer=student, clip=clip, t5=t5)
        timings["distill_s"] = time.time() - t
    if args.stop_after == "distill":
        return
    save_model(args.model_out, student, vae, clip, t5, clip_tok, t5_tok)

    t = time.time()
    lora_state = train_style_lora(phases, student, vae, table, clip, t5, device)
    save_lora(args.lora_out, lora_state)
    timings["lora_s"] = time.time() - t
    timings["total_train_s"] = time.time() - t_all

    report = {"phases": asdict(phases), "timings": {k: round(v, 1) for k, v in timings.items()},
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "default": judge(args.model_out, classifier, device, seeds=args.judge_seeds, grid=args.grid),
              "lora_1.0": judge(args.model_out, classifier, device, seeds=args.judge_seeds, lora=args.lora_out)}
    print(json.dumps(report, indent=1))
    if args.report:
        args.report.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
