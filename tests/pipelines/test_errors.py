"""Error codes: what integrations and dashboards match a failed job on."""

from __future__ import annotations

import re

# Imported for the errors they define.
import pipelines.engine
import pipelines.model
import pipelines.tokens  # noqa: F401
from pipelines.errors import ModelPrepareError, PermanentError


def _subclasses(cls: type) -> list[type]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *_subclasses(sub)]
    return found


def test_every_permanent_error_has_its_own_snake_case_code() -> None:
    """A subclass that forgot its code would share its parent's.

    The model-preparation errors are one family with one code: the message
    says which step failed.
    """
    family = set(_subclasses(ModelPrepareError))
    codes = [cls.code for cls in _subclasses(PermanentError) if cls not in family]

    assert len(codes) >= 6
    assert len(set(codes)) == len(codes)
    assert "permanent_error" not in codes
    assert all(re.fullmatch(r"[a-z]+(_[a-z]+)*", code) for code in codes)
