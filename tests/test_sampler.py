"""DDIM sampler over HeadlessModel (tiny-sd1 eps, tiny-sd2 v-prediction)."""

from __future__ import annotations

import pytest
import torch

from lib_lora.errors import ConfigError
from lib_lora.model import load_model
from lib_lora.model.sampler import ddim_timesteps, latents_to_pil, sample, txt2img

pytestmark = pytest.mark.usefixtures("torch_single_thread")

KW = {"steps": 3, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def tiny1(tmp_path_factory):
    return load_model("tiny-sd1", tokenizer_cache=tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tiny2():
    return load_model("tiny-sd2")


def test_ddim_timesteps_follow_ldm_uniform():
    assert ddim_timesteps(20) == list(range(1, 1000, 50))
    assert ddim_timesteps(3) == [1, 334, 667]
    assert ddim_timesteps(1) == [1]
    assert len(ddim_timesteps(1000)) == 1000 and ddim_timesteps(1000)[-1] == 999
    with pytest.raises(ConfigError, match="steps"):
        ddim_timesteps(0)


def test_same_seed_same_output_and_prompt_matters(tiny1):
    a = sample(tiny1, "a photo of a cat", seed=7, **KW)
    b = sample(tiny1, "a photo of a cat", seed=7, **KW)
    assert a.shape == (1, 4, 8, 8) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert (a - sample(tiny1, "a red car", seed=7, **KW)).abs().max() > 1e-3
    assert (a - sample(tiny1, "a photo of a cat", seed=8, **KW)).abs().max() > 1e-3
    assert (a - sample(tiny1, "a photo of a cat", negative_prompt="blurry", seed=7, **KW)).abs().max() > 1e-3


def test_generator_equals_seed(tiny1):
    a = sample(tiny1, "x", seed=3, **KW)
    b = sample(tiny1, "x", generator=torch.Generator().manual_seed(3), **KW)
    assert torch.equal(a, b)


@pytest.mark.parametrize("which", ["tiny1", "tiny2"])
def test_finite_outputs_and_images(which, request):
    model = request.getfixturevalue(which)
    lat = sample(model, ["a cat", "a dog"], cfg_scale=5.0, seed=1, steps=2, width=64, height=128)
    assert lat.shape == (2, 4, 16, 8) and torch.isfinite(lat).all()
    images = latents_to_pil(model, lat)
    assert [im.size for im in images] == [(64, 128), (64, 128)] and images[0].mode == "RGB"


def test_v_prediction_and_no_cfg(tiny2):
    assert tiny2.prediction_type == "v_prediction"
    a = sample(tiny2, "a cat", cfg_scale=1.0, seed=0, **KW)
    assert torch.isfinite(a).all()
    assert torch.equal(a, sample(tiny2, "a cat", cfg_scale=1.0, seed=0, **KW))


def test_one_step_eps_matches_ddim_formula(tiny1):
    """One step from t=1 to alphas_cumprod[0]: x0 = (x - sqrt(1-a) eps) / sqrt(a), then re-noised with eps."""
    from lib_lora.model_api import Conditioning

    g = torch.Generator().manual_seed(0)
    x = torch.randn((1, 4, 8, 8), generator=g).double()
    got = sample(tiny1, "a cat", cfg_scale=1.0, steps=1, width=64, height=64, seed=0)
    ac = tiny1.alphas_cumprod.double()
    eps = tiny1.unet_forward(x.float(), torch.tensor([1]), Conditioning(tiny1.encode_prompts(["a cat"]).crossattn))
    eps = eps.double()
    x0 = (x - (1 - ac[1]).sqrt() * eps) / ac[1].sqrt()
    expected = ac[0].sqrt() * x0 + (1 - ac[0]).sqrt() * eps
    torch.testing.assert_close(got, expected.float(), rtol=1e-4, atol=1e-4)


def test_bad_arguments(tiny1):
    with pytest.raises(ConfigError, match="multiples of 64"):
        sample(tiny1, "x", steps=1, width=72, height=64)
    with pytest.raises(ConfigError, match="negative_prompt"):
        sample(tiny1, ["a", "b", "c"], negative_prompt=["x", "y"], **KW)


def test_txt2img(tiny1):
    (image,) = txt2img(tiny1, "a cat", seed=0, **KW)
    assert image.size == (64, 64)
