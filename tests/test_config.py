"""``TrainConfig``: TOML round trip, unknown keys refused by name, ``validate()`` messages naming the field."""

from __future__ import annotations

import dataclasses

import pytest

from lib_lora.config import CONFIG_VERSION, TrainConfig
from lib_lora.errors import ConfigError


def _every_field_changed() -> TrainConfig:
    """A config where every field differs from its default (lists, a nested dict, odd strings, set optionals)."""
    return TrainConfig(
        model="C:\\models\\tiny \"v1\".safetensors", v_prediction=True, train_data_dir="/data/dögs & cats",
        repeats=3, class_tokens="sks dog", caption_extension=".caption", caption_separator=";",
        trigger_words=["sks dog", "o'brien \"x\""], shuffle_caption=True, keep_tokens=2, caption_dropout_rate=0.05,
        caption_tag_dropout_rate=0.1, on_bad_image="stop", resolution=768, enable_bucket=False,
        min_bucket_reso=320, max_bucket_reso=1536, bucket_reso_steps=32, bucket_no_upscale=True, flip_aug=True,
        random_crop=True, cache_latents="none", network_dim=64, network_alpha=0.5, conv_dim=8, conv_alpha=1.0,
        network_dropout=0.1, rank_dropout=0.2, module_dropout=0.3, network_weights="/x/init.safetensors",
        network_train_unet_only=True, learning_rate=3e-5, unet_lr=2e-4, text_encoder_lr=5e-5,
        optimizer="AdamW8bit", optimizer_args={"weight_decay": 0.01, "betas": [0.9, 0.99], "name": "x y"},
        lr_scheduler="cosine_with_restarts", lr_warmup_steps=0.1, lr_scheduler_num_cycles=3.0,
        lr_scheduler_power=2.0, max_train_steps=1234, max_train_epochs=7, train_batch_size=4,
        gradient_accumulation_steps=2, max_grad_norm=0.5, mixed_precision="bf16", gradient_checkpointing=True,
        noise_offset=0.0357, min_snr_gamma=5.0, clip_skip=2, seed=-1, on_nonfinite_loss="skip",
        lr_drop_on_plateau=True, plateau_patience_steps=50, plateau_factor=0.25, plateau_min_delta=1e-4,
        early_stopping_patience_steps=300, output_dir="out dir", output_name="my-lora_v2", save_every_n_steps=50,
        save_every_n_epochs=2, save_last_n=3, save_precision="bf16", save_state=True, resume="out/x-state",
        logging_dir="logs", preferred_weight=0.8, sample_prompts=["a photo of sks dog", "sks dog, beach"],
        sample_every_n_steps=100, sample_every_n_epochs=1, sample_steps=12, sample_cfg_scale=5.5, sample_seed=7,
        sample_negative_prompt="blurry\nlow quality", ignore_dataset_errors=True, device="cuda:1",
        version=CONFIG_VERSION,
    )


def test_every_field_is_changed_by_the_fixture():
    """Proves the round-trip fixture exercises every field (a new field must be added to it)."""
    cfg, default = _every_field_changed(), TrainConfig()
    same = [f.name for f in dataclasses.fields(TrainConfig)
            if getattr(cfg, f.name) == getattr(default, f.name) and f.name != "version"]
    assert same == []


@pytest.mark.parametrize("cfg", [TrainConfig(), _every_field_changed()], ids=["defaults", "every-field-changed"])
def test_toml_round_trip(tmp_path, cfg):
    """Proves ``to_toml`` then ``from_toml`` gives an equal config (types included: floats stay floats, lists,
    the optimizer_args table, strings with quotes, backslashes, newlines and non-ASCII)."""
    path = tmp_path / "c.toml"
    path.write_text(cfg.to_toml(), encoding="utf-8")
    back = TrainConfig.from_toml(path)
    assert back == cfg
    assert back.to_dict() == cfg.to_dict()
    assert type(back.network_alpha) is type(cfg.network_alpha)


def test_toml_round_trip_keeps_unset_fields_whose_default_is_set(tmp_path):
    """Proves that a config with no step saves and epoch-based length (``save_every_n_steps=None``,
    ``max_train_steps=None``: the demo's settings) survives the TOML round trip, as the ``.config.toml`` written
    next to the outputs must when it is passed back with ``--config``."""
    cfg = TrainConfig(max_train_steps=None, max_train_epochs=3, save_every_n_steps=None, save_every_n_epochs=1)
    path = tmp_path / "c.toml"
    path.write_text(cfg.to_toml(), encoding="utf-8")
    back = TrainConfig.from_toml(path)
    assert (back.save_every_n_steps, back.max_train_steps) == (None, None)
    assert back == cfg


def test_toml_tables_are_flattened(tmp_path):
    """Proves that a ``[network]`` table groups keys (flattened one level) while ``optimizer_args`` stays a dict."""
    path = tmp_path / "c.toml"
    path.write_text('output_name = "n"\n[network]\nnetwork_dim = 8\nnetwork_alpha = 4.0\n'
                    '[optimizer_args]\nweight_decay = 0.1\n', encoding="utf-8")
    cfg = TrainConfig.from_toml(path)
    assert (cfg.output_name, cfg.network_dim, cfg.network_alpha) == ("n", 8, 4.0)
    assert cfg.optimizer_args == {"weight_decay": 0.1}


def test_unknown_keys_are_refused_by_name(tmp_path):
    """Proves typos do not pass silently: unknown keys (top level and inside a table) raise a ConfigError naming
    each of them, from a TOML file and from a dict."""
    path = tmp_path / "c.toml"
    path.write_text('netwrok_dim = 8\nlearning_rate = 1e-4\n[network]\nnetwork_alpah = 4\n', encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_toml(path)
    assert "netwrok_dim" in str(info.value) and "network_alpah" in str(info.value)
    assert "learning_rate" not in str(info.value)
    with pytest.raises(ConfigError, match="unknown config keys: learnig_rate"):
        TrainConfig.from_dict({"learnig_rate": 1e-4})


def test_unreadable_toml_is_a_config_error(tmp_path):
    """Proves a syntax error or a missing file gives a ConfigError naming the file, not a TOML traceback."""
    bad = tmp_path / "bad.toml"
    bad.write_text("network_dim = = 8\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="bad.toml"):
        TrainConfig.from_toml(bad)
    with pytest.raises(ConfigError, match="missing.toml"):
        TrainConfig.from_toml(tmp_path / "missing.toml")


def test_defaults_validate():
    """Proves the defaults are a valid config."""
    assert TrainConfig().validate() == TrainConfig()


@pytest.mark.parametrize(("field", "value"), [
    ("network_dim", 0), ("network_alpha", -1.0), ("conv_dim", -1), ("learning_rate", 0.0),
    ("train_batch_size", 0), ("gradient_accumulation_steps", 0), ("max_train_steps", 0), ("max_train_epochs", 0),
    ("mixed_precision", "fp8"), ("save_precision", "int8"), ("on_nonfinite_loss", "ignore"),
    ("cache_latents", "gpu"), ("clip_skip", 0), ("resolution", 100), ("resolution", 32), ("min_snr_gamma", 0.0),
    ("noise_offset", -0.1), ("save_every_n_steps", 0), ("save_every_n_epochs", 0), ("save_last_n", 0),
    ("sample_every_n_steps", 0), ("sample_every_n_epochs", 0), ("early_stopping_patience_steps", 0),
    ("plateau_factor", 1.0), ("plateau_patience_steps", 0), ("output_name", "a/b"), ("output_name", ""),
    ("sample_steps", 0),
])
def test_validate_names_the_field(field, value):
    """Proves each out-of-range value raises a ConfigError whose message names the field and the bad value."""
    with pytest.raises(ConfigError) as info:
        TrainConfig(**{field: value}).validate()
    assert field in str(info.value)
    assert repr(value) in str(info.value) or str(value) in str(info.value)


def test_validate_needs_a_length():
    """Proves a run with neither max_train_steps nor max_train_epochs is refused, naming both fields."""
    with pytest.raises(ConfigError, match="max_train_steps or max_train_epochs"):
        TrainConfig(max_train_steps=None, max_train_epochs=None).validate()


def test_validate_refuses_a_newer_version():
    """Proves a config from a newer lib_lora is refused with the version numbers, not half-understood."""
    with pytest.raises(ConfigError, match=f"version {CONFIG_VERSION + 1}"):
        TrainConfig(version=CONFIG_VERSION + 1).validate()


@pytest.mark.parametrize("data, needle", [
    ({"resolution": "big"}, "resolution must be a whole number"),
    ({"learning_rate": "1e-4"}, "learning_rate must be a number"),
    ({"save_state": "yes"}, "save_state must be true or false"),
    ({"trigger_words": [1, 2]}, "trigger_words must be a list of strings"),
    ({"netwrok_dim": 3}, "did you mean network_dim"),
])
def test_wrong_typed_values_are_config_errors(data, needle):
    """A value of the wrong type in a TOML/JSON config is a ConfigError naming the field (never a TypeError later
    in validate), and a misspelt key gets a suggestion."""
    with pytest.raises(ConfigError, match=needle):
        TrainConfig.from_dict(data)


def test_harmless_type_variants_are_normalised():
    """One trigger string means a one-element list (not a list of letters); ints are fine where floats go and
    whole floats where ints go."""
    cfg = TrainConfig.from_dict({"trigger_words": "mydog", "network_alpha": 8, "resolution": 512.0})
    assert cfg.trigger_words == ["mydog"] and cfg.network_alpha == 8.0 and cfg.resolution == 512
    assert isinstance(cfg.resolution, int)
