"""llmdeploy.merge.bnb: bitsandbytes 4-bit (NF4/FP4) dequantization in pure torch, and merging onto a 4-bit base.

Oracles: hand-built blocks whose values are known (codes packed by hand, absmax chosen), a
4-bit checkpoint written here without bitsandbytes; and, where ``bitsandbytes`` imports on this
machine, bitsandbytes itself: its ``dequantize_4bit``, and QLoRA models it quantizes.
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmdeploy.errors import QuantizedCheckpointError, QuantStateError
from llmdeploy.merge import bnb, save_pretrained_merged
from llmdeploy.merge.bnb import FP4, NF4, Quant4bit, dequantize_4bit, pack_4bit, unpack_4bit
from tests.merge.common import base, load, logits, lora, read

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _meta(quant_type: str = "nf4", **fields: object) -> torch.Tensor:
    """The ``quant_state.bitsandbytes__*`` tensor: JSON as uint8 bytes, as bitsandbytes packs it."""
    return torch.tensor(list(json.dumps({"quant_type": quant_type, **fields}).encode()), dtype=torch.uint8)


def _state(shape, absmax, quant_type="nf4", blocksize=64, dtype="bfloat16", **nested) -> Quant4bit:
    parts = {"absmax": absmax, f"quant_state.bitsandbytes__{quant_type}": _meta(
        quant_type, blocksize=blocksize, dtype=dtype, shape=list(shape),
        **{k: v for k, v in nested.items() if not isinstance(v, torch.Tensor)})}  # fmt: skip
    parts.update({k: v for k, v in nested.items() if isinstance(v, torch.Tensor)})
    return Quant4bit.from_checkpoint("w", parts)


# -- hand-built blocks ---------------------------------------------------------------------------


def test_tables():
    """NF4 is the QLoRA paper's table; FP4 lists sign/exponent/mantissa codes in code order, over 12."""
    assert NF4.dtype == FP4.dtype == torch.float32 and NF4[0] == -1 and NF4[7] == 0 and NF4[15] == 1
    assert bool((NF4[1:] > NF4[:-1]).all())
    raw = torch.tensor([0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0])
    assert torch.equal(FP4[:8], raw / 12) and FP4[3] == 1 and FP4[5] == 0.5 and FP4[7] == 0.25  # divided in float32
    assert torch.equal(FP4[9:], -FP4[1:8]) and not torch.signbit(FP4[8])  # code 8 is +0, as bitsandbytes has it


def test_packing_layout():
    """Two codes a byte, the first in the high nibble; an odd count pads a zero code."""
    assert pack_4bit(torch.tensor([1, 2, 15, 0, 7])).reshape(-1).tolist() == [0x12, 0xF0, 0x70]
    assert pack_4bit(torch.tensor([1, 2])).shape == (1, 1)
    assert unpack_4bit(torch.tensor([0x12, 0xF0, 0x70], dtype=torch.uint8), 5).tolist() == [1, 2, 15, 0, 7]
    codes = torch.randint(0, 16, (999,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(unpack_4bit(pack_4bit(codes), 999), codes.to(torch.uint8))
    # another quant_storage dtype holds the same bytes
    as_bf16 = pack_4bit(codes[:996]).reshape(-1).view(torch.bfloat16)  # 498 bytes: 249 bf16 "values"
    assert torch.equal(unpack_4bit(as_bf16, 996), codes[:996].to(torch.uint8))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_known_values(quant_type, dtype):
    """Every code in two blocks of 64 with absmax 2 and 0.5: value = table[code] * absmax, exactly."""
    table = {"nf4": NF4, "fp4": FP4}[quant_type]
    codes = torch.cat([torch.arange(16).repeat(4), torch.arange(15, -1, -1).repeat(4)])
    absmax = torch.tensor([2.0, 0.5])
    got = dequantize_4bit(pack_4bit(codes), _state((8, 16), absmax, quant_type, dtype=dtype))
    torch_dtype = getattr(torch, dtype)
    want = (table[codes].view(2, 64) * absmax.view(2, 1)).reshape(8, 16).to(torch_dtype)
    assert got.dtype == torch_dtype and got.shape == (8, 16) and torch.equal(got, want)
    # spot values, written out (row 0: codes 0..15 of block 1; row 4: codes 15, 14, ... of block 2)
    if quant_type == "nf4":
        assert got[0, 15].item() == 2.0 and got[0, 0].item() == -2.0 and got[0, 7].item() == 0.0
        assert got[4, 0].item() == 0.5
    else:
        assert got[0, 3].item() == 2.0 and got[0, 5].item() == 1.0 and got[0, 11].item() == -2.0
        assert not torch.signbit(got[0, 8])  # code 8: +0.0
        assert got[4, 0].item() == -0.125  # block 2, code 15: -3/12 * 0.5


def test_short_last_block_and_odd_count():
    """n = 99 values, blocksize 64: a full block and a short one (with its own absmax); 50 bytes, the last half-used."""
    codes = torch.full((99,), 15)
    absmax = torch.tensor([1.0, 3.0])
    got = dequantize_4bit(pack_4bit(codes), _state((9, 11), absmax, dtype="float32")).reshape(-1)
    assert got[:64].eq(1.0).all() and got[64:].eq(3.0).all()


def test_double_quantization():
    """Nested absmax: absmax[j] = nested_quant_map[code j] * nested_absmax[j // 256] + nested_offset."""
    n_blocks = 300  # two nested groups of 256 (the second short)
    absmax_codes = torch.arange(n_blocks) % 256
    nested_map = torch.linspace(-1, 1, 256)
    nested_absmax = torch.tensor([0.5, 0.25])
    offset = 0.75
    state = _state(
        (n_blocks, 64), absmax_codes.to(torch.uint8), "nf4", dtype="float32", nested_absmax=nested_absmax,
        nested_quant_map=nested_map, nested_blocksize=256, nested_dtype="float32", nested_offset=offset,
    )  # fmt: skip
    scales = state.scales()
    want = nested_map[absmax_codes] * torch.where(torch.arange(n_blocks) < 256, 0.5, 0.25) + offset
    assert torch.equal(scales, want)
    codes = torch.full((n_blocks * 64,), 15)  # NF4 code 15 = 1.0: each value is its block's scale
    got = dequantize_4bit(pack_4bit(codes), state)
    assert torch.equal(got, want.view(-1, 1).expand(n_blocks, 64))


def test_chunks_do_not_change_values(monkeypatch):
    """The weight is dequantized a chunk of blocks at a time; the chunk size cannot change a bit."""
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (37 * 64,), generator=g)
    state = _state((37, 64), torch.rand(37, generator=g) + 0.1, "fp4")
    whole = dequantize_4bit(pack_4bit(codes), state)
    monkeypatch.setattr(bnb, "_CHUNK", 64)
    assert torch.equal(dequantize_4bit(pack_4bit(codes), state), whole)


@pytest.mark.parametrize(
    ("parts", "match"),
    [
        ({"absmax": torch.ones(1)}, r"one w.quant_state.bitsandbytes__nf4 \(or __fp4\) tensor, found none"),
        ({"absmax": torch.ones(1), "quant_state.bitsandbytes__nf4": torch.tensor([1, 2], dtype=torch.uint8)},
         "is not the JSON bitsandbytes writes"),
        ({"absmax": torch.ones(1), "quant_state.bitsandbytes__int4": _meta("int4", blocksize=64, dtype="bfloat16",
          shape=[8, 8])}, "quant_type 'int4' is not supported; llmdeploy reads 'nf4' and 'fp4'"),
        ({"absmax": torch.ones(1), "quant_state.bitsandbytes__nf4": _meta(blocksize=48, dtype="bfloat16",
          shape=[8, 8])}, "blocksize 48"),
        ({"absmax": torch.ones(3), "quant_state.bitsandbytes__nf4": _meta(blocksize=64, dtype="bfloat16",
          shape=[8, 8])}, r"1 blocks of 64 but 3 absmax values"),
        ({"absmax": torch.ones(1), "quant_map": FP4, "quant_state.bitsandbytes__nf4": _meta(blocksize=64,
          dtype="bfloat16", shape=[8, 8])}, "w.quant_map is not bitsandbytes' nf4 table"),
        ({"absmax": torch.ones(1), "quant_state.bitsandbytes__nf4": _meta(blocksize=64, dtype="int8",
          shape=[8, 8])}, "dequantizes to dtype 'int8'"),
        ({"absmax": torch.ones(1), "quant_state.bitsandbytes__nf4": _meta(blocksize=64, shape=[8, 8])},
         "has no 'dtype' in its quantization state"),
    ],
    ids=["no_meta", "bad_json", "int4", "blocksize", "absmax_count", "quant_map", "dtype", "missing_field"],
)  # fmt: skip
def test_bad_states(parts, match):
    with pytest.raises(QuantStateError, match=match):
        Quant4bit.from_checkpoint("w", parts)


def test_packed_size_must_fit_the_shape():
    state = _state((8, 16), torch.ones(2))
    with pytest.raises(QuantStateError, match=r"needs 64 packed bytes, the checkpoint has 32"):
        dequantize_4bit(torch.zeros(32, 1, dtype=torch.uint8), state)
    assert issubclass(QuantStateError, QuantizedCheckpointError)


# -- a 4-bit checkpoint written here (no bitsandbytes needed) ---------------------------------------------


def _quantize_nearest(w: torch.Tensor, table: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (nearest table value after scaling each block by its absmax) and the absmax; any codes will do."""
    blocks = w.float().reshape(-1, blocksize)
    absmax = blocks.abs().amax(dim=1).clamp(min=1e-12)
    codes = ((blocks / absmax[:, None]).unsqueeze(-1) - table).abs().argmin(dim=-1)
    return codes.reshape(-1), absmax


def _four_bit_folder(tmp_path, quant_type: str, nested: bool):
    """The tiny base with its linear layers stored as bitsandbytes would save them, and a bf16 folder holding
    exactly the values they stand for (table[code] * absmax, computed here) — the merge's reference base."""
    src = base()
    q4, ref = tmp_path / f"q4-{quant_type}-{nested}", tmp_path / f"deq-{quant_type}-{nested}"
    shutil.copytree(src, q4)
    shutil.copytree(src, ref)
    table = {"nf4": NF4, "fp4": FP4}[quant_type]
    stored = load_file(str(src / "model.safetensors"))
    out, deq = {}, {}
    for name, w in stored.items():
        if not any(f".{p}." in name for p in LINEARS):
            out[name] = deq[name] = w
            continue
        codes, absmax = _quantize_nearest(w, table, 64)
        deq[name] = (table[codes].view(-1, 64) * absmax[:, None]).reshape(w.shape).to(w.dtype)
        out[name] = pack_4bit(codes)
        meta = dict(blocksize=64, dtype="bfloat16", shape=list(w.shape))
        if nested:  # absmax as 8-bit codes around their mean (a 256-value map, one group of 256)
            offset = absmax.mean()
            nested_map = torch.linspace(-1, 1, 256)
            centered = absmax - offset
            nabs = centered.abs().max().reshape(1)
            acodes = ((centered / nabs).unsqueeze(-1) - nested_map).abs().argmin(dim=-1)
            real = nested_map[acodes] * nabs + offset
            deq[name] = (table[codes].view(-1, 64) * real[:, None]).reshape(w.shape).to(w.dtype)
            out[f"{name}.absmax"] = acodes.to(torch.uint8)
            out[f"{name}.nested_absmax"], out[f"{name}.nested_quant_map"] = nabs, nested_map.clone()
            meta.update(nested_blocksize=256, nested_dtype="float32", nested_offset=float(offset))
        else:
            out[f"{name}.absmax"] = absmax
        out[f"{name}.quant_map"] = table.clone()
        out[f"{name}.quant_state.bitsandbytes__{quant_type}"] = _meta(quant_type, **meta)
    save_file(out, str(q4 / "model.safetensors"), metadata={"format": "pt"})
    save_file(deq, str(ref / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((q4 / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "bnb_4bit_quant_type": quant_type,
    }
    (q4 / "config.json").write_text(json.dumps(cfg))
    return q4, ref


@pytest.mark.parametrize(("quant_type", "nested"), [("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True)])
def test_merge_onto_a_saved_4bit_base(quant_type, nested, tmp_path, caplog):
    """An adapter folder merged onto a 4-bit checkpoint equals the same adapter merged onto the bf16 values
    the 4-bit weights stand for; the output is a plain 16-bit folder, and the user is warned."""
    q4, ref = _four_bit_folder(tmp_path, quant_type, nested)
    pm = lora(load(base()), target_modules=["q_proj", "v_proj", "down_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(str(tmp_path / "adapter"))
    with caplog.at_level(logging.WARNING, logger="llmdeploy"):
        out = save_pretrained_merged(tmp_path / "adapter", tmp_path / "out", base=q4)
    assert f"bitsandbytes 4-bit ({quant_type}{', double quantization' if nested else ''})" in caplog.text
    assert "carry the 4-bit rounding" in caplog.text
    want = read(save_pretrained_merged(tmp_path / "adapter", tmp_path / "want", base=ref))
    got = read(out)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert all(v.dtype == torch.bfloat16 for v in got.values())
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["dtype"] == "bfloat16"
    load(out)  # transformers loads it as a plain model


# -- against bitsandbytes ------------------------------------------------------------------------------------


def _bnb():
    try:
        import bitsandbytes.functional as F
    except Exception as e:  # noqa: BLE001 - any import failure: no usable bitsandbytes here
        pytest.skip(f"bitsandbytes does not import on this machine ({type(e).__name__}: {e})")
    return F


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("shape", "blocksize"), [((96, 256), 64), ((64, 256), 128), ((33, 17), 64), ((7, 4096), 4096)])
def test_equals_bitsandbytes(quant_type, nested, dtype, shape, blocksize):
    """Bit for bit against bitsandbytes' dequantize_4bit, from its QuantState and from the saved tensors."""
    F = _bnb()
    g = torch.Generator().manual_seed(blocksize + shape[0])
    w = (0.05 * torch.randn(shape, generator=g)).to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        packed, qs = F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)
        want = F.dequantize_4bit(packed, qs)
    got = dequantize_4bit(packed, Quant4bit.from_bnb("w", qs))
    saved = dequantize_4bit(packed, Quant4bit.from_checkpoint("w", qs.as_dict(packed=True)))
    assert got.dtype == want.dtype == dtype and torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    assert torch.equal(saved.view(torch.uint8), got.view(torch.uint8))


def _qlora(folder, quant_type, nested):
    _bnb()
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cfg = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=nested,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(str(folder), quantization_config=cfg, dtype=torch.bfloat16)


@pytest.mark.parametrize(("quant_type", "nested"), [("nf4", True), ("fp4", False)])
def test_qlora_model_in_memory_and_saved(quant_type, nested, tmp_path, caplog):
    """A QLoRA model (bitsandbytes quantized the base on load): the merge equals bitsandbytes' dequantized
    weight plus PEFT's delta, rounded once; its logits match the unmerged model's; the saved 4-bit base
    plus the adapter folder merge to the same tensors."""
    F = _bnb()
    folder = base()
    pm = lora(_qlora(folder, quant_type, nested), target_modules=["q_proj", "v_proj", "up_proj"])
    with caplog.at_level(logging.WARNING, logger="llmdeploy"):
        out = save_pretrained_merged(pm, tmp_path / "mem")
    assert "quantized with bitsandbytes 4-bit: its 14 4-bit weights are dequantized" in caplog.text
    got = read(out)
    inner = pm.get_base_model()
    for i, layer in enumerate(inner.model.layers):
        for path, mod in (("self_attn.q_proj", layer.self_attn.q_proj), ("self_attn.k_proj", layer.self_attn.k_proj),
                          ("mlp.up_proj", layer.mlp.up_proj)):  # fmt: skip
            base_layer = getattr(mod, "base_layer", mod)
            w = F.dequantize_4bit(base_layer.weight.data, base_layer.weight.quant_state)
            if hasattr(mod, "get_delta_weight"):
                with torch.no_grad():
                    w = (w.float() + mod.get_delta_weight("default").float()).to(torch.bfloat16)
            assert torch.equal(got[f"model.layers.{i}.{path}.weight"], w), (i, path)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    torch.testing.assert_close(logits(load(out)), logits(pm), rtol=0.05, atol=0.05)  # bf16 compute in the QLoRA model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(str(tmp_path / "adapter"))
        _qlora(folder, quant_type, nested).save_pretrained(str(tmp_path / "q4"))
    assert any(k.endswith(".absmax") for k in load_file(str(tmp_path / "q4" / "model.safetensors")))
    disk = read(save_pretrained_merged(tmp_path / "adapter", tmp_path / "disk", base=tmp_path / "q4"))
    assert disk.keys() == got.keys() and all(torch.equal(disk[k], got[k]) for k in got)
