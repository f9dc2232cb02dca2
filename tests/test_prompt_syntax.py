"""lib_lora.prompt_syntax: the WebUI's <lora:name:te[:unet[:dyn]]> syntax (extra_networks[_lora].py)."""

from __future__ import annotations

import pytest

from lib_lora.errors import ConfigError
from lib_lora.prompt_syntax import (
    LoraTag,
    add_trigger_words,
    format_lora_tag,
    format_number,
    has_trigger_word,
    parse_extra_networks,
    parse_lora_tags,
    split_trigger_words,
    strip_lora_tags,
)


def _one(prompt: str) -> LoraTag:
    tags = parse_lora_tags(prompt)
    assert len(tags) == 1
    return tags[0]


@pytest.mark.parametrize("text, name, te, unet, dyn", [
    ("<lora:x>", "x", 1.0, 1.0, None),
    ("<lora:x:0.7>", "x", 0.7, 0.7, None),  # one number sets both parts
    ("<lora:x:0.5:0.8>", "x", 0.5, 0.8, None),
    ("<lora:x:0.5:0.8:4>", "x", 0.5, 0.8, 4),
    ("<lora:x:te=0.3:unet=0.9:dyn=8>", "x", 0.3, 0.9, 8),
    ("<lora:x:0.5:unet=1.2>", "x", 0.5, 1.2, None),
    ("<lora:x:0.5:te=0.2>", "x", 0.2, 0.2, None),  # unet defaults to te after te= overrides it
    ("<lora:x:0.5:0.6:te=0.1>", "x", 0.1, 0.6, None),
    ("<lyco:立绘 style v1-000002:unet=0:1>", "立绘 style v1-000002", 1.0, 0.0, None),
])
def test_parse_matches_webui_activate(text, name, te, unet, dyn):
    tag = _one(f"a photo, {text}, best")
    assert (tag.name, tag.te, tag.unet, tag.dyn) == (name, te, unet, dyn)
    assert tag.text == text


def test_parse_extra_networks_is_webui_parse_prompt():
    """Tags replaced by "" (separators kept), items split on ':', 'a=b=c' stays positional."""
    stripped, found = parse_extra_networks("a <lora:x:1>, b <hypernet:h:0.5> <lora:y:a=b=c:te=2>")
    assert stripped == "a , b  "
    assert [p.items for p in found["lora"]] == [["x", "1"], ["y", "a=b=c", "te=2"]]
    assert found["lora"][1].positional == ["y", "a=b=c"] and found["lora"][1].named == {"te": "2"}
    assert found["hypernet"][0].positional == ["h", "0.5"]


def test_bad_tags_raise_config_error():
    with pytest.raises(ConfigError, match="bad multiplier"):
        parse_lora_tags("<lora:x:strong>")
    with pytest.raises(ConfigError, match="no network name"):
        parse_lora_tags("<lora:te=1>")
    assert parse_lora_tags("<hypernet:h:zz>") == []  # other kinds are not read


@pytest.mark.parametrize("args, text", [
    (("x", 0.5), "<lora:x:0.5>"),
    (("x", 1.0), "<lora:x:1>"),
    (("x", 0.5, 1.0), "<lora:x:0.5:1>"),
    (("x", 0.5, 0.5, 4), "<lora:x:0.5:0.5:4>"),
])
def test_format_shortest_form(args, text):
    assert format_lora_tag(*args) == text


def test_format_named_and_round_trip_with_spaces_and_non_ascii():
    assert format_lora_tag("x", te=0.25, unet=1, named=True) == "<lora:x:te=0.25:unet=1>"
    for name in ("立绘 style v1-000002", "my lora (v2)", "x-step00000200"):
        for te, unet, dyn in ((0.1, 0.1, None), (0.3, 1.5, None), (-0.5, 0.0, 8)):
            for named in (None, True, False):
                tag = _one("p " + format_lora_tag(name, te, unet, dyn, named=named))
                assert (tag.name, tag.te, tag.unet, tag.dyn) == (name, te, unet, dyn)


@pytest.mark.parametrize("name", ["a:b", "a>b", "a=b", "", "  ", "a\nb"])
def test_names_the_syntax_cannot_carry(name):
    with pytest.raises(ConfigError):
        format_lora_tag(name, 1.0)


def test_format_number_never_shows_noise_or_exponent():
    assert [format_number(x) for x in (0.3, 1.0, 1e-05, -0.0, 2, 0.15)] == ["0.3", "1", "0.00001", "0", "2", "0.15"]
    with pytest.raises(ConfigError):
        format_number(float("nan"))


def test_strip_lora_tags():
    prompt = "a <lora:x:1>, b <lyco:y:0.5> <hypernet:h:1>"
    assert strip_lora_tags(prompt) == "a , b  <hypernet:h:1>"
    assert strip_lora_tags(prompt, kinds=None) == "a , b  "


def test_trigger_words_added_only_when_missing():
    assert add_trigger_words("a photo of sks dog", "sks dog") == "a photo of sks dog"
    assert add_trigger_words("a photo of SKS Dog", ["sks dog"]) == "a photo of SKS Dog"  # case-insensitive
    assert add_trigger_words("a photo of dog", "sks, red hat") == "sks, red hat, a photo of dog"
    assert add_trigger_words("a photo of sksx dog", "sks") == "sks, a photo of sksx dog"  # not a whole word
    assert add_trigger_words("photo <lora:sks:1>", "sks") == "sks, photo <lora:sks:1>"  # a tag's name is no trigger
    assert add_trigger_words("", "立绘") == "立绘"
    assert add_trigger_words("立绘, photo", "立绘") == "立绘, photo"
    assert add_trigger_words("photo", None) == "photo"
    assert split_trigger_words(" a, b ,a,, c") == ["a", "b", "c"]
    assert has_trigger_word("x, sks dog, y", "sks dog") and not has_trigger_word("sks dogs", "sks dog")
