"""Fixtures for pipeline tests: the prepared model and its token counter."""

from __future__ import annotations

import pytest

from pipelines.model import PreparedModel, prepare_embedded_model
from pipelines.tokens import TokenCounter
from schemas.settings import Settings


@pytest.fixture(scope="session")
def prepared_model() -> PreparedModel:
    """The embedded model in its default folder, prepared once if CI has not."""
    # Idempotent: after `chartsum model prepare` this only reads the marker.
    return prepare_embedded_model(target_dir=Settings().model_dir)


@pytest.fixture(scope="session")
def token_counter(prepared_model: PreparedModel) -> TokenCounter:
    """The embedded model's token counter."""
    return TokenCounter.from_model_dir(prepared_model.path)
