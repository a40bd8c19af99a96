"""Build llama.cpp's programs from the source in a pinned PyPI sdist, once.

One cmake build directory compiles the library once and links every program the
product runs: llama-server, llama-quantize and llama-finetune (fine-tuning), and
ggml-rpc-server (RPC workers). The fixes in scripts/llama_patches/ are applied to the
source first. The programs are cached outside the repository, keyed by source version,
build flags and patches, so later runs find them in milliseconds. Prints
llama-server's path on the last line of stdout. `LLAMA_SERVER_PATH` or a
`llama-server` on PATH skips the build.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from ailab import config
from ailab.upstream import binaries

SDIST_NAME = "llama-cpp-python"
SDIST_VERSION = binaries.SDIST_VERSION
TARGETS = binaries.PROGRAMS
PATCHES = sorted((Path(__file__).parent / "llama_patches").glob("*.patch"))
AMX_PROBE = Path(__file__).parent / "amx_probe.c"
# What a native build needs to leave llama.cpp's AMX kernels out (see amx_probe.c).
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"


def log(message: str) -> None:
    print(f"[build-llama-server] {message}", file=sys.stderr, flush=True)


def gpu_present() -> bool:
    """CUDA is only worth building when a compiler *and* a GPU are there."""
    if not shutil.which("nvcc") or not shutil.which("nvidia-smi"):
        return False
    probe = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False)
    return probe.returncode == 0 and "GPU" in probe.stdout


def native_amx_broken() -> bool:
    """The compiler's native target has AMX, but this machine faults on it."""
    if shutil.which("cc") is None:
        return False  # cmake says that a compiler is missing, and how to get one
    defines = subprocess.run(
        ["cc", "-march=native", "-dM", "-E", "-"],
        input="", capture_output=True, text=True, check=False,
    )  # fmt: skip
    if "__AMX_INT8__" not in defines.stdout:
        return False
    with tempfile.TemporaryDirectory(prefix="ailab-amx-probe-") as tmp:
        probe = Path(tmp) / "amx_probe"
        subprocess.run(["cc", "-O2", "-march=native", str(AMX_PROBE), "-o", str(probe)], check=True)
        works = subprocess.run([str(probe)], check=False).returncode == 0
    if not works:
        log("this CPU advertises AMX but faults on it (a virtual machine?): building without AMX")
    return not works


def cmake_flags(cuda: bool) -> list[str]:
    flags = [
        "-DCMAKE_BUILD_TYPE=Release",
        "-DBUILD_SHARED_LIBS=OFF",
        "-DLLAMA_BUILD_TESTS=OFF",
        # Examples must be configured for the llama-finetune target; only the
        # targets below are compiled.
        "-DLLAMA_BUILD_EXAMPLES=ON",
        "-DLLAMA_BUILD_SERVER=ON",
        "-DLLAMA_BUILD_UI=OFF",
        # The prebuilt web UI would be fetched from the internet; we never want that.
        "-DLLAMA_USE_PREBUILT_UI=OFF",
        "-DLLAMA_OPENSSL=OFF",
        "-DGGML_NATIVE=ON",
        # The RPC backend is dormant unless llama-server is started with --rpc.
        "-DGGML_RPC=ON",
    ]
    if native_amx_broken():
        flags += [f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}"]
    if cuda:
        flags.append("-DGGML_CUDA=ON")
    return flags


def cache_dir_for(settings: config.Settings, flags: list[str]) -> Path:
    digest = hashlib.sha256(" ".join(flags).encode())
    for patch in PATCHES:  # a changed fix is a different build
        digest.update(patch.read_bytes())
    return binaries.build_dir(settings, digest.hexdigest()[:12])


def apply_patches(source: Path) -> None:
    """llama.cpp fixes AI Lab carries until a release has them; each says why at its top."""
    for patch in PATCHES:
        log(f"applying {patch.name}")
        subprocess.run(["git", "apply", "-p1", str(patch)], cwd=source, check=True)


def fetch_source(settings: config.Settings, workdir: Path) -> Path:
    """Download the pinned sdist from PyPI (or reuse a cached one) and unpack it."""
    sdist_dir = settings.build_cache / "sdist"
    archives = sorted(sdist_dir.glob(f"llama_cpp_python-{SDIST_VERSION}.tar.gz"))
    if not archives:
        log(f"downloading {SDIST_NAME}=={SDIST_VERSION} source from PyPI")
        sdist_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                f"{SDIST_NAME}=={SDIST_VERSION}",
                "-d",
                str(sdist_dir),
            ],
            check=True,
            stdout=sys.stderr,  # stdout carries only the binary's path
        )
        archives = sorted(sdist_dir.glob(f"llama_cpp_python-{SDIST_VERSION}.tar.gz"))
    log(f"unpacking {archives[0].name}")
    with tarfile.open(archives[0]) as archive:
        archive.extractall(workdir, filter="data")
    return workdir / f"llama_cpp_python-{SDIST_VERSION}" / "vendor" / "llama.cpp"


def build(source: Path, build_dir: Path, flags: list[str]) -> Path:
    jobs = str(os.cpu_count() or 2)
    log("configuring: cmake " + " ".join(flags))
    subprocess.run(
        ["cmake", "-S", str(source), "-B", str(build_dir), *flags],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    log(f"compiling {', '.join(TARGETS)} with {jobs} jobs (about 10 minutes on 2 cores)")
    # cmake prints "[ NN%] Building ..." lines: they are the progress display.
    subprocess.run(
        ["cmake", "--build", str(build_dir), "--target", *TARGETS, "-j", jobs],
        check=True,
        stdout=sys.stderr,
    )
    return build_dir / "bin"


def ensure_llama_server(settings: config.Settings, cuda: bool) -> Path:
    flags = cmake_flags(cuda)
    target = cache_dir_for(settings, flags)
    binary = target / "llama-server"
    if binary.exists():
        return binary
    with tempfile.TemporaryDirectory(prefix="ailab-llama-build-") as tmp:
        source = fetch_source(settings, Path(tmp))
        apply_patches(source)
        built = build(source, Path(tmp) / "build", flags)
        staging = target.with_suffix(".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for program in TARGETS:
            shutil.copy2(built / program, staging / program)
        shutil.copytree(source / "models" / "templates", staging / "templates")
        (staging / "FLAGS").write_text(" ".join(flags) + "\n")
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)  # atomic: a half-built cache entry is never seen
    return binary


def main() -> int:
    settings = config.load_settings()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cuda", choices=["auto", "on", "off"], default=settings.cuda)
    args = parser.parse_args()
    # An explicit or installed llama-server wins, as it does when the gateway starts.
    if settings.llama_server_path or shutil.which("llama-server"):
        print(binaries.find_llama_server(settings))
        return 0
    cuda = args.cuda == "on" or (args.cuda == "auto" and gpu_present())
    print(ensure_llama_server(settings, cuda))
    return 0


if __name__ == "__main__":
    sys.exit(main())
