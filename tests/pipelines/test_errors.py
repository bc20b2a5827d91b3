"""Error codes: what integrations and dashboards match a failed job on."""

from __future__ import annotations

import re

from pipelines.errors import PermanentError


def _subclasses(cls: type) -> list[type]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *_subclasses(sub)]
    return found


def test_every_permanent_error_has_its_own_snake_case_code() -> None:
    """A subclass that forgot its code would share its parent's."""
    codes = [cls.code for cls in _subclasses(PermanentError)]

    assert len(codes) >= 4
    assert len(set(codes)) == len(codes)
    assert "permanent_error" not in codes
    assert all(re.fullmatch(r"[a-z]+(_[a-z]+)*", code) for code in codes)
