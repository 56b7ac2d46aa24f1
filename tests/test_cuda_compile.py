"""Every cuda/*.cu compiles for sm_80, sm_86, sm_89 and sm_90 (nvcc -cubin), and, where an NVRTC library
can be found, with NVRTC the way CuPy's RawModule compiles it (no headers, -std=c++17). No GPU needed.
"""

from __future__ import annotations

import ctypes
import glob
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

from abqcli.btc import cuda as bc

ARCHS = ("80", "86", "89", "90")
CUDA_DIR = bc.cuda_source_dir()
SOURCES = sorted(CUDA_DIR.glob("*.cu"))


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for cand in (
        "/usr/local/cuda/bin/nvcc",
        os.path.join(os.environ.get("CUDA_HOME", "/nonexistent"), "bin/nvcc"),
    ):
        if os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


NVCC = _nvcc()


def test_sources_present():
    names = {p.name for p in SOURCES}
    assert set(bc.SOURCES) <= names, f"missing CUDA sources in {CUDA_DIR}: {set(bc.SOURCES) - names}"


def _entry_points(src: Path) -> list[str]:
    import re

    return re.findall(r'extern "C" __global__ void (\w+)\(', src.read_text())


def test_expected_entry_points_exist():
    gemm = CUDA_DIR / "btc_gemm.cu"
    text = gemm.read_text()
    names = set(_entry_points(gemm))
    for mt, nt in bc.TILE_CONFIGS:
        for kwords in (bc.K256_WORDS, bc.K128_WORDS):
            suffix = f"k{kwords * 32}_m{mt}n{nt}"
            assert f"BTC_MMA_ENTRIES(BTC_K{kwords * 32}_WORDS, {mt}, {nt}, {suffix})" in text
    assert {"btc_popc_acc", "btc_epilogue_f32", "btc_epilogue_f16"} <= names
    assert {"btc_quant_pack_f32", "btc_quant_pack_f16"} <= set(_entry_points(CUDA_DIR / "btc_pack.cu"))
    for key, value in {
        "BTC_MMA_M": bc.MMA_M,
        "BTC_MMA_N": bc.MMA_N,
        "BTC_K256_WORDS": bc.K256_WORDS,
        "BTC_K128_WORDS": bc.K128_WORDS,
    }.items():
        assert f"#define {key} {value}\n" in text, f"{key} out of sync with abqcli.btc.cuda"


def test_no_headers_nvrtc_lacks():
    for src in SOURCES:
        for line in src.read_text().splitlines():
            assert not line.strip().startswith("#include"), (
                f"{src.name}: {line.strip()} (keep sources header-free)"
            )


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH (nor in /usr/local/cuda/bin)")
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.name)
def test_nvcc_cubin(src: Path, arch: str, tmp_path: Path):
    out = tmp_path / f"{src.stem}.sm_{arch}.cubin"
    cmd = [
        NVCC,
        "-std=c++17",
        "-cubin",
        f"-arch=sm_{arch}",
        "-Werror",
        "all-warnings",
        "-o",
        str(out),
        str(src),
    ]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    assert out.stat().st_size > 0


# ----------------------------------------------------------------------------------------------- NVRTC


def _find_nvrtc() -> str | None:
    env = os.environ.get("ABQ_NVRTC_LIB")
    if env and os.path.isfile(env):
        return env
    cands: list[str] = []
    roots = list(site.getsitepackages()) + [site.getusersitepackages()] + sys.path
    for root in roots:
        cands += glob.glob(os.path.join(root, "nvidia", "*", "lib", "libnvrtc.so*"))
        cands += glob.glob(os.path.join(root, "nvidia", "cuda_nvrtc", "lib", "libnvrtc.so*"))
    for base in ("/usr/local/cuda/lib64", "/usr/local/cuda/lib", "/usr/lib/x86_64-linux-gnu"):
        cands += glob.glob(os.path.join(base, "libnvrtc.so*"))
    cands = [c for c in cands if "builtins" not in os.path.basename(c)]
    return min(cands) if cands else None


NVRTC = _find_nvrtc()


def _nvrtc_compile(lib_path: str, source: str, options: list[str]) -> tuple[int, str]:
    lib = ctypes.CDLL(lib_path)
    prog = ctypes.c_void_p()
    rc = lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"btc.cu", 0, None, None)
    assert rc == 0, f"nvrtcCreateProgram failed: {rc}"
    opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
    rc = lib.nvrtcCompileProgram(prog, len(options), opts)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return rc, log.value.decode(errors="replace")


@pytest.mark.skipif(NVRTC is None, reason="no libnvrtc found (set ABQ_NVRTC_LIB to check NVRTC compilation)")
@pytest.mark.parametrize("arch", ("80", "90"))
@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.name)
def test_nvrtc_compiles(src: Path, arch: str):
    # the options CuPy's RawModule ends up with: ours, its -ftz=true, and an arch
    rc, log = _nvrtc_compile(
        NVRTC, src.read_text(), ["-std=c++17", "-ftz=true", f"--gpu-architecture=sm_{arch}"]
    )
    assert rc == 0, log
