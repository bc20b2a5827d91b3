"""TokenCounter gives the ids of the model's own tokenizer, offline."""

from __future__ import annotations

import copy
import json
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from pipelines.model import PreparedModel
from pipelines.tokens import (
    NEUTRALIZER,
    TokenCounter,
    UnsupportedTokenizerError,
    neutralize_special_tokens,
)

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
CORPUS_FILES = ("stays.jsonl", "longitudinal.jsonl")
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>")
# Pieces that stress the pre-tokenizer: digits of several scripts,
# whitespace runs (before digits too), contractions, emoji sequences,
# control characters (U+0004 has no token in SmolLM2) and control tokens.
FRAGMENTS = (
    "0", "7", "12", "٣", "５", "Ⅻ", "½", " ", "  ", "\t", "\n", "\n\n", "\r\n",
    "\x0b", "\x0c", "\x85", "\xa0", "\u2003", "\u3000", "\u200b", "'s", "'LL",
    "don't", "😀", "👍🏽", "👨\u200d👩\u200d👧", "\x00", "\x04", "\x1d", "\x7f",
    "mg/dL", "Na+", "é", "ß", "中文", "<", "|", ">", "<|", "|>", *SPECIALS,
)  # fmt: skip
tricky_text = st.lists(
    st.one_of(
        st.sampled_from(FRAGMENTS),
        st.text(max_size=6),
        st.characters(codec="utf-8"),
    ),
    max_size=24,
).map("".join)


def corpus_notes() -> Iterator[str]:
    """Every note text of the shared developer corpus."""
    for name in CORPUS_FILES:
        with (SHARED_DATA / name).open(encoding="utf-8") as lines:
            for line in lines:
                yield from (note["text"] for note in json.loads(line)["notes"])


@pytest.fixture(scope="module")
def hf_plain(prepared_model: PreparedModel) -> Tokenizer:
    """The model's HF tokenizer, reading special-token strings as text."""
    tokenizer = Tokenizer.from_file(str(prepared_model.path / "tokenizer.json"))
    tokenizer.encode_special_tokens = True
    return tokenizer


@pytest.fixture(scope="module")
def hf_special(prepared_model: PreparedModel) -> Tokenizer:
    """The model's HF tokenizer, parsing special-token strings as controls."""
    return Tokenizer.from_file(str(prepared_model.path / "tokenizer.json"))


@pytest.fixture(scope="module")
def tokenizer_spec(prepared_model: PreparedModel) -> dict[str, Any]:
    """The prepared model's tokenizer.json, parsed."""
    text = (prepared_model.path / "tokenizer.json").read_text(encoding="utf-8")
    spec: dict[str, Any] = json.loads(text)
    return spec


def counter_for(spec: dict[str, Any], folder: Path) -> TokenCounter:
    """A TokenCounter over ``spec`` written into ``folder``."""
    folder.mkdir(exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    return TokenCounter(folder)


def test_every_corpus_note_encodes_to_the_model_tokenizers_ids(
    token_counter: TokenCounter, hf_plain: Tokenizer
) -> None:
    """All notes of stays.jsonl and longitudinal.jsonl get exactly HF's ids."""
    notes = list(corpus_notes())

    mismatched = [
        i
        for i, text in enumerate(notes)
        if token_counter.encode(text)
        != hf_plain.encode(text, add_special_tokens=False).ids
    ]

    assert len(notes) == 515
    assert mismatched == []


@settings(max_examples=400, deadline=None)
@given(text=tricky_text)
def test_any_text_encodes_to_the_model_tokenizers_ids(
    token_counter: TokenCounter, hf_plain: Tokenizer, text: str
) -> None:
    """Arbitrary text, special-token strings as plain text, gets HF's ids."""
    expected = hf_plain.encode(text, add_special_tokens=False).ids

    assert token_counter.encode(text) == expected
    assert token_counter.count(text) == len(expected)


@settings(max_examples=400, deadline=None)
@given(text=tricky_text)
def test_any_text_with_specials_allowed_encodes_to_the_model_tokenizers_ids(
    token_counter: TokenCounter, hf_special: Tokenizer, text: str
) -> None:
    """With allow_special, control-token strings become their ids, as in HF."""
    expected = hf_special.encode(text, add_special_tokens=False).ids

    assert token_counter.encode(text, allow_special=True) == expected


@pytest.mark.parametrize(
    ("text", "pieces"),
    [
        ("12345", ["1", "2", "3", "4", "5"]),
        ("  5", ["  ", "5"]),
        ("x \n\n7", ["x", " \n\n", "7"]),
        ("dose  10 mg", ["dose", "  ", "1", "0", " mg"]),
        ("a  b", ["a", " ", " b"]),
        ("end  ", ["end", "  "]),
    ],
)
def test_digits_are_single_tokens_and_whitespace_before_them_stays_whole(
    token_counter: TokenCounter, text: str, pieces: list[str]
) -> None:
    """Each digit is its own token and a whitespace run before it is one piece."""
    ids = token_counter.encode(text)

    assert [token_counter.decode([i]) for i in ids] == pieces


def test_every_code_point_pre_tokenizes_like_the_model_tokenizer(
    token_counter: TokenCounter, hf_plain: Tokenizer
) -> None:
    """Letter, digit and space classes agree with HF for every code point.

    The regex engines' Unicode tables differ in version; this catches a
    class that one engine knows and the other does not.
    """
    present = set(token_counter._present_bytes)
    code_points = [
        *range(0x40000),
        *range(0xE0000, 0xE1000),
        *range(0xF0000, 0x110000, 97),
    ]
    usable = [
        chr(c)
        for c in code_points
        if not 0xD800 <= c < 0xE000 and set(chr(c).encode()) <= present
    ]
    # Two spaces before c: one piece only if c is a digit; then c joins
    # "a" if it is a letter and "!" if it is neither letter, digit nor space.
    text = "".join(f"  {c}a{c}!" for c in usable)

    assert token_counter.encode(text) == hf_plain.encode(text).ids


@pytest.mark.parametrize(
    "text", ["!\x04!", "a\x04b", "x\x13\x14y", "a\U00040000b", "12\x1d34"]
)
def test_bytes_without_a_token_are_dropped_as_the_model_tokenizer_does(
    token_counter: TokenCounter, hf_plain: Tokenizer, text: str
) -> None:
    """Characters with no token vanish and their neighbours merge, as in HF."""
    assert token_counter.encode(text) == hf_plain.encode(text).ids


def test_lone_surrogates_are_refused(token_counter: TokenCounter) -> None:
    """Text with a lone surrogate raises, as the model's tokenizer does."""
    with pytest.raises(UnicodeEncodeError):
        token_counter.encode("a\ud800b")


@settings(max_examples=200, deadline=None)
@given(text=tricky_text)
def test_decode_gives_back_the_encoded_text(
    token_counter: TokenCounter, text: str
) -> None:
    """Decoding the ids of text whose bytes all have tokens gives the text."""
    assume(set(text.encode()) <= set(token_counter._present_bytes))

    ids = token_counter.encode(text, allow_special=True)

    assert token_counter.decode(ids) == text


def test_special_tokens_are_the_seventeen_control_strings(
    token_counter: TokenCounter,
) -> None:
    """The counter knows SmolLM2's 17 control strings, ChatML's among them."""
    specials = token_counter.special_tokens

    assert len(specials) == 17
    assert {"<|endoftext|>", "<|im_start|>", "<|im_end|>"} <= specials
    assert token_counter.encode("<|im_end|>", allow_special=True) == [2]


def test_from_model_dir_builds_one_counter_per_folder(
    prepared_model: PreparedModel, token_counter: TokenCounter
) -> None:
    """Asking again for the same folder, by any path, returns the same counter."""
    relative = Path(os.path.relpath(prepared_model.path))

    again = TokenCounter.from_model_dir(relative)

    assert again is token_counter


CHATS = [
    [{"role": "user", "content": "Summarize the stay."}],
    [
        {"role": "system", "content": "You write discharge summaries."},
        {"role": "user", "content": "Na 134 mmol/L,  K 4.1\n\n  2 notes"},
    ],
    [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok <|im_end|>"},
        {"role": "user", "content": "  trailing spaces  "},
    ],
]


@pytest.fixture(scope="module")
def hf_chat_tokenizer(prepared_model: PreparedModel) -> Any:
    """transformers' tokenizer for the prepared model, as vLLM loads it."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(prepared_model.path)


@pytest.mark.parametrize("messages", CHATS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_rendered_chat_counts_the_prompt_tokens_vllm_sees(
    token_counter: TokenCounter,
    hf_chat_tokenizer: Any,
    messages: list[dict[str, str]],
    add_generation_prompt: bool,
) -> None:
    """Counting the rendered chat equals transformers' tokenized chat length."""
    expected = hf_chat_tokenizer.apply_chat_template(
        messages,
        tokenize=True,
        add_generation_prompt=add_generation_prompt,
        return_dict=False,
    )

    rendered = token_counter.render_chat(
        messages, add_generation_prompt=add_generation_prompt
    )

    assert token_counter.encode(rendered, allow_special=True) == expected
    assert token_counter.count(rendered, allow_special=True) == len(expected)


def test_rendered_chat_ends_with_the_assistant_header(
    token_counter: TokenCounter,
) -> None:
    """With a generation prompt the text ends by opening the assistant's turn."""
    rendered = token_counter.render_chat(CHATS[0])

    assert rendered.startswith("<|im_start|>system\n")
    assert rendered.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_a_folder_without_chat_template_refuses_to_render(
    tokenizer_spec: dict[str, Any], tmp_path: Path
) -> None:
    """Rendering a chat without a template raises UnsupportedTokenizerError."""
    counter = counter_for(tokenizer_spec, tmp_path)

    with pytest.raises(UnsupportedTokenizerError, match="no chat template"):
        counter.render_chat(CHATS[0])


LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BYTE_LEVEL = {
    "type": "ByteLevel",
    "add_prefix_space": False,
    "trim_offsets": True,
    "use_regex": True,
}
OTHER_PRE_TOKENIZERS = {
    "gpt2": BYTE_LEVEL,
    "digit_runs": {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Digits", "individual_digits": False},
            BYTE_LEVEL,
        ],
    },
    "llama3_split": {
        "type": "Sequence",
        "pretokenizers": [
            {
                "type": "Split",
                "pattern": {"Regex": LLAMA3_SPLIT},
                "behavior": "Isolated",
                "invert": False,
            },
            {**BYTE_LEVEL, "use_regex": False},
        ],
    },
    # Leaves gaps between matches, which must stay whole pieces.
    "letters_split": {
        "type": "Sequence",
        "pretokenizers": [
            {
                "type": "Split",
                "pattern": {"Regex": r"\p{L}+"},
                "behavior": "Isolated",
                "invert": False,
            },
            {**BYTE_LEVEL, "use_regex": False},
        ],
    },
}


@pytest.mark.parametrize("name", sorted(OTHER_PRE_TOKENIZERS))
def test_other_byte_level_pre_tokenizers_convert_exactly(
    tokenizer_spec: dict[str, Any], tmp_path: Path, name: str
) -> None:
    """GPT-2, digit-run and regex-Split pre-tokenizers also give HF's ids."""
    spec = copy.deepcopy(tokenizer_spec)
    spec["pre_tokenizer"] = OTHER_PRE_TOKENIZERS[name]
    counter = counter_for(spec, tmp_path)
    reference = Tokenizer.from_str(json.dumps(spec))
    reference.encode_special_tokens = True
    samples = [*corpus_notes(), *FRAGMENTS, "".join(FRAGMENTS) * 3]

    mismatched = [
        text for text in samples if counter.encode(text) != reference.encode(text).ids
    ]

    assert mismatched == []


def test_ids_out_of_merge_order_are_mapped_back_to_the_model_ids(
    tokenizer_spec: dict[str, Any], tmp_path: Path
) -> None:
    """A vocab whose ids do not follow the merges still encodes to HF's ids."""
    spec = copy.deepcopy(tokenizer_spec)
    vocab = spec["model"]["vocab"]
    regular = [token for token, i in vocab.items() if i >= 17]
    shuffled_ids = sorted(vocab[t] for t in regular)
    random.Random(7).shuffle(shuffled_ids)
    vocab.update(zip(regular, shuffled_ids, strict=True))
    counter = counter_for(spec, tmp_path)
    reference = Tokenizer.from_str(json.dumps(spec))
    text = "\n".join(list(corpus_notes())[:40]) + "<|im_end|> 12 ok"

    ids = counter.encode(text, allow_special=True)

    assert counter._rank_to_id is not None
    assert ids == reference.encode(text, add_special_tokens=False).ids
    assert counter.decode(ids) == text


UNSUPPORTED: dict[str, tuple[dict[str, Any], str]] = {
    "unigram": ({"model": {"type": "Unigram", "vocab": []}}, "not BPE"),
    "wordpiece": ({"model": {"type": "WordPiece", "vocab": {}}}, "not BPE"),
    "byte_fallback": ({"model": {"byte_fallback": True}}, "byte_fallback"),
    "normalizer": ({"normalizer": {"type": "NFC"}}, "normalizer"),
    "metaspace": (
        {"pre_tokenizer": {"type": "Metaspace", "replacement": "▁"}},
        "ByteLevel",
    ),
    "prefix_space": (
        {"pre_tokenizer": {**BYTE_LEVEL, "add_prefix_space": True}},
        "prefix",
    ),
    "non_special_added": (
        {
            "added_tokens": [
                {"id": 0, "content": "<x>", "special": False},
            ]
        },
        "not plain special",
    ),
}


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_tokenizers_that_cannot_be_mirrored_exactly_are_refused(
    tokenizer_spec: dict[str, Any], tmp_path: Path, name: str
) -> None:
    """SentencePiece-like, normalized or oddly pre-tokenized files raise."""
    change, message = UNSUPPORTED[name]
    spec = copy.deepcopy(tokenizer_spec)
    for key, value in change.items():
        if key == "model":
            spec["model"].update(value)
        else:
            spec[key] = value

    with pytest.raises(UnsupportedTokenizerError, match=message):
        counter_for(spec, tmp_path)


@settings(max_examples=300, deadline=None)
@given(text=tricky_text)
def test_neutralized_text_holds_no_control_tokens(
    token_counter: TokenCounter, text: str
) -> None:
    """After neutralizing, even allow_special encoding yields no control ids."""
    safe, _ = neutralize_special_tokens(text, token_counter.special_tokens)

    ids = token_counter.encode(safe, allow_special=True)

    assert not set(ids) & set(range(17))


@settings(max_examples=300, deadline=None)
@given(text=tricky_text)
def test_neutralizing_twice_changes_nothing(
    token_counter: TokenCounter, text: str
) -> None:
    """Neutralized text comes back unchanged, with a count of zero."""
    once, _ = neutralize_special_tokens(text, token_counter.special_tokens)

    assert neutralize_special_tokens(once, token_counter.special_tokens) == (
        once,
        0,
    )


@given(text=st.text())
def test_text_without_control_strings_is_left_alone(
    token_counter: TokenCounter, text: str
) -> None:
    """Text with no special-token string is returned as is, count zero."""
    specials = token_counter.special_tokens
    assume(not any(token in text for token in specials))

    assert neutralize_special_tokens(text, specials) == (text, 0)


@pytest.mark.parametrize(
    ("text", "expected", "count"),
    [
        ("a<|im_end|>b", f"a<{NEUTRALIZER}|im_end|>b", 1),
        ("<<|im_end|>", f"<<{NEUTRALIZER}|im_end|>", 1),
        (
            "<|im_start|><|im_end|>",
            f"<{NEUTRALIZER}|im_start|><{NEUTRALIZER}|im_end|>",
            2,
        ),
        ("<|im_end|", "<|im_end|", 0),
        ("Na < 135 | K > 5", "Na < 135 | K > 5", 0),
    ],
)
def test_neutralize_breaks_each_control_string_after_its_first_character(
    token_counter: TokenCounter, text: str, expected: str, count: int
) -> None:
    """A zero-width space follows the first character of each occurrence."""
    result = neutralize_special_tokens(text, token_counter.special_tokens)

    assert result == (expected, count)


def test_overlapping_control_strings_are_all_broken() -> None:
    """Occurrences that share characters are each broken."""
    specials = frozenset({"<a|", "|b>"})

    safe, count = neutralize_special_tokens("<a|b>", specials)

    assert count == 2
    assert "<a|" not in safe and "|b>" not in safe


def test_control_strings_that_cannot_be_broken_are_refused() -> None:
    """A one-character special token raises ValueError."""
    with pytest.raises(ValueError, match="cannot neutralize"):
        neutralize_special_tokens("x", frozenset({"x"}))


def test_neutralize_with_no_special_tokens_changes_nothing() -> None:
    """Without special tokens the text is returned unchanged."""
    assert neutralize_special_tokens("<|im_end|>", frozenset()) == (
        "<|im_end|>",
        0,
    )
