"""Tests of lib_lora.optimizers. The optional packages are not installed here; their presence is simulated with a fake
module in sys.modules, and their absence by patching importlib.util.find_spec."""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import types
import warnings

import pytest
import torch

from lib_lora import optimizers as O
from lib_lora.errors import ConfigError, TrainingError


def _params():
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]


def _install_fake(monkeypatch, module_name: str, class_name: str, class_module: str):
    """Puts a fake package into sys.modules, with a spec so that find_spec finds it."""
    cls = type(class_name, (torch.optim.SGD,), {"__module__": class_module})
    mod = types.ModuleType(module_name)
    mod.__spec__ = importlib.machinery.ModuleSpec(module_name, None)
    setattr(mod, class_name, cls)
    monkeypatch.setitem(sys.modules, module_name, mod)
    return cls


def _hide(monkeypatch, *top_level_names: str):
    """Makes find_spec report the given packages as not installed, as it does on a machine without them."""
    real = importlib.util.find_spec

    def fake_find_spec(name, package=None):
        if name.split(".")[0] in top_level_names:
            return None
        return real(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec)


def test_adamw_is_the_default_and_trains():
    params = _params()
    for name in (None, "", "AdamW"):
        opt = O.build_optimizer(name, params, 1e-2)
        assert type(opt) is torch.optim.AdamW
    opt = O.build_optimizer("AdamW", params, 1e-2, weight_decay=0.0, betas=(0.9, 0.99))
    assert opt.param_groups[0]["betas"] == (0.9, 0.99) and opt.param_groups[0]["lr"] == 1e-2
    loss0 = sum((p**2).sum() for p in params).item()
    for _ in range(20):
        opt.zero_grad()
        loss = sum((p**2).sum() for p in params)
        loss.backward()
        opt.step()
    assert loss.item() < loss0


@pytest.mark.parametrize("name", ["adamw", "ADAMW", " AdamW ", "aDaMw"])
def test_name_lookup_is_case_insensitive(name):
    assert type(O.build_optimizer(name, _params(), 1e-3)) is torch.optim.AdamW
    assert O.get_optimizer_spec(name.upper()).name == "AdamW"
    assert O.get_optimizer_spec("adamw8BIT").name == "AdamW8bit"
    assert O.get_optimizer_spec("PRODIGY").name == "Prodigy"


def test_unknown_name_lists_the_choices():
    with pytest.raises(ConfigError) as exc:
        O.build_optimizer("DAdaptAdam", _params(), 1.0)
    msg = str(exc.value)
    assert "DAdaptAdam" in msg
    for name in ("AdamW", "AdamW8bit", "Lion", "Prodigy"):
        assert name in msg
    assert O.OPTIMIZER_NAMES == ("AdamW", "AdamW8bit", "Lion", "Prodigy")


def test_per_group_learning_rates_are_kept():
    a, b = _params()
    opt = O.build_optimizer("AdamW", [{"params": [a], "lr": 1e-4}, {"params": [b]}], 5e-5)
    assert [g["lr"] for g in opt.param_groups] == [1e-4, 5e-5]


@pytest.mark.parametrize(
    "name,message",
    [
        ("AdamW8bit", "AdamW8bit needs the bitsandbytes package: pip install bitsandbytes"),
        ("Lion", "Lion needs the lion-pytorch package: pip install lion-pytorch"),
        ("Prodigy", "Prodigy needs the prodigyopt package: pip install prodigyopt"),
    ],
)
def test_missing_package_names_the_pip_package(monkeypatch, name, message):
    _hide(monkeypatch, "bitsandbytes", "lion_pytorch", "prodigyopt")
    assert not O.is_optimizer_available(name)
    with pytest.raises(TrainingError) as exc:
        O.build_optimizer(name, _params(), 1e-4)
    assert str(exc.value) == message


def test_missing_package_in_this_environment():
    # The venv deliberately lacks bitsandbytes; no patching, so this checks the real find_spec path.
    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed")
    with pytest.raises(TrainingError, match="pip install bitsandbytes"):
        O.build_optimizer("adamw8bit", _params(), 1e-4)


def test_installed_but_broken_package(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, package=None: importlib.machinery.ModuleSpec(name, None))
    real_import = importlib.import_module

    def broken_import(name, package=None):
        if name.startswith("bitsandbytes"):
            raise ImportError("libcudart.so: cannot open shared object file")
        return real_import(name, package)

    monkeypatch.setattr(importlib, "import_module", broken_import)
    with pytest.raises(TrainingError, match="failed to import: libcudart"):
        O.build_optimizer("AdamW8bit", _params(), 1e-4)


def test_package_without_the_class(monkeypatch):
    mod = types.ModuleType("lion_pytorch")
    mod.__spec__ = importlib.machinery.ModuleSpec("lion_pytorch", None)
    monkeypatch.setitem(sys.modules, "lion_pytorch", mod)
    with pytest.raises(TrainingError, match="too old"):
        O.build_optimizer("Lion", _params(), 1e-4)


def test_fake_optional_package_is_used(monkeypatch):
    cls = _install_fake(monkeypatch, "lion_pytorch", "Lion", "lion_pytorch.lion_pytorch")
    assert O.is_optimizer_available("lion")
    opt = O.build_optimizer("lion", _params(), 3e-5, momentum=0.9)
    assert type(opt) is cls
    assert O.optimizer_display_name(opt) == "lion_pytorch.lion_pytorch.Lion"
    assert O.optimizer_display_name(opt, {"momentum": 0.9}) == "lion_pytorch.lion_pytorch.Lion(momentum=0.9)"


def test_prodigy_warns_on_low_lr(monkeypatch):
    _install_fake(monkeypatch, "prodigyopt", "Prodigy", "prodigyopt.prodigy")
    with pytest.warns(UserWarning, match="around 1.0"):
        O.build_optimizer("Prodigy", _params(), 1e-4)
    with pytest.warns(UserWarning, match="around 1.0"):
        O.build_optimizer("Prodigy", _params(), 0.1)  # sd-scripts warns at lr <= 0.1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = O.build_optimizer("Prodigy", _params(), 1.0)
    assert O.optimizer_display_name(opt) == "prodigyopt.prodigy.Prodigy"


def test_prodigy_warns_when_groups_differ(monkeypatch):
    _install_fake(monkeypatch, "prodigyopt", "Prodigy", "prodigyopt.prodigy")
    a, b = _params()
    with pytest.warns(UserWarning, match="only the first parameter group"):
        O.build_optimizer("prodigy", [{"params": [a], "lr": 1.0}, {"params": [b], "lr": 0.5}], 1.0)


def test_display_name_as_sd_scripts_writes_it():
    opt = O.build_optimizer("AdamW", _params(), 1e-4)
    assert O.optimizer_display_name(opt) == "torch.optim.adamw.AdamW"
    assert O.optimizer_display_name(torch.optim.AdamW) == "torch.optim.adamw.AdamW"
    args = {"weight_decay": 0.01, "betas": (0.9, 0.99)}
    assert O.optimizer_display_name(opt, args) == "torch.optim.adamw.AdamW(weight_decay=0.01,betas=(0.9, 0.99))"
    assert O.optimizer_display_name(opt, {}) == "torch.optim.adamw.AdamW"


@pytest.mark.parametrize("lr", [0, -1e-4, float("nan"), float("inf"), True, "1e-4"])
def test_bad_learning_rate(lr):
    with pytest.raises(ConfigError, match="learning rate"):
        O.build_optimizer("AdamW", _params(), lr)


def test_bad_arguments_and_empty_params():
    with pytest.raises(ConfigError, match="AdamW rejected its arguments"):
        O.build_optimizer("AdamW", _params(), 1e-4, not_an_arg=1)
    with pytest.raises(ConfigError, match="AdamW rejected"):
        O.build_optimizer("AdamW", _params(), 1e-4, betas=(1.5, 0.9))
    with pytest.raises(ConfigError, match="no parameters"):
        O.build_optimizer("AdamW", [], 1e-4)


def test_torch_is_always_available():
    assert O.is_optimizer_available("AdamW")
    assert O.get_optimizer_class(None) is torch.optim.AdamW
