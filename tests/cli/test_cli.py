"""The command line: clear errors instead of tracebacks or silent surprises."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from chartsum.cli import cli
from pipelines.errors import ModelPrepareError
from pipelines.runtime import open_store
from pipelines.store import ChartStore
from schemas.settings import Settings
from schemas.tables import JobState
from tests.helpers import space_out_jobs, stay_line


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """An embedded data dir of its own, with no model in it."""
    return {
        "CHARTSUM_DATA_DIR": str(tmp_path / "data"),
        "CHARTSUM_VLLM__MODEL_DIR": str(tmp_path / "no-model"),
    }


def _ingest(env: dict[str, str], path: Path, *lines: str) -> Result:
    """Write the stay lines to ``path`` and run `chartsum ingest` on it."""
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return CliRunner().invoke(cli, ["ingest", str(path)], env=env)


def _listed_job_ids(env: dict[str, str], *args: str) -> list[str]:
    """The job ids `chartsum jobs --json ARGS` prints, in its order."""
    result = CliRunner().invoke(cli, ["jobs", "--json", *args], env=env)
    assert result.exit_code == 0, result.output
    return [json.loads(line)["job_id"] for line in result.stdout.splitlines()]


@contextmanager
def _store(env: dict[str, str]) -> Iterator[ChartStore]:
    """The embedded database the commands under ``env`` use."""
    store = open_store(Settings(data_dir=Path(env["CHARTSUM_DATA_DIR"])))
    try:
        yield store
    finally:
        store.close()


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
    assert _ingest(env, tmp_path / "stays.jsonl", stay_line("a")).exit_code == 0

    result = CliRunner().invoke(cli, ["route", "a"], env=env)

    assert isinstance(result.exception, ModelPrepareError)
    assert "chartsum model prepare" in str(result.exception)


def test_ingest_reports_a_stay_moved_to_another_patient(
    env: dict[str, str], tmp_path: Path
) -> None:
    """The refused stay is listed as rejected and the exit code says so."""
    _ingest(env, tmp_path / "first.jsonl", stay_line("a"))

    result = _ingest(env, tmp_path / "moved.jsonl", stay_line("a", patient_id="other"))

    assert result.exit_code == 1
    assert "stay a: stored for another patient_id" in result.output
    assert "0 updated, 0 unchanged, 1 rejected" in result.output


def test_show_names_the_job_of_a_stay_that_has_no_summary_yet(
    env: dict[str, str], tmp_path: Path
) -> None:
    """'no summary' alone left an operator guessing; the job and state say why."""
    _ingest(env, tmp_path / "stays.jsonl", stay_line("a"))
    with _store(env) as store:
        [(job_id, _)] = store.create_jobs(kind="discharge", stay_ids=["a"], queue="q")

    result = CliRunner().invoke(cli, ["show", "a"], env=env)

    assert result.exit_code == 1
    assert f"job {job_id} is queued" in result.output


def test_status_lists_failures_with_full_job_ids_and_whole_words(
    env: dict[str, str], tmp_path: Path, redis_url: str
) -> None:
    """An operator can paste the job id into `chartsum show`."""
    env |= {"CHARTSUM_REDIS__URL": redis_url}
    _ingest(env, tmp_path / "stays.jsonl", stay_line("a"))
    with _store(env) as store:
        [(job_id, _)] = store.create_jobs(kind="discharge", stay_ids=["a"], queue="q")
        reason = " ".join(["unsupported"] * 40)
        store.fail_job(job_id, state=JobState.FAILED, error_code="x", error=reason)

    result = CliRunner().invoke(cli, ["status"], env=env, terminal_width=200)

    assert result.exit_code == 0
    assert job_id in result.output
    # Shortened at a word, marked, never cut mid-word.
    assert "..." in result.output
    assert result.output.count("unsupp") == result.output.count("unsupported") < 40


def test_jobs_lists_the_summaries_waiting_for_review_with_their_support(
    env: dict[str, str], tmp_path: Path
) -> None:
    """--state needs_review gives those jobs only, newest first, ids in full."""
    from dataclasses import replace

    from tests.pipelines.test_store import _summary

    _ingest(env, tmp_path / "stays.jsonl", stay_line("a"), stay_line("b"))
    with _store(env) as store:
        created = store.create_jobs(kind="discharge", stay_ids=["a", "b"], queue="q")
        [(review_id, _), (failed_id, _)] = created
        store.complete_job_for_review(
            replace(_summary(review_id, "a"), support_rate=0.25),
            error_code="low_support",
            error="support rate 0.25 is below 0.50",
        )
        store.fail_job(
            failed_id, state=JobState.FAILED, error_code="stay_not_found", error="x"
        )

    result = CliRunner().invoke(
        cli, ["jobs", "--state", "needs_review"], env=env, terminal_width=200
    )
    as_json = CliRunner().invoke(cli, ["jobs", "--json"], env=env)
    by_code = CliRunner().invoke(cli, ["jobs", "--code", "stay_not_found"], env=env)

    assert result.exit_code == 0, result.output
    assert review_id in result.output
    assert failed_id not in result.output
    assert "0.25" in result.output and "low_support" in result.output
    rows = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert {row["job_id"]: row["state"] for row in rows} == {
        review_id: "needs_review",
        failed_id: "failed",
    }
    assert {row["job_id"]: row["support_rate"] for row in rows}[review_id] == 0.25
    assert failed_id in by_code.output and review_id not in by_code.output


def test_jobs_are_listed_newest_first_and_narrowed_by_kind_and_limit(
    env: dict[str, str], tmp_path: Path
) -> None:
    """--limit keeps the newest; --kind longitudinal keeps patient jobs only."""
    _ingest(env, tmp_path / "stays.jsonl", stay_line("a"), stay_line("b"))
    with _store(env) as store:
        [(first, _)] = store.create_jobs(kind="discharge", stay_ids=["a"], queue="q")
        [(second, _)] = store.create_jobs(kind="discharge", stay_ids=["b"], queue="q")
        [(patient, _)] = store.create_patient_jobs(
            kind="longitudinal", patient_ids=["t-patient-1"], queue="q"
        )
        space_out_jobs(store, [first, second, patient])

    assert _listed_job_ids(env) == [patient, second, first]
    assert _listed_job_ids(env, "--limit", "2") == [patient, second]
    assert _listed_job_ids(env, "--kind", "longitudinal") == [patient]


def test_logs_go_to_stderr_so_piped_output_stays_clean(
    tmp_path: Path, model_dir: Path
) -> None:
    """`chartsum route` warns model_not_calibrated on stderr; stdout is its answer."""
    import subprocess
    import sys

    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "CHARTSUM_DATA_DIR": str(tmp_path / "data"),
        "CHARTSUM_VLLM__MODEL_DIR": str(model_dir),
    }
    _ingest(env, tmp_path / "stays.jsonl", stay_line("a"))

    result = subprocess.run(
        [sys.executable, "-m", "chartsum", "route", "a"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )

    assert result.stdout.startswith("stay a: 1 notes")
    assert "model_not_calibrated" not in result.stdout
    warnings = [json.loads(line) for line in result.stderr.splitlines() if "{" in line]
    assert "model_not_calibrated" in {line.get("event") for line in warnings}


def test_jobs_latest_leaves_out_a_stay_s_older_jobs(
    env: dict[str, str], tmp_path: Path
) -> None:
    """A stay summarized twice shows its newer job only, under --latest."""
    _ingest(env, tmp_path / "stays.jsonl", stay_line("a"), stay_line("b"))
    with _store(env) as store:
        [(old, _)] = store.create_jobs(kind="discharge", stay_ids=["a"], queue="q")
        store.fail_job(old, state=JobState.NEEDS_REVIEW, error_code="x", error="x")
        [(new, _)] = store.create_jobs(kind="discharge", stay_ids=["a"], queue="q")
        [(other, _)] = store.create_jobs(kind="discharge", stay_ids=["b"], queue="q")
        store.fail_job(new, state=JobState.SUCCEEDED, error_code="-", error="-")
        store.fail_job(other, state=JobState.NEEDS_REVIEW, error_code="x", error="x")
        space_out_jobs(store, [old, new, other])

    assert _listed_job_ids(env, "--state", "needs_review") == [other, old]
    assert _listed_job_ids(env, "--latest", "--state", "needs_review") == [other]
    assert _listed_job_ids(env, "--latest") == [other, new]


def test_tables_piped_to_a_file_are_wide_enough_for_whole_ids(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Not a terminal and no COLUMNS: 200 columns, not Rich's 80."""
    from chartsum import console

    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.setattr(console.sys.stdout, "isatty", lambda: False, raising=False)
    assert console._width() == console.PIPED_WIDTH

    monkeypatch.setenv("COLUMNS", "100")
    assert console._width() is None
