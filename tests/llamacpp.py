"""The reference llama.cpp (llama-cpp-python 0.3.36) as a test oracle for whole files.

- ``source_dir()``: the sdist's ``vendor/llama.cpp`` (converter, vocab GGUFs, chat
  templates), downloaded once from PyPI into the test cache.
- ``convert(folder, outtype)``: llama.cpp's own ``convert_hf_to_gguf.py``, run in a
  subprocess with the sdist's own gguf-py, exactly as a user would run it.
- ``quantize(src, dst, ftype)``: ``llama_model_quantize`` (= llama-quantize), through
  llama-cpp-python's bindings, in a subprocess (it prints to stdout/stderr from C).

Everything built is cached under ``cache_dir()`` keyed by its inputs, so a test
session pays for each conversion once.  Built paths appear atomically (built in
a temporary sibling, then renamed), so parallel pytest workers can share them.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
from typing import Callable

VERSION = "0.3.36"

# llama_ftype values (llama.h) of the file types llmdeploy writes.
FTYPES = {
    "f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9,
    "q2_k": 10, "q3_k_s": 11, "q3_k_m": 12, "q3_k_l": 13, "q4_k_s": 14, "q4_k_m": 15,
    "q5_k_s": 16, "q5_k_m": 17, "q6_k": 18, "iq4_nl": 25, "iq4_xs": 30, "bf16": 32,
    "tq1_0": 36, "tq2_0": 37,
}  # fmt: skip


def cache_dir() -> pathlib.Path:
    """Where built test artefacts live: ``LLMDEPLOY_TEST_CACHE`` or ~/.cache/llmdeploy-tests."""
    root = os.environ.get("LLMDEPLOY_TEST_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "llmdeploy-tests"
    )
    path = pathlib.Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def build_once(path: pathlib.Path, build: Callable[[pathlib.Path], None]) -> pathlib.Path:
    """Return ``path``, building it first with ``build(tmp)`` if missing; safe across processes."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    target = tmp / path.name
    try:
        build(target)
        try:
            os.rename(target, path)
        except OSError:
            if not path.exists():  # lost a race: another worker built it
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def source_dir() -> pathlib.Path:
    """``vendor/llama.cpp`` of the llama-cpp-python sdist (downloaded from PyPI once)."""
    override = os.environ.get("LLAMA_CPP_SOURCE")
    if override:
        return pathlib.Path(override)

    def fetch(target: pathlib.Path) -> None:
        download = target.parent / "download"
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
             f"llama-cpp-python=={VERSION}", "-d", str(download)],
            check=True,
        )  # fmt: skip
        (sdist,) = download.glob("*.tar.gz")
        with tarfile.open(sdist) as tar:
            tar.extractall(target.parent / "src", filter="data")
        (root,) = (target.parent / "src").iterdir()
        os.rename(root / "vendor" / "llama.cpp", target)

    return build_once(cache_dir() / f"llama.cpp-{VERSION}", fetch)


def _key(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def _folder_digest(folder: pathlib.Path) -> str:
    digest = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if f.is_file():
            digest.update(f.name.encode())
            digest.update(hashlib.sha256(f.read_bytes()).digest())
    return digest.hexdigest()[:16]


def convert(folder: pathlib.Path, outtype: str = "bf16") -> pathlib.Path:
    """The GGUF that llama.cpp's ``convert_hf_to_gguf.py --outtype OUTTYPE`` writes for ``folder``."""
    src = source_dir()
    path = cache_dir() / "converted" / f"{folder.name}-{_folder_digest(folder)}-{outtype}.gguf"

    def run(target: pathlib.Path) -> None:
        env = dict(os.environ, PYTHONPATH=str(src / "gguf-py"), NO_LOCAL_GGUF="")
        subprocess.run(
            [sys.executable, str(src / "convert_hf_to_gguf.py"), str(folder), "--outtype", outtype,
             "--outfile", str(target)],
            check=True, env=env, capture_output=True,
        )  # fmt: skip

    return build_once(path, run)


def quantize(source: pathlib.Path, ftype: str, *, threads: int = 2) -> pathlib.Path:
    """``llama_model_quantize(source, ..., ftype)``: what ``llama-quantize SOURCE OUT FTYPE`` writes."""
    path = source.parent / f"{source.stem}-{ftype}-{_key(source.stat().st_size, source.stat().st_mtime_ns)}.gguf"
    code = (
        "import sys, llama_cpp\n"
        "p = llama_cpp.llama_model_quantize_default_params()\n"
        f"p.ftype = {FTYPES[ftype]}\n"
        f"p.nthread = {threads}\n"
        "rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p)\n"
        "sys.exit(rc)\n"
    )

    def run(target: pathlib.Path) -> None:
        subprocess.run([sys.executable, "-c", code, str(source), str(target)], check=True, capture_output=True)

    return build_once(path, run)
