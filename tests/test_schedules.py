"""Tests of lib_lora.schedules against closed forms computed independently (numpy float64, math)."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from lib_lora import schedules as S
from lib_lora.errors import ConfigError

# --------------------------------------------------------------------------------------------------------------------
# LR factors
# --------------------------------------------------------------------------------------------------------------------

# (name, step, total, warmup, options, expected) — expected values from the diffusers formulas worked by hand.
FACTOR_CASES = [
    ("constant", 0, 100, 0, {}, 1.0),
    ("constant", 99, 100, 0, {}, 1.0),
    ("constant_with_warmup", 0, 100, 10, {}, 0.0),
    ("constant_with_warmup", 5, 100, 10, {}, 0.5),
    ("constant_with_warmup", 10, 100, 10, {}, 1.0),
    ("constant_with_warmup", 90, 100, 10, {}, 1.0),
    ("linear", 0, 100, 0, {}, 1.0),
    ("linear", 25, 100, 0, {}, 0.75),
    ("linear", 100, 100, 0, {}, 0.0),
    ("linear", 150, 100, 0, {}, 0.0),
    ("linear", 5, 110, 10, {}, 0.5),
    ("linear", 60, 110, 10, {}, 0.5),
    ("cosine", 0, 100, 0, {}, 1.0),
    ("cosine", 50, 100, 0, {}, 0.5),
    ("cosine", 25, 100, 0, {}, 0.5 * (1 + math.cos(math.pi / 4))),
    ("cosine", 100, 100, 0, {}, 0.0),
    ("cosine", 60, 110, 10, {}, 0.5),
    ("cosine", 50, 100, 0, {"num_cycles": 3}, 0.5),  # "cosine" ignores num_cycles, as get_scheduler does
    ("cosine_with_restarts", 50, 100, 0, {}, 0.5),
    ("cosine_with_restarts", 25, 100, 0, {"num_cycles": 2}, 0.5),
    ("cosine_with_restarts", 50, 100, 0, {"num_cycles": 2}, 1.0),  # hard restart
    ("cosine_with_restarts", 75, 100, 0, {"num_cycles": 2}, 0.5),
    ("cosine_with_restarts", 100, 100, 0, {"num_cycles": 2}, 0.0),
    ("cosine_with_restarts", 5, 100, 10, {"num_cycles": 2}, 0.5),
    ("polynomial", 0, 100, 0, {}, 1.0),
    ("polynomial", 50, 100, 0, {}, 0.5),
    ("polynomial", 50, 100, 0, {"power": 2.0, "lr_end_ratio": 0.1}, 0.9 * 0.25 + 0.1),
    ("polynomial", 100, 100, 0, {"power": 2.0, "lr_end_ratio": 0.1}, 0.1),
    ("polynomial", 150, 100, 0, {"power": 2.0, "lr_end_ratio": 0.1}, 0.1),
    ("polynomial", 60, 110, 10, {"power": 1.0, "lr_end_ratio": 0.0}, 0.5),
    ("polynomial", 3, 110, 10, {"power": 1.0, "lr_end_ratio": 0.0}, 0.3),
]


@pytest.mark.parametrize("name,step,total,warmup,options,expected", FACTOR_CASES)
def test_lr_factor_closed_forms(name, step, total, warmup, options, expected):
    fn = S.LR_SCHEDULES[name]
    assert fn(step, total, warmup, **options) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("name", [n for n in S.LR_SCHEDULES if n != "constant"])
def test_warmup_is_a_linear_ramp_for_every_schedule(name):
    fn = S.LR_SCHEDULES[name]
    for step in range(20):
        assert fn(step, 200, 20, num_cycles=2, power=2.0, lr_end_ratio=0.1) == pytest.approx(step / 20)
    assert fn(20, 200, 20, num_cycles=2, power=2.0, lr_end_ratio=0.1) == pytest.approx(1.0)


def test_polynomial_power_one_without_end_equals_linear():
    for step in range(0, 121, 7):
        assert S.lr_polynomial(step, 110, 10) == pytest.approx(S.lr_linear(step, 110, 10), abs=1e-12)


def test_polynomial_warmup_equal_to_total_does_not_divide_by_zero():
    assert S.lr_polynomial(10, 10, 10, lr_end_ratio=0.2) == pytest.approx(1.0)


def test_polynomial_rejects_bad_end_ratio():
    with pytest.raises(ConfigError, match="lr_end_ratio"):
        S.lr_polynomial(5, 10, 0, lr_end_ratio=1.0)


def test_all_factor_functions_share_one_signature():
    import inspect

    sigs = {name: list(inspect.signature(fn).parameters) for name, fn in S.LR_SCHEDULES.items()}
    first = next(iter(sigs.values()))
    assert first == ["step", "total_steps", "warmup_steps", "num_cycles", "power", "lr_end_ratio"]
    assert all(params == first for params in sigs.values())


def test_constant_with_warmup_raises_like_sd_scripts():
    with pytest.raises(ConfigError, match="constant_with_warmup"):
        S.lr_constant(0, 100, 10)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ConfigError, match="no warmup"):
        S.build_lr_scheduler(opt, "constant", 100, warmup=0.1)
    S.build_lr_scheduler(opt, "constant", 100, warmup=0)  # 0 is allowed, as in sd-scripts
    S.build_lr_scheduler(opt, "constant", 100, warmup=None)


def test_unknown_schedule_lists_the_allowed_names():
    with pytest.raises(ConfigError) as exc:
        S.get_lr_schedule("cosine_annealing")
    for name in S.LR_SCHEDULES:
        assert name in str(exc.value)
    assert S.get_lr_schedule(" Cosine ") is S.lr_cosine


@pytest.mark.parametrize(
    "warmup,total,expected",
    [(0, 100, 0), (None, 100, 0), (10, 100, 10), (0.1, 1000, 100), (0.05, 30, 1), (0.999, 10, 9), (100.0, 1000, 100)],
)
def test_resolve_warmup_steps(warmup, total, expected):
    assert S.resolve_warmup_steps(warmup, total) == expected


@pytest.mark.parametrize("warmup", [-1, -0.1, 1.5, True, "10", float("nan")])
def test_resolve_warmup_steps_rejects(warmup):
    with pytest.raises(ConfigError):
        S.resolve_warmup_steps(warmup, 100)


def test_resolve_warmup_steps_rejects_bad_total():
    with pytest.raises(ConfigError, match="total_steps"):
        S.resolve_warmup_steps(0, 0)


def _lrs(scheduler, optimizer, steps):
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_build_lr_scheduler_follows_the_factor_function():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=1e-3)
    sched = S.build_lr_scheduler(opt, "cosine", 100, warmup=0.1)
    lrs = _lrs(sched, opt, 101)
    for step, lr in enumerate(lrs):
        assert lr == pytest.approx(1e-3 * S.lr_cosine(step, 100, 10), abs=1e-15)
    assert lrs[0] == 0.0  # first optimizer step of a warmup runs at lr 0, as in sd-scripts
    assert lrs[55] == pytest.approx(0.5e-3)


def test_build_lr_scheduler_per_group_base_lrs():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [a], "lr": 1e-4}, {"params": [b], "lr": 5e-5}], lr=1e-4)
    sched = S.build_lr_scheduler(opt, "linear", 10)
    for _ in range(5):
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.5e-4, 0.25e-4])


def test_polynomial_scheduler_ends_at_lr_end():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    sched = S.build_lr_scheduler(opt, "polynomial", 50, power=2.0, lr_end=1e-6)
    lrs = _lrs(sched, opt, 52)
    assert lrs[50] == pytest.approx(1e-6, rel=1e-9)
    assert lrs[51] == pytest.approx(1e-6, rel=1e-9)
    assert lrs[25] == pytest.approx((1e-4 - 1e-6) * 0.25 + 1e-6, rel=1e-9)
    with pytest.raises(ConfigError, match="lr_end"):
        S.build_lr_scheduler(opt, "polynomial", 50, lr_end=1e-3)


def test_build_lr_scheduler_multiplier_applies_at_next_step():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    box = {"factor": 1.0}
    sched = S.build_lr_scheduler(opt, "constant", 100, multiplier=lambda: box["factor"])
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4)
    box["factor"] = 0.5
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-5)


def test_build_lr_scheduler_state_round_trips_through_torch_save():
    def make():
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        return opt, S.build_lr_scheduler(opt, "cosine_with_restarts", 40, warmup=4, num_cycles=3,
                                         multiplier=lambda: 0.5)

    opt, sched = make()
    _lrs(sched, opt, 17)
    buf = io.BytesIO()
    torch.save(sched.state_dict(), buf)
    buf.seek(0)
    opt2, sched2 = make()
    sched2.load_state_dict(torch.load(buf, weights_only=True))
    sched2.step()
    sched.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5e-3 * S.lr_cosine_with_restarts(18, 40, 4, num_cycles=3))


@pytest.mark.parametrize("kwargs", [{"num_cycles": 0}, {"power": 0.0}, {"power": -1.0}])
def test_build_lr_scheduler_rejects_bad_options(kwargs):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    with pytest.raises(ConfigError):
        S.build_lr_scheduler(opt, "cosine_with_restarts", 10, **kwargs)


# --------------------------------------------------------------------------------------------------------------------
# Noise schedule
# --------------------------------------------------------------------------------------------------------------------


def _reference_alphas_cumprod() -> np.ndarray:
    # DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"), in float64.
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def test_ddpm_alphas_cumprod_matches_the_sd_schedule():
    ac = S.ddpm_alphas_cumprod()
    assert ac.shape == (1000,) and ac.dtype == torch.float32
    np.testing.assert_allclose(ac.double().numpy(), _reference_alphas_cumprod(), rtol=2e-5)
    assert ac[0].item() == pytest.approx(0.99915, abs=1e-7)
    # Lin et al. 2023 give sqrt(alphas_cumprod[-1]) = 0.068265 for SD's schedule.
    assert math.sqrt(ac[-1].item()) == pytest.approx(0.068265, abs=1e-6)


def test_zero_terminal_snr_schedule():
    ac = S.ddpm_alphas_cumprod(zero_terminal_snr=True)
    ref = S.ddpm_alphas_cumprod()
    assert ac[-1].item() == pytest.approx(0.0, abs=1e-12)
    assert ac[0].item() == pytest.approx(ref[0].item(), rel=1e-6)
    assert bool(torch.all(ac[1:] < ac[:-1]))
    # Algorithm 1: sqrt(ab) is shifted and scaled linearly.
    sqrt_ref = np.sqrt(_reference_alphas_cumprod())
    expected = (sqrt_ref - sqrt_ref[-1]) * sqrt_ref[0] / (sqrt_ref[0] - sqrt_ref[-1])
    np.testing.assert_allclose(ac.double().sqrt().numpy(), expected, atol=2e-5)


def test_ddpm_alphas_cumprod_rejects_bad_args():
    with pytest.raises(ConfigError):
        S.ddpm_alphas_cumprod(1)
    with pytest.raises(ConfigError):
        S.ddpm_alphas_cumprod(beta_start=0.02, beta_end=0.01)


def test_sample_timesteps_range_dtype_and_determinism():
    g = torch.Generator().manual_seed(1234)
    t = S.sample_timesteps(4000, g, 0, 10)
    assert t.dtype == torch.int64 and t.shape == (4000,)
    assert int(t.min()) == 0 and int(t.max()) == 9
    assert set(t.tolist()) == set(range(10))
    expected = torch.randint(0, 10, (4000,), generator=torch.Generator().manual_seed(1234))
    assert torch.equal(t, expected)
    t2 = S.sample_timesteps(8, torch.Generator().manual_seed(5), 200, 800, device="cpu")
    assert bool(((t2 >= 200) & (t2 < 800)).all())


def test_sample_timesteps_fixed_timestep_and_errors():
    g = torch.Generator().manual_seed(0)
    assert S.sample_timesteps(3, g, 500, 500).tolist() == [500, 500, 500]
    for args in [(0, g, 0, 10), (2, g, -1, 10), (2, g, 10, 5)]:
        with pytest.raises(ConfigError):
            S.sample_timesteps(*args)


def test_make_noise_without_offset_is_plain_randn():
    shape = (2, 4, 8, 8)
    n = S.make_noise(shape, torch.Generator().manual_seed(7))
    assert n.shape == shape and n.dtype == torch.float32
    assert torch.equal(n, torch.randn(shape, generator=torch.Generator().manual_seed(7)))


def test_make_noise_offset_draw_order_and_value():
    shape = (2, 4, 8, 8)
    n = S.make_noise(shape, torch.Generator().manual_seed(7), 0.1, dtype=torch.float16)
    g = torch.Generator().manual_seed(7)
    base = torch.randn(shape, generator=g)
    offset = torch.randn((2, 4, 1, 1), generator=g)
    assert n.dtype == torch.float16
    torch.testing.assert_close(n, (base + 0.1 * offset).half())


def test_make_noise_random_strength_and_adaptive_scale():
    shape = (3, 4, 6, 6)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(1)) + 0.5
    n = S.make_noise(shape, torch.Generator().manual_seed(9), 0.2, noise_offset_random_strength=True,
                     adaptive_noise_scale=0.05, latents=latents)
    g = torch.Generator().manual_seed(9)
    base = torch.randn(shape, generator=g)
    strength = torch.rand(1, generator=g)
    off = torch.clamp(strength * 0.2 + 0.05 * latents.mean(dim=(2, 3), keepdim=True).abs(), min=0.0)
    expected = base + off * torch.randn((3, 4, 1, 1), generator=g)
    torch.testing.assert_close(n, expected)


def test_make_noise_offset_statistics():
    # Per-(sample, channel) means of offset noise have variance ~ 1/(H*W) + offset^2.
    n = S.make_noise((64, 16, 16, 16), torch.Generator().manual_seed(3), 0.5)
    means = n.mean(dim=(2, 3))
    assert means.var().item() == pytest.approx(1 / 256 + 0.25, rel=0.15)


@pytest.mark.parametrize(
    "shape,kwargs",
    [((2, 4, 8), {}), ((2, 4, 8, 8), {"noise_offset": -0.1}), ((2, 4, 8, 8), {"adaptive_noise_scale": 0.1}),
     ((2, 4, 8, 8), {"noise_offset": 0.1, "adaptive_noise_scale": 0.1}),
     ((2, 4, 8, 8), {"noise_offset": 0.1, "adaptive_noise_scale": 0.1, "latents": torch.zeros(1, 4, 8, 8)})],
)
def test_make_noise_rejects(shape, kwargs):
    with pytest.raises(ConfigError):
        S.make_noise(shape, torch.Generator().manual_seed(0), **kwargs)


def test_add_noise_and_velocity_match_closed_forms():
    ac = S.ddpm_alphas_cumprod()
    ref = _reference_alphas_cumprod()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    n = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 500, 999])
    xt = S.add_noise(x, n, t, ac)
    v = S.get_velocity(x, n, t, ac)
    for i, ti in enumerate(t.tolist()):
        a = ref[ti]
        torch.testing.assert_close(xt[i], math.sqrt(a) * x[i] + math.sqrt(1 - a) * n[i], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(v[i], math.sqrt(a) * n[i] - math.sqrt(1 - a) * x[i], rtol=1e-4, atol=1e-5)
    # Identities of the v parameterisation (Salimans & Ho 2022): x0 = sqrt(a) x_t - sqrt(1-a) v, eps likewise.
    a = ac.double()[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(a.sqrt() * xt - (1 - a).sqrt() * v, x)
    torch.testing.assert_close((1 - a).sqrt() * xt + a.sqrt() * v, n)


def test_add_noise_keeps_dtype_and_device():
    ac = S.ddpm_alphas_cumprod()
    x = torch.randn(2, 4, 3, 3).half()
    out = S.add_noise(x, torch.randn_like(x), torch.tensor([10, 20]), ac)
    assert out.dtype == torch.float16 and out.shape == x.shape


def test_snr_matches_reference():
    ac = S.ddpm_alphas_cumprod()
    ref = _reference_alphas_cumprod()
    t = torch.tensor([0, 1, 250, 500, 999])
    s = S.snr(t, ac)
    np.testing.assert_allclose(s.double().numpy(), ref[t.numpy()] / (1 - ref[t.numpy()]), rtol=1e-4)
    assert s[0].item() == pytest.approx(0.99915 / 0.00085, rel=1e-4)  # ~1175.5


def test_min_snr_weight_epsilon_and_v():
    ac = S.ddpm_alphas_cumprod()
    ref = _reference_alphas_cumprod()
    t = torch.tensor([0, 100, 300, 600, 999])
    snr_ref = ref[t.numpy()] / (1 - ref[t.numpy()])
    w_eps = S.min_snr_weight(t, ac, 5.0)
    w_v = S.min_snr_weight(t, ac, 5.0, v_prediction=True)
    assert w_eps.dtype == torch.float32 and w_eps.shape == (5,)
    np.testing.assert_allclose(w_eps.double().numpy(), np.minimum(snr_ref, 5.0) / snr_ref, rtol=1e-4)
    np.testing.assert_allclose(w_v.double().numpy(), np.minimum(snr_ref, 5.0) / (snr_ref + 1.0), rtol=1e-4)
    assert w_eps[-1].item() == pytest.approx(1.0)  # SNR < gamma: weight 1 for epsilon
    assert w_eps[0].item() == pytest.approx(5.0 / (0.99915 / 0.00085), rel=1e-4)


def test_min_snr_weight_with_zero_terminal_snr_stays_finite():
    ac = S.ddpm_alphas_cumprod(zero_terminal_snr=True)
    t = torch.tensor([998, 999])
    w_eps = S.min_snr_weight(t, ac, 5.0)
    w_v = S.min_snr_weight(t, ac, 5.0, v_prediction=True)
    assert bool(torch.isfinite(w_eps).all()) and w_eps.tolist() == pytest.approx([1.0, 1.0])
    assert w_v[-1].item() == 0.0


def test_min_snr_weight_rejects_bad_gamma():
    with pytest.raises(ConfigError, match="gamma"):
        S.min_snr_weight(torch.tensor([1]), S.ddpm_alphas_cumprod(), 0.0)
