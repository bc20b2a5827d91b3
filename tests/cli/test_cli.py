"""The command line: clear errors instead of tracebacks or silent surprises."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from chartsum.cli import cli
from pipelines.errors import ModelPrepareError
from tests.helpers import stay_line


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """An embedded data dir of its own, with no model in it."""
    return {
        "CHARTSUM_DATA_DIR": str(tmp_path / "data"),
        "CHARTSUM_VLLM__MODEL_DIR": str(tmp_path / "no-model"),
    }


def test_bad_settings_are_named_one_per_line_without_their_values(
    env: dict[str, str],
) -> None:
    """Each bad variable is named as it is set; its value is not echoed."""
    env |= {
        "CHARTSUM_VLLM__MODE": "bogus-mode-value",
        "CHARTSUM_PIPELINE__MIN_SUPPORT_RATE": "abc",
    }

    result = CliRunner().invoke(cli, ["status"], env=env)

    assert result.exit_code == 1
    assert "CHARTSUM_VLLM__MODE:" in result.output
    assert "CHARTSUM_PIPELINE__MIN_SUPPORT_RATE:" in result.output
    assert "bogus-mode-value" not in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("limit", ["0", "-1"])
def test_run_refuses_a_limit_below_one(env: dict[str, str], limit: str) -> None:
    """--limit 0 used to mean every stay; now it is a usage error."""
    result = CliRunner().invoke(cli, ["run", "--limit", limit], env=env)

    assert result.exit_code == 2
    assert "--limit" in result.output


def test_route_without_a_model_says_how_to_get_one(
    env: dict[str, str], tmp_path: Path
) -> None:
    """Not a FileNotFoundError traceback: the same message as run and worker."""
    stays = tmp_path / "stays.jsonl"
    stays.write_text(stay_line("a") + "\n", encoding="utf-8")
    runner = CliRunner()
    assert runner.invoke(cli, ["ingest", str(stays)], env=env).exit_code == 0

    result = runner.invoke(cli, ["route", "a"], env=env)

    assert isinstance(result.exception, ModelPrepareError)
    assert "chartsum model prepare" in str(result.exception)


def test_ingest_reports_a_stay_moved_to_another_patient(
    env: dict[str, str], tmp_path: Path
) -> None:
    """The refused stay is listed as rejected and the exit code says so."""
    first = tmp_path / "first.jsonl"
    first.write_text(stay_line("a") + "\n", encoding="utf-8")
    moved = tmp_path / "moved.jsonl"
    moved.write_text(stay_line("a", patient_id="other") + "\n", encoding="utf-8")
    runner = CliRunner()
    runner.invoke(cli, ["ingest", str(first)], env=env)

    result = runner.invoke(cli, ["ingest", str(moved)], env=env)

    assert result.exit_code == 1
    assert "stay a: stored for another patient_id" in result.output
    assert "0 updated, 0 unchanged, 1 rejected" in result.output


def test_show_names_the_job_of_a_stay_that_has_no_summary_yet(
    env: dict[str, str], tmp_path: Path
) -> None:
    """'no summary' alone left an operator guessing; the job and state say why."""
    from pipelines.runtime import open_store
    from schemas.settings import Settings

    stays = tmp_path / "stays.jsonl"
    stays.write_text(stay_line("a") + "\n", encoding="utf-8")
    runner = CliRunner()
    runner.invoke(cli, ["ingest", str(stays)], env=env)
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        store = open_store(Settings())
        [(job_id, _)] = store.create_jobs(kind="discharge", stay_ids=["a"], queue="q")
        store.close()

    result = runner.invoke(cli, ["show", "a"], env=env)

    assert result.exit_code == 1
    assert f"job {job_id} is queued" in result.output


def test_status_lists_failures_with_full_job_ids_and_whole_words(
    env: dict[str, str], tmp_path: Path, redis_url: str
) -> None:
    """An operator can paste the job id into `chartsum show`."""
    from pipelines.runtime import open_store
    from schemas.settings import Settings
    from schemas.tables import JobState

    env |= {"CHARTSUM_REDIS__URL": redis_url}
    stays = tmp_path / "stays.jsonl"
    stays.write_text(stay_line("a") + "\n", encoding="utf-8")
    runner = CliRunner()
    runner.invoke(cli, ["ingest", str(stays)], env=env)
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        store = open_store(Settings())
        [(job_id, _)] = store.create_jobs(kind="discharge", stay_ids=["a"], queue="q")
        reason = " ".join(["unsupported"] * 40)
        store.fail_job(job_id, state=JobState.FAILED, error_code="x", error=reason)
        store.close()

    result = CliRunner().invoke(cli, ["status"], env=env, terminal_width=200)

    assert result.exit_code == 0
    assert job_id in result.output
    # Shortened at a word, marked, never cut mid-word.
    assert "..." in result.output
    assert result.output.count("unsupp") == result.output.count("unsupported") < 40
