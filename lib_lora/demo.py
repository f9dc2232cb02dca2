"""``python -m lib_lora demo``: the whole job on an embedded default, in a few minutes on a CPU.

It trains a LoRA on five real photos of a dog shipped with lib_lora (DreamBooth dataset, CC BY 4.0, see
``demo_data/dog/ATTRIBUTION.md``) or on a folder you pass, with the embedded ``tiny-sd1`` model (the real SD1
architecture at tiny width, random weights: the images it makes are noise-like patterns, not dogs; the point is
that every step of the pipeline runs and the LoRA measurably learns the photos). Into the output folder it writes:

- ``demo-000001.safetensors`` ... (one per epoch) and ``demo.safetensors``, each with a ``.json`` sidecar;
- ``loss.png``: the loss curve; ``grid.png``: samples for each checkpoint (columns) x LoRA weight (rows), same seed;
- ``logs/``: TensorBoard events and ``train_log.jsonl``;
- ``eval.json``: the denoising loss on the training images at fixed noise, with and without the LoRA.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from importlib import resources
from pathlib import Path

import torch

from .config import TrainConfig
from .errors import DatasetError

DEMO_TRIGGER = "sks dog"
DEMO_WEIGHTS = (0.0, 0.5, 1.0)


def bundled_images() -> Path:
    """The folder of demo photos shipped inside the package."""
    return Path(str(resources.files("lib_lora") / "demo_data" / "dog"))


def prepare_dataset(target: Path, images: str | None) -> Path:
    """Copies the demo photos (or the user's images) into ``target/10_sks dog`` (Kohya layout: 10 repeats).

    Raises:
        DatasetError: the user's folder has no images.
    """
    source = Path(images) if images else bundled_images()
    folder = target / f"10_{DEMO_TRIGGER}"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    n = 0
    for f in sorted(source.iterdir()):
        if f.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp", ".bmp") and not f.name.startswith("."):
            shutil.copy2(f, folder / f.name)
            n += 1
    if n == 0:
        raise DatasetError(f"no images (.jpg, .png, .webp, .bmp) in {source}")
    return target


def demo_config(output_dir: Path, dataset: Path, steps: int | None) -> TrainConfig:
    """The demo's settings: tiny-sd1 at 128 px, rank 8, a learning rate suited to a tiny random model."""
    cfg = TrainConfig(model="tiny-sd1", train_data_dir=str(dataset), output_dir=str(output_dir),
                      output_name="demo", trigger_words=[DEMO_TRIGGER], resolution=128, min_bucket_reso=64,
                      max_bucket_reso=256, network_dim=8, network_alpha=8.0, learning_rate=1e-3,
                      train_batch_size=2, max_train_steps=None, max_train_epochs=3, save_every_n_steps=None,
                      save_every_n_epochs=1, save_precision="fp16", seed=0, device="cpu",
                      preferred_weight=1.0)
    if steps:
        cfg = cfg.replace(max_train_epochs=None, max_train_steps=steps, save_every_n_epochs=None,
                          save_every_n_steps=max(1, steps // 3))
    return cfg


def denoising_loss(model, network, latents: torch.Tensor, prompt: str, multiplier: float, seed: int = 0,
                   n_timesteps: int = 8) -> float:
    """Mean eps-MSE of the model on ``latents`` (scaled) at fixed noise and timesteps, with the network at
    ``multiplier`` (0 = base model)."""
    from . import schedules

    g = torch.Generator("cpu").manual_seed(seed)
    ac = model.alphas_cumprod
    total = 0.0
    network.set_multiplier(multiplier)
    with torch.no_grad(), network.applied():
        network.eval()
        cond = model.encode_prompts([prompt] * latents.shape[0])
        for t in torch.linspace(50, 950, n_timesteps).long():
            noise = torch.randn(latents.shape, generator=g)
            ts = torch.full((latents.shape[0],), int(t))
            noisy = schedules.add_noise(latents, noise, ts, ac)
            pred = model.unet_forward(noisy, ts, cond)
            target = schedules.get_velocity(latents, noise, ts, ac) if model.prediction_type == "v_prediction" \
                else noise
            total += float(torch.nn.functional.mse_loss(pred.float(), target.float()))
    network.set_multiplier(1.0)
    return total / n_timesteps


def run_demo(output_dir: str, images: str | None = None, steps: int | None = None) -> dict:
    """Runs the demo end to end and prints where everything is. Returns the eval numbers and file paths."""
    from .cli import build_parser
    from .cli_grid import render_run_grid
    from .console import run_training
    from .model.headless import load_model
    from .network import LoRANetwork
    from .plots import loss_plot
    from .safetensors_io import load_lora_file
    from .train_log import read_jsonl

    start = time.monotonic()
    out = Path(output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    dataset = prepare_dataset(out / "dataset", images)
    cfg = demo_config(out, dataset, steps)
    model = load_model(cfg.model, device="cpu")
    result = run_training(cfg, model=model)

    records = [r for r in read_jsonl(Path(result.log_dir) / "train_log.jsonl") if "loss/current" in r]
    plot = loss_plot([r["step"] for r in records], {"loss": [r["loss/current"] for r in records],
                                                    "average": [r["loss/average"] for r in records]},
                     title="demo: training loss (tiny-sd1)")
    plot.save(out / "loss.png")

    checkpoints = [Path(p) for p in result.files]
    # The checkpoint x weight grid, rendered by the same code as `python -m lib_lora grid`.
    grid_args = build_parser().parse_args([
        "grid", "--files", *map(str, checkpoints), "--weights", ",".join(f"{w:g}" for w in DEMO_WEIGHTS),
        "--prompt", f"a photo of {DEMO_TRIGGER}", "--seed", "7", "--base", cfg.model, "--size", "128",
        "--steps", "12", "--cfg-scale", "5", "--output", str(out / "grid.png")])
    render_run_grid(grid_args)

    # How much did the LoRA learn the photos? Denoising loss at fixed noise, with and without it.
    from .data.buckets import BucketSpec
    from .data.dataset import load_item_pixels, plan_items, scan_dataset

    report = scan_dataset(dataset)
    plans = plan_items(report.images, BucketSpec(resolution=(cfg.resolution, cfg.resolution), min_reso=64,
                                                 max_reso=256))
    pixels = torch.stack([torch.from_numpy(load_item_pixels(p)) for p in plans if
                          p.assignment.bucket == plans[0].assignment.bucket])
    latents = model.encode_images(pixels, generator=torch.Generator("cpu").manual_seed(0))
    final, _ = LoRANetwork.from_weights(load_lora_file(checkpoints[-1])[0], model.unet, model.text_encoders,
                                        model.arch)
    base_loss = denoising_loss(model, final, latents, DEMO_TRIGGER, 0.0)
    lora_loss = denoising_loss(model, final, latents, DEMO_TRIGGER, 1.0)
    summary = {"checkpoints": [str(c) for c in checkpoints], "loss_png": str(out / "loss.png"),
               "grid_png": str(out / "grid.png"), "log_dir": result.log_dir,
               "denoising_loss_base": base_loss, "denoising_loss_lora": lora_loss,
               "reduction": 1 - lora_loss / base_loss, "seconds": round(time.monotonic() - start, 1)}
    (out / "eval.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    print(f"\ndemo done in {summary['seconds']} s. Output in {out}:", file=sys.stderr)
    for c in checkpoints:
        print(f"  {c}  (+ {c.with_suffix('.json').name})", file=sys.stderr)
    print(f"  {out / 'loss.png'}\n  {out / 'grid.png'} (+ grid.json, grid-cells/)\n  {out / 'eval.json'}",
          file=sys.stderr)
    print("note: tiny-sd1 has random weights, so its images are noise patterns, not dogs; the LoRA's effect shows "
          "as pixel differences between the grid's rows and in the denoising loss below", file=sys.stderr)
    print(f"denoising loss on the photos: base {base_loss:.4f}, with the LoRA {lora_loss:.4f} "
          f"({summary['reduction']:.0%} lower)", file=sys.stderr)
    print(f"check a file: python -m lib_lora inspect {checkpoints[-1]}", file=sys.stderr)
    return summary
