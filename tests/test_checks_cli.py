"""Tests of lib_lora.checks.inspect_file and the command line (`python -m lib_lora keys|inspect`), on the shared
reference LoRA files and on small files written here."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from lib_lora.checks import inspect_file
from lib_lora.cli import main

BOGUS = "lora_unet_bogus_block_0_to_q"
NAN_KEY = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_v.lora_up.weight"


@pytest.fixture(scope="module")
def nan_file(reference_lora_dir, tmp_path_factory) -> Path:
    """test_lora.safetensors with one NaN in one lora_up (written without validation, as a damaged download)."""
    sd = safetensors.torch.load_file(str(reference_lora_dir / "test_lora.safetensors"))
    sd[NAN_KEY][0, 0] = float("nan")
    path = tmp_path_factory.mktemp("nan") / "damaged.safetensors"
    safetensors.torch.save_file(sd, str(path), metadata={"ss_base_model_version": "sd_v1"})
    return path


def _tiny_file(path: Path, modules: dict[str, tuple[int, int]], metadata: dict[str, str] | None = None) -> Path:
    """A file of rank-2 modules {name: (in, out)} with seeded random tensors and alpha 1."""
    g = torch.Generator().manual_seed(0)
    sd = {}
    for name, (cin, cout) in modules.items():
        sd[f"{name}.lora_down.weight"] = torch.randn(2, cin, generator=g)
        sd[f"{name}.lora_up.weight"] = torch.randn(cout, 2, generator=g)
        sd[f"{name}.alpha"] = torch.tensor(1.0)
    safetensors.torch.save_file(sd, str(path), metadata=metadata)
    return path


# ------------------------------------------------------------------------------------------------ inspect_file


def test_inspect_bogus_reference_file(reference_lora_dir):
    """On test_lora_bogus: SD1 (from metadata; the tiny widths say nothing), 193 UNet + 12 TE modules of rank/alpha
    4/4, and exactly one unmatched module, matched against the full-size SD1 tree."""
    report = inspect_file(reference_lora_dir / "test_lora_bogus.safetensors")
    assert report.arch == "sd1" and report.arch_reason == "metadata"
    assert report.counts == {"unet": 193, "te": 12}
    assert report.ranks == {"unet": {"4/4": 193}, "te": {"4/4": 12}}
    assert report.unmatched == [BOGUS]
    assert report.unknown_keys == [] and report.non_finite is None and report.conv_modules == 0
    text = report.to_text()
    assert f"unmatched modules: 1: {BOGUS}" in text and "DAMAGED" not in text


@pytest.mark.parametrize("stem", ["test_lora", "test_lora_compvis"])
def test_inspect_clean_reference_files(stem, reference_lora_dir):
    """test_lora (diffusers names) and test_lora_compvis (LDM names) have no unmatched module: both namings are
    recognised."""
    report = inspect_file(reference_lora_dir / f"{stem}.safetensors")
    assert report.arch == "sd1"
    assert report.counts == {"unet": 192, "te": 12}
    assert report.unmatched == [] and report.unknown_keys == []
    assert json.loads(json.dumps(report.to_dict()))["path"].endswith(f"{stem}.safetensors")


def test_inspect_nan_file_names_the_key(nan_file):
    """A NaN in one tensor is reported (not raised), naming the key."""
    report = inspect_file(nan_file)
    assert report.non_finite is not None and NAN_KEY in report.non_finite and "NaN" in report.non_finite
    assert f"DAMAGED: {NAN_KEY}" in report.to_text()


def test_inspect_guesses_sd2_from_widths_and_lists_unused_layer(tmp_path):
    """A file with SD2 widths (cross-attention 1024) is SD2 without metadata; a module on OpenCLIP layer 23 (which
    SD2 never runs) is listed as unmatched; a stray non-LoRA key is listed as unknown."""
    path = _tiny_file(tmp_path / "sd2.safetensors", {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (1024, 320),
        "lora_te_text_model_encoder_layers_22_self_attn_q_proj": (1024, 1024),
        "lora_te_text_model_encoder_layers_23_self_attn_q_proj": (1024, 1024),
    })
    sd = safetensors.torch.load_file(str(path))
    sd["lora_te2_text_projection.weight"] = torch.zeros(2, 2)
    safetensors.torch.save_file(sd, str(path))
    report = inspect_file(path)
    assert (report.arch, report.arch_reason) == ("sd2", "cross-attention width 1024")
    assert report.unmatched == ["lora_te_text_model_encoder_layers_23_self_attn_q_proj"]
    assert report.unknown_keys == ["lora_te2_text_projection.weight"]
    assert report.counts == {"unet": 1, "te": 2} and report.ranks["te"] == {"2/1": 2}


def test_inspect_sdxl_file(tmp_path):
    """lora_te1_/lora_te2_ keys mean SDXL; SDXL UNet modules match by LDM name (sd-scripts) or diffusers alias;
    a module on a layer SDXL does not have (attention at level 0) is unmatched."""
    path = _tiny_file(tmp_path / "xl.safetensors", {
        "lora_te1_text_model_encoder_layers_0_mlp_fc1": (768, 3072),
        "lora_te2_text_model_encoder_layers_31_self_attn_out_proj": (1280, 1280),
        "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q": (640, 640),
        "lora_unet_down_blocks_1_attentions_0_proj_in": (640, 640),
        "lora_unet_input_blocks_1_1_proj_in": (320, 320),
    })
    report = inspect_file(path)
    assert report.arch == "sdxl"
    assert report.counts == {"te1": 1, "te2": 1, "unet": 3}
    assert report.unmatched == ["lora_unet_input_blocks_1_1_proj_in"]


# ----------------------------------------------------------------------------------------------------- the CLI


@pytest.mark.parametrize("arch, counts", [
    ("sd1", {"unet": 192, "te": 72}),
    ("sd2", {"unet": 192, "te": 138}),
    ("sdxl", {"unet": 722, "te1": 72, "te2": 192}),
])
def test_cli_keys_json(arch, counts, capsys):
    """`keys --arch A --json` prints {"unet": [...], "te": [...]} (SDXL: te1, te2) with sd-scripts' counts."""
    assert main(["keys", "--arch", arch, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert list(data) == list(counts)
    assert {k: len(v) for k, v in data.items()} == counts
    assert all(isinstance(n, str) and n.startswith("lora_") for v in data.values() for n in v)


def test_cli_keys_text_and_conv_dim(capsys):
    """Without --json one name per line on stdout and the counts on stderr; --conv-dim adds the conv layers."""
    assert main(["keys", "--arch", "sd1", "--conv-dim", "8"]) == 0
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert len(lines) == 278 + 72
    assert "lora_unet_down_blocks_0_downsamplers_0_conv" in lines
    assert "lora_unet_mid_block_resnets_1_time_emb_proj" in lines
    assert "sd1: unet 278, te 72" in out.err


def test_cli_keys_rejects_unknown_arch(capsys):
    """An unknown --arch is an argparse error (exit 2), naming the choices."""
    with pytest.raises(SystemExit) as exc:
        main(["keys", "--arch", "sd3"])
    assert exc.value.code == 2
    assert "sd1" in capsys.readouterr().err


def test_cli_inspect_json_and_text(reference_lora_dir, capsys):
    """`inspect FILE --json` prints one parseable report (exit 0) naming the unmatched module; the text form too."""
    path = str(reference_lora_dir / "test_lora_bogus.safetensors")
    assert main(["inspect", path, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["unmatched"] == [BOGUS] and data["arch"] == "sd1" and data["non_finite"] is None
    assert main(["inspect", path]) == 0
    assert BOGUS in capsys.readouterr().out


def test_cli_inspect_nan_file_exits_1(nan_file, capsys):
    """A file with a NaN makes `inspect` exit 1 and name the key."""
    assert main(["inspect", str(nan_file)]) == 1
    assert NAN_KEY in capsys.readouterr().out
    assert main(["inspect", str(nan_file), "--json"]) == 1
    assert NAN_KEY in json.loads(capsys.readouterr().out)["non_finite"]


def test_cli_inspect_missing_file_is_one_line_error(tmp_path, capsys):
    """An unreadable file is a lib_lora error: exit 2 and one `error:` line on stderr, no traceback."""
    assert main(["inspect", str(tmp_path / "missing.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "missing.safetensors" in err and "Traceback" not in err


def test_python_m_lib_lora_inspect(reference_lora_dir, nan_file, capsys, monkeypatch):
    """`python -m lib_lora inspect A B --json` (the package's __main__, run as python -m runs it): a JSON list of
    both reports and exit status 1 because one file is damaged; the bogus file's unmatched module and the damaged
    key are named. (A fresh interpreter importing every submodule is covered by test_import_boundary.)"""
    argv = ["python -m lib_lora", "inspect", str(reference_lora_dir / "test_lora_bogus.safetensors"), str(nan_file),
            "--json"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exc:
        runpy.run_module("lib_lora", run_name="__main__", alter_sys=True)
    assert exc.value.code == 1
    bogus, damaged = json.loads(capsys.readouterr().out)
    assert bogus["unmatched"] == [BOGUS] and bogus["non_finite"] is None
    assert NAN_KEY in damaged["non_finite"] and damaged["unmatched"] == []


def test_cli_inspect_reports_good_files_despite_a_bad_one(reference_lora_dir, tmp_path, capsys):
    """inspect on a good file and a truncated one: the good file's report is printed, the bad one is one error line,
    exit status 2."""
    bad = tmp_path / "trunc.safetensors"
    data = (reference_lora_dir / "test_lora.safetensors").read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    status = main(["inspect", str(reference_lora_dir / "test_lora.safetensors"), str(bad)])
    out, err = capsys.readouterr()
    assert status == 2 and "test_lora.safetensors" in out and "unmatched modules: 0" in out
    assert "trunc.safetensors" in err and "Traceback" not in err


def test_cli_keys_into_a_closed_pipe_is_quiet():
    """``keys ... | head`` must not end in a BrokenPipeError traceback."""
    import subprocess

    cmd = f"{sys.executable} -m lib_lora keys --arch sd1 --json | head -n 2"
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=300)
    assert proc.stdout.splitlines()[0] == "{" and "Traceback" not in proc.stderr
