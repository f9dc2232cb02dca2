"""Tests of lib_lora.safetensors_io against real files: our own saves and the shared Kohya reference LoRAs."""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from _paths import REFERENCE_LORA_DIR, REPO_ROOT

from lib_lora import safetensors_io as sio
from lib_lora.errors import ConfigError, FormatError
from lib_lora.safetensors_io import (
    addnet_hash_legacy,
    addnet_hash_safetensors,
    atomic_write_bytes,
    check_finite,
    group_lora_keys,
    load_lora_file,
    precalculate_hashes,
    remove_stale_temp_files,
    save_dtype_from_name,
    save_lora_file,
    sha256_file,
)

REF_DIR = REFERENCE_LORA_DIR if (REFERENCE_LORA_DIR / "test_lora.safetensors").is_file() else None
needs_ref = pytest.mark.skipif(REF_DIR is None, reason="shared reference LoRA files not present")

# sha256 of the data section of the reference files, computed independently (struct + hashlib) when written.
REF_ADDNET_HASH = {
    "test_lora.safetensors": "ad037175bc6637502a291d7510d24d0f66d412838a4f43cd789be094fbb903a4",
    "test_lora-000002.safetensors": "519973e0eb241278b78816448d15a2ed86e26a4461e2c800173e4b2d78e5b58c",
    "test_lora_bogus.safetensors": "12e3a1c8a1fb5e863ef3d6c32ab66d3e3cc3b19b217a02bca0f4b538c3141340",
    "test_lora_compvis.safetensors": "07e70777d5d23ee390c210e9cbb7676d9ab2b782d3eef8193bedbe5048391e53",
}
EMPTY_SHA8 = hashlib.sha256(b"").hexdigest()[:8]  # "e3b0c442"

Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
P = "lora_unet_down_blocks_0_attentions_0_proj_in"
TE = "lora_te_text_model_encoder_layers_0_mlp_fc1"


def make_sd(rank: int = 4, alpha: float = 4.0, seed: int = 0) -> dict[str, torch.Tensor]:
    """A small Kohya-layout state dict: a Linear (Q), a 1x1 conv (P) and a text-encoder Linear (TE), fp32."""
    g = torch.Generator().manual_seed(seed)
    return {
        f"{Q}.lora_down.weight": torch.randn(rank, 32, generator=g),
        f"{Q}.lora_up.weight": torch.randn(32, rank, generator=g),
        f"{Q}.alpha": torch.tensor(alpha),
        f"{P}.lora_down.weight": torch.randn(rank, 32, 1, 1, generator=g),
        f"{P}.lora_up.weight": torch.randn(32, rank, 1, 1, generator=g),
        f"{P}.alpha": torch.tensor(alpha),
        f"{TE}.lora_down.weight": torch.randn(rank, 32, generator=g),
        f"{TE}.lora_up.weight": torch.randn(64, rank, generator=g),
        f"{TE}.alpha": torch.tensor(2.0),
    }


def raw_data_section_sha256(path: Path) -> str:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return hashlib.sha256(data[8 + n :]).hexdigest()


def folder_listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


# ----------------------------------------------------------------------------------------------------------------------
# Saving: dtypes, alpha, metadata, hashes
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype, expected",
    [(torch.float32, torch.float32), (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16)],
)
def test_save_casts_every_tensor_and_alpha_is_0dim_float(tmp_path, dtype, expected):
    sd = make_sd()
    path = save_lora_file(tmp_path / "a.safetensors", sd, {"ss_network_dim": 4}, dtype)
    loaded, md = load_lora_file(path)
    assert set(loaded) == set(sd)
    for key, tensor in loaded.items():
        assert tensor.dtype == expected, key
        if key.endswith(".alpha"):
            assert tensor.shape == torch.Size([])
            assert tensor.item() == (2.0 if key.startswith(TE) else 4.0)
        else:
            assert torch.equal(tensor, sd[key].to(expected))
    assert md["ss_network_dim"] == "4"


def test_save_keeps_dtypes_when_dtype_none_and_int_alpha_becomes_float32(tmp_path):
    sd = make_sd()
    sd[f"{Q}.alpha"] = torch.tensor(1)  # int64 tensor, as sd-scripts' argparse default alpha=1 gives
    sd[f"{P}.lora_down.weight"] = sd[f"{P}.lora_down.weight"].half()
    sd[f"{TE}.alpha"] = 8  # plain Python int
    path = save_lora_file(tmp_path / "a.safetensors", sd, None, None)
    loaded, _ = load_lora_file(path)
    assert loaded[f"{Q}.alpha"].dtype == torch.float32 and loaded[f"{Q}.alpha"].shape == ()
    assert loaded[f"{Q}.alpha"].item() == 1.0
    assert loaded[f"{TE}.alpha"].dtype == torch.float32 and loaded[f"{TE}.alpha"].item() == 8.0
    assert loaded[f"{P}.lora_down.weight"].dtype == torch.float16
    assert loaded[f"{Q}.lora_down.weight"].dtype == torch.float32


def test_alpha_of_shape_1_is_stored_as_0dim(tmp_path):
    sd = make_sd()
    sd[f"{Q}.alpha"] = torch.tensor([3.0])
    loaded, _ = load_lora_file(save_lora_file(tmp_path / "a.safetensors", sd, {}, torch.float16))
    assert loaded[f"{Q}.alpha"].shape == () and loaded[f"{Q}.alpha"].item() == 3.0


def test_save_does_not_modify_input_and_handles_noncontiguous_and_grad(tmp_path):
    sd = make_sd()
    up = torch.randn(4, 32).t()  # non-contiguous [32, 4]
    assert not up.is_contiguous()
    sd[f"{Q}.lora_up.weight"] = up
    sd[f"{Q}.lora_down.weight"] = sd[f"{Q}.lora_down.weight"].clone().requires_grad_(True)
    before = {k: v.detach().clone() for k, v in sd.items()}
    loaded, _ = load_lora_file(save_lora_file(tmp_path / "a.safetensors", sd, {}, torch.float16))
    for k in sd:
        assert torch.equal(sd[k].detach(), before[k])
        assert sd[k].dtype == before[k].dtype
    assert torch.equal(loaded[f"{Q}.lora_up.weight"], up.half())


def test_save_metadata_is_stringified(tmp_path):
    md = {"ss_network_dim": 8, "ss_seed": None, "ss_tag_frequency": {"d": {"cat": 2}}, "ss_v2": False}
    _, loaded = load_lora_file(save_lora_file(tmp_path / "a.safetensors", make_sd(), md, torch.float32))
    assert loaded["ss_network_dim"] == "8"
    assert loaded["ss_seed"] == "None"
    assert loaded["ss_tag_frequency"] == '{"d": {"cat": 2}}'
    assert loaded["ss_v2"] == "False"
    assert set(loaded) == set(md) | {"sshs_model_hash", "sshs_legacy_hash"}


def test_str_path_and_parent_folder_created(tmp_path):
    target = tmp_path / "deep" / "er" / "x.safetensors"
    out = save_lora_file(str(target), make_sd(), {}, None)
    assert out == target and target.is_file()
    assert folder_listing(target.parent) == ["x.safetensors"]


def test_sshs_model_hash_equals_addnet_hash_of_final_file(tmp_path):
    path = save_lora_file(tmp_path / "a.safetensors", make_sd(), {"ss_a": "1", "modelspec.title": "t"}, torch.float16)
    _, md = load_lora_file(path)
    assert md["sshs_model_hash"] == addnet_hash_safetensors(path)
    assert md["sshs_model_hash"] == raw_data_section_sha256(path)
    assert len(md["sshs_model_hash"]) == 64
    # metadata does not change the model hash
    path2 = save_lora_file(tmp_path / "b.safetensors", make_sd(), {"ss_other": "x" * 1000}, torch.float16)
    assert load_lora_file(path2)[1]["sshs_model_hash"] == md["sshs_model_hash"]
    # stale hashes passed in are replaced
    path3 = save_lora_file(tmp_path / "c.safetensors", make_sd(), {"sshs_model_hash": "bogus"}, torch.float16)
    assert load_lora_file(path3)[1]["sshs_model_hash"] == md["sshs_model_hash"]


def test_legacy_hash_as_sd_scripts_for_large_file(tmp_path):
    # > 1 MiB so the legacy hash covers real bytes; computed here the way sd-scripts does it.
    sd = {
        "lora_unet_x.lora_down.weight": torch.randn(64, 4096),
        "lora_unet_x.lora_up.weight": torch.randn(4096, 64),
        "lora_unet_x.alpha": torch.tensor(32.0),
    }
    md = {"ss_network_dim": "64", "modelspec.title": "not hashed", "user_key": "not hashed"}
    path = save_lora_file(tmp_path / "big.safetensors", sd, md, torch.float32)
    _, saved_md = load_lora_file(path)
    ss_bytes = safetensors.torch.save({k: v.contiguous() for k, v in sd.items()}, {"ss_network_dim": "64"})
    expected_legacy = hashlib.sha256(ss_bytes[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]
    assert saved_md["sshs_legacy_hash"] == expected_legacy
    assert saved_md["sshs_legacy_hash"] != EMPTY_SHA8
    assert precalculate_hashes(sd, md) == (saved_md["sshs_model_hash"], expected_legacy)
    # the legacy hash is taken of the ss_-only serialisation, so it need not match the final file
    assert addnet_hash_legacy(path) == hashlib.sha256(path.read_bytes()[0x100000:0x110000]).hexdigest()[:8]


def test_legacy_hash_of_small_file_is_empty_sha(tmp_path):
    _, md = load_lora_file(save_lora_file(tmp_path / "a.safetensors", make_sd(), {}, None))
    assert md["sshs_legacy_hash"] == EMPTY_SHA8 == "e3b0c442"


def test_hash_functions_accept_bytes_paths_and_files(tmp_path):
    path = save_lora_file(tmp_path / "a.safetensors", make_sd(), {}, None)
    data = path.read_bytes()
    expected = raw_data_section_sha256(path)
    assert addnet_hash_safetensors(data) == expected
    assert addnet_hash_safetensors(bytearray(data)) == expected
    assert addnet_hash_safetensors(str(path)) == expected
    with open(path, "rb") as fh:
        assert addnet_hash_safetensors(fh) == expected
    assert addnet_hash_legacy(data) == addnet_hash_legacy(path) == EMPTY_SHA8
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    with pytest.raises(FormatError, match="too short"):
        addnet_hash_safetensors(b"\x01\x02")
    with pytest.raises(FormatError, match="missing.safetensors"):
        addnet_hash_safetensors(tmp_path / "missing.safetensors")
    with pytest.raises(FormatError):
        sha256_file(tmp_path / "missing.bin")


@needs_ref
@pytest.mark.parametrize("name", sorted(REF_ADDNET_HASH))
def test_reference_files_addnet_hash_and_resave(tmp_path, name):
    ref = REF_DIR / name
    assert addnet_hash_safetensors(ref) == REF_ADDNET_HASH[name]
    sd, md = load_lora_file(ref)
    assert md["ss_network_module"] == "networks.lora"
    out = save_lora_file(tmp_path / name, sd, md, None)
    _, out_md = load_lora_file(out)
    # Same tensors -> same data section as the Kohya-layout reference, so the same hash A1111 would compute.
    assert out_md["sshs_model_hash"] == REF_ADDNET_HASH[name] == addnet_hash_safetensors(out)
    assert out_md["sshs_legacy_hash"] == EMPTY_SHA8  # the files are under 1 MiB
    for key, value in md.items():
        assert out_md[key] == value


@needs_ref
def test_reference_file_resaved_fp16_is_loadable_and_close(tmp_path):
    sd, md = load_lora_file(REF_DIR / "test_lora.safetensors")
    loaded, _ = load_lora_file(save_lora_file(tmp_path / "h.safetensors", sd, md, torch.float16))
    assert all(t.dtype == torch.float16 for t in loaded.values())
    alphas = [k for k in loaded if k.endswith(".alpha")]
    assert len(alphas) == 204
    assert all(loaded[k].shape == () and loaded[k].item() == 4.0 for k in alphas)
    key = f"{P}.lora_up.weight"
    assert loaded[key].shape == sd[key].shape and loaded[key].dim() == 4
    torch.testing.assert_close(loaded[key].float(), sd[key], rtol=1e-3, atol=1e-3)


# ----------------------------------------------------------------------------------------------------------------------
# Saving: refusals
# ----------------------------------------------------------------------------------------------------------------------


def test_nan_in_one_lora_up_refuses_and_leaves_no_file(tmp_path):
    sd = make_sd()
    sd[f"{Q}.lora_up.weight"][3, 1] = float("nan")
    target = tmp_path / "x.safetensors"
    with pytest.raises(FormatError) as err:
        save_lora_file(target, sd, {}, torch.float16)
    assert f"{Q}.lora_up.weight holds NaN" in str(err.value)
    assert folder_listing(tmp_path) == []


def test_inf_refuses_naming_key(tmp_path):
    sd = make_sd()
    sd[f"{TE}.lora_down.weight"][0, 0] = float("-inf")
    with pytest.raises(FormatError, match=rf"^{TE}\.lora_down\.weight holds Inf"):
        save_lora_file(tmp_path / "x.safetensors", sd, {}, None)
    assert folder_listing(tmp_path) == []


def test_fp16_overflow_after_cast_refuses(tmp_path):
    sd = make_sd()
    sd[f"{P}.lora_down.weight"][0, 0, 0, 0] = 1e6  # finite in fp32, Inf in fp16
    with pytest.raises(FormatError, match=rf"{P}\.lora_down\.weight holds Inf after casting to torch\.float16"):
        save_lora_file(tmp_path / "x.safetensors", sd, {}, torch.float16)
    save_lora_file(tmp_path / "ok.safetensors", sd, {}, torch.bfloat16)  # bf16 has the range


def test_preexisting_file_survives_failed_save(tmp_path):
    target = tmp_path / "x.safetensors"
    save_lora_file(target, make_sd(seed=1), {"ss_v": "old"}, None)
    before = target.read_bytes()
    bad = make_sd(seed=2)
    bad[f"{Q}.lora_up.weight"][0, 0] = float("nan")
    with pytest.raises(FormatError):
        save_lora_file(target, bad, {"ss_v": "new"}, None)
    assert target.read_bytes() == before
    assert folder_listing(tmp_path) == ["x.safetensors"]


def test_unexpected_keys_are_named(tmp_path):
    sd = make_sd()
    sd[f"{Q}.bias"] = torch.zeros(32)
    sd["some_other_tensor"] = torch.zeros(1)
    sd["dotted.name.alpha"] = torch.tensor(1.0)  # A1111 would read module "dotted", part "name.alpha"
    sd[".alpha"] = torch.tensor(1.0)
    with pytest.raises(FormatError) as err:
        save_lora_file(tmp_path / "x.safetensors", sd, {}, None)
    message = str(err.value)
    assert message.startswith(
        f"unexpected key(s) in LoRA state dict: {Q}.bias, some_other_tensor, dotted.name.alpha, .alpha; only"
    )
    assert folder_listing(tmp_path) == []


def test_lora_mid_and_dora_scale_are_not_saved(tmp_path):
    sd = make_sd()
    sd[f"{Q}.dora_scale"] = torch.ones(1, 32)
    with pytest.raises(FormatError, match="dora_scale"):
        save_lora_file(tmp_path / "x.safetensors", sd, {}, None)


@pytest.mark.parametrize("drop", ["lora_up.weight", "lora_down.weight"])
def test_module_without_up_or_down_refused(tmp_path, drop):
    sd = make_sd()
    del sd[f"{Q}.{drop}"]
    with pytest.raises(FormatError, match=re.escape(f"module {Q} has no {drop}")):
        save_lora_file(tmp_path / "x.safetensors", sd, {}, None)


def test_rank_mismatch_refused(tmp_path):
    sd = make_sd()
    sd[f"{Q}.lora_up.weight"] = torch.randn(32, 5)
    with pytest.raises(FormatError, match=f"module {Q}: lora_down"):
        save_lora_file(tmp_path / "x.safetensors", sd, {}, None)


def test_bad_alpha_refused(tmp_path):
    sd = make_sd()
    sd[f"{Q}.alpha"] = torch.tensor([1.0, 2.0])
    with pytest.raises(FormatError, match=rf"{Q}\.alpha has shape \(2,\)"):
        save_lora_file(tmp_path / "x.safetensors", sd, {}, None)


def test_empty_state_dict_refused(tmp_path):
    with pytest.raises(FormatError, match="empty"):
        save_lora_file(tmp_path / "x.safetensors", {}, {}, None)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int8, torch.float8_e4m3fn])
def test_bad_save_dtype_is_config_error(tmp_path, dtype):
    with pytest.raises(ConfigError, match="save dtype"):
        save_lora_file(tmp_path / "x.safetensors", make_sd(), {}, dtype)


def test_non_safetensors_name_is_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"\.safetensors"):
        save_lora_file(tmp_path / "x.ckpt", make_sd(), {}, None)


def test_non_str_metadata_key_refused(tmp_path):
    with pytest.raises(FormatError, match="metadata key 3"):
        save_lora_file(tmp_path / "x.safetensors", make_sd(), {3: "x"}, None)
    assert folder_listing(tmp_path) == []


def test_save_dtype_from_name():
    assert save_dtype_from_name("fp16") is torch.float16
    assert save_dtype_from_name("bf16") is torch.bfloat16
    assert save_dtype_from_name("float") is torch.float32
    assert save_dtype_from_name("FP32") is torch.float32
    assert save_dtype_from_name(None) is None
    assert save_dtype_from_name("") is None
    assert save_dtype_from_name(torch.bfloat16) is torch.bfloat16
    with pytest.raises(ConfigError):
        save_dtype_from_name("fp8")
    with pytest.raises(ConfigError):
        save_dtype_from_name(torch.float64)


# ----------------------------------------------------------------------------------------------------------------------
# Atomicity
# ----------------------------------------------------------------------------------------------------------------------


def _half_then(exc: BaseException):
    def fake_write_all(fh, data):
        fh.write(data[: len(data) // 2])
        fh.flush()
        raise exc

    return fake_write_all


@pytest.mark.parametrize("exc", [RuntimeError("boom mid-write"), KeyboardInterrupt()])
def test_exception_inside_write_cleans_up_and_keeps_old_file(tmp_path, monkeypatch, exc):
    target = tmp_path / "x.safetensors"
    save_lora_file(target, make_sd(seed=1), {"ss_v": "old"}, None)
    before = target.read_bytes()
    monkeypatch.setattr(sio, "_write_all", _half_then(exc))
    with pytest.raises(type(exc)):
        save_lora_file(target, make_sd(seed=2), {"ss_v": "new"}, None)
    assert target.read_bytes() == before
    assert folder_listing(tmp_path) == ["x.safetensors"]


def test_exception_inside_first_write_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(sio, "_write_all", _half_then(RuntimeError("boom")))
    with pytest.raises(RuntimeError):
        save_lora_file(tmp_path / "x.safetensors", make_sd(), {}, None)
    assert folder_listing(tmp_path) == []


def test_oserror_in_fsync_becomes_format_error(tmp_path, monkeypatch):
    target = tmp_path / "x.safetensors"
    save_lora_file(target, make_sd(seed=1), {}, None)
    before = target.read_bytes()

    def no_space(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sio.os, "fsync", no_space)
    with pytest.raises(FormatError, match="No space left on device") as err:
        save_lora_file(target, make_sd(seed=2), {}, None)
    assert "x.safetensors" in str(err.value)
    assert target.read_bytes() == before
    assert folder_listing(tmp_path) == ["x.safetensors"]


def test_oserror_in_replace_cleans_up(tmp_path, monkeypatch):
    def refuse(src, dst):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(sio.os, "replace", refuse)
    with pytest.raises(FormatError, match="Permission denied"):
        save_lora_file(tmp_path / "x.safetensors", make_sd(), {}, None)
    assert folder_listing(tmp_path) == []


def test_temp_name_is_hidden_in_same_folder(tmp_path, monkeypatch):
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append((Path(src), Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(sio.os, "replace", spy)
    atomic_write_bytes(tmp_path / "a.safetensors", b"12345")
    ((src, dst),) = seen
    assert src.parent == dst.parent == tmp_path
    assert src.name.startswith(f".a.safetensors.tmp-{os.getpid()}-")
    assert not src.name.endswith(".safetensors")  # A1111 does not list it
    assert (tmp_path / "a.safetensors").read_bytes() == b"12345"


def test_remove_stale_temp_files(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".x.safetensors.tmp-{dead.pid}-deadbeef"
    mine = tmp_path / f".y.safetensors.tmp-{os.getpid()}-0badcafe"
    other = tmp_path / ".hidden-but-not-ours"
    keep = tmp_path / "x.safetensors"
    for p in (stale, mine, other, keep):
        p.write_bytes(b"x")
    removed = remove_stale_temp_files(tmp_path)
    assert removed == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, other.name, keep.name])
    old = time.time() - 7200
    os.utime(mine, (old, old))
    assert remove_stale_temp_files(tmp_path) == [mine]
    assert remove_stale_temp_files(tmp_path / "no-such-dir") == []


_CHILD = textwrap.dedent(
    """
    import sys, torch
    from lib_lora.safetensors_io import save_lora_file
    target = sys.argv[1]
    # ~64 MiB of fp32: each save takes a while, so a kill often lands inside the write.
    sd = {}
    for m in range(4):
        sd[f"lora_unet_m{m}.lora_down.weight"] = torch.full((64, 32768), float(m + 1))
        sd[f"lora_unet_m{m}.lora_up.weight"] = torch.full((32768, 64), float(m + 1) / 8)
        sd[f"lora_unet_m{m}.alpha"] = torch.tensor(32.0)
    i = 0
    while True:
        save_lora_file(target, sd, {"ss_iteration": i}, None)
        print("saved", i, flush=True)
        i += 1
    """
)


def _check_complete(target: Path) -> None:
    sd, md = load_lora_file(target)
    assert md["sshs_model_hash"] == addnet_hash_safetensors(target)
    assert len(sd) == 12
    for m in range(4):
        assert torch.equal(sd[f"lora_unet_m{m}.lora_down.weight"], torch.full((64, 32768), float(m + 1)))
        assert torch.equal(sd[f"lora_unet_m{m}.lora_up.weight"], torch.full((32768, 64), float(m + 1) / 8))
        assert sd[f"lora_unet_m{m}.alpha"].item() == 32.0


@pytest.mark.slow
@pytest.mark.skipif(os.name == "nt", reason="SIGKILL is POSIX")
@pytest.mark.parametrize("after_saves", [0, 1])
def test_sigkill_mid_save_leaves_nothing_or_a_complete_file(tmp_path, after_saves):
    target = tmp_path / "big.safetensors"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(target)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    try:
        for _ in range(after_saves):
            line = proc.stdout.readline()
            assert line.startswith(b"saved"), (line, proc.stderr.read() if proc.poll() is not None else b"")
        deadline = time.monotonic() + 120
        caught_temp = False
        while time.monotonic() < deadline and proc.poll() is None:
            if any(name.startswith(".big.safetensors.tmp-") for name in os.listdir(tmp_path)):
                caught_temp = True
                break
            time.sleep(0.0005)
        assert proc.poll() is None, proc.stderr.read()
        assert caught_temp, "the child never started writing"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    if target.exists():
        _check_complete(target)
    else:
        assert after_saves == 0  # once one save completed, the final name must hold a file
    # whatever the kill left is only a hidden temp file, which the stale cleanup removes
    leftovers = [n for n in os.listdir(tmp_path) if n != target.name]
    assert all(n.startswith(".big.safetensors.tmp-") for n in leftovers)
    assert sorted(p.name for p in remove_stale_temp_files(tmp_path)) == sorted(leftovers)
    assert os.listdir(tmp_path) == ([target.name] if target.exists() else [])


# ----------------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------------


def test_load_without_metadata_gives_empty_dict(tmp_path):
    path = tmp_path / "plain.safetensors"
    safetensors.torch.save_file(make_sd(), str(path))
    sd, md = load_lora_file(path)
    assert md == {}
    assert len(sd) == 9


def test_load_truncated_file_is_format_error(tmp_path):
    path = save_lora_file(tmp_path / "t.safetensors", make_sd(), {}, None)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(FormatError, match=r"^t\.safetensors: not a readable safetensors file"):
        load_lora_file(path)


@pytest.mark.parametrize("content", [b"", b"garbage", b"\xff" * 8 + b"{}", struct.pack("<Q", 5) + b"{bad}"])
def test_load_garbage_is_format_error(tmp_path, content):
    path = tmp_path / "g.safetensors"
    path.write_bytes(content)
    with pytest.raises(FormatError, match=r"g\.safetensors"):
        load_lora_file(path)


def test_load_missing_file_and_bad_extension(tmp_path):
    with pytest.raises(FormatError, match=r"nope\.safetensors: no such file"):
        load_lora_file(tmp_path / "nope.safetensors")
    with pytest.raises(FormatError, match=r"nope\.pt: no such file"):
        load_lora_file(tmp_path / "nope.pt")
    (tmp_path / "x.bin").write_bytes(b"x")
    with pytest.raises(FormatError, match="unsupported extension '.bin'"):
        load_lora_file(tmp_path / "x.bin")


@pytest.mark.parametrize("ext", [".pt", ".ckpt"])
def test_load_torch_file(tmp_path, ext):
    sd = make_sd()
    path = tmp_path / f"old{ext}"
    torch.save(sd, path)
    loaded, md = load_lora_file(path)
    assert md == {}
    assert set(loaded) == set(sd) and all(torch.equal(loaded[k], sd[k]) for k in sd)
    wrapped = tmp_path / f"wrapped{ext}"
    torch.save({"state_dict": sd, "epoch": 3}, wrapped)
    assert set(load_lora_file(wrapped)[0]) == set(sd)


class _Evil:
    def __reduce__(self):
        return (Path.touch, (Path(os.environ["LIB_LORA_PWNED"]),))


def test_load_torch_file_never_unpickles_objects(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("LIB_LORA_PWNED", str(marker))
    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"x.lora_up.weight": _Evil()}, fh, protocol=2)
    with pytest.raises(FormatError, match=r"evil\.pt: not a readable weights-only torch file"):
        load_lora_file(path)
    assert not marker.exists()


def test_load_torch_file_without_tensors(tmp_path):
    path = tmp_path / "empty.pt"
    torch.save({"epoch": 1}, path)
    with pytest.raises(FormatError, match="holds no tensors"):
        load_lora_file(path)
    torch.save([torch.zeros(1)], path)
    with pytest.raises(FormatError, match="holds a list"):
        load_lora_file(path)


# ----------------------------------------------------------------------------------------------------------------------
# Grouping and finiteness
# ----------------------------------------------------------------------------------------------------------------------


def test_group_lora_keys():
    sd = make_sd()
    sd[f"{Q}.lora_mid.weight"] = torch.zeros(1)
    sd[f"{Q}.dora_scale"] = torch.zeros(1)
    sd["lora_unet_x.hada_w1_a"] = torch.zeros(1)
    sd[f"{TE}.bias"] = torch.zeros(1)
    sd["nodot"] = torch.zeros(1)
    sd["bundle_emb.sks.string_to_param.*"] = torch.zeros(1)
    modules, unknown = group_lora_keys(sd)
    assert set(modules) == {Q, P, TE}
    assert set(modules[Q]) == {"lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha", "dora_scale"}
    assert modules[P]["lora_up.weight"] is sd[f"{P}.lora_up.weight"]
    assert unknown == ["lora_unet_x.hada_w1_a", f"{TE}.bias", "nodot", "bundle_emb.sks.string_to_param.*"]
    modules2, unknown2 = group_lora_keys([f"{Q}.alpha", "zzz"])
    assert modules2 == {Q: {"alpha": f"{Q}.alpha"}} and unknown2 == ["zzz"]


@needs_ref
def test_group_reference_files():
    sd, _ = load_lora_file(REF_DIR / "test_lora.safetensors")
    modules, unknown = group_lora_keys(sd)
    assert len(modules) == 204 and unknown == []
    assert all(set(parts) == {"lora_down.weight", "lora_up.weight", "alpha"} for parts in modules.values())
    assert sum(name.startswith("lora_te_") for name in modules) == 12
    bogus, _ = load_lora_file(REF_DIR / "test_lora_bogus.safetensors")
    modules_b, unknown_b = group_lora_keys(bogus)
    assert len(modules_b) == 205 and unknown_b == []
    assert "lora_unet_bogus_block_0_to_q" in modules_b
    check_finite(sd)


def test_check_finite():
    sd = make_sd()
    check_finite(sd)
    sd["ints.alpha"] = torch.tensor(3)
    check_finite(sd)
    bad_key = f"{Q}.lora_up.weight"
    sd[bad_key][0, 0] = float("nan")
    sd[f"{TE}.lora_up.weight"][0, 0] = float("inf")
    with pytest.raises(FormatError) as err:
        check_finite(sd)
    assert str(err.value) == f"{bad_key} holds NaN"
    with pytest.raises(FormatError, match=rf"^{TE}\.lora_up\.weight holds Inf$"):
        check_finite({f"{TE}.lora_up.weight": sd[f"{TE}.lora_up.weight"].bfloat16()})


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_batched_finite_check_names_the_key(bad):
    """The joined check finds one bad value among many small tensors (and in a tensor checked
    alone), and the message names its key as check_finite does."""
    g = torch.Generator().manual_seed(0)
    sd = {f"m{i}.lora_up.weight": torch.randn(8, 4, generator=g) for i in range(50)}
    sd["m0.alpha"] = torch.tensor(4.0, dtype=torch.float16)
    sd["ids"] = torch.arange(5)
    sd["big.lora_down.weight"] = torch.randn(10, 10, generator=g)  # >= chunk: checked alone
    check_finite(sd, chunk=64)
    for key in ("m37.lora_up.weight", "m0.alpha", "big.lora_down.weight"):
        broken = dict(sd)
        broken[key] = broken[key].clone().reshape(-1)
        broken[key][-1] = bad
        with pytest.raises(FormatError, match=f"{key} holds {'NaN' if bad != bad else 'Inf'}"):
            check_finite(broken, chunk=64)
