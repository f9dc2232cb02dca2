"""Stand-in for ``modules/images.py``: ``image_grid``, ``GridAnnotation``, ``draw_grid_annotations``,
``save_image`` (and ``get_font``, ``get_next_sequence_number``, ``save_image_with_geninfo``), copied closely from
A1111 v1.10.1 with Pillow 9.5 APIs (``multiline_textsize`` is still there; Pillow 10 removed it).

Differences: the font is DejaVuSans (Roboto ships with the WebUI, not here) or Pillow's default; the filename
pattern is the default ``[seed]-[prompt_spaces]`` only (no ``FilenameGenerator``); no EXIF for JPEG/WebP (no
piexif), no 4chan export, no ``save_txt``. Settings the stand-in's ``shared_options`` does not register are read
with the WebUI's defaults (:data:`OPTION_DEFAULTS`).
"""

from __future__ import annotations

import math
import os

from PIL import Image, ImageColor, ImageDraw, ImageFont, PngImagePlugin

from modules import script_callbacks, shared

LANCZOS = (Image.Resampling.LANCZOS if hasattr(Image, 'Resampling') else Image.LANCZOS)

#: Defaults of the WebUI settings read here (``modules/shared_options.py`` v1.10.1).
OPTION_DEFAULTS = {
    "n_rows": -1, "grid_prevent_empty_spots": False, "grid_background_color": "#ffffff",
    "grid_text_active_color": "#000000", "grid_text_inactive_color": "#999999", "font": "",
    "enable_pnginfo": True, "jpeg_quality": 80, "webp_lossless": False, "save_images_add_number": True,
    "save_to_dirs": True, "grid_save_to_dirs": True, "samples_filename_pattern": "",
    "save_images_replace_action": "Replace", "samples_save": True, "grid_format": "png", "samples_format": "png",
    "grid_save": True,
}

invalid_filename_chars = '#<>:"/\\|?*\n\r\t'
invalid_filename_prefix = ' '
invalid_filename_postfix = ' .'
max_filename_part_length = 128


def _opt(key):
    """``shared.opts.<key>`` when registered, else the WebUI's default. Private to this stand-in: the real
    ``modules.images`` has no such helper, so code under test must read ``shared.opts`` itself."""
    opts = shared.opts
    if opts is not None and (key in opts.data or key in opts.data_labels):
        return getattr(opts, key)
    return OPTION_DEFAULTS[key]


def get_font(fontsize: int):
    """Mirrors ``images.get_font`` (DejaVuSans instead of Roboto)."""
    for name in (_opt("font"), "DejaVuSans.ttf"):
        try:
            return ImageFont.truetype(name, fontsize)
        except Exception:
            continue
    return ImageFont.load_default()


def image_grid(imgs, batch_size=1, rows=None):
    """Mirrors ``images.image_grid``: ``cols = ceil(len / rows)``, cells pasted row by row, centred."""
    if rows is None:
        if _opt("n_rows") > 0:
            rows = _opt("n_rows")
        elif _opt("n_rows") == 0:
            rows = batch_size
        elif _opt("grid_prevent_empty_spots"):
            rows = math.floor(math.sqrt(len(imgs)))
            while len(imgs) % rows != 0:
                rows -= 1
        else:
            rows = math.sqrt(len(imgs))
            rows = round(rows)
    if rows > len(imgs):
        rows = len(imgs)

    cols = math.ceil(len(imgs) / rows)

    params = script_callbacks.ImageGridLoopParams(imgs, cols, rows)
    script_callbacks.image_grid_callback(params)

    w, h = map(max, zip(*(img.size for img in imgs)))
    grid_background_color = ImageColor.getcolor(_opt("grid_background_color"), 'RGB')
    grid = Image.new('RGB', size=(params.cols * w, params.rows * h), color=grid_background_color)

    for i, img in enumerate(params.imgs):
        img_w, img_h = img.size
        w_offset, h_offset = 0 if img_w == w else (w - img_w) // 2, 0 if img_h == h else (h - img_h) // 2
        grid.paste(img, box=(i % params.cols * w + w_offset, i // params.cols * h + h_offset))

    return grid


class GridAnnotation:
    """Mirrors ``images.GridAnnotation``."""

    def __init__(self, text='', is_active=True):
        self.text = text
        self.is_active = is_active
        self.size = None


def draw_grid_annotations(im, width, height, hor_texts, ver_texts, margin=0):
    """Mirrors ``images.draw_grid_annotations``: a band of column texts on top (``pad_top``), row texts on the
    left (``pad_left = width * 3 // 4`` when any), font size ``(width + height) // 25``."""
    color_active = ImageColor.getcolor(_opt("grid_text_active_color"), 'RGB')
    color_inactive = ImageColor.getcolor(_opt("grid_text_inactive_color"), 'RGB')
    color_background = ImageColor.getcolor(_opt("grid_background_color"), 'RGB')

    def wrap(drawing, text, font, line_length):
        lines = ['']
        for word in text.split():
            line = f'{lines[-1]} {word}'.strip()
            if drawing.textlength(line, font=font) <= line_length:
                lines[-1] = line
            else:
                lines.append(word)
        return lines

    def draw_texts(drawing, draw_x, draw_y, lines, initial_fnt, initial_fontsize):
        for line in lines:
            fnt = initial_fnt
            fontsize = initial_fontsize
            while drawing.multiline_textsize(line.text, font=fnt)[0] > line.allowed_width and fontsize > 0:
                fontsize -= 1
                fnt = get_font(fontsize)
            drawing.multiline_text((draw_x, draw_y + line.size[1] / 2), line.text, font=fnt,
                                   fill=color_active if line.is_active else color_inactive, anchor="mm",
                                   align="center")

            if not line.is_active:
                drawing.line((draw_x - line.size[0] // 2, draw_y + line.size[1] // 2, draw_x + line.size[0] // 2,
                              draw_y + line.size[1] // 2), fill=color_inactive, width=4)

            draw_y += line.size[1] + line_spacing

    fontsize = (width + height) // 25
    line_spacing = fontsize // 2

    fnt = get_font(fontsize)

    pad_left = 0 if sum([sum([len(line.text) for line in lines]) for lines in ver_texts]) == 0 else width * 3 // 4

    cols = im.width // width
    rows = im.height // height

    assert cols == len(hor_texts), f'bad number of horizontal texts: {len(hor_texts)}; must be {cols}'
    assert rows == len(ver_texts), f'bad number of vertical texts: {len(ver_texts)}; must be {rows}'

    calc_img = Image.new("RGB", (1, 1), color_background)
    calc_d = ImageDraw.Draw(calc_img)

    for texts, allowed_width in zip(hor_texts + ver_texts, [width] * len(hor_texts) + [pad_left] * len(ver_texts)):
        items = [] + texts
        texts.clear()

        for line in items:
            wrapped = wrap(calc_d, line.text, fnt, allowed_width)
            texts += [GridAnnotation(x, line.is_active) for x in wrapped]

        for line in texts:
            bbox = calc_d.multiline_textbbox((0, 0), line.text, font=fnt)
            line.size = (bbox[2] - bbox[0], bbox[3] - bbox[1])
            line.allowed_width = allowed_width

    hor_text_heights = [sum([line.size[1] + line_spacing for line in lines]) - line_spacing for lines in hor_texts]
    ver_text_heights = [sum([line.size[1] + line_spacing for line in lines]) - line_spacing * len(lines)
                        for lines in ver_texts]

    pad_top = 0 if sum(hor_text_heights) == 0 else max(hor_text_heights) + line_spacing * 2

    result = Image.new("RGB", (im.width + pad_left + margin * (cols - 1), im.height + pad_top + margin * (rows - 1)),
                       color_background)

    for row in range(rows):
        for col in range(cols):
            cell = im.crop((width * col, height * row, width * (col + 1), height * (row + 1)))
            result.paste(cell, (pad_left + (width + margin) * col, pad_top + (height + margin) * row))

    d = ImageDraw.Draw(result)

    for col in range(cols):
        x = pad_left + (width + margin) * col + width / 2
        y = pad_top / 2 - hor_text_heights[col] / 2

        draw_texts(d, x, y, hor_texts[col], fnt, fontsize)

    for row in range(rows):
        x = pad_left / 2
        y = pad_top + (height + margin) * row + height / 2 - ver_text_heights[row] / 2

        draw_texts(d, x, y, ver_texts[row], fnt, fontsize)

    return result


def sanitize_filename_part(text, replace_spaces=True):
    """Mirrors ``images.sanitize_filename_part``."""
    if text is None:
        return None
    if replace_spaces:
        text = text.replace(' ', '_')
    text = text.translate({ord(x): '_' for x in invalid_filename_chars})
    text = text.lstrip(invalid_filename_prefix)[:max_filename_part_length]
    text = text.rstrip(invalid_filename_postfix)
    return text


def get_next_sequence_number(path, basename):
    """Mirrors ``images.get_next_sequence_number``."""
    result = -1
    if basename != '':
        basename = f"{basename}-"

    prefix_length = len(basename)
    for p in os.listdir(path):
        if p.startswith(basename):
            parts = os.path.splitext(p[prefix_length:])[0].split('-')
            try:
                result = max(int(parts[0]), result)
            except ValueError:
                pass

    return result + 1


def save_image_with_geninfo(image, geninfo, filename, extension=None, existing_pnginfo=None,
                            pnginfo_section_name='parameters'):
    """Mirrors ``images.save_image_with_geninfo`` for PNG (text chunk) and JPEG/WebP (no EXIF here)."""
    if extension is None:
        extension = os.path.splitext(filename)[1]

    image_format = Image.registered_extensions()[extension]

    if extension.lower() == '.png':
        existing_pnginfo = existing_pnginfo or {}
        if _opt("enable_pnginfo"):
            existing_pnginfo[pnginfo_section_name] = geninfo
            pnginfo_data = PngImagePlugin.PngInfo()
            for k, v in (existing_pnginfo or {}).items():
                pnginfo_data.add_text(k, str(v))
        else:
            pnginfo_data = None
        image.save(filename, format=image_format, quality=_opt("jpeg_quality"), pnginfo=pnginfo_data)
    elif extension.lower() in (".jpg", ".jpeg", ".webp"):
        if image.mode == 'RGBA':
            image = image.convert("RGB")
        image.save(filename, format=image_format, quality=_opt("jpeg_quality"), lossless=_opt("webp_lossless"))
    else:
        image.save(filename, format=image_format, quality=_opt("jpeg_quality"))


def save_image(image, path, basename, seed=None, prompt=None, extension='png', info=None, short_filename=False,
               no_prompt=False, grid=False, pnginfo_section_name='parameters', p=None, existing_info=None,
               forced_filename=None, suffix="", save_to_dirs=None):
    """Mirrors ``images.save_image``: JPEG over 65,535 px / WebP over 16,383 px per side switch to PNG; name
    ``<basename>-<NNNN>-<seed>-<prompt>.<ext>`` (or ``NNNNN-...`` without basename); atomic ``.tmp`` + replace;
    ``before_image_saved``/``image_saved`` callbacks. ``save_to_dirs`` defaults to False here (no
    ``[prompt_words]`` folders). Returns ``(fullfn, txt_fullfn)``."""
    if (image.height > 65535 or image.width > 65535) and extension.lower() in ("jpg", "jpeg") or \
            (image.height > 16383 or image.width > 16383) and extension.lower() == "webp":
        print('Image dimensions too large; saving as PNG')
        extension = "png"

    os.makedirs(path, exist_ok=True)

    if forced_filename is None:
        if short_filename or seed is None:
            file_decoration = ""
        else:
            file_decoration = f"{seed}-{sanitize_filename_part(prompt or '')[:64]}" if prompt else f"{seed}"
        file_decoration = file_decoration + suffix
        add_number = _opt("save_images_add_number") or file_decoration == ''
        if file_decoration != "" and add_number:
            file_decoration = f"-{file_decoration}"
        if add_number:
            basecount = get_next_sequence_number(path, basename)
            fullfn = None
            for i in range(500):
                fn = f"{basecount + i:05}" if basename == '' else f"{basename}-{basecount + i:04}"
                fullfn = os.path.join(path, f"{fn}{file_decoration}.{extension}")
                if not os.path.exists(fullfn):
                    break
        else:
            fullfn = os.path.join(path, f"{file_decoration}.{extension}")
    else:
        fullfn = os.path.join(path, f"{forced_filename}.{extension}")

    pnginfo = existing_info or {}
    if info is not None:
        pnginfo[pnginfo_section_name] = info

    params = script_callbacks.ImageSaveParams(image, p, fullfn, pnginfo)
    script_callbacks.before_image_saved_callback(params)

    image = params.image
    fullfn = params.filename
    info = params.pnginfo.get(pnginfo_section_name, None)

    fullfn_without_extension, extension = os.path.splitext(params.filename)
    temp_file_path = f"{fullfn_without_extension}.tmp"
    save_image_with_geninfo(image, info, temp_file_path, extension, existing_pnginfo=params.pnginfo,
                            pnginfo_section_name=pnginfo_section_name)
    os.replace(temp_file_path, fullfn)

    image.already_saved_as = fullfn
    script_callbacks.image_saved_callback(params)
    return fullfn, None
