"""numba plumbing for the fast kernels, and the scalar float32 helpers they share.

Every fast kernel is compiled with :func:`kernel`:

* ``fastmath=False``: LLVM may then neither reorder float operations nor
  contract ``a*b+c`` into an FMA, so each float32 operation rounds exactly as
  in ggml's C code (which ggml-base builds without ``-march=native``).
* ``error_model="numpy"``: a float division by zero gives inf/nan as in C,
  instead of raising ``ZeroDivisionError``.
* ``nogil=True``: :mod:`llmdeploy.quants.base` runs kernels on row chunks from
  a thread pool.

numba types ``float32 op int`` and ``float32 op python-float`` as float64, so
every constant below is an ``np.float32`` and integers are cast with ``F32(..)``
before they meet a float.

When numba is missing or broken, :data:`AVAILABLE` is False, the functions
stay plain Python and callers use the (torch) reference kernels instead.
"""

from __future__ import annotations

import os
import platform
from typing import Any, Callable

import numpy as np

F32 = np.float32

try:  # pragma: no cover - exercised by the import itself
    if os.environ.get("LLMDEPLOY_DISABLE_NUMBA", "") not in ("", "0"):
        raise ImportError("disabled by LLMDEPLOY_DISABLE_NUMBA")
    import numba
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    AVAILABLE = True
    UNAVAILABLE_REASON = ""
except Exception as exc:  # ImportError, or a numba that fails to initialise
    numba = None
    AVAILABLE = False
    UNAVAILABLE_REASON = f"{type(exc).__name__}: {exc}"


def kernel(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Compile ``fn`` lazily (on first call) with the exactness-preserving flags."""
    if not AVAILABLE:
        return fn
    return numba.njit(fastmath=False, error_model="numpy", nogil=True, cache=True)(fn)


def helper(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Like :func:`kernel`, for small scalar helpers that kernels call (always inlined)."""
    if not AVAILABLE:
        return fn
    return numba.njit(fastmath=False, error_model="numpy", nogil=True, cache=True, inline="always")(fn)


if AVAILABLE:

    @intrinsic
    def f32_bits(typingctx, x):  # type: ignore[no-untyped-def]
        """Reinterpret a float32 as its int32 bit pattern (a register bitcast)."""
        if x != types.float32:
            return None

        def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
            return builder.bitcast(args[0], ir.IntType(32))

        return types.int32(types.float32), codegen

    @intrinsic
    def bits_f32(typingctx, x):  # type: ignore[no-untyped-def]
        """Reinterpret an int32 bit pattern as a float32."""
        if x != types.int32:
            return None

        def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
            return builder.bitcast(args[0], ir.FloatType())

        return types.float32(types.int32), codegen

else:

    def f32_bits(x):  # type: ignore[no-redef]
        return int(np.array([x], np.float32).view(np.int32)[0])

    def bits_f32(x):  # type: ignore[no-redef]
        return np.array([x], np.int32).view(np.float32)[0]


_MAGIC = F32(12582912.0)  # 1.5 * 2**23


@helper
def nearest_int(f):  # type: ignore[no-untyped-def]
    """ggml's ``nearest_int``: round half to even through the 1.5*2**23 trick.

    Kept bit for bit (not ``rint``) because ggml drops its range assert, so
    out-of-range, inf and nan inputs must give ggml's garbage: nan -> 0,
    +-inf -> -4194304.
    """
    return (f32_bits(F32(f) + _MAGIC) & 0x7FFFFF) - 0x400000


@helper
def roundf(f):  # type: ignore[no-untyped-def]
    """C ``roundf``/``lroundf`` (half away from zero) of a float32, as an int.

    Done in float64, where ``|f| + 0.5`` is exact for every float32 ``f``.
    """
    a = np.float64(f)
    if a < 0.0:
        return -np.int64(np.floor(-a + 0.5))
    return np.int64(np.floor(a + 0.5))


@helper
def fp32_to_fp16_bits(f):  # type: ignore[no-untyped-def]
    """IEEE binary16 bits of a float32, round to nearest even; nan -> sign | 0x7E00.

    The same result as ggml's ``ggml_compute_fp32_to_fp16`` and numpy's
    ``astype(np.float16)``, written in integer arithmetic because numba has
    no CPU float16 type.
    """
    x = f32_bits(F32(f))
    sign = (x >> 16) & 0x8000
    a = x & 0x7FFFFFFF
    if a > 0x7F800000:  # nan: quiet, sign kept (x86's default nan is negative)
        return sign | 0x7E00
    if a >= 0x477FF000:  # rounds to >= 65520: inf (0x477FF000 is 65520.0)
        return sign | 0x7C00
    if a < 0x38800000:  # below the smallest fp16 normal: subnormal or zero
        # A float32 with biased exponent e is mant * 2**(e-150), i.e.
        # mant >> (126-e) in units of 2**-24 (the fp16 subnormal step); round
        # that shift to nearest even.  Below 2**-25 everything rounds to zero,
        # float32 subnormals included (their missing implicit bit is moot).
        mant = (a & 0x7FFFFF) | 0x800000
        shift = 126 - (a >> 23)
        if shift > 24:
            return sign
        q = mant >> shift
        rem = mant & ((1 << shift) - 1)
        half = 1 << (shift - 1)
        if rem > half or (rem == half and (q & 1) == 1):
            q += 1
        return sign | q
    # normal: rebias exponent (127 -> 15) and round 23 -> 10 mantissa bits
    q = ((a >> 13) - ((127 - 15) << 10)) & 0xFFFF
    rem = a & 0x1FFF
    if rem > 0x1000 or (rem == 0x1000 and (q & 1) == 1):
        q += 1  # a carry into the exponent is the correct rounding
    return sign | q


@helper
def fp16_bits_to_fp32(h):  # type: ignore[no-untyped-def]
    """float32 value of IEEE binary16 bits (exact)."""
    h = np.int32(h)
    sign = (h & 0x8000) << 16
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    if e == 0:
        # zero or subnormal: m * 2**-24, exact in float32
        v = F32(m) * F32(5.9604644775390625e-08)
        return -v if sign else v
    if e == 31:
        return bits_f32(np.int32(sign | 0x7F800000 | (m << 13)))
    return bits_f32(np.int32(sign | ((e + 112) << 23) | (m << 13)))


@helper
def fp16_round(f):  # type: ignore[no-untyped-def]
    """The float32 that ggml reads back after storing ``f`` as fp16."""
    return fp16_bits_to_fp32(fp32_to_fp16_bits(f))


def _hardware_fp16() -> bool:
    """Whether LLVM lowers a float->half ``fptrunc`` to one instruction for numba's target.

    On x86 that needs F16C (every AVX2 CPU has it); without it LLVM would call
    a compiler-rt routine that numba does not link.  A NUMBA_CPU_NAME or
    NUMBA_CPU_FEATURES override (portable caches) may drop the feature, so
    then the integer code is used.
    """
    if not AVAILABLE:
        return False
    from numba.core import config

    if config.CPU_NAME or config.CPU_FEATURES:
        return False
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        import llvmlite.binding as llvm

        return bool(llvm.get_host_cpu_features().get("f16c", False))
    return machine in ("aarch64", "arm64")


HARDWARE_FP16 = _hardware_fp16()

if HARDWARE_FP16:

    @intrinsic
    def _fp16_bits_hw(typingctx, x):  # type: ignore[no-untyped-def]
        """IEEE binary16 bits of a float32 (LLVM ``fptrunc``: round to nearest even)."""
        if x != types.float32:
            return None

        def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
            half = builder.fptrunc(args[0], ir.HalfType())
            return builder.zext(builder.bitcast(half, ir.IntType(16)), ir.IntType(32))

        return types.int32(types.float32), codegen

    @helper
    def fp16_bits(f):  # type: ignore[no-untyped-def]
        """fp16 bits of a float32 with the F16C instruction: ten times faster than
        :func:`fp32_to_fp16_bits` and equal to it except for NaN payloads (a NaN
        made by arithmetic is x86's default NaN, which both map to 0xFE00)."""
        return _fp16_bits_hw(F32(f))

else:
    fp16_bits = fp32_to_fp16_bits
