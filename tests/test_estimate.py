"""llmdeploy.estimate: GGUF file sizes, KV cache and compute buffer, checked against llama.cpp itself.

- File sizes: the exported file's real size (our writer) and llama-quantize's output (requantized
  estimate of a bf16 GGUF).
- KV cache: the cells, layers and MiB llama.cpp (llama-cpp-python 0.3.36) logs when it creates its
  cache, for a full-attention model (Llama) and a sliding-window one (Gemma 3, 5 SWA + 1 full layer).
- Compute buffer: llama.cpp's logged "compute buffer size", with and without flash attention.
- ModelShape.from_gguf: the same shape as config.json gives; a split file estimated from any part.
  (The GGUF reader itself is tested in tests/gguf/test_reader.py.)
"""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys

import gguf
import pytest

import llmdeploy
from llmdeploy.errors import GGUFReadError, InvalidOptionError, MissingFileError, UnsupportedQuantTypeError
from llmdeploy.estimate import (
    ModelShape,
    compute_buffer_bytes,
    estimate,
    format_bytes,
    kv_cache_bytes,
    kv_cache_layout,
)
from llmdeploy.gguf.reader import GGUFModelFile, MetadataEntry, open_gguf

from . import llamacpp, models

llama_cpp = pytest.importorskip("llama_cpp")

MiB = 2**20


@pytest.fixture(scope="module")
def folders() -> dict[str, pathlib.Path]:
    return {
        "llama": models.model_folder("LlamaForCausalLM"),
        # 6 layers: Gemma 3's pattern makes layers 0-4 sliding-window and layer 5 full attention
        "gemma3": models.model_folder("Gemma3ForCausalLM", num_hidden_layers=6),
    }


@pytest.fixture(scope="module")
def exported(folders: dict[str, pathlib.Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    out = tmp_path_factory.mktemp("estimate")
    files = {}
    for name, folder in folders.items():
        # a folder per model: each export writes its Modelfiles beside its GGUFs
        for path in llmdeploy.save_pretrained_gguf(
            folder, out / name, quantization=["q8_0", "q4_k_m", "bf16"], progress=False
        ):
            ftype = path.stem.rsplit("-", 1)[1].lower()
            files[f"{name}-{ftype}"] = path
    return files


# --- file sizes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_file_size_is_the_exported_files_size(folders: dict, exported: dict, name: str) -> None:
    # Exact, not "within the header": the estimate lays out the same KVs (tokenizer included) and
    # tensors as the writer does, with its alignment padding.
    estimates = estimate(folders[name], quantization=["q8_0", "q4_k_m", "bf16"], context=512)
    assert [e.quantization for e in estimates] == ["q8_0", "q4_k_m", "bf16"]
    for e in estimates:
        path = exported[f"{name}-{e.quantization}"]
        assert e.file_bytes_exact
        assert e.file_bytes == path.stat().st_size
        reader = gguf.GGUFReader(path)
        assert e.tensor_bytes == sum(int(t.n_bytes) for t in reader.tensors)
        assert e.n_params == sum(int(t.n_elements) for t in reader.tensors)
        assert e.bits_per_weight == pytest.approx(8 * e.tensor_bytes / e.n_params)
        assert e.total_bytes == e.tensor_bytes + e.kv_cache_bytes + e.compute_bytes


def test_gguf_as_is_is_its_own_size(exported: dict) -> None:
    path = exported["llama-q4_k_m"]
    (e,) = estimate(path, context=512)
    reader = gguf.GGUFReader(path)
    assert e.quantization == "q4_k_m"
    assert e.file_bytes == path.stat().st_size
    assert e.tensor_bytes == sum(int(t.n_bytes) for t in reader.tensors)


def test_requantized_size_is_llama_quantizes_output(exported: dict) -> None:
    bf16 = exported["llama-bf16"]
    reference = llamacpp.quantize(bf16, "q4_k_m")  # llama.cpp's llama_model_quantize on our bf16 file
    (e,) = estimate(bf16, quantization="q4_k_m", context=512)
    assert e.file_bytes == reference.stat().st_size
    assert e.tensor_bytes == sum(int(t.n_bytes) for t in gguf.GGUFReader(reference).tensors)


def test_folder_without_tokenizer_files_is_flagged(folders: dict, tmp_path: pathlib.Path) -> None:
    folder = tmp_path / "no-tokenizer"
    folder.mkdir()
    for f in ("config.json", "model.safetensors"):
        (folder / f).symlink_to(folders["llama"] / f)
    (e,) = estimate(folder, quantization="q8_0")
    (with_tokenizer,) = estimate(folders["llama"], quantization="q8_0")
    assert not e.file_bytes_exact
    assert e.file_bytes < with_tokenizer.file_bytes
    assert e.tensor_bytes == with_tokenizer.tensor_bytes


def test_adapter_folder_is_sized_as_its_export(tmp_path: pathlib.Path) -> None:
    from tests.merge import common

    base = common.base()
    adapter = tmp_path / "adapter"
    common.lora(common.load(base)).save_pretrained(str(adapter))
    (path,) = llmdeploy.save_pretrained_gguf(adapter, tmp_path / "out", quantization="q4_k_m", progress=False)
    (e,) = estimate(adapter, quantization="q4_k_m")
    assert e.file_bytes == path.stat().st_size
    assert estimate(adapter, quantization="q4_k_m", base=base) == [e]


# --- KV cache and compute buffer against llama.cpp ----------------------------------------------

_PROBE = """
import json, sys, llama_cpp
path, runs = sys.argv[1], json.loads(sys.argv[2])
for n_ctx, flash in runs:
    print(f"@@run {n_ctx} {int(flash)}", file=sys.stderr, flush=True)
    llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=512, n_ubatch=512, flash_attn=flash,
                          swa_full=False, verbose=True, n_threads=2)
    llm.close()
"""
_KV_LINE = re.compile(r"llama_kv_cache: size = +([\d.]+) MiB \( *(\d+) cells, +(\d+) layers")
_COMPUTE_LINE = re.compile(r"CPU compute buffer size = +([\d.]+) MiB")


def llama_cpp_memory(path: pathlib.Path, runs: list[tuple[int, bool]]) -> dict[tuple[int, bool], dict]:
    """What llama.cpp logs when it creates a context: its KV caches and compute buffer, per run."""
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, str(path), json.dumps(runs)], capture_output=True, text=True, check=True
    )
    found: dict[tuple[int, bool], dict] = {}
    current = None
    for line in result.stderr.splitlines():
        if line.startswith("@@run"):
            n_ctx, flash = line.split()[1:]
            current = found.setdefault((int(n_ctx), flash == "1"), {"caches": [], "compute_mib": None})
        elif current is not None and (m := _KV_LINE.search(line)):
            current["caches"].append((float(m[1]), int(m[2]), int(m[3])))
        elif current is not None and (m := _COMPUTE_LINE.search(line)):
            current["compute_mib"] = float(m[1])
    return found


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_kv_cache_and_compute_buffer_match_llama_cpp(folders: dict, exported: dict, name: str) -> None:
    path = exported[f"{name}-q8_0"]
    # 1000 is not a multiple of 256 (llama.cpp pads it), 300 is below Gemma 3's window + ubatch
    runs = [(8192, True), (8192, False), (1000, True), (300, True)]
    logged = llama_cpp_memory(path, runs)
    shape = ModelShape.from_hf_config(json.loads((folders[name] / "config.json").read_text()))
    assert shape == ModelShape.from_gguf(open_gguf(path))  # config.json and the GGUF's KVs say the same
    for context, flash in runs:
        run = logged[(context, flash)]
        layout = kv_cache_layout(shape, context)
        # llama.cpp logs one line per cache: the full-attention one first, then the sliding-window one
        expected = []
        if name == "gemma3":
            per_layer_cell = 2 * 64 * 2 * 2  # the tiny config's 2 KV heads x head_dim 64, K and V, f16
            assert (layout.full_layers, layout.swa_layers) == (1, 5)
            expected.append((layout.cells, 1, layout.cells * 1 * per_layer_cell))
            expected.append((layout.swa_cells, 5, layout.swa_cells * 5 * per_layer_cell))
        else:
            assert (layout.full_layers, layout.swa_layers) == (2, 0)
            expected.append((layout.cells, layout.full_layers, layout.total_bytes))
        assert [(cells, layers) for _, cells, layers in run["caches"]] == [(c, n) for c, n, _ in expected]
        for (mib, _, _), (_, _, nbytes) in zip(run["caches"], expected, strict=True):
            assert abs(nbytes / MiB - mib) <= 0.005  # llama.cpp prints MiB with two decimals
        assert sum(nbytes for *_, nbytes in expected) == layout.total_bytes == kv_cache_bytes(shape, context)
        # The compute buffer is an estimate of the graph's peak (inputs + largest stage); llama.cpp's
        # allocator adds small tensors and alignment. Within 10% for these models and settings.
        ours = compute_buffer_bytes(shape, context, flash_attn=flash) / MiB
        assert ours == pytest.approx(run["compute_mib"], rel=0.10), (context, flash)


def test_real_gemma3_270m_matches_llama_cpp() -> None:
    # Google's Gemma 3 270M as llama.cpp's converter wrote it: head_dim 256, one KV head, a 512-token
    # window, 262k vocabulary (the logits dominate the compute buffer unless the context is long).
    path = models.gemma3_gguf()
    runs = [(32768, True), (65536, False)]
    logged = llama_cpp_memory(path, runs)
    shape = ModelShape.from_gguf(open_gguf(path))
    for context, flash in runs:
        layout = kv_cache_layout(shape, context)
        assert [(cells, layers) for _, cells, layers in logged[(context, flash)]["caches"]] == [
            (layout.cells, layout.full_layers),
            (layout.swa_cells, layout.swa_layers),
        ]
        logged_mib = sum(mib for mib, _, _ in logged[(context, flash)]["caches"])
        assert abs(layout.total_bytes / MiB - logged_mib) <= 0.01  # two MiB figures of two decimals each
        # the compute estimate: see test_kv_cache_and_compute_buffer_match_llama_cpp (1% here)
        ours = compute_buffer_bytes(shape, context, flash_attn=flash) / MiB
        assert ours == pytest.approx(logged[(context, flash)]["compute_mib"], rel=0.01), (context, flash)


# --- the KV math on real configs ----------------------------------------------------------------

# Published config.json values (the hub's meta-llama/Meta-Llama-3-8B, google/gemma-2-9b,
# mistralai/Mistral-7B-v0.1, google/gemma-3-4b-it), the keys the KV cache depends on.
LLAMA3_8B = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
             "vocab_size": 128256, "max_position_embeddings": 8192}  # fmt: skip
GEMMA2_9B = {"architectures": ["Gemma2ForCausalLM"], "hidden_size": 3584, "num_hidden_layers": 42,
             "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256, "sliding_window": 4096,
             "intermediate_size": 14336, "vocab_size": 256000}  # fmt: skip
MISTRAL_7B_V01 = {"architectures": ["MistralForCausalLM"], "hidden_size": 4096, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 8, "sliding_window": 4096,
                  "intermediate_size": 14336, "vocab_size": 32000}  # fmt: skip
GEMMA3_4B_TEXT = {"hidden_size": 2560, "num_hidden_layers": 34, "num_attention_heads": 8, "num_key_value_heads": 4,
                  "head_dim": 256, "sliding_window": 1024, "sliding_window_pattern": 6, "intermediate_size": 10240,
                  "vocab_size": 262208}  # fmt: skip
GEMMA3_4B = {"architectures": ["Gemma3ForConditionalGeneration"], "text_config": GEMMA3_4B_TEXT}


def test_llama3_8b_kv_cache_is_128_kib_per_token() -> None:
    # 32 layers x 8 KV heads x 128 dims x (K + V) x 2 bytes = 131072 bytes per token
    assert kv_cache_bytes(LLAMA3_8B, 8192) == 8192 * 131072 == 2**30
    assert kv_cache_bytes(LLAMA3_8B, 8000) == 8192 * 131072  # padded to 256 cells
    assert kv_cache_bytes(LLAMA3_8B, 8192, cache_type="q8_0") == 8192 * 32 * 2 * (1024 // 32 * 34)


def test_gemma2_sliding_layers_hold_the_window_and_one_ubatch() -> None:
    per_layer_cell = 8 * 256 * 2 * 2  # K and V, f16
    layout = kv_cache_layout(GEMMA2_9B, 32768)
    assert (layout.full_layers, layout.swa_layers) == (21, 21)  # every other layer
    assert layout.swa_cells == 4096 + 512  # window + ubatch, a multiple of 256 already
    assert layout.total_bytes == 21 * per_layer_cell * (32768 + 4608)
    assert kv_cache_bytes(GEMMA2_9B, 32768, swa_full=True) == 42 * per_layer_cell * 32768
    assert kv_cache_layout(GEMMA2_9B, 2048).swa_cells == 2048  # never more than the context


def test_gemma3_reads_text_config_and_its_pattern() -> None:
    shape = ModelShape.from_hf_config(GEMMA3_4B)
    assert shape.arch == "gemma3"
    assert shape.swa_layers == tuple(il % 6 != 5 for il in range(34))
    layout = kv_cache_layout(shape, 131072)
    assert (layout.full_layers, layout.swa_layers, layout.swa_cells) == (5, 29, 1536)


def test_mistral_sliding_window_is_not_used_by_llama_cpp() -> None:
    # llama.cpp runs Mistral as its "llama" architecture, which has no sliding-window cache
    assert kv_cache_bytes(MISTRAL_7B_V01, 32768) == 32768 * 32 * 8 * 128 * 2 * 2


def test_hf_layer_types_win_over_the_pattern() -> None:
    layer_types = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    config = {
        **GEMMA3_4B_TEXT,
        "architectures": ["Gemma3ForCausalLM"],
        "num_hidden_layers": 4,
        "layer_types": layer_types,
    }
    assert ModelShape.from_hf_config(config).swa_layers == (False, True, False, True)


def test_gguf_metadata_per_layer_arrays_and_swa_pattern_array() -> None:
    kvs = {"general.architecture": "gemma3", "gemma3.block_count": 3, "gemma3.embedding_length": 64,
           "gemma3.attention.head_count": [4, 4, 4], "gemma3.attention.head_count_kv": [2, 1, 0],
           "gemma3.attention.key_length": 16, "gemma3.attention.value_length": 16,
           "gemma3.attention.sliding_window": 128, "gemma3.attention.sliding_window_pattern": [True, False, True],
           "gemma3.feed_forward_length": 128, "gemma3.vocab_size": 100}  # fmt: skip
    layout = kv_cache_layout(kvs, 1024)
    # layer 2 has no KV heads (no cache); layer 0 is SWA, layer 1 full
    assert (layout.full_layers, layout.swa_layers) == (1, 1)
    assert layout.total_bytes == 1024 * 1 * 16 * 2 * 2 + 768 * 2 * 16 * 2 * 2


def test_bad_options() -> None:
    with pytest.raises(InvalidOptionError, match="context"):
        kv_cache_bytes(LLAMA3_8B, 0)
    with pytest.raises(InvalidOptionError, match="cache type 'q9'"):
        kv_cache_bytes(LLAMA3_8B, 512, cache_type="q9")
    with pytest.raises(UnsupportedQuantTypeError, match="q9_9"):
        estimate(models.model_folder("LlamaForCausalLM"), quantization="q9_9")


def test_format_bytes() -> None:
    assert [format_bytes(n) for n in (512, 1536, 3 * MiB, 2**30 * 1.5)] == ["512 B", "1.50 KiB", "3.00 MiB", "1.50 GiB"]


# --- GGUF files --------------------------------------------------------------------------------


def test_a_split_file_is_estimated_from_any_part(folders: dict, tmp_path: pathlib.Path) -> None:
    parts = llmdeploy.save_pretrained_gguf(folders["llama"], tmp_path, quantization="q8_0", max_file_size="600KB",
                                           progress=False)  # fmt: skip
    assert len(parts) > 1
    whole = llmdeploy.save_pretrained_gguf(folders["llama"], tmp_path / "whole", quantization="q8_0", progress=False)[0]
    (as_is,) = estimate(parts[-1], context=512)
    assert as_is.quantization == "q8_0"
    assert as_is.file_bytes == sum(p.stat().st_size for p in parts)
    assert as_is.tensor_bytes == sum(int(t.n_bytes) for t in gguf.GGUFReader(whole).tensors)
    (e,) = estimate(parts[0], quantization="q8_0")  # requantizing a split file writes one file
    assert e.file_bytes == whole.stat().st_size
    parts[1].unlink()
    with pytest.raises(MissingFileError, match=re.escape(parts[1].name)):
        estimate(parts[0])


def test_shape_from_a_gguf_without_the_keys_names_the_file() -> None:
    arch_only = GGUFModelFile(
        [pathlib.Path("no-keys.gguf")], [MetadataEntry("general.architecture", "llama", gguf.GGUFValueType.STRING)], []
    )
    with pytest.raises(GGUFReadError, match=r"no-keys.gguf: the GGUF lacks llama.block_count"):
        ModelShape.from_gguf(arch_only)
