"""Choosing a route: one full-context pass, or the chunked fallback.

A stay goes to the model in one pass only when its whole prompt plus the
completion budget fits in the model's *effective* context: the length at
which the model was measured to still find facts anywhere in its input.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Route(StrEnum):
    """How a stay is summarized."""

    SINGLE_PASS = "single_pass"
    CHUNKED = "chunked"


@dataclass(frozen=True)
class EffectiveContext:
    """The context length the router trusts, and where it came from."""

    tokens: int
    #: A calibration id, or "default" for the uncalibrated fallback.
    source: str


@dataclass(frozen=True)
class RouteDecision:
    """A route and the numbers behind it."""

    route: Route
    prompt_tokens: int
    completion_budget_tokens: int
    context: EffectiveContext

    @property
    def needed_tokens(self) -> int:
        """Prompt plus completion budget."""
        return self.prompt_tokens + self.completion_budget_tokens

    def explain(self) -> str:
        """One line an operator can read: the route and why."""
        relation = "<=" if self.route is Route.SINGLE_PASS else ">"
        return (
            f"{self.route}: prompt {self.prompt_tokens} + completion budget"
            f" {self.completion_budget_tokens} = {self.needed_tokens} tokens"
            f" {relation} effective context {self.context.tokens}"
            f" ({self.context.source})"
        )


def choose_route(
    *, prompt_tokens: int, completion_budget_tokens: int, context: EffectiveContext
) -> RouteDecision:
    """Single pass when prompt and completion fit the effective context.

    Args:
        prompt_tokens: Exact tokens of the full single-pass prompt.
        completion_budget_tokens: The most tokens the summary may take.
        context: The measured (or default) effective context.
    """
    fits = prompt_tokens + completion_budget_tokens <= context.tokens
    route = Route.SINGLE_PASS if fits else Route.CHUNKED
    return RouteDecision(route, prompt_tokens, completion_budget_tokens, context)
