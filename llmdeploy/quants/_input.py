"""Values to quantize, read as float32 one chunk at a time.

A bf16 checkpoint tensor must not be widened to float32 as a whole before it
is quantized: that would double its memory.  :class:`Values` keeps the
caller's array or tensor as it is and converts only the chunk being worked
on, exactly (bf16/fp16 -> float32 is exact; float64 -> float32 rounds to
nearest, and a value that overflows is an error, never a silent inf).
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from ..errors import InputDTypeError, NonFiniteValueError


def torch_module_if_tensor(x: Any) -> Any:
    """The torch module if ``x`` is a torch tensor (without importing torch otherwise)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return torch
    return None


class Values:
    """A numpy array or torch tensor of floats, seen as flat float32 chunks."""

    def __init__(self, x: Any) -> None:
        torch = torch_module_if_tensor(x)
        if torch is not None:
            if x.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
                raise InputDTypeError(
                    f"Cannot quantize a torch tensor of dtype {x.dtype}; pass float32, float16, bfloat16 or float64."
                )
            x = x.detach()
            self.device = x.device
            if x.device.type == "cpu" and x.dtype != torch.bfloat16:
                x = x.numpy()  # zero-copy; numpy has no bfloat16
        else:
            self.device = None
        if isinstance(x, np.generic):
            x = np.asarray(x)
        if isinstance(x, np.ndarray):
            if x.dtype not in (np.float32, np.float16, np.float64):
                raise InputDTypeError(
                    f"Cannot quantize an array of dtype {x.dtype}; pass float32 (float16 and float64 are converted)."
                )
            flat: Any = np.ascontiguousarray(x).reshape(-1)
        elif torch is not None:
            flat = x.contiguous().reshape(-1)
        else:
            raise InputDTypeError(f"Cannot quantize a {type(x).__name__}; pass a numpy array or a torch tensor.")
        if x.ndim == 0:
            raise InputDTypeError("Cannot quantize a 0-d array: pass rows of values, shape (n_rows, n_cols).")
        self.shape: tuple[int, ...] = tuple(x.shape)
        self.size = int(flat.shape[0])
        self._flat = flat
        self._is_torch = torch is not None and not isinstance(flat, np.ndarray)

    @property
    def is_float64(self) -> bool:
        return str(self._flat.dtype) in ("float64", "torch.float64")

    def numpy_chunk(self, lo: int, hi: int) -> np.ndarray:
        """Values ``lo:hi`` of the flattened input as float32 numpy (a view when no conversion is needed)."""
        chunk = self._flat[lo:hi]
        if self._is_torch:
            chunk = self._narrow_torch(chunk, lo).cpu().numpy()
        elif chunk.dtype == np.float64:
            chunk = self._narrow_numpy(chunk, lo)
        return chunk if chunk.dtype == np.float32 else chunk.astype(np.float32)

    def torch_chunk(self, lo: int, hi: int, device: Any) -> Any:
        """Values ``lo:hi`` as a float32 torch tensor on ``device``."""
        import torch

        if self._is_torch:
            return self._narrow_torch(self._flat[lo:hi], lo).to(device)
        return torch.from_numpy(np.ascontiguousarray(self.numpy_chunk(lo, hi))).to(device)

    def _narrow_numpy(self, chunk: np.ndarray, lo: int) -> np.ndarray:
        with np.errstate(over="ignore"):
            narrowed = chunk.astype(np.float32)
        self._check_overflow(np.isfinite(chunk) & ~np.isfinite(narrowed), chunk, lo)
        return narrowed

    def _narrow_torch(self, chunk: Any, lo: int) -> Any:
        import torch

        narrowed = chunk.to(torch.float32)
        if chunk.dtype == torch.float64:
            overflow = (torch.isfinite(chunk) & ~torch.isfinite(narrowed)).cpu().numpy()
            self._check_overflow(overflow, chunk.cpu().numpy(), lo)
        return narrowed

    def _check_overflow(self, overflow: np.ndarray, chunk: np.ndarray, lo: int) -> None:
        if overflow.any():
            local = int(np.flatnonzero(overflow)[0])
            where = tuple(int(i) for i in np.unravel_index(lo + local, self.shape))
            raise NonFiniteValueError(
                f"float64 value(s) overflow float32, the first at index {where} (value {float(chunk[local])!r}). "
                "Scale the tensor or clip it before quantizing."
            )

    def raise_non_finite(self, chunk_values: int) -> None:
        """Count the NaN/inf values chunk by chunk and raise an error that says where the first is."""
        n_nan = n_inf = 0
        first = -1
        for lo in range(0, self.size, chunk_values):
            chunk = self.numpy_chunk(lo, min(lo + chunk_values, self.size))
            nan, inf = np.isnan(chunk), np.isinf(chunk)
            n_nan += int(nan.sum())
            n_inf += int(inf.sum())
            if first < 0 and (nan.any() or inf.any()):
                local = int(np.flatnonzero(nan | inf)[0])
                first, value = lo + local, float(chunk[local])
        index = tuple(int(i) for i in np.unravel_index(first, self.shape))
        where = f"row {index[0]}, column {index[1]}" if len(self.shape) == 2 else f"index {index}"
        raise NonFiniteValueError(
            f"Cannot quantize: {n_nan + n_inf} non-finite value(s) ({n_nan} NaN, {n_inf} inf), "
            f"the first at {where} (value {value!r}). Fix the weights (e.g. a diverged fine-tune) before exporting."
        )
