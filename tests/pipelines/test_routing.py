"""Routing at the boundary of the effective context."""

from __future__ import annotations

import pytest

from pipelines.routing import EffectiveContext, Route, choose_route

CONTEXT = EffectiveContext(tokens=4096, source="cal-1")


@pytest.mark.parametrize(
    ("prompt_tokens", "route"),
    [(3071, Route.SINGLE_PASS), (3072, Route.SINGLE_PASS), (3073, Route.CHUNKED)],
)
def test_a_prompt_one_token_over_the_context_goes_chunked(
    prompt_tokens: int, route: Route
) -> None:
    """Prompt plus budget equal to the context fits; one token more does not."""
    decision = choose_route(
        prompt_tokens=prompt_tokens, completion_budget_tokens=1024, context=CONTEXT
    )

    assert decision.route is route


def test_the_explanation_names_the_numbers_and_their_source() -> None:
    """An operator sees the counts, the limit and where the limit came from."""
    decision = choose_route(
        prompt_tokens=5000, completion_budget_tokens=1024, context=CONTEXT
    )

    assert decision.explain() == (
        "chunked: prompt 5000 + completion budget 1024 = 6024 tokens"
        " > effective context 4096 (cal-1)"
    )
