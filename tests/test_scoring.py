"""lib_lora.scoring with a random-weight tiny open_clip model (built from a model config at small width; nothing is
downloaded): loading rules, the mechanics of the three signals and the combined score, tables, "apply", and the
property that the cell made from a training image scores the highest fidelity."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from _paths import dog_photos
from PIL import Image

open_clip = pytest.importorskip("open_clip")

from lib_lora.errors import ConfigError  # noqa: E402
from lib_lora.grid import plan_grid  # noqa: E402
from lib_lora.scoring import (  # noqa: E402
    ClipScorer,
    ScoringUnavailable,
    adherence_text,
    apply_best,
    find_training_images,
    load_clip,
    load_training_images,
    parse_clip_spec,
    score_grid,
)
from lib_lora.sidecar import read_sidecar, write_sidecar  # noqa: E402

TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module")
def tiny_clip_files(tmp_path_factory, torch_single_thread):
    """(config json, weights .bin, weights .safetensors) of a random tiny open_clip CLIP."""
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("clip")
    cfg = d / "lib-lora-tiny-clip.json"
    cfg.write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(cfg)
    torch.manual_seed(0)
    model = open_clip.create_model("lib-lora-tiny-clip")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    torch.save(state, d / "tiny.bin")
    save_file(state, str(d / "tiny.safetensors"))
    return cfg, d / "tiny.bin", d / "tiny.safetensors"


@pytest.fixture(scope="module")
def scorer(tiny_clip_files) -> ClipScorer:
    cfg, weights, _ = tiny_clip_files
    return load_clip(f"{cfg}:{weights}")


def _noise(seed: int, size: int = 64) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(arr, "RGB")


# ----------------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------------


def test_parse_clip_spec():
    assert parse_clip_spec("ViT-L-14:/m/clip.bin") == ("ViT-L-14", Path("/m/clip.bin"))
    assert parse_clip_spec("ViT-B-32:C:/m/clip.bin") == ("ViT-B-32", Path("C:/m/clip.bin"))
    assert parse_clip_spec("C:/m/ViT-L-14.pt") == ("", Path("C:/m/ViT-L-14.pt"))
    assert parse_clip_spec("/m/ViT-L-14.pt") == ("", Path("/m/ViT-L-14.pt"))
    with pytest.raises(ConfigError):
        parse_clip_spec("  ")
    with pytest.raises(ConfigError):
        parse_clip_spec("ViT-L-14:")


def test_load_refuses_without_downloading(tmp_path, tiny_clip_files):
    _, weights, _ = tiny_clip_files
    with pytest.raises(ScoringUnavailable, match="not found"):
        load_clip(f"ViT-B-32:{tmp_path / 'absent.bin'}")
    with pytest.raises(ScoringUnavailable, match="unknown open_clip architecture"):
        load_clip(f"no-such-arch:{weights}")
    with pytest.raises(ScoringUnavailable, match="hf-hub|unknown"):
        load_clip(f"hf-hub:laion/x:{weights}")
    with pytest.raises(ScoringUnavailable, match="Hugging Face"):
        load_clip(f"roberta-ViT-B-32:{weights}")  # text tower from the HF hub: refused before anything loads
    with pytest.raises(ScoringUnavailable, match="architecture"):
        load_clip(str(weights))  # a plain state dict carries no architecture
    with pytest.raises(ScoringUnavailable, match="cannot load"):
        load_clip(f"ViT-B-32:{weights}")  # wrong architecture for the file: a message, not a crash


def test_load_bin_and_safetensors_agree(tiny_clip_files, scorer):
    cfg, _, st = tiny_clip_files
    other = load_clip(f"{cfg}:{st}")
    img = [_noise(1)]
    assert torch.allclose(scorer.embed_images(img), other.embed_images(img), atol=1e-6)
    emb = scorer.embed_texts(["a dog", "a cat on a long sentence " * 20])  # long text is truncated, not an error
    assert emb.shape == (2, 32)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_from_model_wraps_a_loaded_model(scorer):
    wrapped = ClipScorer.from_model(scorer.model, scorer.preprocess, name="interrogator")
    assert wrapped.tokenize is open_clip.tokenize
    with pytest.raises(ScoringUnavailable):
        ClipScorer.from_model(None, None)
    with pytest.raises(ScoringUnavailable, match="not a CLIP"):
        ClipScorer.from_model(torch.nn.Linear(1, 1), scorer.preprocess)


# ----------------------------------------------------------------------------------------------------------------------
# Mechanics
# ----------------------------------------------------------------------------------------------------------------------


def test_adherence_text_removes_tags_and_trigger():
    assert adherence_text("sks dog, <lora:x-000001:0.5> on a beach", "sks dog") == "on a beach"
    assert adherence_text("photo of SKS Dog in snow <lyco:y:1>", ["sks dog"]) == "photo of in snow"
    assert adherence_text("sks dogs run", "sks dog") == "sks dogs run"  # whole phrase only


def _cells(plan, images):
    return [(c, images.get((c.row, c.col, c.page))) for c in plan.cells]


def test_training_image_cell_scores_highest_fidelity(scorer):
    """A cell that reproduces a training photo has similarity 1 to it, so it wins fidelity in "max" mode for any
    CLIP model. In "mean" mode the property needs a model with semantics (a random-weight CLIP embeds unrelated
    pictures almost alike), so it is checked there with a one-image training set, where mean = max."""
    photos = dog_photos()
    train, problems = load_training_images(photos)
    assert not problems and len(train) == len(photos)
    plan = plan_grid(["run-000001", "run-000002", "run"], "0.5,1", "sks dog on grass")
    for mode, train_set, copied in (("max", train, 2), ("max", train, 4), ("mean", train[1:2], 0)):
        images = {(c.row, c.col, c.page): _noise(10 + i) for i, c in enumerate(plan.cells)}
        images[(0, 0, 0)] = train[(copied + 1) % len(train)].rotate(90)  # another dog photo, turned
        images[(1, 2, 0)] = train_set[copied].resize((64, 64))  # the final file at weight 1 drew a training image
        scores = score_grid(scorer, _cells(plan, images), train_set, trigger_words="sks dog", fidelity=mode)
        fid = {(g.row, g.col): g.fidelity for g in scores.groups}
        assert max(fid, key=fid.get) == (1, 2), (mode, fid)
        assert fid[(1, 2)] > 0.99  # the same picture as a training image (up to resizing)
        assert scores.training_images == len(train_set)
    assert "one seed" in " ".join(scores.messages)
    assert scores.weights["overfit"] == 0


def test_combined_score_table_and_best(scorer):
    train = [_noise(100 + i) for i in range(3)]
    plan = plan_grid(["a-000001", "a"], "0.5,1", "a photo", seeds=[1, 2], baseline=True)
    images = {}
    for c in plan.cells:
        if c.baseline:
            images[(c.row, c.col, c.page)] = _noise(500 + c.page)
        elif c.col == 1 and c.weight == 1:
            images[(c.row, c.col, c.page)] = train[0]  # collapsed: the same training copy whatever the seed
        elif c.col == 0 and c.weight == 0.5:
            images[(c.row, c.col, c.page)] = None  # missing file
        else:
            images[(c.row, c.col, c.page)] = _noise(1000 + 7 * c.row + 3 * c.col + c.page)
    scores = score_grid(scorer, _cells(plan, images), train)
    assert [(g.checkpoint, g.weight) for g in scores.groups] == [("a-000001", 0.5), ("a-000001", 1.0),
                                                                 ("a", 0.5), ("a", 1.0)]
    missing = scores.group("a-000001", 0.5)
    assert missing.images == 0 and missing.combined is None and missing.fidelity is None
    collapsed = scores.group("a", 1.0)
    assert collapsed.collapse == pytest.approx(1.0, abs=1e-5)
    assert collapsed.overfit == pytest.approx(1.0 - scores.reference_collapse, abs=1e-5)
    assert scores.baseline is not None and scores.baseline.images == 2  # one baseline image per seed
    assert scores.reference_collapse == pytest.approx(scores.baseline.collapse)
    for g in scores.groups:
        if g.images:
            assert math.isfinite(g.combined)
    assert scores.best is not None and scores.best.best
    assert sum(g.best for g in scores.groups) == 1
    assert len(scores.cells) == 2 + 3 * 2  # baseline once per seed + three LoRA groups x two seeds
    md = scores.table_markdown()
    assert md.splitlines()[0].startswith("| checkpoint | weight | fidelity")
    assert "no LoRA" in md and "best:" in md
    csv_lines = scores.table_csv().splitlines()
    assert csv_lines[0] == "checkpoint,weight,fidelity,adherence,collapse,overfit,combined,best"
    assert len(csv_lines) == 1 + 1 + 4
    json.dumps(scores.to_dict())


def test_weights_change_the_winner(scorer):
    train = [_noise(7)]
    plan = plan_grid(["x"], "0.2,1", "red")
    images = {(1, 0, 0): train[0], (0, 0, 0): Image.new("RGB", (64, 64), "red")}
    by_fid = score_grid(scorer, _cells(plan, images), train, weights={"fidelity": 1, "adherence": 0})
    assert by_fid.best.weight == 1.0
    with pytest.raises(ConfigError):
        score_grid(scorer, _cells(plan, images), train, weights={"fidelity": 0, "adherence": 0, "overfit": 0})
    with pytest.raises(ConfigError):
        score_grid(scorer, _cells(plan, images), train, weights={"style": 1})
    with pytest.raises(ConfigError):
        score_grid(scorer, _cells(plan, images), train, fidelity="median")
    none = score_grid(scorer, [(c, None) for c in plan.cells], [])
    assert none.best is None and "nothing to score" in " ".join(none.messages)


# ----------------------------------------------------------------------------------------------------------------------
# Training images and apply
# ----------------------------------------------------------------------------------------------------------------------


def test_find_training_images(tmp_path):
    ds = tmp_path / "ds"
    (ds / "10_sks dog").mkdir(parents=True)
    for i in range(3):
        _noise(i).save(ds / "10_sks dog" / f"{i}.png")
    (ds / "10_sks dog" / "0.txt").write_text("sks dog")
    _noise(9).save(ds / "top.jpg")
    found = find_training_images(ds)
    assert [p.name for p in found] == ["0.png", "1.png", "2.png", "top.jpg"]
    assert len(find_training_images(ds, limit=2)) == 2
    (tmp_path / "run.config.toml").write_text(f'train_data_dir = "{ds.as_posix()}"\n')
    assert find_training_images(run_folder=tmp_path, run_name="run") == found
    assert find_training_images(run_folder=tmp_path, run_name="other") == []


def test_apply_writes_sidecar_and_preview(tmp_path, scorer):
    lora = tmp_path / "立绘 style v1-000002.safetensors"
    lora.write_bytes(b"x")
    write_sidecar(lora, activation_text="sks", notes="keep me")
    plan = plan_grid([str(lora)], "0.3,0.8", "sks dog")
    win = Image.new("RGB", (64, 64), "blue")
    train = [win]
    images = {(0, 0, 0): _noise(3), (1, 0, 0): win}
    cells = _cells(plan, images)
    scores = score_grid(scorer, cells, train, weights={"fidelity": 1, "adherence": 0})
    assert scores.best.weight == 0.8
    out = apply_best(scores, {lora.stem: lora}, cells)
    side = read_sidecar(lora)
    assert side["preferred weight"] == 0.8 and side["notes"] == "keep me" and side["activation text"] == "sks"
    preview = tmp_path / "立绘 style v1-000002.preview.png"
    assert out["preview"] == str(preview)
    with Image.open(preview) as im:
        assert im.getpixel((5, 5)) == (0, 0, 255)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left
    with pytest.raises(ConfigError):
        apply_best(scores, {}, cells)


# ----------------------------------------------------------------------------------------------------------------------
# Headless grid CLI with scoring
# ----------------------------------------------------------------------------------------------------------------------


def test_cli_grid_scores_and_applies(tmp_path, tiny_clip_files, capsys):
    from lib_lora.cli import main
    from lib_lora.model.headless import load_model
    from lib_lora.network import LoRANetwork
    from lib_lora.safetensors_io import save_lora_file

    cfg, weights, _ = tiny_clip_files
    ds = tmp_path / "ds" / "5_sks dog"
    ds.mkdir(parents=True)
    for p in dog_photos()[:2]:
        Image.open(p).convert("RGB").resize((64, 64)).save(ds / f"{p.stem}.png")
    runs = tmp_path / "runs"
    runs.mkdir()
    model = load_model("tiny-sd1")
    for i, stem in enumerate(["dog-000001", "dog"]):
        torch.manual_seed(i)
        net = LoRANetwork.create(model.unet, model.text_encoders, model.arch, network_dim=2, network_alpha=2)
        with torch.no_grad():
            for m in net.lora_modules():
                m.lora_up.weight.normal_(0, 0.5)
        save_lora_file(runs / f"{stem}.safetensors", net.kohya_state_dict(), {}, None)
    (runs / "dog.config.toml").write_text(f'train_data_dir = "{(tmp_path / "ds").as_posix()}"\n')
    out = tmp_path / "grid.png"
    argv = ["grid", "--run", str(runs / "dog"), "--weights", "0.5,1", "--prompt", "sks dog on grass", "--seed", "1",
            "--seed", "2", "--size", "64", "--steps", "2", "--output", str(out), "--no-trigger",
            "--clip-model", f"{cfg}:{weights}", "--apply-best"]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "grid.json").read_text(encoding="utf-8"))
    sc = summary["scoring"]
    assert sc["training_images"] == 2 and len(sc["groups"]) == 4
    assert sum(g["best"] for g in sc["groups"]) == 1
    best = sc["best"]
    assert Path(sc["table_md"]).read_text(encoding="utf-8").count("\n") >= 6
    assert Path(sc["table_csv"]).is_file()
    side = read_sidecar(runs / f"{best['checkpoint']}.safetensors")
    assert side["preferred weight"] == best["weight"]
    assert (runs / f"{best['checkpoint']}.preview.png").is_file()
    assert "best:" in capsys.readouterr().err

    # an unusable CLIP file: a warning, the grid without scores
    argv[argv.index("--clip-model") + 1] = f"{cfg}:{tmp_path / 'nope.bin'}"
    argv.remove("--apply-best")
    assert main(argv) == 0
    summary = json.loads((tmp_path / "grid.json").read_text(encoding="utf-8"))
    assert "not found" in summary["scoring"]["error"]
    assert "no scores" in capsys.readouterr().err
