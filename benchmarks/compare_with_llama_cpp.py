"""Is llmdeploy's GGUF byte-identical to llama.cpp's, file type by file type, for a real model?

Runs llama.cpp's ``convert_hf_to_gguf.py --outtype bf16`` once and ``llama_model_quantize``
for each file type, exports every file type with llmdeploy in one pass, and compares
tensor names, types and data (and KVs) with gguf.GGUFReader.

    python benchmarks/compare_with_llama_cpp.py path/to/hf-folder [--types q4_k_m q8_0 ...]
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

import numpy as np
from gguf import GGUFReader

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from llmdeploy.gguf.export import save_pretrained_gguf  # noqa: E402
from llmdeploy.gguf.plan import FILE_TYPES  # noqa: E402
from tests import llamacpp  # noqa: E402


def compare(ours: pathlib.Path, theirs: pathlib.Path) -> tuple[int, int, list[str]]:
    """(tensors compared, tensors that differ, KV keys that differ)."""
    a, b = GGUFReader(ours), GGUFReader(theirs)
    tb = {t.name: t for t in b.tensors}
    differ = 0
    for t in a.tensors:
        other = tb.get(t.name)
        if (
            other is None
            or other.tensor_type != t.tensor_type
            or not np.array_equal(np.asarray(t.data).view(np.uint8), np.asarray(other.data).view(np.uint8))
        ):
            differ += 1
    differ += len(set(tb) - {t.name for t in a.tensors})
    fa = {k: f.contents() for k, f in a.fields.items()}
    fb = {k: f.contents() for k, f in b.fields.items()}
    kv_diff = sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))
    return len(tb), differ, kv_diff


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=pathlib.Path)
    parser.add_argument("--types", nargs="*", default=sorted(FILE_TYPES))
    args = parser.parse_args(argv)

    start = time.perf_counter()
    bf16 = llamacpp.convert(args.folder, "bf16")
    print(f"# llama.cpp convert --outtype bf16: {time.perf_counter() - start:.1f} s")
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        paths = save_pretrained_gguf(args.folder, out, quantization=args.types, progress=False)
        print(f"# llmdeploy, {len(args.types)} file types in one pass: {time.perf_counter() - start:.1f} s")
        print("\n| file type | tensors | differing tensors | differing KVs | byte-identical |\n|---|---:|---:|---|---|")
        all_same = True
        for name, path in zip(args.types, paths):
            n, differ, kvs = compare(path, llamacpp.quantize(bf16, name))
            same = differ == 0 and not kvs
            all_same &= same
            print(f"| {name} | {n} | {differ} | {', '.join(kvs) or '-'} | {'yes' if same else 'NO'} |")
            sys.stdout.flush()
    return 0 if all_same else 1


if __name__ == "__main__":
    raise SystemExit(main())
