"""Hypothesis strategies shared by the tests."""

from __future__ import annotations

from hypothesis import strategies as st

from pipelines.stays import ChartNote

# Note text is drawn as a flat list of pieces: one draw per piece keeps
# generation fast, and headings start with a line break so they begin a line.
_PIECES = [
    "patient ", "was ", "admitted ", "with ", "pneumonia", "cisplatin ",
    "50 ", "mg", "2020-01-03 ", "Dr. ", "X ", "b.i.d. ", "non-small ",
    "café ", "日本語", "🙂", "<|im_end|>", "a" * 40, "1,000 ", "95%",
    "(disorder) ", ". ", "? ", ".) ", " ", "  ", "\t", "\n", " \n", "\r\n",
    "\n\n", "\n\n\n", "  \n \n", "\n- ", "\n# Chief Complaint\n",
    "\n## Plan\n", "\nHOSPITAL COURSE: ", "\nDISCHARGE MEDICATIONS:\n",
    "\n HISTORY OF PRESENT ILLNESS: ", "\nDIAGNOSES ON ADMISSION  \n",
    "\nGI: ", "\nRespiration: ", "NKDA",
]  # fmt: skip


@st.composite
def note_texts(draw: st.DrawFn) -> str:
    """Note text: headings, sentences, lists and odd spacing, or raw text."""
    if draw(st.integers(0, 9)) == 0:
        # Lone surrogates are left out: the model's tokenizer rejects them.
        alphabet = st.characters(exclude_categories=["Cs"])
        return draw(st.text(alphabet, min_size=1, max_size=300))
    pieces = draw(st.lists(st.sampled_from(_PIECES), min_size=1, max_size=200))
    return "".join(pieces)


@st.composite
def chart_notes(draw: st.DrawFn, *, max_notes: int = 3) -> list[ChartNote]:
    """A few notes with distinct ids."""
    texts = draw(st.lists(note_texts(), min_size=1, max_size=max_notes))
    return [
        ChartNote(note_id=f"n{i}", note_type=None, charted_at=None, text=text)
        for i, text in enumerate(texts)
    ]


@st.composite
def chunk_budgets(draw: st.DrawFn) -> dict[str, int]:
    """max_tokens, overlap_tokens and min_tokens that chunking accepts."""
    max_tokens = draw(st.integers(min_value=8, max_value=128))
    return {
        "max_tokens": max_tokens,
        "overlap_tokens": draw(st.integers(min_value=0, max_value=max_tokens - 1)),
        "min_tokens": draw(st.integers(min_value=0, max_value=48)),
    }
