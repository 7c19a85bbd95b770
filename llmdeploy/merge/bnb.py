"""bitsandbytes 4-bit weights (NF4, FP4) dequantized in pure torch: no CUDA, no bitsandbytes.

A ``Linear4bit`` weight of shape ``(out, in)`` is flattened in row-major order into ``n``
values, packed two 4-bit codes to a byte, and cut into blocks of ``blocksize`` values that
share one float32 scale::

    byte k         [ b7 b6 b5 b4 | b3 b2 b1 b0 ]
                     code of 2k    code of 2k+1        (an odd n pads the last low nibble)

    value i      = quant_map[code i] * absmax[i // blocksize]     float32, then cast to dtype

``quant_map`` is the 16-value NF4 or FP4 table below (FP4: 1 sign, 2 exponent, 1 mantissa
bit; listed in code order). With double quantization ("nested"), ``absmax`` is itself stored
as one uint8 code per block, into the 256-value 8-bit dynamic map ``nested_quant_map``, in
blocks of ``nested_blocksize`` (256) sharing a float32 ``nested_absmax``, around their mean::

    absmax[j]    = nested_quant_map[code j] * nested_absmax[j // nested_blocksize] + nested_offset

In a checkpoint saved by transformers, weight ``W`` is stored as ``W`` (the packed bytes:
uint8 ``(ceil(n/2), 1)``, or another ``bnb_4bit_quant_storage`` dtype holding the same bytes)
next to ``W.absmax``, ``W.quant_map``, ``W.nested_absmax``, ``W.nested_quant_map`` and
``W.quant_state.bitsandbytes__nf4`` (or ``__fp4``): the UTF-8 bytes, as uint8, of a JSON object
with ``quant_type``, ``blocksize``, ``dtype``, ``shape`` and the ``nested_*`` scalars.

Every float operation is bitsandbytes' (``backends/default/ops.py``, which its CPU and CUDA
kernels match): a float32 table lookup times a float32 scale, then one cast to ``dtype``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import QuantStateError

__all__ = [
    "COMPONENTS",
    "FP4",
    "NF4",
    "Quant4bit",
    "code_table",
    "dequantize_4bit",
    "pack_4bit",
    "unpack_4bit",
]

# bitsandbytes' get_4bit_type("nf4"): quantiles of N(0, 1), already in [-1, 1]
NF4 = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)  # fmt: skip
# get_4bit_type("fp4"): codes 0..7 are +, 8..15 the same magnitudes negated; divided by the largest
# (12) in float32. Code 8 is +0.0, not -0.0: bitsandbytes writes it as the int -0.
FP4 = torch.tensor(
    [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0],
    dtype=torch.float32,
) / torch.tensor(12.0)  # fmt: skip
_TABLES = {"nf4": NF4, "fp4": FP4}
_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# the checkpoint tensors that hold one 4-bit weight's state, by suffix after the weight's name
COMPONENTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4",
              "quant_state.bitsandbytes__fp4")  # fmt: skip

_CHUNK = 1 << 21  # values dequantized at a time (a few 8 MiB float32 temporaries)


def code_table(quant_type: str) -> torch.Tensor:
    """The 16 float32 values a 4-bit code stands for (``"nf4"`` or ``"fp4"``)."""
    try:
        return _TABLES[quant_type]
    except KeyError:
        raise QuantStateError(
            f"bitsandbytes 4-bit quant_type {quant_type!r} is not supported; llmdeploy reads 'nf4' and 'fp4'"
        ) from None


@dataclass(frozen=True)
class Quant4bit:
    """The quantization state of one 4-bit weight (bitsandbytes' ``QuantState``, on the CPU).

    Args:
        name: the weight's name, for messages.
        quant_type: ``"nf4"`` or ``"fp4"``.
        blocksize: values per ``absmax`` scale.
        dtype: the dtype the weight is dequantized to (the weight's dtype before quantization).
        shape: the weight's shape.
        absmax: float32 scales, one per block; uint8 codes when nested.
        nested_absmax: float32 scales of the absmax codes, one per ``nested_blocksize`` of them.
        nested_quant_map: the 256 float32 values of the absmax codes.
        nested_blocksize: absmax codes per nested scale.
        nested_offset: the mean added back to the dequantized absmax.
    """

    name: str
    quant_type: str
    blocksize: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    absmax: torch.Tensor
    nested_absmax: torch.Tensor | None = None
    nested_quant_map: torch.Tensor | None = None
    nested_blocksize: int | None = None
    nested_offset: float | None = None

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @classmethod
    def from_checkpoint(cls, name: str, parts: Mapping[str, torch.Tensor]) -> Quant4bit:
        """The state saved next to weight ``name``: ``parts`` maps each suffix in :data:`COMPONENTS` to its tensor."""
        packed = [k for k in parts if k.startswith("quant_state.bitsandbytes__")]
        if len(packed) != 1:
            raise QuantStateError(
                f"4-bit weight {name!r} should have one {name}.quant_state.bitsandbytes__nf4 (or __fp4) tensor, "
                f"found {[f'{name}.{k}' for k in packed] or 'none'}; the checkpoint is incomplete"
            )
        try:
            meta = json.loads(bytes(parts[packed[0]].to(torch.uint8).reshape(-1).tolist()).decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise QuantStateError(f"{name}.{packed[0]} is not the JSON bitsandbytes writes ({e})") from None
        if not isinstance(meta, dict):
            raise QuantStateError(f"{name}.{packed[0]} holds {type(meta).__name__}, not a JSON object")
        meta.setdefault("quant_type", packed[0].rsplit("__", 1)[1])
        return cls.from_fields(name, {**meta, **{k: v for k, v in parts.items() if k not in packed}})

    @classmethod
    def from_bnb(cls, name: str, state: Any) -> Quant4bit:
        """From an in-memory ``bitsandbytes.functional.QuantState`` (tensors copied to the CPU)."""
        fields: dict[str, Any] = {
            "quant_type": state.quant_type, "blocksize": state.blocksize, "dtype": state.dtype,
            "shape": tuple(state.shape), "absmax": state.absmax, "quant_map": state.code,
        }  # fmt: skip
        if getattr(state, "nested", False):
            fields.update(
                nested_absmax=state.state2.absmax, nested_quant_map=state.state2.code,
                nested_blocksize=state.state2.blocksize, nested_offset=float(state.offset),
            )  # fmt: skip
        return cls.from_fields(name, fields)

    @classmethod
    def from_fields(cls, name: str, f: Mapping[str, Any]) -> Quant4bit:
        """From bitsandbytes' ``QuantState.as_dict()`` fields (tensors and plain values), checked."""

        def need(key: str) -> Any:
            if f.get(key) is None:
                raise QuantStateError(
                    f"4-bit weight {name!r} has no {key!r} in its quantization state; the checkpoint is incomplete "
                    "or was not written by bitsandbytes"
                )
            return f[key]

        quant_type = str(need("quant_type"))
        table = code_table(quant_type)
        blocksize = int(need("blocksize"))
        if blocksize not in _BLOCKSIZES:
            raise QuantStateError(f"4-bit weight {name!r} has blocksize {blocksize}; bitsandbytes uses {_BLOCKSIZES}")
        dtype = need("dtype")
        if isinstance(dtype, str):
            dtype = _DTYPES.get(dtype.removeprefix("torch."))
        if dtype not in _DTYPES.values():
            raise QuantStateError(
                f"4-bit weight {name!r} dequantizes to dtype {f['dtype']!r}; expected one of {list(_DTYPES)}"
            )
        shape = tuple(int(d) for d in need("shape"))
        quant_map = f.get("quant_map")
        if quant_map is not None and not (quant_map.numel() == 16 and bool((quant_map.float().cpu() == table).all())):
            raise QuantStateError(
                f"{name}.quant_map is not bitsandbytes' {quant_type} table; this 4-bit format is not supported"
            )
        absmax = need("absmax").detach().cpu()
        n = 1
        for d in shape:
            n *= d
        blocks = -(-n // blocksize)
        state = cls(name, quant_type, blocksize, dtype, shape, absmax.reshape(-1))
        if f.get("nested_absmax") is not None:
            nested_map = need("nested_quant_map").detach().cpu().float().reshape(-1)
            nested_bs = int(need("nested_blocksize"))
            if absmax.dtype != torch.uint8 or nested_map.numel() != 256:
                raise QuantStateError(
                    f"4-bit weight {name!r}: a nested state needs uint8 absmax codes and a 256-value nested_quant_map, "
                    f"got {absmax.dtype} absmax and {nested_map.numel()} values"
                )
            nested_absmax = need("nested_absmax").detach().cpu().float().reshape(-1)
            if nested_bs <= 0 or nested_absmax.numel() != -(-blocks // nested_bs):
                raise QuantStateError(
                    f"4-bit weight {name!r}: {nested_absmax.numel()} nested_absmax values for {blocks} blocks in "
                    f"groups of {nested_bs}; the state does not belong to this weight"
                )
            state = cls(
                name, quant_type, blocksize, dtype, shape, absmax.reshape(-1), nested_absmax, nested_map, nested_bs,
                float(need("nested_offset")),
            )  # fmt: skip
        elif absmax.dtype != torch.float32:
            raise QuantStateError(f"{name}.absmax is {absmax.dtype}; without double quantization it is float32")
        if state.absmax.numel() != blocks:
            raise QuantStateError(
                f"4-bit weight {name!r} of shape {shape} has {blocks} blocks of {blocksize} but "
                f"{state.absmax.numel()} absmax values; the state does not belong to this weight"
            )
        return state

    def scales(self) -> torch.Tensor:
        """The float32 ``absmax`` of every block (dequantized first when nested)."""
        if not self.nested:
            return self.absmax.float()
        assert self.nested_quant_map is not None and self.nested_absmax is not None and self.nested_blocksize
        # bitsandbytes' dequantize_blockwise, then `absmax += offset`, both in float32
        values = self.nested_quant_map[self.absmax.long()]
        out = _scale_blocks(values, self.nested_absmax, self.nested_blocksize)
        out += torch.tensor(self.nested_offset, dtype=torch.float32)
        return out


def _scale_blocks(values: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """``values[i] * absmax[i // blocksize]`` (float32; the last block may be short)."""
    n = values.numel()
    full = n - n % blocksize
    out = torch.empty(n, dtype=torch.float32)
    blocks = out[:full].view(-1, blocksize)
    torch.mul(values[:full].view(-1, blocksize), absmax[: full // blocksize].view(-1, 1), out=blocks)
    if full < n:
        torch.mul(values[full:], absmax[full // blocksize], out=out[full:])
    return out


def unpack_4bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` 4-bit codes of ``packed`` (any dtype holding the bytes), as uint8 (high nibble first)."""
    b = packed.detach().contiguous().reshape(-1).view(torch.uint8)
    if b.numel() * 2 < n:
        raise QuantStateError(f"{b.numel()} packed bytes hold {2 * b.numel()} 4-bit codes; {n} are needed")
    return torch.stack((b >> 4, b & 0x0F), dim=1).reshape(-1)[:n]


def pack_4bit(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes (0..15) packed two to a byte, high nibble first, as bitsandbytes stores them.

    Returns:
        ``(ceil(n/2), 1)`` uint8 (an odd count pads a zero code).
    """
    c = codes.reshape(-1).to(torch.uint8)
    if bool((c > 15).any()):
        raise QuantStateError("4-bit codes must be in 0..15")
    if c.numel() % 2:
        c = torch.cat([c, c.new_zeros(1)])
    return ((c[0::2] << 4) | c[1::2]).reshape(-1, 1)


def dequantize_4bit(packed: torch.Tensor, state: Quant4bit) -> torch.Tensor:
    """The weight a 4-bit tensor stands for, shaped ``state.shape``, in ``state.dtype``.

    Bit-identical to ``bitsandbytes.functional.dequantize_4bit``. Works through the packed
    bytes a chunk at a time, so the temporaries stay small whatever the weight's size.

    Args:
        packed: the stored 4-bit tensor (uint8, or the quant_storage dtype holding the bytes).
        state: its quantization state.
    """
    n = state.numel
    b = packed.detach().contiguous().reshape(-1).view(torch.uint8)
    if b.numel() != -(-n // 2):
        raise QuantStateError(
            f"4-bit weight {state.name!r} of shape {state.shape} needs {-(-n // 2)} packed bytes, the checkpoint has "
            f"{b.numel()}; the quantization state does not belong to this weight"
        )
    table = code_table(state.quant_type)
    # one lookup per byte: pairs[byte] = (value of the high code, value of the low code)
    pairs = torch.stack((table.repeat_interleave(16), table.repeat(16)), dim=1)
    scales = state.scales()
    out = torch.empty(n, dtype=state.dtype)
    step = max(state.blocksize, _CHUNK - _CHUNK % state.blocksize)  # whole blocks per chunk: an even count
    for start in range(0, n, step):
        stop = min(start + step, n)
        values = pairs[b[start // 2 : (stop + 1) // 2].long()].reshape(-1)[: stop - start]
        first = start // state.blocksize
        scaled = _scale_blocks(values, scales[first : first + -(-(stop - start) // state.blocksize)], state.blocksize)
        out[start:stop].copy_(scaled)  # the one rounding to dtype
    return out.view(state.shape)
