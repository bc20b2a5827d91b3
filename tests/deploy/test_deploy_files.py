"""deploy/ files parse, and every chartsum setting they name exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from schemas.settings import Settings
from tests.conftest import REPO

DEPLOY = REPO / "deploy"
VARIABLE = re.compile(r"\bCHARTSUM_[A-Z0-9_]+")


def _known_variables() -> set[str]:
    known = set()
    for name, field in Settings.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            for sub in annotation.model_fields:
                known.add(f"CHARTSUM_{name}__{sub}".upper())
        else:
            known.add(f"CHARTSUM_{name}".upper())
    return known


def _deploy_files() -> list[Path]:
    return sorted(path for path in DEPLOY.rglob("*") if path.is_file())


def test_the_compose_file_parses_and_runs_every_part() -> None:
    """compose.yaml is YAML with the services an operator expects."""
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())

    services = set(compose["services"])
    assert {
        "postgres",
        "redis",
        "vllm",
        "worker-realtime",
        "worker-backfill",
        "beat",
        "flower",
    } <= services
    assert (
        "--structured-outputs-config.disable_any_whitespace=true"
        in (compose["services"]["vllm"]["command"])
    )


def test_every_env_file_line_is_a_known_setting_or_a_comment() -> None:
    """chartsum.env holds KEY=VALUE lines only, for settings that exist."""
    known = _known_variables()
    for line in (DEPLOY / "chartsum.env").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, _, _value = line.partition("=")
        assert key.startswith(("CHARTSUM_", "WORKER_QUEUES_")), line
        if key.startswith("CHARTSUM_"):
            assert key in known, key


@pytest.mark.parametrize("path", _deploy_files(), ids=lambda p: p.name)
def test_every_chartsum_variable_in_deploy_files_exists(path: Path) -> None:
    """A typo in a variable name would be silently ignored; catch it here."""
    known = _known_variables() | {"CHARTSUM_FLOWER_AUTH"}

    used = set(VARIABLE.findall(path.read_text()))

    assert used <= known, used - known


def test_systemd_units_have_the_sections_systemd_needs() -> None:
    """Each unit has [Unit], [Service] with ExecStart, and [Install]."""
    units = sorted((DEPLOY / "systemd").glob("*.service"))
    assert len(units) >= 4
    for unit in units:
        text = unit.read_text()
        for section in ("[Unit]", "[Service]", "[Install]"):
            assert section in text, (unit.name, section)
        assert re.search(r"^ExecStart=\S", text, re.MULTILINE), unit.name
        assert "EnvironmentFile=/etc/chartsum/chartsum.env" in text
