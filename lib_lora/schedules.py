"""Pure schedules of the training loop: learning-rate factors, timestep sampling, noise, the DDPM forward process and
min-SNR loss weights.

Everything here is a function of its arguments: random draws take an explicit ``torch.Generator``, tensors land on an
explicit ``device``, and nothing keeps hidden state. The conventions are those of sd-scripts (``train_network.py``,
``library/train_util.py``, ``library/custom_train_functions.py``) and of the diffusers / transformers code it calls
(``get_scheduler``, ``DDPMScheduler.add_noise`` / ``get_velocity``).

Learning-rate factor functions share one signature, so the UI can list them from :data:`LR_SCHEDULES`::

    fn(step, total_steps, warmup_steps=0, *, num_cycles=1.0, power=1.0, lr_end_ratio=0.0) -> float

``step`` counts scheduler steps already taken (``LambdaLR.last_epoch``: 0 for the first optimizer step), and the
factor multiplies each parameter group's base learning rate. Options a schedule does not use are ignored.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from .errors import ConfigError

# --------------------------------------------------------------------------------------------------------------------
# Learning-rate factors
# --------------------------------------------------------------------------------------------------------------------

LrFactorFn = Callable[..., float]


def _warmup_ramp(step: int, warmup_steps: int) -> float:
    # The ramp of every diffusers/transformers "*_with_warmup" schedule: 0 at step 0, (W-1)/W just before W.
    return float(step) / float(max(1, warmup_steps))


def lr_constant(step: int, total_steps: int, warmup_steps: int = 0, *, num_cycles: float = 1.0, power: float = 1.0,
                lr_end_ratio: float = 0.0) -> float:
    """Factor 1.0 at every step (diffusers ``get_constant_schedule``; sd-scripts' default ``--lr_scheduler``).

    Args:
        step, total_steps: scheduler steps; unused.
        warmup_steps: must be 0; the other options are ignored.

    Returns:
        1.0.

    Raises:
        ConfigError: ``warmup_steps`` is not 0. sd-scripts ``get_scheduler_fix`` refuses a warmup for "constant"
            ("constant does not require `num_warmup_steps`"); use "constant_with_warmup".
    """
    if warmup_steps:
        raise ConfigError(
            f"lr scheduler 'constant' takes no warmup, got warmup_steps={warmup_steps}; "
            "use 'constant_with_warmup' or set the warmup to 0"
        )
    return 1.0


def lr_constant_with_warmup(step: int, total_steps: int, warmup_steps: int = 0, *, num_cycles: float = 1.0,
                            power: float = 1.0, lr_end_ratio: float = 0.0) -> float:
    """Linear warmup from 0 to 1 over ``warmup_steps``, then 1.0 (diffusers ``get_constant_schedule_with_warmup``).

    Formula: ``step / max(1, W)`` for ``step < W``, else 1.0. ``total_steps`` and the options are unused.
    """
    if step < warmup_steps:
        return _warmup_ramp(step, warmup_steps)
    return 1.0


def lr_linear(step: int, total_steps: int, warmup_steps: int = 0, *, num_cycles: float = 1.0, power: float = 1.0,
              lr_end_ratio: float = 0.0) -> float:
    """Warmup, then linear decay to 0 at ``total_steps`` (diffusers ``get_linear_schedule_with_warmup``).

    Formula: ``step / max(1, W)`` for ``step < W``, else ``max(0, (T - step) / max(1, T - W))``.
    """
    if step < warmup_steps:
        return _warmup_ramp(step, warmup_steps)
    return max(0.0, float(total_steps - step) / float(max(1, total_steps - warmup_steps)))


def lr_cosine(step: int, total_steps: int, warmup_steps: int = 0, *, num_cycles: float = 1.0, power: float = 1.0,
              lr_end_ratio: float = 0.0) -> float:
    """Warmup, then a half cosine from 1 to 0 at ``total_steps`` (diffusers ``get_cosine_schedule_with_warmup``).

    Formula: with ``p = (step - W) / max(1, T - W)``, ``max(0, 0.5 * (1 + cos(pi * 2 * 0.5 * p)))``. The half period
    (diffusers' default ``num_cycles=0.5``) is fixed, as in diffusers' and sd-scripts' ``get_scheduler``, which never
    pass ``num_cycles`` to "cosine"; the ``num_cycles`` option is ignored. At ``p = 0.5`` the factor is 0.5.
    """
    if step < warmup_steps:
        return _warmup_ramp(step, warmup_steps)
    progress = float(step - warmup_steps) / float(max(1, total_steps - warmup_steps))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))


def lr_cosine_with_restarts(step: int, total_steps: int, warmup_steps: int = 0, *, num_cycles: float = 1.0,
                            power: float = 1.0, lr_end_ratio: float = 0.0) -> float:
    """Warmup, then ``num_cycles`` half cosines from 1 to 0 with hard restarts (diffusers
    ``get_cosine_with_hard_restarts_schedule_with_warmup``; sd-scripts ``--lr_scheduler_num_cycles``, default 1).

    Formula: with ``p = (step - W) / max(1, T - W)``: 0.0 once ``p >= 1``, else
    ``max(0, 0.5 * (1 + cos(pi * ((num_cycles * p) % 1))))``.
    """
    if step < warmup_steps:
        return _warmup_ramp(step, warmup_steps)
    progress = float(step - warmup_steps) / float(max(1, total_steps - warmup_steps))
    if progress >= 1.0:
        return 0.0
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((float(num_cycles) * progress) % 1.0))))


def lr_polynomial(step: int, total_steps: int, warmup_steps: int = 0, *, num_cycles: float = 1.0, power: float = 1.0,
                  lr_end_ratio: float = 0.0) -> float:
    """Warmup, then polynomial decay from 1 to ``lr_end_ratio`` at ``total_steps`` (diffusers
    ``get_polynomial_decay_schedule_with_warmup``; sd-scripts ``--lr_scheduler_power``, default 1.0 = linear).

    Formula, with ``r = lr_end_ratio`` (diffusers' ``lr_end / lr_init``): ``step / max(1, W)`` for ``step < W``;
    ``r`` for ``step > T``; else ``(1 - r) * (1 - (step - W) / (T - W)) ** power + r``. ``T - W`` is clamped to
    at least 1, where diffusers would divide by zero when ``W == T``.

    Raises:
        ConfigError: ``lr_end_ratio`` is not in [0, 1) (diffusers: "lr_end must be smaller than initial lr").
    """
    if not 0.0 <= lr_end_ratio < 1.0:
        raise ConfigError(f"polynomial lr_end_ratio must be in [0, 1), got {lr_end_ratio}")
    if step < warmup_steps:
        return _warmup_ramp(step, warmup_steps)
    if step > total_steps:
        return lr_end_ratio
    decay_steps = max(1, total_steps - warmup_steps)
    pct_remaining = 1.0 - (step - warmup_steps) / decay_steps
    return (1.0 - lr_end_ratio) * pct_remaining**power + lr_end_ratio


LR_SCHEDULES: dict[str, LrFactorFn] = {
    "constant": lr_constant,
    "constant_with_warmup": lr_constant_with_warmup,
    "linear": lr_linear,
    "cosine": lr_cosine,
    "cosine_with_restarts": lr_cosine_with_restarts,
    "polynomial": lr_polynomial,
}
"""Scheduler name (sd-scripts ``--lr_scheduler`` spelling) -> factor function, in UI order."""


def get_lr_schedule(name: str) -> LrFactorFn:
    """Looks a factor function up by its sd-scripts name (case-insensitive, surrounding spaces ignored).

    Raises:
        ConfigError: unknown name; the message lists the names of :data:`LR_SCHEDULES`.
    """
    key = str(name).strip().lower()
    if key not in LR_SCHEDULES:
        raise ConfigError(f"unknown lr scheduler {name!r}; choose one of: {', '.join(LR_SCHEDULES)}")
    return LR_SCHEDULES[key]


def resolve_warmup_steps(warmup: int | float | None, total_steps: int) -> int:
    """Turns a warmup given as steps or as a fraction of the run into a step count.

    Follows sd-scripts ``get_scheduler_fix`` and its ``int_or_float`` argument type: an int is a step count; a float
    below 1 is a fraction of ``total_steps``, truncated (``int(warmup * total_steps)``). A float >= 1 with an integral
    value (e.g. 100.0 from a UI number field) is taken as a step count, as ``int_or_float("100")`` is. None means 0.

    Args:
        warmup: steps (int >= 0) or fraction (float in [0, 1)).
        total_steps: scheduler steps of the whole run (>= 1).

    Returns:
        Warmup in scheduler steps.

    Raises:
        ConfigError: negative values, a non-integral float >= 1, a bool, or ``total_steps < 1``.
    """
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ConfigError(f"total_steps must be an int >= 1, got {total_steps!r}")
    if warmup is None:
        return 0
    if isinstance(warmup, bool) or not isinstance(warmup, (int, float)):
        raise ConfigError(f"lr warmup must be an int (steps) or a float below 1 (fraction of steps), got {warmup!r}")
    if isinstance(warmup, float):
        if not math.isfinite(warmup) or warmup < 0:
            raise ConfigError(f"lr warmup must be >= 0, got {warmup}")
        if warmup < 1.0:
            return int(warmup * total_steps)
        if not warmup.is_integer():
            raise ConfigError(
                f"lr warmup {warmup} is neither a step count nor a fraction below 1; give an int or a value in [0, 1)"
            )
        return int(warmup)
    if warmup < 0:
        raise ConfigError(f"lr warmup must be >= 0, got {warmup}")
    return int(warmup)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, name: str, total_steps: int,
                       warmup: int | float | None = 0, *, num_cycles: float = 1.0, power: float = 1.0,
                       lr_end: float = 1e-7, multiplier: Callable[[], float] | None = None,
                       last_step: int = -1) -> torch.optim.lr_scheduler.LambdaLR:
    """Builds the ``LambdaLR`` that sd-scripts' ``get_scheduler_fix`` builds for ``name``.

    Args:
        optimizer: the optimizer whose groups' ``initial_lr`` the factor multiplies.
        name: a key of :data:`LR_SCHEDULES` (case-insensitive).
        total_steps: scheduler steps of the run (sd-scripts: ``max_train_steps * num_processes``).
        warmup: steps or fraction, see :func:`resolve_warmup_steps`. Must be 0/None for "constant".
        num_cycles: hard restarts of "cosine_with_restarts" (sd-scripts ``--lr_scheduler_num_cycles``, > 0).
        power: exponent of "polynomial" (``--lr_scheduler_power``, > 0).
        lr_end: final absolute learning rate of "polynomial"; the factor ends at ``lr_end / optimizer.defaults["lr"]``
            as in diffusers/transformers (default 1e-7, which sd-scripts does not override).
        multiplier: optional zero-argument callable whose value multiplies the factor each time the scheduler steps,
            e.g. ``lambda: plateau.lr_factor`` for :class:`lib_lora.plateau.PlateauController`. A change takes effect
            at the next ``scheduler.step()``.
        last_step: ``LambdaLR``'s ``last_epoch``; -1 for a fresh run. On resume prefer ``load_state_dict``.

    Returns:
        A ``torch.optim.lr_scheduler.LambdaLR``. Its lambda is a plain closure, so ``state_dict()`` holds only
        counters and can be saved with ``torch.save``.

    Raises:
        ConfigError: unknown name, bad warmup/total_steps, warmup given to "constant", ``num_cycles``/``power`` not
            > 0, or ``lr_end`` not below the optimizer's default lr for "polynomial".
    """
    fn = get_lr_schedule(name)
    warmup_steps = resolve_warmup_steps(warmup, total_steps)
    if fn is lr_constant and warmup_steps:
        fn(0, total_steps, warmup_steps)  # raises the ConfigError
    if not num_cycles > 0:
        raise ConfigError(f"num_cycles must be > 0, got {num_cycles}")
    if not power > 0:
        raise ConfigError(f"polynomial power must be > 0, got {power}")
    lr_end_ratio = 0.0
    if fn is lr_polynomial:
        lr_init = float(optimizer.defaults["lr"])
        if not lr_init > lr_end >= 0:
            raise ConfigError(f"polynomial lr_end ({lr_end}) must be >= 0 and smaller than the initial lr ({lr_init})")
        lr_end_ratio = lr_end / lr_init

    def lr_lambda(step: int) -> float:
        factor = fn(step, total_steps, warmup_steps, num_cycles=num_cycles, power=power, lr_end_ratio=lr_end_ratio)
        return factor * float(multiplier()) if multiplier is not None else factor

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda, last_epoch=last_step)


# --------------------------------------------------------------------------------------------------------------------
# Noise schedule (DDPM)
# --------------------------------------------------------------------------------------------------------------------


def ddpm_alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                        zero_terminal_snr: bool = False) -> torch.Tensor:
    """The SD training schedule: ``DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    num_train_timesteps=1000)`` as sd-scripts builds it (``NetworkTrainer.get_noise_scheduler``).

    ``betas = linspace(sqrt(beta_start), sqrt(beta_end), N) ** 2`` (float32, as diffusers), and
    ``alphas_cumprod = cumprod(1 - betas)``. With ``zero_terminal_snr`` the betas are first rescaled so that
    ``alphas_cumprod[-1] == 0`` (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed",
    Algorithm 1; sd-scripts ``fix_noise_scheduler_betas_for_zero_terminal_snr``, ``--zero_terminal_snr``).

    Returns:
        (num_train_timesteps,) float32 CPU tensor; ``[0] = 0.99915`` and ``[999] ~= 0.0046601`` for the defaults.

    Raises:
        ConfigError: ``num_train_timesteps < 2`` or betas outside (0, 1).
    """
    if num_train_timesteps < 2:
        raise ConfigError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
    if not 0 < beta_start <= beta_end < 1:
        raise ConfigError(f"need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    if zero_terminal_snr:
        sqrt_ab = torch.cumprod(1.0 - betas, dim=0).sqrt()
        first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
        sqrt_ab = (sqrt_ab - last) * (first / (first - last))
        ab = sqrt_ab**2
        alphas = torch.cat([ab[0:1], ab[1:] / ab[:-1]])
        betas = 1.0 - alphas
    return torch.cumprod(1.0 - betas, dim=0)


def sample_timesteps(batch: int, generator: torch.Generator, min_t: int = 0, max_t: int = 1000,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """Uniform integer timesteps in ``[min_t, max_t)``, one per sample (sd-scripts ``train_util.get_timesteps``,
    ``--min_timestep`` / ``--max_timestep``).

    The draw happens on ``generator.device`` and is then moved to ``device``, so a CPU generator gives the same
    timesteps whatever the training device (sd-scripts also draws on the CPU). As in sd-scripts, ``min_t == max_t``
    gives every sample ``max_t`` (a fixed timestep).

    Args:
        batch: B >= 1.
        generator: the random source; it is advanced.
        min_t, max_t: bounds in timesteps, ``0 <= min_t <= max_t``.
        device: where the result goes; None means ``generator.device``.

    Returns:
        (B,) int64 tensor.

    Raises:
        ConfigError: ``batch < 1``, ``min_t < 0`` or ``min_t > max_t``.
    """
    if batch < 1:
        raise ConfigError(f"batch must be >= 1, got {batch}")
    if min_t < 0 or min_t > max_t:
        raise ConfigError(f"need 0 <= min_timestep <= max_timestep, got {min_t}, {max_t}")
    if min_t == max_t:
        t = torch.full((batch,), max_t, dtype=torch.int64, device=generator.device)
    else:
        t = torch.randint(min_t, max_t, (batch,), generator=generator, device=generator.device, dtype=torch.int64)
    return t.to(device if device is not None else generator.device)


def make_noise(latents_shape: Sequence[int], generator: torch.Generator, noise_offset: float = 0.0, *,
               adaptive_noise_scale: float | None = None, latents: torch.Tensor | None = None,
               noise_offset_random_strength: bool = False, device: torch.device | str | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Training noise: N(0, 1) of ``latents_shape`` plus the optional offset noise of sd-scripts.

    Order of draws, as in sd-scripts ``get_noise_noisy_latents_and_timesteps`` (so a given generator state gives one
    result): the (B, C, H, W) noise; then, if ``noise_offset_random_strength``, one U(0, 1) scalar that multiplies the
    offset; then the (B, C, 1, 1) offset noise. Offset noise (``custom_train_functions.apply_noise_offset``,
    crosslabs.org "Diffusion with Offset Noise"): ``noise += offset * N(0, 1)[B, C, 1, 1]``. With
    ``adaptive_noise_scale`` s the offset becomes ``clamp(offset + s * |mean_{H,W}(latents)|, min=0)`` per sample and
    channel. An offset of 0 draws nothing more (sd-scripts skips a falsy ``--noise_offset``).

    Draws happen in float32 on ``generator.device``; the result is then cast to ``dtype`` and moved to ``device``.

    Args:
        latents_shape: (B, C, H, W).
        generator: the random source; it is advanced.
        noise_offset: ``--noise_offset`` (>= 0; sd-scripts suggests about 0.1).
        adaptive_noise_scale: ``--adaptive_noise_scale``; needs ``noise_offset`` and ``latents``.
        latents: (B, C, H, W) latents, only read for the adaptive scale.
        noise_offset_random_strength: ``--noise_offset_random_strength``.
        device: where the result goes; None means ``generator.device``.
        dtype: dtype of the result.

    Returns:
        (B, C, H, W) tensor.

    Raises:
        ConfigError: shape not 4-D, negative offset, adaptive scale without offset or without matching latents.
    """
    shape = tuple(int(s) for s in latents_shape)
    if len(shape) != 4:
        raise ConfigError(f"latents_shape must be (B, C, H, W), got {shape}")
    if noise_offset < 0:
        raise ConfigError(f"noise_offset must be >= 0, got {noise_offset}")
    if adaptive_noise_scale is not None:
        if not noise_offset:
            raise ConfigError("adaptive_noise_scale needs a noise_offset > 0 (as in sd-scripts)")
        if latents is None or tuple(latents.shape) != shape:
            got = None if latents is None else tuple(latents.shape)
            raise ConfigError(f"adaptive_noise_scale needs latents of shape {shape}, got {got}")
    gdev = generator.device
    noise = torch.randn(shape, generator=generator, device=gdev, dtype=torch.float32)
    if noise_offset:
        offset: float | torch.Tensor = noise_offset
        if noise_offset_random_strength:
            offset = torch.rand(1, generator=generator, device=gdev, dtype=torch.float32) * noise_offset
        if adaptive_noise_scale is not None:
            latent_mean = latents.detach().to(device=gdev, dtype=torch.float32).mean(dim=(2, 3), keepdim=True).abs()
            offset = torch.clamp(offset + adaptive_noise_scale * latent_mean, min=0.0)
        noise = noise + offset * torch.randn(shape[:2] + (1, 1), generator=generator, device=gdev,
                                             dtype=torch.float32)
    return noise.to(device=device if device is not None else gdev, dtype=dtype)


def _per_sample(values: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    # values[t] as (B, 1, ..., 1), on like's device and dtype: diffusers' add_noise broadcasting.
    v = values.to(device=like.device, dtype=like.dtype)[timesteps.to(like.device).long()].flatten()
    return v.reshape(v.shape + (1,) * (like.dim() - 1))


def add_noise(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
              alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """DDPM forward process ``x_t = sqrt(a_t) * x_0 + sqrt(1 - a_t) * noise`` with ``a_t = alphas_cumprod[t]``
    (diffusers ``DDPMScheduler.add_noise``; Ho et al. 2020, eq. 4).

    As diffusers does, ``alphas_cumprod`` is cast to the latents' dtype before the square roots.

    Args:
        latents: (B, ...) clean latents x_0.
        noise: same shape as ``latents``.
        timesteps: (B,) integer timesteps indexing ``alphas_cumprod``.
        alphas_cumprod: (N,) schedule, e.g. :func:`ddpm_alphas_cumprod` or the model's.

    Returns:
        (B, ...) noisy latents in the latents' dtype and device.
    """
    a = _per_sample(alphas_cumprod, timesteps, latents)
    return a**0.5 * latents + (1 - a) ** 0.5 * noise


def get_velocity(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                 alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """v-prediction target ``v = sqrt(a_t) * noise - sqrt(1 - a_t) * x_0`` (diffusers ``DDPMScheduler.get_velocity``;
    Salimans & Ho 2022, "Progressive Distillation"; sd-scripts ``--v_parameterization``).

    Args and return shapes as :func:`add_noise`.
    """
    a = _per_sample(alphas_cumprod, timesteps, latents)
    return a**0.5 * noise - (1 - a) ** 0.5 * latents


def snr(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ``a_t / (1 - a_t)`` per sample (sd-scripts ``prepare_scheduler_for_custom_training``
    ``all_snr = (sqrt(a) / sqrt(1 - a)) ** 2``; diffusers ``training_utils.compute_snr``).

    Args:
        timesteps: (B,) integer timesteps.
        alphas_cumprod: (N,) schedule.

    Returns:
        (B,) tensor in the schedule's dtype on the timesteps' device. 0 at a zero-terminal-SNR last step.
    """
    a = alphas_cumprod.to(timesteps.device)[timesteps.long()]
    return (a.sqrt() / (1.0 - a).sqrt()) ** 2


def min_snr_weight(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float,
                   v_prediction: bool = False) -> torch.Tensor:
    """Min-SNR-gamma loss weight (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy";
    sd-scripts ``apply_snr_weight``, ``--min_snr_gamma``, 5 recommended by the paper).

    ``min(SNR, gamma) / SNR`` for epsilon prediction, ``min(SNR, gamma) / (SNR + 1)`` for v-prediction. The weight
    multiplies the per-sample loss (already averaged over C, H, W). Where SNR is 0 (zero terminal SNR) the epsilon
    weight is its limit 1.0; sd-scripts yields NaN there.

    Args:
        timesteps: (B,) integer timesteps.
        alphas_cumprod: (N,) schedule.
        gamma: the cap, > 0.
        v_prediction: the model predicts v.

    Returns:
        (B,) float32 weights on the timesteps' device.

    Raises:
        ConfigError: ``gamma <= 0``.
    """
    if not gamma > 0:
        raise ConfigError(f"min_snr_gamma must be > 0, got {gamma}")
    s = snr(timesteps, alphas_cumprod).float()
    capped = torch.clamp(s, max=float(gamma))
    if v_prediction:
        return capped / (s + 1.0)
    return torch.where(s > 0, capped / torch.where(s > 0, s, torch.ones_like(s)), torch.ones_like(s))
