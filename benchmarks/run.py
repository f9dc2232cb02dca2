"""Benchmarks of lib_lora's training step against its floor and against PEFT, memory, data path, growth, grid.

Run by hand (not in CI)::

    python benchmarks/run.py [--quick | --smoke] [--json FILE] [--threads N]

Every training-step variant runs in a fresh subprocess (``--worker``), so its peak RSS is its own: the peak is reset
(``/proc/self/clear_refs`` = 5) once the model and the optimizer are built, and ``VmHWM`` is read after the timed
steps (fallback: ``ru_maxrss``). Variants are interleaved round by round, so each round's ratios compare steps run
under the same machine load; figures are medians over steps and rounds, spreads are (min, max) of the per-round
ratios.

PEFT: optional. With transformers 4.30.2 (the WebUI's pin) peft 0.10.0 imports fine; install it beside, not into,
the venv::

    pip install --no-deps --target benchmarks/.peft-site peft==0.10.0 accelerate==0.30.1 psutil

``benchmarks/.peft-site`` (or ``--peft-site DIR``) is put on the PEFT worker's ``sys.path``. Without PEFT the
``peft_*`` figures are ``null`` and the table says so.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
DEFAULT_PEFT_SITE = ROOT / "benchmarks" / ".peft-site"
DREAMBOOTH = ROOT.parent / "shared" / "data" / "dreambooth"
RANK, ALPHA, LR = 32, 16.0, 1e-4


# ------------------------------------------------------------------------------------------------ memory helpers
def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _peak_rss_bytes(reset_ok: bool) -> int:
    hwm = _status_kb("VmHWM")
    if reset_ok and hwm is not None:
        return hwm * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kB


# ------------------------------------------------------------------------------------------------ models
def _fast_random_unet(cfg: dict):
    """The full ldm UNet with random weights, built on meta and filled in place (seconds instead of ldm's init)."""
    import torch

    from lib_lora.model import build

    unet = build.build_unet(cfg, device="meta").to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if p.dim() >= 2:
                bound = math.sqrt(3.0 / p[0].numel())
                p.uniform_(-bound, bound, generator=g)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
        for b in unet.buffers():
            b.zero_()
    return unet


def _build_unet(model: str):
    from lib_lora.model import build, configs

    if model == "tiny":
        return build.build_unet(configs.UNET_TINY_SD1, seed=0), configs.UNET_TINY_SD1["context_dim"]
    return _fast_random_unet(configs.UNET_SD1), configs.UNET_SD1["context_dim"]


def _target_names(unet) -> list[str]:
    """Module paths of the layers LoRANetwork.create targets on an SD1 UNet (192 on the SD1.5 UNet)."""
    from lib_lora.network import find_unet_targets

    ids = {id(t.layer) for t in find_unet_targets(unet, "sd1", include_conv=False)}
    return [n for n, m in unet.named_modules() if id(m) in ids]


# ------------------------------------------------------------------------------------------------ worker
def _prepared_unet(model: str, device, amp):
    """The UNet on ``device`` as a trainer holds it: frozen, train mode, SDPA attention; under mixed precision (as
    sd-scripts' weight_dtype and lib_lora's trainer do) in the autocast dtype with fp32 norm affines."""
    import torch

    from lib_lora.model.attention import use_sdpa

    unet, ctx_dim = _build_unet(model)
    unet.to(device, dtype=amp or torch.float32)
    if amp is not None:  # as lib_lora.model.headless.HeadlessModel.to: norm affines fp32, ldm's dtype attribute set
        for m in unet.modules():
            if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                m.float()
        unet.dtype = amp
    use_sdpa(unet)
    unet.requires_grad_(False)
    unet.train()
    return unet, ctx_dim


def _device_amp(spec: dict):
    """(torch.device, autocast dtype or None) of a worker spec."""
    import torch

    return torch.device(spec.get("device", "cpu")), {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
        spec.get("autocast") or "")


def _step_inputs(b: int, hw: int, ctx_dim: int, device):
    """Fixed random latents (b, 4, hw, hw), context (b, 77, ctx_dim), timesteps (b,) and target, on ``device``."""
    import torch

    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, 4, hw, hw, generator=g).to(device)
    ctx = torch.randn(b, 77, ctx_dim, generator=g).to(device)
    t = torch.randint(0, 1000, (b,), generator=g).to(device)
    target = torch.randn(b, 4, hw, hw, generator=g).to(device)
    return x, ctx, t, target


def _our_network(unet, device):
    """lib_lora's network on the UNet's 192 transformer-block layers (rank 32, alpha 16), train mode, and its
    trainable parameters."""
    from lib_lora.network import LoRANetwork

    net = LoRANetwork.create(unet, [], "sd1", network_dim=RANK, network_alpha=ALPHA, train_text_encoder=False)
    net.to(device)
    net.train()
    groups, _ = net.prepare_optimizer_params(None, LR, LR)
    return net, [p for g in groups for p in g["params"]]


def paired_worker(spec: dict) -> dict:
    """Floor and LoRA steps alternated in one process on one UNet (ABBA order: F L, L F, F L, ...), the network
    attached for LoRA steps only. No memory figure (one process holds both); for time, each pair runs back to back
    under the same machine load, so the per-pair ratio is far less noisy than one formed across processes."""
    import torch
    import torch.nn.functional as F

    from lib_lora.checkpointing import training_mode
    from lib_lora.recompute import tagged

    torch.set_num_threads(spec["threads"])
    device, amp = _device_amp(spec)
    cuda = device.type == "cuda"
    unet, ctx_dim = _prepared_unet(spec["model"], device, amp)
    net, params = _our_network(unet, device)
    opt = torch.optim.AdamW(params, lr=LR)
    x, ctx, t, target = _step_inputs(spec["batch"], spec["latent"], ctx_dim, device)
    autocast = torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()

    def step(lora: bool) -> float:
        if lora:
            net.attach()
        x.requires_grad_(not lora)
        s = time.perf_counter()
        with tagged(unet, enabled=lora):
            with autocast:
                pred = unet(x, t, context=ctx)
            F.mse_loss(pred.float(), target).backward()
        if lora:
            opt.step()
            opt.zero_grad(set_to_none=True)
        x.grad = None
        if cuda:
            torch.cuda.synchronize(device)
        took = time.perf_counter() - s
        if lora:
            net.detach()
        return took

    floor, lora = [], []
    with training_mode(unet, False):
        for i in range(spec["warmup"] + spec["steps"]):
            order = (False, True) if i % 2 == 0 else (True, False)
            times = {which: step(which) for which in order}
            if i >= spec["warmup"]:
                floor.append(times[False])
                lora.append(times[True])
    return {"floor": floor, "lora": lora, "pair_ratios": [a / f for a, f in zip(lora, floor)]}


def worker(spec: dict) -> dict:
    """One variant in this process: build, set up, warm up, time ``steps`` steps, report times and peak RSS."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(spec["threads"])
    if spec["variant"] == "peft" and spec.get("peft_site"):
        sys.path.insert(0, spec["peft_site"])
    from lib_lora import fused
    from lib_lora.checkpointing import training_mode
    from lib_lora.recompute import tagged

    fused.ENABLED = spec.get("fused", True)
    device, amp = _device_amp(spec)
    cuda = device.type == "cuda"
    t0 = time.perf_counter()
    unet, ctx_dim = _prepared_unet(spec["model"], device, amp)
    build_s = time.perf_counter() - t0
    variant, b, hw = spec["variant"], spec["batch"], spec["latent"]
    params, net, n_modules = [], None, 0
    if variant == "lora":
        net, params = _our_network(unet, device)
        n_modules = len(net.names())
        net.attach()
    elif variant == "peft":
        from peft import LoraConfig, inject_adapter_in_model

        names = _target_names(unet)
        cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=names, bias="none")
        unet = inject_adapter_in_model(cfg, unet)
        params = [p for n, p in unet.named_parameters() if "lora_" in n]
        for p in params:
            p.data = p.data.float()  # fp32 LoRA weights, as ours
            p.requires_grad_(True)
        n_modules = len(names)
    # Creating the first AdamW imports torch._dynamo and sympy (~110-150 MiB of code and data, measured here):
    # library state, not training memory. The floor builds one on a dummy parameter too, so every variant's peak RSS
    # holds the same libraries; the amount is recorded (``lib_rss``) so the ratio without it can be formed.
    rss_before_opt = (_status_kb("VmRSS") or 0) * 1024
    opt = torch.optim.AdamW(params if params else [torch.nn.Parameter(torch.zeros(1))], lr=LR)
    lib_rss = (_status_kb("VmRSS") or 0) * 1024 - rss_before_opt
    if not params:
        opt = None
    x, ctx, t, target = _step_inputs(b, hw, ctx_dim, device)
    if variant == "floor":
        x.requires_grad_(True)
    autocast = torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()

    def step() -> None:
        with autocast:
            pred = unet(x, t, context=ctx)
        loss = F.mse_loss(pred.float(), target)
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            x.grad = None

    times = []
    # Ours recomputes norm/GEGLU outputs that feed LoRA layers, and some of the frozen UNet's own saved activations,
    # instead of keeping them (off with checkpointing).
    # floor_lean: the floor with the frozen UNet's own recomputes (lib_lora.recompute) that a LoRA step also gets.
    lean = (variant == "lora" or spec.get("lean", False)) and not spec["ckpt"]
    with training_mode(unet, spec["ckpt"]), tagged(unet, enabled=lean):
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        reset_ok = _reset_peak()
        rss_setup = (_status_kb("VmRSS") or 0) * 1024
        alloc_setup = torch.cuda.memory_allocated(device) if cuda else 0
        step_peaks = []  # per step (warm-up included), so the table can say which step sets the peak
        for i in range(spec["warmup"] + spec["steps"]):
            if reset_ok and not cuda:
                _reset_peak()
            s = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize(device)
            if i >= spec["warmup"]:
                times.append(time.perf_counter() - s)
            step_peaks.append(_peak_rss_bytes(reset_ok) if not cuda else torch.cuda.max_memory_allocated(device))
    out = {"times": times, "peak_rss": max(step_peaks), "step_peaks": step_peaks, "rss_setup": rss_setup,
           "build_s": build_s, "modules": n_modules, "peak_reset": reset_ok, "lib_rss": lib_rss}
    if cuda:
        # On CUDA the memory figure is the allocator's peak (tensors only), as the issue asks.
        out.update(peak_rss=torch.cuda.max_memory_allocated(device), rss_setup=alloc_setup,
                   peak_host_rss=_peak_rss_bytes(reset_ok), gpu=torch.cuda.get_device_name(device))
    return out


def run_worker(spec: dict, inproc: bool = False) -> dict:
    """Runs :func:`worker` (:func:`paired_worker` for a ``paired`` spec) in a fresh subprocess (own peak RSS), or in
    this process for the tiny UNet / smoke mode."""
    if inproc:
        import gc

        res = (paired_worker if spec.get("paired") else worker)(spec)
        gc.collect()
        return res
    with tempfile.NamedTemporaryFile("r", suffix=".json", delete=False) as f:
        out = f.name
    try:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec), "--worker-out", out]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT))
        if proc.returncode != 0:
            raise RuntimeError(f"worker {spec} failed:\n{proc.stderr[-3000:]}")
        return json.loads(Path(out).read_text())
    finally:
        os.unlink(out)


def peft_version(site: str | None) -> str | None:
    """peft's version as a fresh interpreter (with ``site`` on its path) imports it; None when it cannot."""
    code = "import sys; sys.path.insert(0, sys.argv[1]) if sys.argv[1] else None; import peft; print(peft.__version__)"
    proc = subprocess.run([sys.executable, "-c", code, site or ""], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


# ------------------------------------------------------------------------------------------------ statistics
def med(xs):
    return statistics.median(xs) if xs else float("nan")


def spread(xs):
    return [min(xs), max(xs)] if xs else [float("nan"), float("nan")]


def step_section(model: str, variants: list[tuple[str, str, bool]], args, peft_site: str | None, log) -> dict:
    """Rounds of interleaved fresh-process variants; per-round ratios to the floor (time and peak RSS)."""
    runs: dict[str, list[dict]] = {key: [] for key, _, _ in variants}
    paired: list[dict] = []
    for r in range(args.rounds):
        for key, variant, ckpt in variants:
            spec = {"model": model, "variant": variant, "ckpt": ckpt, "batch": args.batch, "latent": args.latent,
                    "steps": args.steps, "warmup": args.warmup, "threads": args.threads, "peft_site": peft_site,
                    "device": args.device, "autocast": args.autocast, "fused": key != "lora_plain",
                    "lean": key == "floor_lean"}
            res = run_worker(spec, inproc=args.smoke or model == "tiny")
            runs[key].append(res)
            log(f"  [{model} round {r + 1}] {key:12s} step {med(res['times']):8.3f} s  "
                f"peak RSS {res['peak_rss'] / 2**20:8.0f} MiB  (build {res['build_s']:.1f} s)")
        if args.paired:
            spec = {"model": model, "paired": True, "batch": args.batch, "latent": args.latent, "steps": args.steps,
                    "warmup": args.warmup, "threads": args.threads, "device": args.device, "autocast": args.autocast}
            res = run_worker(spec, inproc=args.smoke or model == "tiny")
            paired.append(res)
            log(f"  [{model} round {r + 1}] paired       floor {med(res['floor']):8.3f} s  lora "
                f"{med(res['lora']):8.3f} s  ratio per pair {' '.join(f'{v:.3f}' for v in res['pair_ratios'])}")
    out: dict = {"variants": {}}
    for key in runs:
        times = [t for res in runs[key] for t in res["times"]]
        out["variants"][key] = {
            "step_s_median": med(times), "step_s_spread": spread(times),
            "peak_rss_median": med([res["peak_rss"] for res in runs[key]]),
            "rss_setup_median": med([res["rss_setup"] for res in runs[key]]),
            "modules": runs[key][0]["modules"], "times": times,
            "lib_rss_median": med([res["lib_rss"] for res in runs[key]]),
        }
    for key in runs:
        if key == "floor":
            continue
        tr = [med(a["times"]) / med(f["times"]) for a, f in zip(runs[key], runs["floor"])]
        mr = [a["peak_rss"] / f["peak_rss"] for a, f in zip(runs[key], runs["floor"])]
        out[f"time_ratio_{key}"] = {"median": med(tr), "spread": spread(tr), "per_round": tr}
        out[f"mem_ratio_{key}"] = {"median": med(mr), "spread": spread(mr), "per_round": mr}
        if args.device == "cpu":
            # The same ratio against a floor process that never imported the optimizer's libraries.
            mr = [a["peak_rss"] / (f["peak_rss"] - f["lib_rss"]) for a, f in zip(runs[key], runs["floor"])]
            out[f"mem_ratio_{key}_vs_bare_floor"] = {"median": med(mr), "spread": spread(mr), "per_round": mr}
    if paired:
        pr = [v for res in paired for v in res["pair_ratios"]]
        rounds = [med(res["pair_ratios"]) for res in paired]
        out["paired_time_ratio_lora"] = {"median": med(pr), "spread": spread(pr), "per_round": rounds,
                                         "floor_s": [v for res in paired for v in res["floor"]],
                                         "lora_s": [v for res in paired for v in res["lora"]]}
    if "floor_lean" in runs:
        tr = [med(a["times"]) / med(f["times"]) for a, f in zip(runs["lora"], runs["floor_lean"])]
        mr = [a["peak_rss"] / f["peak_rss"] for a, f in zip(runs["lora"], runs["floor_lean"])]
        out["ours_over_floor_lean_time"] = {"median": med(tr), "spread": spread(tr), "per_round": tr}
        out["ours_over_floor_lean_mem"] = {"median": med(mr), "spread": spread(mr), "per_round": mr}
    if "peft" in runs:
        tr = [med(a["times"]) / med(p["times"]) for a, p in zip(runs["lora"], runs["peft"])]
        mr = [a["peak_rss"] / p["peak_rss"] for a, p in zip(runs["lora"], runs["peft"])]
        out["ours_over_peft_time"] = {"median": med(tr), "spread": spread(tr), "per_round": tr}
        out["ours_over_peft_mem"] = {"median": med(mr), "spread": spread(mr), "per_round": mr}
    return out


def growth_section(args, log) -> dict:
    """LoRA step time over batch (at the main latent size) and latent size (at batch 2), SD1.5-size UNet."""
    points = args.growth_points
    rows = []
    for b, hw in points:
        spec = {"model": args.growth_model, "variant": "lora", "ckpt": False, "batch": b, "latent": hw,
                "steps": args.growth_steps, "warmup": args.growth_warmup, "threads": args.threads, "peft_site": None,
                "device": args.device, "autocast": args.autocast}
        res = run_worker(spec, inproc=args.smoke or args.growth_model == "tiny")
        rows.append({"batch": b, "latent": hw, "step_s_median": med(res["times"]),
                     "step_s_spread": spread(res["times"]), "peak_rss": res["peak_rss"], "rss_setup": res["rss_setup"]})
        log(f"  [growth] batch {b} latent {hw}x{hw}: {med(res['times']):.3f} s, "
            f"peak RSS {res['peak_rss'] / 2**20:.0f} MiB")
    base = next((r for r in rows if r["batch"] == 2 and r["latent"] == args.latent), rows[0])
    for r in rows:
        work = (r["batch"] * r["latent"] ** 2) / (base["batch"] * base["latent"] ** 2)
        r["time_vs_base"] = r["step_s_median"] / base["step_s_median"]
        r["work_vs_base"] = work
        r["time_per_work_vs_base"] = r["time_vs_base"] / work
        r["activation_mem_vs_base"] = ((r["peak_rss"] - r["rss_setup"]) /
                                       max(1, base["peak_rss"] - base["rss_setup"]))
    return {"model": args.growth_model, "rows": rows}


# ------------------------------------------------------------------------------------------------ data path
def data_section(args, log) -> dict:
    import torch

    from lib_lora.data.buckets import BucketSpec
    from lib_lora.data.dataset import ScanOptions, TrainDataset, scan_dataset
    from lib_lora.model import build, configs

    torch.set_num_threads(args.threads)
    root = Path(args.data_dir)
    folders = sorted(p for p in root.iterdir() if p.is_dir())[: args.data_folders]
    vae = build.build_vae(configs.VAE_TINY, seed=0)
    vae.eval()
    out = {"vae": "VAE_TINY (tiny-sd1's VAE: the figure is the data path, not the encoder)", "folders": len(folders)}
    for res in args.data_sizes:
        calls = {"n": 0}

        def encode(pixels, _calls=calls):
            _calls["n"] += 1
            with torch.no_grad():
                return vae.encode(pixels).sample()

        t0 = time.perf_counter()
        images = []
        for folder in folders:
            images.extend(scan_dataset(folder, ScanOptions(class_tokens=folder.name)).images)
        ds = TrainDataset(images, encode, buckets=BucketSpec(resolution=(res, res)), batch_size=1, cache="memory")
        n1 = sum(len(bt.captions) for bt in ds.batches(1))
        e1, calls1 = time.perf_counter() - t0, calls["n"]
        t0 = time.perf_counter()
        n2 = sum(len(bt.captions) for bt in ds.batches(2))
        e2, calls2 = time.perf_counter() - t0, calls["n"] - calls1
        out[str(res)] = {"images": n1, "epoch1_s": e1, "epoch2_s": e2, "images_per_s_epoch1": n1 / e1,
                         "images_per_s_epoch2": n2 / e2, "vae_calls_epoch1": calls1, "vae_calls_epoch2": calls2,
                         "epoch2_over_epoch1": (e2 / n2) / (e1 / n1)}
        log(f"  [data {res}px] {n1} images: epoch 1 {e1:.2f} s ({n1 / e1:.1f} img/s, {calls1} VAE calls), "
            f"epoch 2 {e2:.4f} s ({calls2} VAE calls)")
    return out


# ------------------------------------------------------------------------------------------------ grid
def grid_section(args, log) -> dict:
    """The grid CLI's per-cell time against plain txt2img on tiny-sd1 (same prompt, steps, size, seed).

    One untimed grid and generation first (first-call costs), then ``args.grid_rounds`` rounds, each timing one
    whole grid (``render_run_grid``: LoRA loading, weight switching, cell PNGs, the grid image and its JSON; the
    base model is loaded once, apart, as a plain generation has no load either) between two halves of as many plain
    generations as the grid has cells, so that a slow spell of a shared machine weighs on both sides. ``overhead``
    is the median of the per-round ratios, minus 1. ``own_ms_per_cell`` is the grid's time outside its txt2img
    calls (timed inside it) per cell: the grid's own work, far less noisy than the difference of two totals, and
    ``own_overhead`` that over the plain generation time.
    """
    import contextlib
    import io

    import torch
    from safetensors.torch import save_file

    import lib_lora.model.headless as headless
    import lib_lora.model.sampler as sampler
    from lib_lora.cli_grid import render_run_grid
    from lib_lora.model.headless import load_model
    from lib_lora.model.sampler import txt2img
    from lib_lora.network import LoRANetwork

    torch.set_num_threads(args.threads)
    s = time.perf_counter()
    model = load_model("tiny-sd1")
    base_load_s = time.perf_counter() - s
    weights = args.grid_weights
    steps, size, prompt = args.grid_steps, 64, "a photo of a sks dog"
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i in range(args.grid_files):
            net = LoRANetwork.create(model.unet, model.text_encoders, model.arch, network_dim=4, network_alpha=4)
            with torch.no_grad():
                for m in net.lora_modules():
                    m.lora_up.weight.normal_(0, 0.01)
            path = Path(tmp) / f"lora{i}.safetensors"
            save_file(net.kohya_state_dict(), str(path))
            files.append(str(path))
        ns = argparse.Namespace(run=None, files=files, weights=",".join(map(str, weights)), prompt=prompt,
                                negative="", seed=[0], base="tiny-sd1", size=size, steps=steps, cfg_scale=7.0,
                                part="both", other_weight=1.0, baseline=False, trigger=None, no_trigger=True,
                                device="cpu", output=str(Path(tmp) / "grid.png"), clip_model=None)
        n_cells = len(files) * len(weights)

        def grid(cells: int) -> tuple[float, float]:
            """(seconds per cell, seconds per cell outside txt2img)."""
            inside = []

            def timed_txt2img(*a, **k):
                s = time.perf_counter()
                try:
                    return org_txt2img(*a, **k)
                finally:
                    inside.append(time.perf_counter() - s)

            headless.load_model, org_load = (lambda *a, **k: model), headless.load_model
            sampler.txt2img, org_txt2img = timed_txt2img, sampler.txt2img
            s = time.perf_counter()
            try:
                with contextlib.redirect_stderr(io.StringIO()):
                    render_run_grid(ns)
            finally:
                total = time.perf_counter() - s
                headless.load_model, sampler.txt2img = org_load, org_txt2img
            return total / cells, (total - sum(inside)) / cells

        def plain(cells: int) -> float:
            s = time.perf_counter()
            with torch.no_grad():
                for _ in range(cells):
                    txt2img(model, prompt, negative_prompt="", steps=steps, cfg_scale=7.0, width=size, height=size,
                            seed=0)
            return (time.perf_counter() - s) / cells

        grid(n_cells)  # warm-up, untimed
        plain(1)
        grid_t, own_t, plain_t = [], [], []
        first = n_cells // 2
        for r in range(args.grid_rounds):
            before = plain(first) * first if first else 0.0
            per_cell, own = grid(n_cells)
            after = plain(n_cells - first) * (n_cells - first)
            grid_t.append(per_cell)
            own_t.append(own)
            plain_t.append((before + after) / n_cells)
            log(f"  [grid round {r + 1}] {per_cell * 1000:.1f} ms/cell ({own * 1000:.1f} ms outside txt2img) vs "
                f"plain {plain_t[-1] * 1000:.1f} ms/gen ({per_cell / plain_t[-1] - 1.0:+.3f})")
    ratios = [gt / pt for gt, pt in zip(grid_t, plain_t)]
    own_ratios = [ot / pt for ot, pt in zip(own_t, plain_t)]
    log(f"  [grid] {args.grid_files} files x {len(weights)} weights, {args.grid_rounds} rounds: "
        f"{med(grid_t) * 1000:.1f} ms/cell vs plain {med(plain_t) * 1000:.1f} ms/gen, overhead "
        f"{med(ratios) - 1.0:+.3f}; own work {med(own_t) * 1000:.1f} ms/cell ({med(own_ratios):+.3f})")
    return {"cells": n_cells, "files": args.grid_files, "weights": list(weights), "rounds": args.grid_rounds,
            "steps": steps, "base_load_s": base_load_s, "size": size, "grid_s_per_cell": med(grid_t),
            "grid_s_per_cell_spread": spread(grid_t), "plain_s_per_gen": med(plain_t),
            "plain_s_per_gen_spread": spread(plain_t), "overhead": med(ratios) - 1.0,
            "overhead_spread": [r - 1.0 for r in spread(ratios)], "overhead_per_round": [r - 1.0 for r in ratios],
            "own_ms_per_cell": med(own_t) * 1000, "own_ms_per_cell_spread": [v * 1000 for v in spread(own_t)],
            "own_overhead": med(own_ratios), "own_overhead_spread": spread(own_ratios)}


# ------------------------------------------------------------------------------------------------ main
def machine_info(threads: int, peft_ver: str | None) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    def ver(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {"python": platform.python_version(), "platform": platform.platform(), "processor": platform.processor(),
            "cpu_count": os.cpu_count(), "torch": ver("torch"), "transformers": ver("transformers"),
            "open_clip": ver("open-clip-torch"), "diffusers": ver("diffusers"), "safetensors": ver("safetensors"),
            "stable_diffusion_sdkit": ver("stable-diffusion-sdkit"),
            "peft": peft_ver, "torch_threads": threads,
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


def configure(args) -> None:
    """Fills the mode-dependent settings (full, --quick, --smoke)."""
    if args.smoke:
        args.models, args.rounds, args.steps, args.warmup = ["tiny"], 1, 1, 0
        args.growth_model, args.growth_points, args.growth_steps, args.growth_warmup = "tiny", [(2, 16)], 1, 0
        args.data_sizes, args.data_folders = [256], 1
        args.grid_files, args.grid_weights, args.grid_steps, args.grid_rounds = 1, [1.0], 2, 1
        args.latent = 16
    elif args.quick:
        args.models, args.rounds, args.steps, args.warmup = ["tiny", "sd15"], 1, 1, 1
        args.growth_model, args.growth_points = "sd15", [(1, 16), (2, 16)]
        args.growth_steps, args.growth_warmup = 1, 0
        args.data_sizes, args.data_folders = [256, 512], 2
        args.grid_files, args.grid_weights, args.grid_steps, args.grid_rounds = 2, [0.5, 1.0], 4, 3
        args.latent = 16
    else:
        args.models = ["tiny", "sd15"]
        args.growth_model = "sd15"
        args.growth_points = [(2, 32), (1, 32), (4, 32), (2, 16), (2, 64)]
        args.growth_steps, args.growth_warmup = 1, 0
        args.data_sizes, args.data_folders = [256, 512], 100
        # The grid Script's default Y axis: weights 0.1 ... 1.0, here for two checkpoints.
        args.grid_files, args.grid_weights, args.grid_steps = 2, [round(0.1 * i, 1) for i in range(1, 11)], 10
        args.grid_rounds = 5


def _growth_points(text: str) -> list[tuple[int, int]]:
    """``"1x64,2x64"`` -> [(1, 64), (2, 64)] (batch x latent side, both >= 1); argparse reports a bad value."""
    try:
        points = [tuple(int(v) for v in p.split("x")) for p in text.split(",")]
    except ValueError:
        points = []
    if not points or any(len(p) != 2 or min(p) < 1 for p in points):
        raise argparse.ArgumentTypeError(f"expected BATCHxLATENT[,BATCHxLATENT...], e.g. 1x64,2x32; got {text!r}")
    return points


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="SD1.5-size at 16x16 latents, one round (~3-5 min)")
    ap.add_argument("--smoke", action="store_true", help="tiny UNet only, one step (tests)")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: stable numbers)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of interleaved variants")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per variant and round")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--latent", type=int, default=32, help="latent side (32 = 256 px)")
    ap.add_argument("--no-peft", action="store_true")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N] (CUDA: memory = peak allocated)")
    ap.add_argument("--autocast", default=None, choices=["bf16", "fp16"],
                    help="mixed precision: UNet weights in this dtype, autocast around the forward, fp32 LoRA")
    ap.add_argument("--growth-points", default=None, type=_growth_points,
                    help="batch x latent points of the growth table, e.g. 1x64,2x64,4x64,2x32 (default by mode)")
    ap.add_argument("--ab-fused", action="store_true",
                    help="also time ours with the fused LoRA Linear path off (variant lora_plain)")
    ap.add_argument("--paired", action="store_true",
                    help="also time floor and LoRA steps alternated in one process (paired_time_ratio_lora)")
    ap.add_argument("--paired-only", action="store_true", help="of the step section, run the paired timing only")
    ap.add_argument("--skip", nargs="*", default=[], choices=["steps", "growth", "data", "grid"])
    ap.add_argument("--peft-site", default=None, help=f"extra sys.path for peft (default {DEFAULT_PEFT_SITE} if any)")
    ap.add_argument("--data-dir", default=str(DREAMBOOTH))
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        res = (paired_worker if spec.get("paired") else worker)(spec)
        Path(args.worker_out).write_text(json.dumps(res))
        return 0
    rounds, steps, warmup, latent, points = args.rounds, args.steps, args.warmup, args.latent, args.growth_points
    configure(args)
    if not (args.smoke or args.quick):
        args.rounds, args.steps, args.warmup, args.latent = rounds, steps, warmup, latent
    args.paired = args.paired or args.paired_only
    if points:
        args.growth_points = points
    if args.device != "cpu":
        # One step without warm-up times CUDA's first-call work (kernel choice, allocator growth), not the step.
        args.growth_steps, args.growth_warmup = args.steps, args.warmup
    site = args.peft_site or (str(DEFAULT_PEFT_SITE) if DEFAULT_PEFT_SITE.is_dir() else None)
    peft_ver = None if args.no_peft else peft_version(site)
    use_peft = peft_ver is not None
    started = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f} s] {msg}", flush=True)

    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    result: dict = {"mode": mode, "machine": machine_info(args.threads, peft_ver),
                    "settings": {"batch": args.batch, "latent": args.latent, "rank": RANK, "alpha": ALPHA,
                                 "rounds": args.rounds, "steps": args.steps, "warmup": args.warmup,
                                 "device": args.device, "autocast": args.autocast,
                                 "optimizer": f"AdamW lr {LR}", "peft": use_peft}}
    nan = float("nan")
    if "steps" not in args.skip:
        for model in args.models:
            # floor_lean: the floor with the frozen UNet's own saved activations trimmed as a LoRA step trims them
            # (lib_lora.recompute), so the table separates that saving from the LoRA's own cost.
            variants = [("floor", "floor", False), ("floor_lean", "floor", False), ("lora", "lora", False),
                        ("lora_ckpt", "lora", True)]
            if args.ab_fused:
                variants.append(("lora_plain", "lora", False))
            if model == "tiny":
                variants.append(("floor_ckpt", "floor", True))
            if use_peft:
                variants.append(("peft", "peft", False))
            if args.paired_only:
                variants = []
            log(f"training step, {model}: batch {args.batch}, latent {args.latent}x{args.latent}, rank {RANK}")
            result[f"steps_{model}"] = step_section(model, variants, args, site, log)
    if "growth" not in args.skip:
        log("growth")
        result["growth"] = growth_section(args, log)
    if "data" not in args.skip and Path(args.data_dir).is_dir():
        log("data path")
        result["data"] = data_section(args, log)
    if "grid" not in args.skip:
        log("grid")
        result["grid"] = grid_section(args, log)

    main_model = "sd15" if "steps_sd15" in result else "tiny"
    st = result.get(f"steps_{main_model}", {})

    def fig(section: dict, key: str) -> float | None:
        """The median of a ratio; None for a PEFT figure without PEFT, NaN for a section that was skipped."""
        v = section.get(key)
        if v:
            return v["median"]
        return None if "peft" in key else nan

    summary = {
        "model_for_sd15_keys": main_model,
        "floor_ratio_sd15": fig(st, "time_ratio_lora"),
        "floor_ratio_sd15_ckpt": fig(st, "time_ratio_lora_ckpt"),
        "floor_ckpt_ratio_sd15": fig(st, "time_ratio_floor_ckpt"),
        "mem_floor_ratio_sd15": fig(st, "mem_ratio_lora"),
        "mem_floor_ratio_sd15_ckpt": fig(st, "mem_ratio_lora_ckpt"),
        "peft_time_ratio_sd15": fig(st, "ours_over_peft_time"),
        "peft_mem_ratio_sd15": fig(st, "ours_over_peft_mem"),
        "peft_floor_ratio_sd15": fig(st, "time_ratio_peft"),
        "peft_mem_floor_ratio_sd15": fig(st, "mem_ratio_peft"),
        "floor_ratio_tiny": fig(result.get("steps_tiny", {}), "time_ratio_lora"),
        "floor_ratio_tiny_ckpt": fig(result.get("steps_tiny", {}), "time_ratio_lora_ckpt"),
        "epoch2_over_epoch1": max((v["epoch2_over_epoch1"] for k, v in result.get("data", {}).items()
                                   if isinstance(v, dict)), default=nan),
        "vae_calls_epoch2": sum(v["vae_calls_epoch2"] for v in result.get("data", {}).values() if isinstance(v, dict)),
        "grid_cell_overhead": result.get("grid", {}).get("overhead", nan),
        "grid_own_overhead": result.get("grid", {}).get("own_overhead", nan),
        "mem_floor_ratio_sd15_bare_floor": fig(st, "mem_ratio_lora_vs_bare_floor"),
        "floor_lean_ratio_sd15": fig(st, "ours_over_floor_lean_time"),
        "floor_ratio_sd15_paired": fig(st, "paired_time_ratio_lora"),
        "mem_floor_lean_ratio_sd15": fig(st, "ours_over_floor_lean_mem"),
    }
    result.update(summary)
    result["total_s"] = time.perf_counter() - started
    print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def print_table(result: dict) -> None:
    print()
    print(f"{'figure':34s} {'median':>8s}  {'spread (min-max)':>18s}  target")
    targets = {"time_ratio_lora": "<= 1.05", "mem_ratio_lora": "<= 1.05", "ours_over_peft_time": "<= 1.00",
               "ours_over_peft_mem": "<= 1.00"}
    for model in ("tiny", "sd15"):
        st = result.get(f"steps_{model}")
        if not st:
            continue
        for key in ("time_ratio_lora", "time_ratio_lora_ckpt", "time_ratio_floor_ckpt", "time_ratio_peft",
                    "paired_time_ratio_lora", "time_ratio_lora_plain", "time_ratio_floor_lean",
                    "ours_over_floor_lean_time",
                    "ours_over_peft_time", "mem_ratio_lora", "mem_ratio_lora_vs_bare_floor", "mem_ratio_lora_ckpt",
                    "mem_ratio_peft", "mem_ratio_lora_plain", "mem_ratio_floor_lean", "ours_over_floor_lean_mem",
                    "ours_over_peft_mem"):
            v = st.get(key)
            if v is None:
                continue
            lo, hi = v["spread"]
            print(f"{model + ' ' + key:34s} {v['median']:8.3f}  {lo:8.3f} - {hi:7.3f}  {targets.get(key, '')}")
        for key, v in st["variants"].items():
            lo, hi = v["step_s_spread"]
            mem = "peak allocated" if result["settings"].get("device", "cpu") != "cpu" else "peak RSS"
            print(f"{model + ' step s ' + key:34s} {v['step_s_median']:8.3f}  {lo:8.3f} - {hi:7.3f}  "
                  f"{mem} {v['peak_rss_median'] / 2**20:.0f} MiB")
    if "growth" in result:
        print(f"\ngrowth ({result['growth']['model']}, LoRA step): batch latent  s/step  x base  work  x/work  act-mem")
        for r in result["growth"]["rows"]:
            print(f"  {r['batch']:5d} {r['latent']:6d}  {r['step_s_median']:8.3f} {r['time_vs_base']:6.2f} "
                  f"{r['work_vs_base']:5.2f} {r['time_per_work_vs_base']:7.2f} {r['activation_mem_vs_base']:7.2f}")
    for k, v in result.get("data", {}).items():
        if isinstance(v, dict):
            print(f"data {k}px: {v['images']} images, epoch 1 {v['images_per_s_epoch1']:.1f} img/s "
                  f"({v['vae_calls_epoch1']} VAE calls), epoch 2 {v['images_per_s_epoch2']:.0f} img/s "
                  f"({v['vae_calls_epoch2']} VAE calls), time/image epoch2/epoch1 {v['epoch2_over_epoch1']:.4f}")
    if "grid" in result:
        g = result["grid"]
        print(f"grid: {g['grid_s_per_cell'] * 1000:.1f} ms/cell vs plain {g['plain_s_per_gen'] * 1000:.1f} ms, "
              f"overhead {g['overhead']:+.3f} ({g['overhead_spread'][0]:+.3f} .. {g['overhead_spread'][1]:+.3f}); "
              f"own work {g['own_ms_per_cell']:.1f} ms/cell = {g['own_overhead']:+.3f} "
              f"({g['own_overhead_spread'][0]:+.3f} .. {g['own_overhead_spread'][1]:+.3f})")
    print()
    for key in ("floor_ratio_sd15", "floor_ratio_sd15_ckpt", "peft_time_ratio_sd15", "peft_mem_ratio_sd15",
                "mem_floor_ratio_sd15", "epoch2_over_epoch1", "grid_cell_overhead"):
        print(f"{key:24s} {_fmt(result.get(key))}")
    print(f"(sd15 keys measured on: {result['model_for_sd15_keys']}; total {result['total_s']:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
