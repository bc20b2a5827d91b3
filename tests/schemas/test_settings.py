"""Engine dtype chosen by what the hardware computes natively."""

from __future__ import annotations

from pathlib import Path

import pytest

from schemas.settings import VllmSettings, native_dtype

AVX2_ONLY = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
SAPPHIRE_RAPIDS = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16\n"
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


@pytest.fixture
def no_gpu(tmp_path: Path) -> Path:
    """An empty /dev."""
    devices = tmp_path / "dev"
    devices.mkdir()
    return devices


@pytest.mark.parametrize(
    ("flags", "expected"),
    [(AVX2_ONLY, "float32"), (SAPPHIRE_RAPIDS, "bfloat16"), (GRAVITON3, "bfloat16")],
)
def test_auto_dtype_follows_native_bfloat16(
    tmp_path: Path, no_gpu: Path, flags: str, expected: str
) -> None:
    """float32 only where the CPU would emulate bfloat16."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(flags)

    assert native_dtype(cpuinfo, no_gpu) == expected


def test_a_gpu_keeps_bfloat16(tmp_path: Path, no_gpu: Path) -> None:
    """An NVIDIA device wins over the CPU's flags."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(AVX2_ONLY)
    (no_gpu / "nvidia0").touch()

    assert native_dtype(cpuinfo, no_gpu) == "bfloat16"


def test_unreadable_cpuinfo_keeps_bfloat16(tmp_path: Path, no_gpu: Path) -> None:
    """No /proc/cpuinfo (not Linux): the old default."""
    assert native_dtype(tmp_path / "missing", no_gpu) == "bfloat16"


def test_settings_resolve_auto_and_keep_an_explicit_dtype() -> None:
    """'auto' never reaches vLLM; an operator's choice is kept as given."""
    assert VllmSettings().dtype in {"float32", "bfloat16"}
    assert VllmSettings(dtype="float16").dtype == "float16"
