"""Which INT8 kernel path onnxruntime takes on this CPU, from the CPU's feature flags.

Why it matters: on x86-64 without VNNI, onnxruntime's U8S8 kernels add pairs of
u8 x s8 products in 16-bit lanes (VPMADDUBSW), which saturate with 8-bit weights; such an
INT8 model drifts far from FP32 (mean embedding cosine 0.93 instead of 0.997). Two cures:
- ``cmn-export quantize`` rounds the GEMMs' weights to 7 bits by GPTQ (``export/gptq.py``),
  so no pair can saturate: the bundled INT8 file is exact on every path, at U8S8 speed;
- for other INT8 files (8-bit weights), onnxruntime's session option
  ``session.x64quantprecision`` rewrites the s8 weights to u8 at load time, an exact change
  at about half the speed. onnxruntime applies it on VNNI machines too, so it is set only
  where it is needed (``cmn_edge.embedder.open_session``).
ARM64 kernels (SDOT/UDOT, or widening multiplies) never saturate.

Flags come from ``/proc/cpuinfo`` (Linux) or ``sysctl`` (macOS); no new dependency.
``CMN_EDGE_CPU_FLAGS`` (space-separated) overrides them, for tests and for emulators that
show the host's ``/proc/cpuinfo``.
"""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import dataclass
from functools import lru_cache

#: onnxruntime's session config key that makes U8S8 exact on x86 without VNNI.
X64_QUANT_PRECISION = "session.x64quantprecision"

#: kernel path -> (INT8 on it keeps FP32-level retrieval, what to tell the user)
KERNEL_PATHS: dict[str, tuple[bool, str]] = {
    "x86-vnni": (True, "x86-64 with VNNI: U8S8 INT8 kernels are exact"),
    "x86-avx2": (
        True,
        "x86-64 with AVX2, no VNNI: U8S8 saturates with 8-bit weights, so 7-bit-GEMM INT8 "
        f"files run as they are and others with {X64_QUANT_PRECISION}=1 (exact U8U8)",
    ),
    "x86-sse": (
        True,
        "x86-64 without AVX2: U8S8 saturates with 8-bit weights, so 7-bit-GEMM INT8 "
        f"files run as they are and others with {X64_QUANT_PRECISION}=1 (exact U8U8)",
    ),
    "arm64-dot": (True, "ARM64 with dot product (SDOT/UDOT): INT8 kernels are exact"),
    "arm64": (True, "ARM64 without dot product: widening INT8 kernels, exact"),
    "unknown": (False, "a CPU whose INT8 kernels cmn-edge has not validated: FP32 is used"),
}


@dataclass(frozen=True)
class CpuInfo:
    """What the CPU offers, and the INT8 kernel path onnxruntime will take on it."""

    machine: str  # platform.machine(), normalised: x86_64 | arm64 | ...
    model: str
    flags: frozenset[str]
    source: str  # where the flags came from

    @property
    def vnni(self) -> bool:
        return bool(self.flags & {"avx512_vnni", "avx_vnni", "avx512vnni", "avxvnni"})

    @property
    def kernel_path(self) -> str:
        if self.machine == "x86_64":
            if self.vnni:
                return "x86-vnni"
            if "avx2" in self.flags:
                return "x86-avx2"
            return "x86-sse"
        if self.machine == "arm64":
            return "arm64-dot" if self.flags & {"asimddp", "dotprod"} else "arm64"
        return "unknown"

    @property
    def int8_is_exact(self) -> bool:
        """INT8 keeps FP32-level retrieval on this path (validated, see the model card)."""
        return KERNEL_PATHS[self.kernel_path][0]

    @property
    def needs_u8u8(self) -> bool:
        """U8S8 saturates here with 8-bit weights: such INT8 graphs need onnxruntime's exact
        U8U8 rewrite."""
        return self.kernel_path in ("x86-avx2", "x86-sse")

    def session_config(self, saturating_int8: bool) -> dict[str, str]:
        """onnxruntime session config entries a graph needs on this CPU: the U8U8 rewrite for
        an INT8 graph whose 8-bit GEMM weights would saturate U8S8 here."""
        if saturating_int8 and self.needs_u8u8:
            return {X64_QUANT_PRECISION: "1"}
        return {}

    def describe(self) -> str:
        shown = sorted(self.flags & INTERESTING_FLAGS) or ["none of note"]
        return (
            f"{self.model or self.machine} [{self.machine}; {', '.join(shown)}] -> "
            f"{self.kernel_path}: {KERNEL_PATHS[self.kernel_path][1]}"
        )

    def to_dict(self) -> dict:
        return {
            "machine": self.machine,
            "model": self.model,
            "flags": sorted(self.flags & INTERESTING_FLAGS),
            "flags_from": self.source,
            "kernel_path": self.kernel_path,
            "int8_exact": self.int8_is_exact,
            "u8u8_rewrite_for_8bit_weights": self.needs_u8u8,
        }


#: The flags that decide the kernel path (and are worth printing).
INTERESTING_FLAGS = frozenset(
    {
        "avx2", "avx512f", "avx512bw", "avx512_vnni", "avx512vnni", "avx_vnni", "avxvnni",
        "amx_int8", "sse4_1", "asimd", "asimddp", "dotprod", "i8mm", "sve",
    }
)  # fmt: skip

_MACHINES = {"amd64": "x86_64", "x86_64": "x86_64", "aarch64": "arm64", "arm64": "arm64"}


def _proc_cpuinfo(text: str) -> tuple[str, set[str]]:
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("flags", "features") and not flags:
            flags = set(value.split())
        elif key in ("model name", "cpu model", "hardware") and not model:
            model = value.strip()
    return model, flags


def _sysctl(name: str) -> str:
    try:
        result = subprocess.run(
            ["sysctl", "-n", name], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return result.stdout.strip()


def _macos() -> tuple[str, set[str]]:
    model = _sysctl("machdep.cpu.brand_string")
    flags = {f.lower().replace(".", "_") for f in _sysctl("machdep.cpu.features").split()}
    flags |= {f.lower() for f in _sysctl("machdep.cpu.leaf7_features").split()}
    if _sysctl("hw.optional.arm.FEAT_DotProd") == "1":
        flags.add("dotprod")
    if flags & {"avx2_0"}:
        flags.add("avx2")
    return model, flags


def detect(cpuinfo_text: str | None = None, machine: str | None = None) -> CpuInfo:
    """Read this CPU's features (or parse ``cpuinfo_text``, for tests)."""
    arch = _MACHINES.get((machine or platform.machine()).lower(), (machine or "").lower())
    override = os.environ.get("CMN_EDGE_CPU_FLAGS")
    if override is not None:
        return CpuInfo(arch, "", frozenset(override.lower().split()), "CMN_EDGE_CPU_FLAGS")
    if cpuinfo_text is None and os.path.exists("/proc/cpuinfo"):
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
                cpuinfo_text = handle.read()
        except OSError:
            cpuinfo_text = None
    if cpuinfo_text is not None:
        model, flags = _proc_cpuinfo(cpuinfo_text)
        return CpuInfo(arch, model, frozenset(flags), "/proc/cpuinfo")
    if platform.system() == "Darwin":
        model, flags = _macos()
        return CpuInfo(arch, model, frozenset(flags), "sysctl")
    # Windows and others: no flags to read. An x86 CPU is then taken to lack VNNI, the
    # choice that is exact everywhere (and only slower where VNNI is present).
    return CpuInfo(arch, platform.processor(), frozenset(), "none")


@lru_cache(maxsize=1)
def this_cpu() -> CpuInfo:
    return detect()


__all__ = ["KERNEL_PATHS", "X64_QUANT_PRECISION", "CpuInfo", "detect", "this_cpu"]
