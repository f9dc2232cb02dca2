"""The CLIP BPE tokenizer without downloads, and prompt-to-token-id chunking as the WebUI does it.

The HF ``CLIPTokenizer`` (SD1, as in ldm's ``FrozenCLIPEmbedder``) is loaded from ``vocab.json``/``merges.txt``
that are generated once from open_clip's bundled ``bpe_simple_vocab_16e6.txt.gz`` into a cache folder (the same
files as ``openai/clip-vit-large-patch14``: 49408 tokens, ``,</w>`` = 267, bos 49406, eos 49407). SD2 uses
open_clip's own tokenizer, as ldm's ``FrozenOpenCLIPEmbedder`` does.

Cache folder: ``cache_dir`` argument, else ``$LIB_LORA_CACHE_DIR``, else ``$XDG_CACHE_HOME/lib_lora``, else
``~/.cache/lib_lora``; the files go in its ``clip-tokenizer/`` subfolder, written atomically (temp file + rename).
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import importlib.util
import json
import os
import tempfile
from pathlib import Path

from ..errors import ConfigError

BOS_ID = 49406  # <|startoftext|>
EOS_ID = 49407  # <|endoftext|>
VOCAB_SIZE = 49408
CHUNK_TOKENS = 75  # tokens per 77-token window, without bos/eos (WebUI sd_hijack_clip chunk_length)
_SUBDIR = "clip-tokenizer"


def default_cache_dir() -> Path:
    """The lib_lora cache folder: ``$LIB_LORA_CACHE_DIR``, ``$XDG_CACHE_HOME/lib_lora`` or ``~/.cache/lib_lora``.
    Nothing is created here."""
    env = os.environ.get("LIB_LORA_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "lib_lora"


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2 / CLIP byte-level alphabet (openai/CLIP simple_tokenizer.bytes_to_unicode).
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def _vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    # Located without importing open_clip (its import pulls in timm and takes seconds).
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("open_clip is not installed; it provides the CLIP BPE merges (bpe_simple_vocab_16e6.txt.gz)")
    bpe = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    with gzip.open(bpe) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]  # as openai/CLIP SimpleTokenizer
    alphabet = list(_bytes_to_unicode().values())
    vocab = alphabet + [a + "</w>" for a in alphabet] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def ensure_tokenizer_files(cache_dir: str | os.PathLike | None = None) -> Path:
    """Writes ``vocab.json`` and ``merges.txt`` (``#version: 0.2`` header) once and returns their folder.

    Args:
        cache_dir: base cache folder (see module doc); the files go to ``<cache_dir>/clip-tokenizer/``.

    Returns:
        the folder holding both files.

    Raises:
        OSError: the folder cannot be created or written.
    """
    folder = Path(cache_dir if cache_dir is not None else default_cache_dir()) / _SUBDIR
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    if vocab_path.is_file() and merges_path.is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = _vocab_and_merges()
    _write_atomic(merges_path, "#version: 0.2\n" + "\n".join(merges) + "\n")
    _write_atomic(vocab_path, json.dumps(vocab, ensure_ascii=False))
    return folder


@functools.lru_cache(maxsize=4)
def _load_hf(folder: str):
    from transformers import CLIPTokenizer

    return CLIPTokenizer(
        vocab_file=os.path.join(folder, "vocab.json"), merges_file=os.path.join(folder, "merges.txt"),
        unk_token="<|endoftext|>", bos_token="<|startoftext|>", eos_token="<|endoftext|>",
        pad_token="<|endoftext|>", model_max_length=77,
    )


def get_clip_tokenizer(cache_dir: str | os.PathLike | None = None):
    """The HF ``CLIPTokenizer`` of ``openai/clip-vit-large-patch14``, built from the cached files (created on first
    use, see :func:`ensure_tokenizer_files`); one instance per folder is kept.

    Returns:
        ``transformers.CLIPTokenizer`` with bos 49406, eos = pad = unk 49407, model_max_length 77.
    """
    return _load_hf(str(ensure_tokenizer_files(cache_dir).resolve()))


def _chunk(ids: list[int], n_chunks: int, pad_id: int) -> list[int]:
    """Splits ids into ``n_chunks`` windows of [bos] + 75 tokens (padded with eos then ``pad_id``) + [eos]."""
    out: list[int] = []
    for c in range(n_chunks):
        part = ids[c * CHUNK_TOKENS : (c + 1) * CHUNK_TOKENS]
        window = [BOS_ID] + part + [EOS_ID]
        window += [pad_id] * (CHUNK_TOKENS + 2 - len(window))
        out += window
    return out


def tokenize_prompts(prompts: list[str], kind: str, cache_dir: str | os.PathLike | None = None) -> list[list[int]]:
    """Token ids for a batch of prompts, in windows of 77 as the WebUI's ``FrozenCLIPEmbedderWithCustomWords``
    builds them (without its comma backtracking and ``(emphasis:1.2)`` parsing: prompts are taken literally).

    Each prompt's BPE ids are split into chunks of 75; each chunk becomes ``[bos] + chunk + [eos] + padding`` (77
    ids). Every prompt of the batch gets the same number of chunks (the largest; at least 1), empty chunks being
    ``[bos, eos, pad...]`` as in the WebUI.

    Args:
        prompts: B strings.
        kind: ``"hf_clip"`` (SD1: HF tokenizer, padding with eos 49407) or ``"openclip"`` (SD2: open_clip's
            tokenizer, padding with 0 after the first eos, like ``open_clip.tokenize``).
        cache_dir: tokenizer cache folder for ``"hf_clip"``.

    Returns:
        B lists of 77 x n_chunks ids.

    Raises:
        lib_lora.errors.ConfigError: unknown ``kind``.
    """
    if kind == "hf_clip":
        tok = get_clip_tokenizer(cache_dir)
        ids = tok(list(prompts), truncation=False, add_special_tokens=False, verbose=False)["input_ids"]
        pad = EOS_ID
    elif kind == "openclip":
        import open_clip.tokenizer as oct

        ids = [oct._tokenizer.encode(p) for p in prompts]
        pad = 0
    else:
        raise ConfigError(f"unknown tokenizer kind {kind!r}; allowed: 'hf_clip', 'openclip'")
    n_chunks = max([1] + [(len(x) + CHUNK_TOKENS - 1) // CHUNK_TOKENS for x in ids])
    return [_chunk(x, n_chunks, pad) for x in ids]
