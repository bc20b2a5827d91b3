"""Preparing the embedded model and fingerprinting model folders."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from pipelines import model
from pipelines.errors import ModelPrepareError
from pipelines.model import (
    MARKER_FILE_NAME,
    SMOLLM2_PRE_TOKENIZER,
    ModelFolderError,
    PreparedModel,
    SourceChecksumError,
    model_fingerprint,
    prepare_embedded_model,
)

TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


@pytest.fixture
def fake_model(tmp_path: Path) -> Path:
    """A small folder shaped like a model folder, with fake weights."""
    folder = tmp_path / "fake-model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')
    (folder / "chat_template.jinja").write_text(TEMPLATE)
    (folder / "generation_config.json").write_text('{"eos_token_id": 2}')
    return folder


def flip_last_byte(path: Path) -> None:
    """Change one byte of a file, keeping its size."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def test_preparing_again_reuses_the_folder(prepared_model: PreparedModel) -> None:
    """A second prepare returns created=False with the same path and fingerprint."""
    again = prepare_embedded_model(target_dir=prepared_model.path)

    assert again.created is False
    assert again.path == prepared_model.path
    assert again.fingerprint == prepared_model.fingerprint
    assert again.source_sha256 == model.SOURCE_SHA256


def test_fingerprint_is_stable_and_matches_a_fresh_hash(
    prepared_model: PreparedModel,
) -> None:
    """The cached fingerprint repeats and equals hashing the files anew."""
    first = model_fingerprint(prepared_model.path)
    second = model_fingerprint(prepared_model.path)

    assert first == second == prepared_model.fingerprint
    assert model._compute_fingerprint(prepared_model.path) == first


def test_prepared_tokenizer_splits_every_digit(prepared_model: PreparedModel) -> None:
    """The folder's tokenizer has SmolLM2's Digits pre-tokenizer restored."""
    path = prepared_model.path / "tokenizer.json"
    tokenizer = Tokenizer.from_file(str(path))

    assert json.loads(path.read_text())["pre_tokenizer"] == SMOLLM2_PRE_TOKENIZER
    assert len(tokenizer.encode("12345").ids) == 5
    # Without the Digits step the two spaces would be two tokens.
    assert tokenizer.encode("  5").tokens == ["ĠĠ", "5"]


def test_prepared_folder_keeps_chat_template_and_eos(
    prepared_model: PreparedModel,
) -> None:
    """ChatML template, <|im_end|> as eos and its id in generation config survive."""
    folder = prepared_model.path
    config = json.loads((folder / "tokenizer_config.json").read_text())
    generation = json.loads((folder / "generation_config.json").read_text())
    eos_id = Tokenizer.from_file(str(folder / "tokenizer.json")).token_to_id(
        "<|im_end|>"
    )

    assert config["eos_token"] == "<|im_end|>"
    assert generation["eos_token_id"] == eos_id == 2
    assert "<|im_start|>" in (folder / "chat_template.jinja").read_text()


def test_marker_records_source_recipe_and_fingerprint(
    prepared_model: PreparedModel,
) -> None:
    """The marker names the source hash, recipe version and fingerprint."""
    marker = json.loads((prepared_model.path / MARKER_FILE_NAME).read_text())

    assert marker["source_sha256"] == model.SOURCE_SHA256
    assert marker["recipe_version"] == model.RECIPE_VERSION
    assert marker["fingerprint"] == prepared_model.fingerprint


def test_fingerprint_of_a_folder_is_stable(fake_model: Path) -> None:
    """Hashing the same files twice gives the same 64-hex fingerprint."""
    first = model_fingerprint(fake_model)

    assert model_fingerprint(fake_model) == first
    assert len(first) == 64


@pytest.mark.parametrize(
    "name",
    ["model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja"],
)
def test_fingerprint_changes_when_one_byte_changes(fake_model: Path, name: str) -> None:
    """Flipping one byte of weights, config, tokenizer or template changes it."""
    before = model_fingerprint(fake_model)

    flip_last_byte(fake_model / name)

    assert model_fingerprint(fake_model) != before


def test_fingerprint_ignores_files_that_do_not_change_output(
    fake_model: Path,
) -> None:
    """Editing generation_config.json or adding a README keeps the fingerprint."""
    before = model_fingerprint(fake_model)

    flip_last_byte(fake_model / "generation_config.json")
    (fake_model / "README.md").write_text("notes")

    assert model_fingerprint(fake_model) == before


def test_fingerprint_reads_the_template_wherever_it_is(fake_model: Path) -> None:
    """A template moved into tokenizer_config.json keeps the fingerprint."""
    before = model_fingerprint(fake_model)

    (fake_model / "chat_template.jinja").unlink()
    config = {"chat_template": TEMPLATE}
    (fake_model / "tokenizer_config.json").write_text(json.dumps(config))

    assert model_fingerprint(fake_model) == before


def test_fingerprint_refuses_a_folder_without_weights(fake_model: Path) -> None:
    """A folder with no *.safetensors raises ModelFolderError."""
    (fake_model / "model.safetensors").unlink()

    with pytest.raises(ModelFolderError, match="safetensors"):
        model_fingerprint(fake_model)


def test_cached_fingerprint_is_used_only_while_files_are_unchanged(
    fake_model: Path,
) -> None:
    """The marker's value is trusted until a covered file's size or mtime moves."""
    computed = model_fingerprint(fake_model)
    marker = {"fingerprint": "cached", "files": model._stat_inputs(fake_model)}
    (fake_model / MARKER_FILE_NAME).write_text(json.dumps(marker))

    assert model_fingerprint(fake_model) == "cached"

    weights = fake_model / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))

    assert model_fingerprint(fake_model) == computed


def test_checksum_mismatch_raises_and_writes_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A GGUF with another sha256 is refused before anything is written."""
    monkeypatch.setattr(model, "SOURCE_SHA256", "0" * 64)
    target = tmp_path / "models" / "embedded"

    with pytest.raises(SourceChecksumError, match="expected 0000"):
        prepare_embedded_model(target_dir=target)

    assert not target.exists()
    assert not (tmp_path / "models").exists() or not any(
        (tmp_path / "models").iterdir()
    )


def test_checksum_error_is_a_model_prepare_error() -> None:
    """Callers catching ModelPrepareError also catch checksum failures."""
    assert issubclass(SourceChecksumError, ModelPrepareError)


def fake_converter(prepared: Path) -> Callable[[Path, Path], None]:
    """A stand-in for the 25 s GGUF conversion, copying the prepared tokenizer."""

    def convert(source: Path, out_dir: Path) -> None:
        for name in ("config.json", "tokenizer_config.json", "chat_template.jinja"):
            shutil.copy(prepared / name, out_dir / name)
        tokenizer = json.loads((prepared / "tokenizer.json").read_text())
        # What transformers writes: ByteLevel alone, before the patch.
        tokenizer["pre_tokenizer"] = SMOLLM2_PRE_TOKENIZER["pretokenizers"][1]
        (out_dir / "tokenizer.json").write_text(json.dumps(tokenizer))
        (out_dir / "model.safetensors").write_bytes(b"weights")

    return convert


def test_prepare_builds_marks_and_then_reuses_a_folder(
    monkeypatch: pytest.MonkeyPatch,
    prepared_model: PreparedModel,
    tmp_path: Path,
) -> None:
    """A fresh prepare creates a patched, marked folder; the next one reuses it."""
    monkeypatch.setattr(model, "_convert_gguf", fake_converter(prepared_model.path))
    target = tmp_path / "embedded"

    first = prepare_embedded_model(target_dir=target)
    second = prepare_embedded_model(target_dir=target)

    assert first.created is True and second.created is False
    assert first.fingerprint == second.fingerprint == model_fingerprint(target)
    tokenizer = json.loads((target / "tokenizer.json").read_text())
    assert tokenizer["pre_tokenizer"] == SMOLLM2_PRE_TOKENIZER
    assert sorted(p.name for p in tmp_path.iterdir()) == ["embedded"]


def test_a_folder_from_an_older_recipe_is_rebuilt(
    monkeypatch: pytest.MonkeyPatch,
    prepared_model: PreparedModel,
    tmp_path: Path,
) -> None:
    """When the recipe version moves on, prepare replaces the old folder."""
    monkeypatch.setattr(model, "_convert_gguf", fake_converter(prepared_model.path))
    target = tmp_path / "embedded"
    prepare_embedded_model(target_dir=target)
    monkeypatch.setattr(model, "RECIPE_VERSION", model.RECIPE_VERSION + 1)

    rebuilt = prepare_embedded_model(target_dir=target)

    marker = json.loads((target / MARKER_FILE_NAME).read_text())
    assert rebuilt.created is True
    assert marker["recipe_version"] == model.RECIPE_VERSION
    assert sorted(p.name for p in tmp_path.iterdir()) == ["embedded"]


def test_failed_conversion_leaves_no_folder_behind(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """An error mid-conversion leaves neither the target nor a temp folder."""

    def broken(source: Path, out_dir: Path) -> None:
        (out_dir / "model.safetensors").write_bytes(b"half")
        raise ModelPrepareError("converting failed")

    monkeypatch.setattr(model, "_convert_gguf", broken)

    with pytest.raises(ModelPrepareError, match="converting failed"):
        prepare_embedded_model(target_dir=tmp_path / "embedded")

    assert list(tmp_path.iterdir()) == []


def test_a_folder_not_made_by_prepare_is_left_alone(tmp_path: Path) -> None:
    """A non-empty target without a marker raises and keeps its files."""
    target = tmp_path / "someone-elses"
    target.mkdir()
    (target / "config.json").write_text("{}")

    with pytest.raises(ModelFolderError, match="not a prepared embedded model"):
        prepare_embedded_model(target_dir=target)

    assert (target / "config.json").read_text() == "{}"
