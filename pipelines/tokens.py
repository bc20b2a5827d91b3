"""Exact model token counts, offline, with tiktoken.

The served model's own ``tokenizer.json`` is turned into a
``tiktoken.Encoding``: tiktoken would otherwise download its encodings at
first use, and it is several times faster than ``tokenizers`` on long charts.
Ids equal those of the model's Hugging Face tokenizer, and so those vLLM
sees. A tokenizer that cannot be converted exactly is refused with
``UnsupportedTokenizerError`` rather than counted approximately.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any, ClassVar

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import tiktoken
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

from pipelines.errors import PermanentError
from pipelines.model import read_chat_template

# GPT-2's pre-tokenizer regex, as tokenizers' ByteLevel(use_regex=True) and
# tiktoken's r50k_base both use it.
GPT2_PATTERN = (
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+"
    r"|\s+(?!\S)|\s+"
)
# tokenizers' Digits splits on Rust's char::is_numeric, whose tables
# (Unicode 17) know numerals that tiktoken's regex crate (Unicode 16) does
# not: Tolong Siki digits and three Yangqin numerals. Drop the ranges once
# tiktoken's \p{N} has them; test_every_code_point_... catches drift.
NUMERIC_CLASS = r"\p{N}\x{11DE0}-\x{11DE9}\x{16FF4}-\x{16FF6}"
# Inserted after the first character of a special-token string found in
# text: invisible when shown, so a reader (and the model, token by token)
# still sees "<|im_end|>", but no tokenizer parses it as the control token.
NEUTRALIZER = "\u200b"
# Size and mtime of each file a counter reads, to notice a changed folder.
_Signature = tuple[tuple[int, int], ...]
_TEMPLATE_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


class UnsupportedTokenizerError(PermanentError):
    """Raised when a tokenizer.json cannot be converted into exact tiktoken ids.

    Examples: SentencePiece or Unigram models, normalizers, byte fallback,
    pre-tokenizers other than ByteLevel (optionally after Digits or one
    regex Split), or a model folder with no chat template to render.
    """

    code = "unsupported_tokenizer"


class TokenCounter:
    """The served model's tokenizer: exact ids, counts and chat rendering.

    Build it with ``TokenCounter.from_model_dir``. It is safe to share
    between threads.
    """

    _cache: ClassVar[dict[tuple[Path, _Signature], TokenCounter]] = {}
    _cache_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, model_dir: Path) -> None:
        """Read ``tokenizer.json`` and the chat template of ``model_dir``.

        Raises:
            UnsupportedTokenizerError: The tokenizer is not a byte-level BPE
                that tiktoken reproduces exactly.
            FileNotFoundError: The folder has no tokenizer.json.
        """
        self.model_dir = model_dir
        self._tokenizer_path = model_dir / "tokenizer.json"
        spec = json.loads(self._tokenizer_path.read_text(encoding="utf-8"))
        conversion = _convert(spec)
        self._encoding = tiktoken.Encoding(
            name=f"chartsum:{model_dir.name}",
            pat_str=conversion.pattern,
            mergeable_ranks=conversion.mergeable_ranks,
            special_tokens=conversion.special_ranks,
        )
        self._rank_to_id = conversion.rank_to_id
        self._id_to_rank = (
            None
            if conversion.rank_to_id is None
            else {i: rank for rank, i in enumerate(conversion.rank_to_id)}
        )
        self._present_bytes = conversion.present_bytes
        self._special_ids = conversion.special_ids
        self._special_tokens = frozenset(conversion.special_ids)
        self._special_split = _special_splitter(self._special_tokens)
        self._fallback: tokenizers.Tokenizer | None = None
        self._fallback_lock = threading.Lock()
        self._chat_template = read_chat_template(model_dir)
        self._template_tokens = _template_tokens(model_dir)

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> TokenCounter:
        """The counter for a model folder, built once per process and folder.

        A folder whose tokenizer files changed since gets a new counter.
        """
        path = model_dir.resolve()
        key = (path, _stat_signature(path))
        with cls._cache_lock:
            counter = cls._cache.get(key)
            if counter is None:
                counter = cls._cache[key] = cls(path)
        return counter

    @property
    def special_tokens(self) -> frozenset[str]:
        """The control-token strings, such as ``<|im_end|>``."""
        return self._special_tokens

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """The token ids of ``text``, as the model's tokenizer makes them.

        Args:
            text: Any text.
            allow_special: When False (default), special-token strings in the
                text are encoded as plain characters; when True they become
                control tokens, as in a rendered chat prompt.

        Raises:
            UnicodeEncodeError: The text holds lone surrogates, which the
                model's tokenizer rejects too.
        """
        if not allow_special:
            return self._encode_plain(text)
        ids: list[int] = []
        for i, part in enumerate(self._special_split(text)):
            # split() alternates text and special-token matches.
            if i % 2:
                ids.append(self._special_ids[part])
            elif part:
                ids.extend(self._encode_plain(part))
        return ids

    def count(self, text: str, *, allow_special: bool = False) -> int:
        """The number of model tokens in ``text`` (see ``encode``)."""
        return len(self.encode(text, allow_special=allow_special))

    def decode(self, ids: Iterable[int]) -> str:
        """The text of token ids; a cut multi-byte character becomes U+FFFD."""
        ranks = list(ids)
        if self._id_to_rank is not None:
            ranks = [self._id_to_rank[i] for i in ranks]
        return self._encoding.decode(ranks)

    def render_chat(
        self,
        messages: Sequence[Mapping[str, str]],
        *,
        add_generation_prompt: bool = True,
    ) -> str:
        """The prompt text the model's chat template makes of ``messages``.

        ``count(render_chat(messages), allow_special=True)`` is the number of
        prompt tokens vLLM sees for the same chat request.

        Args:
            messages: Dicts with ``role`` and ``content``.
            add_generation_prompt: End with the assistant header (default
                True), as a chat completion request does.

        Raises:
            UnsupportedTokenizerError: The model folder has no chat template.
        """
        if self._chat_template is None:
            raise UnsupportedTokenizerError(
                f"{self.model_dir} has no chat template (chat_template.jinja or"
                " tokenizer_config.json); chat prompts cannot be rendered"
            )
        template = _compile_template(self._chat_template)
        return template.render(
            messages=[dict(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            tools=None,
            documents=None,
            **self._template_tokens,
        )

    def _encode_plain(self, text: str) -> list[int]:
        """Ids of text with no control tokens."""
        # Deleting every byte that has a token leaves only those without.
        if text.encode("utf-8").translate(None, self._present_bytes):
            return self._encode_with_tokenizers(text)
        ranks = self._encoding.encode_ordinary(text)
        if self._rank_to_id is None:
            return ranks
        return [self._rank_to_id[rank] for rank in ranks]

    def _encode_with_tokenizers(self, text: str) -> list[int]:
        """Ids from the tokenizers library itself, for bytes with no token.

        The model's tokenizer silently drops a byte that has no token (here
        a few control characters such as U+0004 and the unassigned planes
        4-11) and then merges its neighbours; tiktoken cannot express that.
        """
        with self._fallback_lock:
            if self._fallback is None:
                fallback = tokenizers.Tokenizer.from_file(str(self._tokenizer_path))
                fallback.no_truncation()
                fallback.no_padding()
                fallback.encode_special_tokens = True
                self._fallback = fallback
        return list(self._fallback.encode(text, add_special_tokens=False).ids)


def neutralize_special_tokens(
    text: str, special_tokens: frozenset[str]
) -> tuple[str, int]:
    """Break every special-token string in ``text`` so it stays plain text.

    A zero-width space (U+200B) goes after the first character of each
    occurrence: ``<|im_end|>`` still reads as ``<|im_end|>`` but can no
    longer close a chat turn. Overlapping occurrences are each broken, the
    insertion cannot create a new one, and neutralized text is returned
    unchanged, so calling this twice changes nothing.

    Args:
        text: Untrusted text, such as a note.
        special_tokens: The model's control-token strings
            (``TokenCounter.special_tokens``).

    Returns:
        The safe text and the number of occurrences broken.

    Raises:
        ValueError: A special token is shorter than two characters or holds
            U+200B itself, so it cannot be broken this way.
    """
    if not special_tokens:
        return text, 0
    starts = [m.start() for m in _occurrence_finder(special_tokens)(text)]
    if not starts:
        return text, 0
    pieces: list[str] = []
    previous = 0
    for start in starts:
        pieces.append(text[previous : start + 1])
        previous = start + 1
    pieces.append(text[previous:])
    return NEUTRALIZER.join(pieces), len(starts)


@cache
def _occurrence_finder(
    special_tokens: frozenset[str],
) -> Callable[[str], Iterator[re.Match[str]]]:
    """finditer over every start of a special token, overlapping ones too."""
    unbreakable = [t for t in special_tokens if len(t) < 2 or NEUTRALIZER in t]
    if unbreakable:
        raise ValueError(
            f"cannot neutralize special tokens {sorted(unbreakable)!r}:"
            " each needs two or more characters and no U+200B"
        )
    alternatives = "|".join(
        re.escape(t) for t in sorted(special_tokens, key=len, reverse=True)
    )
    return re.compile(f"(?=(?:{alternatives}))").finditer


@cache
def _special_splitter(special_tokens: frozenset[str]) -> Callable[[str], list[str]]:
    """re.split with the specials kept, longest first as tokenizers matches."""
    if not special_tokens:
        return lambda text: [text]
    alternatives = "|".join(
        re.escape(t) for t in sorted(special_tokens, key=len, reverse=True)
    )
    return re.compile(f"({alternatives})").split


@dataclass(frozen=True)
class _Conversion:
    """What tiktoken needs, derived from one tokenizer.json.

    ``rank_to_id`` is None when tiktoken's ranks are the model's ids (the
    usual case); ``present_bytes`` lists the bytes that have a token of
    their own, and text with any other byte goes to tokenizers.
    """

    pattern: str
    mergeable_ranks: dict[bytes, int]
    special_ranks: dict[str, int]
    special_ids: dict[str, int]
    rank_to_id: tuple[int, ...] | None
    present_bytes: bytes


def _convert(spec: dict[str, Any]) -> _Conversion:
    """Turn a parsed tokenizer.json into tiktoken's pattern, ranks and specials.

    Raises:
        UnsupportedTokenizerError: Anything tiktoken cannot reproduce exactly.
    """
    _check_model(spec)
    pattern = _pre_tokenizer_pattern(spec.get("pre_tokenizer"))
    special_ids = _special_ids(spec.get("added_tokens") or [])
    byte_of = {char: byte for byte, char in _bytes_to_unicode().items()}
    vocab = {
        token: token_id
        for token, token_id in spec["model"]["vocab"].items()
        if token_id not in special_ids.values()
    }
    foreign = [t for t in vocab if any(c not in byte_of for c in t)]
    if foreign:
        raise UnsupportedTokenizerError(
            f"{len(foreign)} vocabulary entries are not byte-level (first:"
            f" {foreign[0]!r}); only byte-level BPE converts exactly"
        )
    merged = _merge_results(spec["model"], vocab)
    rank_order = _rank_order(vocab, merged)

    def to_bytes(token: str) -> bytes:
        return bytes(byte_of[c] for c in token)

    if rank_order is None:
        ranks = {to_bytes(t): i for t, i in vocab.items() if len(t) == 1}
        ranks.update({to_bytes(t): vocab[t] for t in merged})
        specials = special_ids
        rank_to_id = None
    else:
        ranks = {to_bytes(t): rank for rank, t in enumerate(rank_order)}
        specials = {t: len(rank_order) + n for n, t in enumerate(special_ids)}
        ids = [vocab[t] for t in rank_order] + list(special_ids.values())
        rank_to_id = tuple(ids)
    present = sorted(b[0] for b in ranks if len(b) == 1)
    return _Conversion(
        pattern=pattern,
        mergeable_ranks=ranks,
        special_ranks=specials,
        special_ids=special_ids,
        rank_to_id=rank_to_id,
        present_bytes=bytes(present),
    )


def _check_model(spec: dict[str, Any]) -> None:
    """Refuse models, normalizers and options tiktoken cannot mirror."""
    model = spec.get("model") or {}
    problems = []
    if model.get("type") != "BPE":
        problems.append(f"model type {model.get('type')!r} is not BPE")
    if model.get("byte_fallback"):
        problems.append("byte_fallback (SentencePiece-style BPE)")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        problems.append("subword prefix or suffix")
    if model.get("dropout"):
        problems.append("BPE dropout")
    if spec.get("normalizer") is not None:
        problems.append(f"normalizer {spec['normalizer'].get('type')!r}")
    if problems:
        reasons = "; ".join(problems)
        raise UnsupportedTokenizerError(
            f"tokenizer cannot be counted exactly with tiktoken: {reasons}"
        )


def _pre_tokenizer_pattern(pre_tokenizer: dict[str, Any] | None) -> str:
    """The single regex doing what the tokenizer's pre-tokenizer chain does.

    Supported: ByteLevel(use_regex=True); Digits then ByteLevel(use_regex=
    True), as SmolLM2 has; one regex Split (isolated) then
    ByteLevel(use_regex=False), as Llama 3 and Qwen2 have.
    """
    steps = (pre_tokenizer or {}).get("pretokenizers", [pre_tokenizer])
    kinds = [step.get("type") if step else None for step in steps]
    byte_level = steps[-1] if kinds[-1] == "ByteLevel" else None
    if byte_level is None or byte_level.get("add_prefix_space"):
        raise UnsupportedTokenizerError(
            f"pre-tokenizer {kinds} does not end in ByteLevel without a prefix"
            " space; only byte-level BPE converts exactly"
        )
    uses_regex = byte_level.get("use_regex", True)
    if kinds == ["ByteLevel"] and uses_regex:
        return GPT2_PATTERN
    if kinds == ["Digits", "ByteLevel"] and uses_regex:
        return _digits_pattern(individual=bool(steps[0].get("individual_digits")))
    if kinds == ["Split", "ByteLevel"] and not uses_regex:
        return _split_pattern(steps[0])
    raise UnsupportedTokenizerError(
        f"pre-tokenizer chain {kinds} (ByteLevel use_regex={uses_regex}) has no"
        " exact tiktoken pattern"
    )


def _digits_pattern(*, individual: bool) -> str:
    """Digits (each alone, or runs) split off first, then the GPT-2 regex.

    Within a segment the GPT-2 ``\\s+(?!\\S)`` takes a whole whitespace run
    at the segment's end; a digit ends a segment, so the lookahead here
    treats a following digit like the end of the text.
    """
    numeric = NUMERIC_CLASS
    digits = f"[{numeric}]" if individual else f"[{numeric}]+"
    return (
        rf"{digits}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{{L}}+"
        rf"| ?[^\s\p{{L}}{numeric}]+|\s+(?![^\s{numeric}])|\s+"
    )


def _split_pattern(split: dict[str, Any]) -> str:
    """A regex Split's pattern, plus an alternative for unmatched stretches.

    tokenizers keeps text between matches as its own piece; tiktoken would
    drop it, so a last alternative takes each such stretch whole.
    """
    regex = (split.get("pattern") or {}).get("Regex")
    if not regex or split.get("behavior") != "Isolated" or split.get("invert"):
        raise UnsupportedTokenizerError(
            "only an isolated, non-inverted regex Split converts exactly"
        )
    return f"(?:{regex})|(?:(?!(?:{regex}))[\\s\\S])+"


def _special_ids(added_tokens: list[dict[str, Any]]) -> dict[str, int]:
    """Special token strings and ids; refuse added tokens tiktoken can't mirror."""
    odd = [
        t["content"]
        for t in added_tokens
        if not t.get("special")
        or t.get("lstrip")
        or t.get("rstrip")
        or t.get("single_word")
    ]
    if odd:
        raise UnsupportedTokenizerError(
            f"added tokens {odd[:5]!r} are not plain special tokens (non-special,"
            " or with lstrip/rstrip/single_word); they cannot be mirrored"
        )
    return {t["content"]: int(t["id"]) for t in added_tokens}


def _merge_results(model: dict[str, Any], vocab: dict[str, int]) -> list[str]:
    """The token each merge makes, in merge order; each must be unique.

    tiktoken merges the adjacent pair whose joined bytes have the lowest
    rank; tokenizers applies the lowest-ranked merge rule. They agree when
    every multi-byte token comes from exactly one rule and ranks follow
    the rule order.
    """
    merged: list[str] = []
    for merge in model.get("merges") or []:
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        merged.append(left + right)
    if len(set(merged)) != len(merged) or any(t not in vocab for t in merged):
        raise UnsupportedTokenizerError(
            "merge rules repeat a token or make tokens missing from the vocab"
        )
    unreachable = set(vocab) - set(merged) - {t for t in vocab if len(t) == 1}
    if unreachable and model.get("ignore_merges"):
        # With ignore_merges tokenizers may emit such a token for a whole
        # word, which tiktoken only does for tokens it can also merge into.
        raise UnsupportedTokenizerError(
            f"{len(unreachable)} tokens come from no merge rule and"
            " ignore_merges is set"
        )
    return merged


def _rank_order(vocab: dict[str, int], merged: list[str]) -> list[str] | None:
    """None when the ids already rise in merge order, else tokens by rank.

    Ranks of single bytes never compete with merges, so only the merge
    order matters; when ids break it, ranks are renumbered and ids mapped
    back after encoding.
    """
    ids = [vocab[t] for t in merged]
    if all(a < b for a, b in itertools.pairwise(ids)):
        return None
    singles = sorted((t for t in vocab if len(t) == 1), key=vocab.__getitem__)
    return singles + merged


@cache
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to the printable character standing for it."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    others = (b for b in range(256) if b not in mapping)
    mapping.update({b: chr(256 + n) for n, b in enumerate(others)})
    return mapping


def _template_tokens(model_dir: Path) -> dict[str, str]:
    """bos_token, eos_token, ... from tokenizer_config.json, for the template."""
    path = model_dir / "tokenizer_config.json"
    if not path.is_file():
        return {}
    config = json.loads(path.read_text(encoding="utf-8"))
    found: dict[str, str] = {}
    for name in _TEMPLATE_TOKEN_NAMES:
        value = config.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            found[name] = value
    return found


def _stat_signature(model_dir: Path) -> _Signature:
    """Size and mtime of the files a counter reads (0, 0 when absent)."""
    names = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
    signature = []
    for name in names:
        try:
            stat = (model_dir / name).stat()
        except FileNotFoundError:
            signature.append((0, 0))
        else:
            signature.append((stat.st_size, stat.st_mtime_ns))
    return tuple(signature)


class _GenerationTag(jinja2.ext.Extension):
    """Accept transformers' ``{% generation %}`` blocks; render their body."""

    # jinja declares tags as an instance attribute, so no ClassVar here.
    tags = {"generation"}  # noqa: RUF012

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        """Parse up to ``{% endgeneration %}``."""
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_render_body")
        return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return str(caller())


@cache
def _compile_template(source: str) -> jinja2.Template:
    """Compile a chat template in the environment transformers renders it in."""
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_template_error
    environment.globals["strftime_now"] = _strftime_now
    return environment.from_string(source)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # transformers' override: no HTML escaping, unlike jinja's own filter.
    return json.dumps(
        value,
        ensure_ascii=ensure_ascii,
        indent=indent,
        separators=separators,
        sort_keys=sort_keys,
    )


def _raise_template_error(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(format_: str) -> str:
    return datetime.now().strftime(format_)
