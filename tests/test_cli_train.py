"""``python -m lib_lora train`` in a subprocess, as a user runs it: ``--config FILE.toml`` plus flags, the resolved
``<name>.config.toml`` next to the outputs, ``inspect`` on the result, and one-line errors with exit status 2."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _paths import dog_photos

from lib_lora.cli import build_parser
from lib_lora.cli_train import config_from_args
from lib_lora.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]




def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m lib_lora ARGS`` from the repository root, one torch thread (the tiny model is faster so)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "lib_lora", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit status 2, no traceback, and stderr is a single line holding ``needles``."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, f"{len(lines)} lines on stderr:\n{proc.stderr}"
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """A 2-step training through the command line: a TOML file with the settings, ``--max-train-steps 2`` and
    ``--output-name`` given as flags on top of it."""
    tmp = tmp_path_factory.mktemp("cli")
    sub = tmp / "data" / "1_sks dog"
    sub.mkdir(parents=True)
    for photo in dog_photos()[:2]:
        shutil.copyfile(photo, sub / photo.name)
    out = tmp / "out"
    toml = tmp / "run.toml"
    toml.write_text(
        'model = "tiny-sd1"\n'
        f"train_data_dir = {str(tmp / 'data')!r}\n"
        f"output_dir = {str(out)!r}\n"
        'output_name = "from_file"\n'
        'trigger_words = ["sks dog"]\n'
        "resolution = 64\nmin_bucket_reso = 64\nmax_bucket_reso = 128\n"
        "max_train_steps = 50\ntrain_batch_size = 1\nsave_every_n_steps = 1000\n"
        'device = "cpu"\n'
        "[network]\nnetwork_dim = 4\nnetwork_alpha = 2.0\n",
        encoding="utf-8")
    proc = run_cli("train", "--config", str(toml), "--max-train-steps", "2", "--output-name", "cli_lora",
                   "--learning-rate", "5e-4", "--no-progress")
    return proc, out


def test_cli_train_from_toml_with_flag_overrides(cli_run):
    """Proves the command-line run: exit 0, flags override the TOML file (2 steps, name ``cli_lora``, lr 5e-4),
    the file's other keys apply (rank 4, alpha 2), ``cli_lora.config.toml`` holding the resolved settings is
    written next to ``cli_lora.safetensors``, and the output path is printed on stdout."""
    proc, out = cli_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = out / "cli_lora.safetensors"
    assert final.is_file() and (out / "cli_lora.json").is_file()
    assert str(final) in proc.stdout.splitlines()
    resolved = TrainConfig.from_toml(out / "cli_lora.config.toml")
    assert (resolved.max_train_steps, resolved.output_name, resolved.learning_rate) == (2, "cli_lora", 5e-4)
    assert (resolved.network_dim, resolved.network_alpha, resolved.resolution) == (4, 2.0, 64)
    assert not (out / "from_file.config.toml").exists()
    assert "finished: 2 steps" in proc.stderr


def test_cli_output_passes_inspect(cli_run):
    """Proves ``python -m lib_lora inspect`` accepts the trained file: exit 0, SD1, rank/alpha 4/2, no damage."""
    _, out = cli_run
    proc = run_cli("inspect", str(out / "cli_lora.safetensors"))
    assert proc.returncode == 0, proc.stderr
    assert "sd1" in proc.stdout and "4/2.0" in proc.stdout
    assert "DAMAGED" not in proc.stdout
    assert "unmatched modules: 0" in proc.stdout


@pytest.mark.parametrize("args, needles", [
    pytest.param(["--network-dim", "0"], ["network_dim", "0"], id="validate-range"),
    pytest.param(["--mixed-precision", "fp8"], ["mixed_precision", "fp8"], id="validate-choice"),
    pytest.param(["--config", "/no/such/file.toml"], ["/no/such/file.toml"], id="missing-config"),
    pytest.param(["--network-dim", "abc"], ["--network-dim", "abc"], id="not-an-int"),
])
def test_cli_bad_flag_value_is_one_line_with_status_2(args, needles):
    """Proves a bad flag value ends the command with exit status 2 and one line on stderr naming the flag or field
    and the value, never a traceback (and before any model loads or file is written)."""
    proc = run_cli("train", *args, "--output-dir", "/nonexistent-dir/should-not-be-created", timeout=120)
    assert_one_line_error(proc, *needles)
    assert not Path("/nonexistent-dir").exists()


@pytest.mark.parametrize("flag", ["--save-state", "--gradient-checkpointing"])
def test_cli_bad_boolean_value_is_refused(flag):
    """Proves a boolean flag refuses a word that is neither true nor false (argparse exit status 2)."""
    with pytest.raises(SystemExit) as info:
        config_from_args(build_parser().parse_args(["train", flag, "ture"]))
    assert info.value.code == 2


def test_cli_boolean_values():
    """Proves the accepted boolean spellings and that flags override the defaults."""
    for word, value in [("true", True), ("1", True), ("yes", True), ("on", True), ("false", False), ("0", False),
                        ("no", False), ("off", False)]:
        cfg = config_from_args(build_parser().parse_args(["train", "--save-state", word]))
        assert cfg.save_state is value
    cfg = config_from_args(build_parser().parse_args(["train", "--trigger-words", "sks dog", "red collar",
                                                      "--network-dim", "8"]))
    assert cfg.trigger_words == ["sks dog", "red collar"] and cfg.network_dim == 8
