"""The WebUI's ``<lora:name:te[:unet[:dyn]]>`` prompt syntax: parse, format, strip, and add trigger words. Pure.

Source convention (A1111 v1.10.1, ``modules/extra_networks.py`` and ``extensions-builtin/Lora/
extra_networks_lora.py``):

- a tag is any match of ``<(\\w+):([^>]+)>``; the text after the first ``:`` is split on ``:`` into items;
- an item that ``split("=", 2)`` cuts into exactly two parts is a named argument (``te=0.5``), every other item
  is positional (so ``a=b=c`` is positional);
- for ``lora`` (and its alias ``lyco``): positional[0] is the network name (file stem or alias); the text-encoder
  multiplier is positional[1] (default 1.0), overridden by ``te=``; the UNet multiplier is positional[2]
  (default: the text-encoder multiplier), overridden by ``unet=``; ``dyn`` (rank truncation) is positional[3] or
  ``dyn=``. So ``<lora:x:0.7>`` sets both parts to 0.7;
- the WebUI removes every tag from the prompt text (replaced by ``""``) before the text encoder sees it.

Multipliers are plain floats (no unit). A name cannot contain ``:`` or ``>`` (they end it) nor ``=`` (it would
become a named argument), and must not start or end with whitespace that the user cannot see.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal

from .errors import ConfigError

__all__ = [
    "EXTRA_NETWORK_RE",
    "LORA_KINDS",
    "ExtraNetworkParams",
    "LoraTag",
    "add_trigger_words",
    "format_lora_tag",
    "format_number",
    "has_trigger_word",
    "parse_extra_networks",
    "parse_lora_tags",
    "split_trigger_words",
    "strip_lora_tags",
    "validate_lora_name",
]

#: ``modules/extra_networks.py`` ``re_extra_net``, unchanged.
EXTRA_NETWORK_RE = re.compile(r"<(\w+):([^>]+)>")

#: The extra-network names the built-in Lora extension registers (``lora`` and the alias ``lyco``).
LORA_KINDS: tuple[str, ...] = ("lora", "lyco")


@dataclass
class ExtraNetworkParams:
    """One tag's arguments as the WebUI's ``ExtraNetworkParams``: ``items`` split on ``:``, then ``named`` (items
    that ``split("=", 2)`` cuts into two parts) and ``positional`` (all others, in order)."""

    items: list[str] = field(default_factory=list)
    positional: list[str] = field(default_factory=list)
    named: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_items(cls, items: Sequence[str]) -> ExtraNetworkParams:
        """Sorts ``items`` into positional and named arguments exactly as the WebUI does."""
        params = cls(items=list(items))
        for item in params.items:
            parts = item.split("=", 2)
            if len(parts) == 2:
                params.named[parts[0]] = parts[1]
            else:
                params.positional.append(item)
        return params


def parse_extra_networks(prompt: str) -> tuple[str, dict[str, list[ExtraNetworkParams]]]:
    """The WebUI's ``extra_networks.parse_prompt``: removes every ``<kind:args>`` tag from ``prompt``.

    Returns:
        (the prompt with all tags replaced by ``""``, {kind: [params of each tag, in prompt order]}).
    """
    found: dict[str, list[ExtraNetworkParams]] = {}

    def take(m: re.Match) -> str:
        found.setdefault(m.group(1), []).append(ExtraNetworkParams.from_items(m.group(2).split(":")))
        return ""

    return EXTRA_NETWORK_RE.sub(take, prompt), found


@dataclass(frozen=True)
class LoraTag:
    """One ``<lora:...>`` tag, resolved as ``ExtraNetworkLora.activate`` does.

    Attributes:
        name: positional[0], the network name (file stem or alias), unchanged (spaces, non-ASCII kept).
        te: text-encoder multiplier.
        unet: UNet multiplier (equals ``te`` unless given).
        dyn: rank truncation (``dyn``), None when not given.
        kind: ``"lora"`` or ``"lyco"``.
        text: the tag's exact text in the prompt; ``start``/``end``: its span (character offsets).
    """

    name: str
    te: float = 1.0
    unet: float = 1.0
    dyn: int | None = None
    kind: str = "lora"
    text: str = ""
    start: int = 0
    end: int = 0

    @classmethod
    def from_params(cls, params: ExtraNetworkParams, kind: str = "lora", text: str = "", start: int = 0,
                    end: int = 0) -> LoraTag:
        """Resolves WebUI params to multipliers.

        Raises:
            ConfigError: no positional name, or a multiplier / dyn that ``float()`` / ``int()`` rejects (the WebUI
                would raise ValueError while generating).
        """
        if not params.positional:
            raise ConfigError(f"{text or kind!r}: no network name (the first argument must not contain '=')")
        pos, named = params.positional, params.named
        try:
            te = float(pos[1]) if len(pos) > 1 else 1.0
            te = float(named.get("te", te))
            unet = float(pos[2]) if len(pos) > 2 else te
            unet = float(named.get("unet", unet))
            dyn = int(pos[3]) if len(pos) > 3 else None
            dyn = int(named["dyn"]) if "dyn" in named else dyn
        except ValueError as exc:
            raise ConfigError(f"{text or kind!r}: bad multiplier or dyn value ({exc})") from exc
        return cls(name=pos[0], te=te, unet=unet, dyn=dyn, kind=kind, text=text, start=start, end=end)

    def format(self, named: bool | None = None) -> str:
        """This tag as text (see :func:`format_lora_tag`); ``named=None`` picks the shortest form."""
        return format_lora_tag(self.name, self.te, self.unet, self.dyn, named=named, kind=self.kind)


def parse_lora_tags(prompt: str, kinds: Iterable[str] | None = LORA_KINDS) -> list[LoraTag]:
    """Every LoRA tag of ``prompt``, in order.

    Args:
        prompt: any prompt text.
        kinds: the tag kinds to read (default ``lora`` and ``lyco``); None reads every ``<kind:...>`` tag.

    Raises:
        ConfigError: a tag of those kinds without a name or with a bad number (see :meth:`LoraTag.from_params`).
    """
    wanted = None if kinds is None else set(kinds)
    tags = []
    for m in EXTRA_NETWORK_RE.finditer(prompt):
        if wanted is not None and m.group(1) not in wanted:
            continue
        params = ExtraNetworkParams.from_items(m.group(2).split(":"))
        tags.append(LoraTag.from_params(params, kind=m.group(1), text=m.group(0), start=m.start(), end=m.end()))
    return tags


def strip_lora_tags(prompt: str, kinds: Iterable[str] | None = LORA_KINDS) -> str:
    """``prompt`` with its LoRA tags replaced by ``""``, as the WebUI does before encoding (separators such as
    ``", "`` around a tag stay, as in the WebUI).

    Args:
        kinds: tag kinds to remove (default ``lora``/``lyco``); None removes every extra-network tag, as
            ``parse_prompt`` does.
    """
    wanted = None if kinds is None else set(kinds)
    return EXTRA_NETWORK_RE.sub(lambda m: "" if wanted is None or m.group(1) in wanted else m.group(0), prompt)


def format_number(value: float) -> str:
    """A multiplier as the shortest text that reads back to the same float: ``0.3`` -> ``"0.3"``, ``1.0`` ->
    ``"1"``, ``1e-05`` -> ``"0.00001"`` (never exponent notation, never float noise beyond what the float holds).

    Raises:
        ConfigError: NaN or infinite.
    """
    x = float(value)
    if x != x or x in (float("inf"), float("-inf")):
        raise ConfigError(f"multiplier {value!r} is not finite")
    if x == 0:
        return "0"
    text = format(Decimal(repr(x)), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


def validate_lora_name(name: str) -> str:
    """Checks that ``name`` survives a round trip through the tag syntax and returns it unchanged.

    Raises:
        ConfigError: empty, contains ``:``, ``>`` or ``=`` (the WebUI would split it or read a named argument),
            or a line break.
    """
    if not name or not name.strip():
        raise ConfigError("a LoRA name in a prompt tag must not be empty")
    bad = sorted({c for c in name if c in ":>=\r\n"})
    if bad:
        raise ConfigError(f"LoRA name {name!r} cannot be written in a <lora:...> tag: it contains {bad!r} (rename "
                          "the file)")
    return name


def format_lora_tag(name: str, te: float = 1.0, unet: float | None = None, dyn: int | None = None, *,
                    named: bool | None = None, kind: str = "lora") -> str:
    """A tag that the WebUI parses back to exactly these values.

    Args:
        name: file stem (A1111 looks networks up by file stem; aliases from ``ss_output_name`` are shared by all
            epochs of a run, so never use them to pick a checkpoint).
        te: text-encoder multiplier; unet: UNet multiplier (None = same as ``te``); dyn: rank truncation.
        named: True writes ``te=..:unet=..[:dyn=..]``; False writes positional ``:te:unet[:dyn]``; None writes
            ``<lora:name:w>`` when te == unet and no dyn, else the positional form.
        kind: ``"lora"`` (or ``"lyco"``).

    Raises:
        ConfigError: a name that the syntax cannot carry (:func:`validate_lora_name`), a non-finite multiplier,
            a kind that is not a ``\\w+`` word.
    """
    validate_lora_name(name)
    if not re.fullmatch(r"\w+", kind):
        raise ConfigError(f"extra-network kind {kind!r} must be a word (letters, digits, _)")
    te_s = format_number(te)
    unet_s = te_s if unet is None else format_number(unet)
    if dyn is not None:
        dyn = int(dyn)
    if named:
        args = [f"te={te_s}", f"unet={unet_s}"] + ([f"dyn={dyn}"] if dyn is not None else [])
    elif named is None and unet_s == te_s and dyn is None:
        args = [te_s]
    else:
        args = [te_s, unet_s] + ([str(dyn)] if dyn is not None else [])
    return f"<{kind}:{name}:{':'.join(args)}>"


def split_trigger_words(words: str | Iterable[str] | None) -> list[str]:
    """Trigger words as a list of phrases: a string is split on commas (the sidecar's ``"activation text"`` is
    one comma-separated string); empty entries are dropped, whitespace trimmed, duplicates removed (first kept)."""
    if words is None:
        return []
    items = words.split(",") if isinstance(words, str) else [p for w in words for p in str(w).split(",")]
    out: list[str] = []
    for item in items:
        item = item.strip()
        if item and item not in out:
            out.append(item)
    return out


def has_trigger_word(prompt: str, word: str) -> bool:
    """True when ``word`` occurs in ``prompt`` as a whole phrase (case-insensitive, not inside a longer word,
    not counting occurrences inside ``<...>`` extra-network tags)."""
    text = EXTRA_NETWORK_RE.sub(" ", prompt).casefold()
    pattern = r"(?<!\w)" + re.escape(word.strip().casefold()) + r"(?!\w)"
    return re.search(pattern, text) is not None


def add_trigger_words(prompt: str, words: str | Iterable[str] | None) -> str:
    """``prompt`` with each missing trigger phrase put in front, joined by ``", "``.

    A phrase counts as present when :func:`has_trigger_word` finds it; present phrases are not repeated. Putting
    the trigger first matches how Kohya captions put it (``keep_tokens``) and how the WebUI's extra-networks card
    adds the "activation text" next to the tag.

    Args:
        words: one comma-separated string or a list of phrases (see :func:`split_trigger_words`).

    Returns:
        The new prompt (``prompt`` unchanged when nothing is missing).
    """
    missing = [w for w in split_trigger_words(words) if not has_trigger_word(prompt, w)]
    if not missing:
        return prompt
    head = ", ".join(missing)
    return f"{head}, {prompt}" if prompt.strip() else head
