"""lib_lora.grid: weight axes, whole-token Prompt S/R, the cell plan, the size guard and the labelled renderer."""

from __future__ import annotations

import pytest
from PIL import Image

from lib_lora.errors import ConfigError
from lib_lora.grid import (
    GridPlan,
    check_grid_size,
    check_placeholders,
    count_placeholder,
    format_weight,
    grid_layout,
    lora_name,
    parse_axis_values,
    parse_weights,
    plan_grid,
    render_grid,
    save_format,
    substitute,
)
from lib_lora.prompt_syntax import parse_lora_tags

TENTHS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
TENTH_LABELS = ["0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7", "0.8", "0.9", "1"]


# ------------------------------------------------------------------------------------------------------- weights
@pytest.mark.parametrize("spec", ["0.1-1.0 [10]", "0.1-1.0 (+0.1)", "0.1 - 1.0 (0.1)", "0.1,0.2-0.9 [8], 1"])
def test_tenths_are_exact_with_clean_labels(spec):
    weights = parse_weights(spec)
    assert weights == TENTHS  # exact float equality: no 0.30000000000000004
    assert [format_weight(w) for w in weights] == TENTH_LABELS


@pytest.mark.parametrize("spec, expected", [
    ("0.2,0.5,1", [0.2, 0.5, 1.0]),
    ("0-1 [4]", [0.0, 0.3333, 0.6667, 1.0]),  # inexact linspace values rounded to 4 decimals
    ("0-1 (+0.3)", [0.0, 0.3, 0.6, 0.9]),  # the end is never overshot (np.arange(0, 1.3, 0.3) gives 1.2)
    ("1-0 (0.25)", [1.0, 0.75, 0.5, 0.25, 0.0]),  # an unsigned step goes towards the end
    ("1-0 (-0.5)", [1.0, 0.5, 0.0]),
    ("0-2", [0.0, 1.0, 2.0]),
    ("-1--0.5 [2]", [-1.0, -0.5]),
    ("0.5-1 [1]", [0.5]),
    ("STRENGTH, 0.5, 1", [0.5, 1.0]),
])
def test_weight_specs(spec, expected):
    assert parse_weights(spec, placeholder="STRENGTH") == expected


@pytest.mark.parametrize("spec", ["abc", "nan", "inf", "0-1 (+0)", "0-1 (-0.1)", "0.5,0.5", "", "0-1 [0]",
                                  "0-1 (+0.0001)", "0.5, STRENGTH"])
def test_bad_weight_specs(spec):
    with pytest.raises(ConfigError):
        parse_weights(spec, placeholder="STRENGTH")


def test_axis_values_csv_and_placeholder():
    assert parse_axis_values('NUM, 000001, "a, b" ,000002', "NUM") == ["000001", "a, b", "000002"]
    with pytest.raises(ConfigError, match="duplicate"):
        parse_axis_values("a,b,a")
    with pytest.raises(ConfigError, match="only be the first"):
        parse_axis_values("a,NUM", "NUM")
    with pytest.raises(ConfigError):
        parse_axis_values("NUM", "NUM")


# ----------------------------------------------------------------------------------------------------------- S/R
def test_substitute_replaces_whole_tokens_only():
    text = "<lora:a:0.1> <lora:b:0.15> 10.1 0.1.2 x0.1 (0.1)"
    assert substitute(text, {"0.1": "0.7"}) == "<lora:a:0.7> <lora:b:0.15> 10.1 0.1.2 x0.1 (0.7)"
    assert count_placeholder(text, "0.1") == 2
    text = "<lora:mylora-NUM:STRENGTH> NUMBER xNUM my_lora_NUM NUM.x"
    assert substitute(text, {"NUM": "000001", "STRENGTH": "0.5"}) == \
        "<lora:mylora-000001:0.5> NUMBER xNUM my_lora_000001 000001.x"
    # one pass: a value holding the other placeholder is not replaced again
    assert substitute("NUM STRENGTH", {"NUM": "STRENGTH", "STRENGTH": "1"}) == "STRENGTH 1"


@pytest.mark.parametrize("placeholders", [("NUM", "NUM"), ("NUM", "NUMBER"), ("STR", "STRENGTH"), ("", "X")])
def test_placeholders_must_be_unique_and_not_nested(placeholders):
    with pytest.raises(ConfigError):
        check_placeholders(placeholders)
    with pytest.raises(ConfigError):
        plan_grid("1,2", "0.5", "<lora:x-NUM:STRENGTH> NUMBER STR", "sr", placeholders=placeholders)


def test_sr_5_checkpoints_x_10_weights_gives_50_distinct_prompts():
    weights = "STRENGTH, 0.1, 0.15, 0.2-0.9 (+0.1)"  # the WebUI form: search text first; 0.1 next to 0.15
    plan = plan_grid("NUM,000001,000002,000003,000004,000005", weights, "photo <lora:mylora-NUM:STRENGTH>, 0.15",
                     "sr", seeds=[7], negative_prompt="blurry NUM")
    assert (plan.cols, plan.rows) == (5, 10)
    assert plan.checkpoints == ("000001", "000002", "000003", "000004", "000005")  # no cell for "NUM"
    assert len({c.prompt for c in plan.cells}) == 50 and len(plan.cells) == 50
    for cell in plan.cells:
        (tag,) = parse_lora_tags(cell.prompt)
        assert tag.name == f"mylora-{cell.checkpoint}" and tag.te == tag.unet == cell.weight
        assert cell.prompt.endswith(">, 0.15")  # 0.15 in the text untouched
        assert cell.negative_prompt == f"blurry {cell.checkpoint}" and cell.seed == 7
    assert plan.row_labels[:3] == ("0.1", "0.15", "0.2") and plan.row_labels[-1] == "0.9"
    assert plan.cell(1, 2).prompt == "photo <lora:mylora-000003:0.15>, 0.15"


def test_sr_with_a_literal_search_text_never_hits_longer_numbers():
    """The WebUI way (search "0.1" in the prompt): 0.15 of another LoRA stays; the search value gets no cell."""
    plan = plan_grid("000001,000002", "0.1, 0.3, 0.5", "<lora:run-000001:0.1>, <lora:style:0.15>", "sr",
                     placeholders=("000001", "0.1"))
    assert plan.row_labels == ("0.3", "0.5") and plan.checkpoints == ("000002",)
    assert [c.prompt for c in plan.cells] == ["<lora:run-000002:0.3>, <lora:style:0.15>",
                                              "<lora:run-000002:0.5>, <lora:style:0.15>"]


def test_sr_errors():
    with pytest.raises(ConfigError, match="did not find 'STRENGTH'"):
        plan_grid("1,2", "0.5", "<lora:x-NUM:1>", "sr")
    with pytest.raises(ConfigError, match="did not find 'NUM'"):
        plan_grid("1,2", "0.5", "<lora:x-NUMBER:STRENGTH>", "sr")  # only whole words count
    with pytest.raises(ConfigError, match="outside"):
        plan_grid("1,2", "0.5", "NUM <lora:x-NUM:STRENGTH>", "sr", baseline=True)


def test_sr_baseline_drops_only_the_placeholder_tags():
    plan = plan_grid("1,2", "0.5", "photo <lora:x-NUM:STRENGTH> <lora:style:0.8>", "sr", baseline=True,
                     trigger_words="sks")
    base = [c for c in plan.cells if c.baseline]
    assert [c.col for c in base] == [0, 1] and {c.prompt for c in base} == {"sks, photo  <lora:style:0.8>"}
    assert plan.row_labels == ("no LoRA", "0.5")


# --------------------------------------------------------------------------------------------------------- plain
def test_plain_mode_names_files_by_stem_with_spaces_and_non_ascii(tmp_path):
    files = [tmp_path / "立绘 style v1-000001.safetensors", tmp_path / "立绘 style v1.safetensors"]
    plan = plan_grid(files, [0.5, 1], "a photo of sks dog", seeds=[7, 8], baseline=True,
                     trigger_words="sks dog, red hat")
    assert isinstance(plan, GridPlan)
    assert plan.checkpoints == ("立绘 style v1-000001", "立绘 style v1") == plan.col_labels
    assert plan.row_labels == ("no LoRA", "0.5", "1") and plan.seeds == (7, 8)
    cell = plan.cell(2, 0, page=1)
    assert cell.prompt == "red hat, a photo of sks dog <lora:立绘 style v1-000001:1>" and cell.seed == 8
    (tag,) = parse_lora_tags(cell.prompt)
    assert tag.name == "立绘 style v1-000001" and tag.te == tag.unet == 1.0
    assert plan.cell(0, 1).prompt == "red hat, a photo of sks dog" and plan.cell(0, 1).baseline
    assert (cell.row_label, cell.col_label, plan.cell(0, 1).row_label) == ("1", "立绘 style v1-000001", "no LoRA")
    # run order: page, then column (one network load), then row
    assert [(c.page, c.col, c.row) for c in plan.cells][:4] == [(0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 1, 0)]
    assert len(plan.cells) == 2 * 2 * 3 and plan.page_cells(1)[1][1].weight == 0.5


def test_plain_mode_parts_and_errors():
    plan = plan_grid(["a.safetensors"], "0.5", "p", part="unet", other_weight=0.0)
    assert plan.cells[0].prompt == "p <lora:a:te=0:unet=0.5>" and plan.row_labels == ("unet 0.5",)
    plan = plan_grid(["a"], "0.5", "", part="te")
    assert plan.cells[0].prompt == "<lora:a:te=0.5:unet=1>"
    assert lora_name("d/model.v2") == "model.v2" and lora_name("d/x-000001.pt") == "x-000001"
    with pytest.raises(ConfigError, match="share a stem"):
        plan_grid(["a/x.safetensors", "b/x.pt"], "1", "p")
    with pytest.raises(ConfigError, match="cannot be written"):
        plan_grid(["a:b.safetensors"], "1", "p")
    with pytest.raises(ConfigError, match="seeds"):
        plan_grid(["a"], "1", "p", seeds=[-1])
    with pytest.raises(ConfigError, match="mode"):
        plan_grid(["a"], "1", "p", mode="xyz")
    with pytest.raises(ConfigError, match="column labels"):
        plan_grid(["a", "b"], "1", "p", col_labels=["only one"])


# ---------------------------------------------------------------------------------------------------- size guard
def test_size_ok_png_and_split():
    ok = check_grid_size(5, 10, 512, 512, label_w=60, label_h=40, fmt="jpg")
    assert ok.action == "ok" and ok.fmt == "jpeg" and ok.message == "" and len(ok.pages) == 1
    assert (ok.width, ok.height) == (60 + 5 * 512, 40 + 10 * 512)

    wide = check_grid_size(130, 1, 512, 512, label_w=60, label_h=40, fmt="jpeg")  # 66,620 px wide, 36.7 MP
    assert wide.action == "png" and wide.fmt == "png" and "65535" in wide.message
    assert check_grid_size(40, 1, 512, 512, fmt="webp").action == "png"  # WebP: 16,383 px per side

    big = check_grid_size(40, 10, 512, 512, label_w=60, label_h=40, fmt="png")  # 106 MP > 89.5 MP
    assert big.action == "split" and "pages" in big.message
    _assert_pages_cover(big, 40, 10)
    assert all(len(p.cols) == 40 for p in big.pages)  # whole rows: every checkpoint stays on each page


def _assert_pages_cover(decision, cols, rows):
    seen = [(r, c) for p in decision.pages for r in p.rows for c in p.cols]
    assert sorted(seen) == [(r, c) for r in range(rows) for c in range(cols)]
    limit = Image.MAX_IMAGE_PIXELS
    assert all(p.width * p.height <= limit for p in decision.pages)


def test_split_also_cuts_columns_and_respects_the_format():
    d = check_grid_size(400, 10, 512, 512, label_w=60, label_h=40, fmt="jpeg")
    assert d.action == "split" and d.fmt == "jpeg"
    _assert_pages_cover(d, 400, 10)
    assert all(max(p.width, p.height) <= 65535 for p in d.pages)
    assert {len(p.cols) for p in d.pages} == {100} and {len(p.rows) for p in d.pages} == {2, 3}  # balanced


def test_size_limit_follows_pillow_and_overrides(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert check_grid_size(40, 10, 512, 512).action == "ok"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)
    assert check_grid_size(4, 4, 100, 100).action == "split"
    assert check_grid_size(4, 4, 100, 100, max_pixels=None).action == "ok"
    with pytest.raises(ConfigError, match="one 400x400 px cell"):
        check_grid_size(2, 2, 400, 400, label_h=20)
    with pytest.raises(ConfigError, match="format"):
        check_grid_size(1, 1, 8, 8, fmt="tiff")
    assert save_format("x/g.JPG") == "jpeg"


# ------------------------------------------------------------------------------------------------------- render
def test_render_is_labels_plus_cells_with_marks():
    rows, cols = ["no LoRA", "0.5", "1"], ["立绘 style v1-000001", "a-very-long-name-step00000200", "x"]
    layout = grid_layout(rows, cols, 32, 24, title="a photo | seed 7")
    assert layout.label_w > 0 and layout.label_h > layout.title_h > 0
    assert max(len(lines) for lines in layout.col_lines) > 1  # long names wrap to the cell width
    colors = [[(r * 80, c * 80, 50) for c in range(3)] for r in range(3)]
    images = [[Image.new("RGB", (32, 24), colors[r][c]) for c in range(3)] for r in range(3)]
    images[1][2] = images[2][2] = None
    grid = render_grid(images, layout, marks={(1, 2): "missing"})
    assert grid.size == (layout.label_w + 3 * 32, layout.label_h + 3 * 24) == (layout.width, layout.height)
    x0, y0, x1, y1 = layout.cell_box(2, 1)
    assert grid.getpixel((x1 - 2, y1 - 2)) == colors[2][1] and grid.getpixel((x0, y0)) == colors[2][1]
    x0, y0, _, _ = layout.cell_box(2, 2)
    assert grid.getpixel((x0 + 16, y0 + 4)) == (0xBB, 0xBB, 0xBB)  # grey missing cell
    page = render_grid(images, layout, rows=range(1, 3), cols=range(0, 2))
    assert page.size == (layout.label_w + 2 * 32, layout.label_h + 2 * 24)
    with pytest.raises(ConfigError):
        render_grid(images[:2], layout)
