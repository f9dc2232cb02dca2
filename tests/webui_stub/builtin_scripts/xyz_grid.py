"""Stand-in for ``scripts/xyz_grid.py`` (A1111 v1.10.1): ``AxisOption`` (+ ``AxisOptionImg2Img`` /
``AxisOptionTxt2Img``), a few ``axis_options``, the ``format_value*`` helpers, ``apply_field``/``apply_prompt``,
``csv_string_to_list_strip`` and ``process_axis`` (the value parsing of ``Script.run``: csv split, int/float
ranges ``a-b``, ``a-b (+s)``, ``a-b [n]`` with numpy as the real one, then ``opt.type(x)`` and ``confirm``).

Load it with ``tests/_webui.py`` ``load_script`` (module name "xyz_grid.py", not in ``sys.modules``, like the
WebUI) and put it in ``modules.scripts.scripts_data``; extensions find it there by basename and append to
``axis_options`` in an ``on_before_ui`` callback. The UI and the grid drawing are not here.
"""

# ruff: noqa: E501, E721 - regexes and type comparisons copied as the WebUI has them

import csv
import re
from io import StringIO
from itertools import chain

import modules.scripts as scripts
import numpy as np


def apply_field(field):
    def fun(p, x, xs):
        setattr(p, field, x)

    return fun


def apply_prompt(p, x, xs):
    if xs[0] not in p.prompt and xs[0] not in p.negative_prompt:
        raise RuntimeError(f"Prompt S/R did not find {xs[0]} in prompt or negative prompt.")

    p.prompt = p.prompt.replace(xs[0], x)
    p.negative_prompt = p.negative_prompt.replace(xs[0], x)


def format_value_add_label(p, opt, x):
    if type(x) == float:  # noqa: E721 - as the WebUI
        x = round(x, 8)

    return f"{opt.label}: {x}"


def format_value(p, opt, x):
    if type(x) == float:  # noqa: E721 - as the WebUI
        x = round(x, 8)
    return x


def format_value_join_list(p, opt, x):
    return ", ".join(x)


def do_nothing(p, x, xs):
    pass


def format_nothing(p, opt, x):
    return ""


def csv_string_to_list_strip(data_str):
    return list(map(str.strip, chain.from_iterable(csv.reader(StringIO(data_str), skipinitialspace=True))))


class AxisOption:
    def __init__(self, label, type, apply, format_value=format_value_add_label, confirm=None, cost=0.0, choices=None,
                 prepare=None):
        self.label = label
        self.type = type
        self.apply = apply
        self.format_value = format_value
        self.confirm = confirm
        self.cost = cost
        self.prepare = prepare
        self.choices = choices


class AxisOptionImg2Img(AxisOption):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.is_img2img = True


class AxisOptionTxt2Img(AxisOption):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.is_img2img = False


axis_options = [
    AxisOption("Nothing", str, do_nothing, format_value=format_nothing),
    AxisOption("Seed", int, apply_field("seed")),
    AxisOption("Steps", int, apply_field("steps")),
    AxisOption("CFG Scale", float, apply_field("cfg_scale")),
    AxisOption("Prompt S/R", str, apply_prompt, format_value=format_value),
]

re_range = re.compile(r"\s*([+-]?\s*\d+)\s*-\s*([+-]?\s*\d+)(?:\s*\(([+-]\d+)\s*\))?\s*")
re_range_float = re.compile(r"\s*([+-]?\s*\d+(?:.\d*)?)\s*-\s*([+-]?\s*\d+(?:.\d*)?)(?:\s*\(([+-]\d+(?:.\d*)?)\s*\))?\s*")
re_range_count = re.compile(r"\s*([+-]?\s*\d+)\s*-\s*([+-]?\s*\d+)(?:\s*\[(\d+)\s*])?\s*")
re_range_count_float = re.compile(r"\s*([+-]?\s*\d+(?:.\d*)?)\s*-\s*([+-]?\s*\d+(?:.\d*)?)(?:\s*\[(\d+(?:.\d*)?)\s*])?\s*")


def process_axis(p, opt, vals):
    """``Script.run``'s inner ``process_axis`` for text values (the dropdown path is not here)."""
    if opt.label == 'Nothing':
        return [0]

    valslist = csv_string_to_list_strip(vals)

    if opt.type == int:
        valslist_ext = []
        for val in valslist:
            if val.strip() == '':
                continue
            m = re_range.fullmatch(val)
            mc = re_range_count.fullmatch(val)
            if m is not None:
                start = int(m.group(1))
                end = int(m.group(2)) + 1
                step = int(m.group(3)) if m.group(3) is not None else 1
                valslist_ext += list(range(start, end, step))
            elif mc is not None:
                start = int(mc.group(1))
                end = int(mc.group(2))
                num = int(mc.group(3)) if mc.group(3) is not None else 1
                valslist_ext += [int(x) for x in np.linspace(start=start, stop=end, num=num).tolist()]
            else:
                valslist_ext.append(val)
        valslist = valslist_ext
    elif opt.type == float:
        valslist_ext = []
        for val in valslist:
            if val.strip() == '':
                continue
            m = re_range_float.fullmatch(val)
            mc = re_range_count_float.fullmatch(val)
            if m is not None:
                start = float(m.group(1))
                end = float(m.group(2))
                step = float(m.group(3)) if m.group(3) is not None else 1
                valslist_ext += np.arange(start, end + step, step).tolist()
            elif mc is not None:
                start = float(mc.group(1))
                end = float(mc.group(2))
                num = int(mc.group(3)) if mc.group(3) is not None else 1
                valslist_ext += np.linspace(start=start, stop=end, num=num).tolist()
            else:
                valslist_ext.append(val)
        valslist = valslist_ext

    valslist = [opt.type(x) for x in valslist]

    if opt.confirm:
        opt.confirm(p, valslist)

    return valslist


class Script(scripts.Script):
    """The X/Y/Z plot script (title only; ``ui`` snapshots the options like the real one)."""

    def title(self):
        return "X/Y/Z plot"

    def ui(self, is_img2img):
        self.current_axis_options = [x for x in axis_options if type(x) == AxisOption or x.is_img2img == is_img2img]  # noqa: E721
        return []
