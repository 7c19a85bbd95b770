"""llmdeploy.merge.lora: the pure merge math, bit-identical to PEFT's layers in float32.

Each example builds a one-layer PEFT model (Linear, transformers' Conv1D for fan_in_fan_out,
Embedding), gives its adapter random weights and compares llmdeploy's delta and merged weight
with PEFT's ``get_delta_weight`` and ``merge(safe_merge=True)`` — exact equality: the same
float32 expressions in the same order.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from llmdeploy.merge.lora import (
    DoraTerm,
    LoraBiasTerm,
    LoraTerm,
    TokenRowsTerm,
    apply_terms,
    embedding_delta,
    lora_delta,
    lora_scaling,
)
from llmdeploy.merge.plan import Scratch, merge_tensor


class _Toy(torch.nn.Module):
    def __init__(self, n_in: int, n_out: int, kind: str, bias: bool) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        if kind == "linear":
            self.layer = torch.nn.Linear(n_in, n_out, bias=bias)
        elif kind == "conv1d":  # GPT-2's layer: weight stored (in, out)
            self.layer = Conv1D(n_out, n_in)
        else:
            self.layer = torch.nn.Embedding(n_in, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def _peft_layer(kind, n_in, n_out, r, alpha, *, rslora=False, dora=False, lora_bias=False, seed=0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    toy = _Toy(n_in, n_out, kind, bias=lora_bias)
    with torch.no_grad():
        for p in toy.parameters():
            p.normal_(0, 0.5)
    cfg = LoraConfig(
        r=r, lora_alpha=alpha, target_modules=["layer"], use_rslora=rslora, use_dora=dora, lora_bias=lora_bias,
        fan_in_fan_out=kind == "conv1d", init_lora_weights=False,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(toy, cfg)
    layer = pm.base_model.model.layer
    with torch.no_grad():
        for n, p in layer.named_parameters():
            if "lora_" in n and "magnitude" not in n:
                p.normal_(0, 0.3)
            elif "magnitude" in n:
                p.mul_(1.2)
    return layer


def _term(layer, kind):
    ad = "default"
    if kind == "embedding":
        A, B = layer.lora_embedding_A[ad], layer.lora_embedding_B[ad]
    else:
        A, B = layer.lora_A[ad].weight, layer.lora_B[ad].weight
    args = (A.detach(), B.detach(), layer.scaling[ad])
    kw = dict(fan_in_fan_out=kind == "conv1d", embedding=kind == "embedding")
    if ad in layer.lora_variant:
        return DoraTerm(*args, **kw, magnitude=layer.lora_magnitude_vector[ad].weight.detach())
    return LoraTerm(*args, **kw)


@given(
    kind=st.sampled_from(["linear", "conv1d", "embedding"]),
    n_in=st.integers(1, 24),
    n_out=st.integers(1, 24),
    r=st.integers(1, 8),
    alpha=st.integers(1, 64),
    rslora=st.booleans(),
    dora=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_delta_and_merge_equal_peft_bit_for_bit(kind, n_in, n_out, r, alpha, rslora, dora, seed):
    layer = _peft_layer(kind, n_in, n_out, r, alpha, rslora=rslora, dora=dora, seed=seed)
    term = _term(layer, kind)
    assert term.scaling == lora_scaling(alpha, r, use_rslora=rslora)
    base = layer.get_base_layer().weight.detach().clone()
    assert term.problem(tuple(base.shape)) is None
    with torch.no_grad():
        assert torch.equal(term.delta(), layer.get_delta_weight("default"))
        ours = apply_terms(base, [term])
        in_scratch = apply_terms(base, [term], buffers=Scratch()).clone()
        layer.merge(safe_merge=True)
    assert torch.equal(ours, layer.get_base_layer().weight.detach())
    assert torch.equal(in_scratch, ours)  # the buffered path (scaling folded into B when 2**k) is the same
    assert torch.equal(base, apply_terms(base, []))  # no term: the base, unchanged


@given(
    out_f=st.integers(1, 300),
    in_f=st.integers(1, 300),
    r=st.sampled_from([1, 4, 8, 16, 64]),
    scalings=st.lists(st.sampled_from([1.0, 2.0, 4.0, 0.5, 16 / math.sqrt(8), 3.0, 2.0**20]), min_size=1, max_size=3),
    fan_in_fan_out=st.booleans(),
    embedding=st.booleans(),
    dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
    seed=st.integers(0, 2**16),
)
def test_buffered_merge_is_bit_identical(out_f, in_f, r, scalings, fan_in_fan_out, embedding, dtype, seed):
    """apply_terms with scratch buffers (the writer's path) gives the bits of the plain expressions,
    PEFT's, for several adapters in a row, both layouts, 16/32-bit bases, and every kind of scaling:
    1, powers of two (folded into B), others (multiplied after the matmul)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(out_f, in_f, generator=g).to(dtype)
    terms = []
    for s in scalings:
        if embedding:  # A (r, num), B (dim, r); the base is (num, dim)
            A, B = torch.randn(r, out_f, generator=g), torch.randn(in_f, r, generator=g)
        else:
            shape_out, shape_in = (in_f, out_f) if fan_in_fan_out else (out_f, in_f)
            A, B = torch.randn(r, shape_in, generator=g), 0.1 * torch.randn(shape_out, r, generator=g)
        terms.append(LoraTerm(A, B, s, fan_in_fan_out=fan_in_fan_out and not embedding, embedding=embedding))
    scratch = Scratch()
    plain = apply_terms(base, terms)
    for _ in range(2):  # the second time in buffers that already hold the first result
        assert torch.equal(apply_terms(base, terms, buffers=scratch), plain)


def test_merge_tensor_reuses_its_buffers():
    """The float32 intermediates live in the scratch buffers (allocated once, grown to the largest
    tensor); every merged tensor is a new tensor of its own."""
    scratch = Scratch()
    A, B = torch.randn(4, 64), torch.randn(32, 4)
    w = torch.randn(32, 64).bfloat16()
    first = merge_tensor(w, [LoraTerm(A, B, 2.0)], dtype=torch.bfloat16, module="m", name="m.weight", scratch=scratch)
    ptrs = {k: b.data_ptr() for k, b in scratch._buffers.items()}
    second = merge_tensor(w, [LoraTerm(A, B, 3.0)], dtype=torch.bfloat16, module="m", name="m.weight", scratch=scratch)
    assert {k: b.data_ptr() for k, b in scratch._buffers.items()} == ptrs
    assert first.data_ptr() != second.data_ptr() and not torch.equal(first, second)
    assert torch.equal(first, (w.float() + (B @ A) * 2.0).bfloat16())


def test_lora_bias_equals_peft():
    layer = _peft_layer("linear", 12, 10, 4, 8, lora_bias=True)
    bias = layer.get_base_layer().bias.detach().clone()
    term = LoraBiasTerm(layer.lora_B["default"].bias.detach(), layer.scaling["default"])
    with torch.no_grad():
        ours = apply_terms(bias, [term])
        layer.merge(safe_merge=True)
    assert torch.equal(ours, layer.get_base_layer().bias.detach())


def test_scaling():
    assert lora_scaling(16, 8) == 2.0
    assert lora_scaling(16, 4, use_rslora=True) == 16 / math.sqrt(4) == 8.0


def test_delta_shapes_and_fan_in_fan_out():
    A, B = torch.randn(3, 7), torch.randn(5, 3)
    assert lora_delta(A, B, 1.0).shape == (5, 7)
    assert torch.equal(lora_delta(A, B, 2.0, fan_in_fan_out=True), (B @ A).T * 2.0)
    eA, eB = torch.randn(3, 11), torch.randn(6, 3)  # Embedding: A (r, num), B (dim, r)
    assert embedding_delta(eA, eB, 1.0).shape == (11, 6)


def test_bf16_inputs_are_computed_in_float32():
    A, B = torch.randn(4, 16).bfloat16(), torch.randn(16, 4).bfloat16()
    d = lora_delta(A, B, 0.5)
    assert d.dtype == torch.float32 and torch.equal(d, (B.float() @ A.float()) * 0.5)
    w = torch.randn(16, 16).bfloat16()
    assert apply_terms(w, [LoraTerm(A, B, 0.5)]).dtype == torch.float32


def test_token_rows_replace_rows():
    w = torch.zeros(6, 3)
    rows = torch.arange(6.0).reshape(2, 3)
    term = TokenRowsTerm((4, 1), rows)
    out = apply_terms(w, [term])
    assert torch.equal(out[4], rows[0]) and torch.equal(out[1], rows[1]) and out[[0, 2, 3, 5]].abs().sum() == 0
    assert term.problem((6, 3)) is None
    assert term.problem((3, 3)) == "token indices [4] are outside the embedding's 3 rows"
    assert term.problem((6, 4)) == "trainable_tokens_delta (2, 3) should be (2, 4) for an embedding of shape (6, 4)"


@pytest.mark.parametrize(
    ("term", "shape", "message"),
    [
        (LoraTerm(torch.zeros(4, 8), torch.zeros(6, 4), 1.0), (6, 9),
         "lora_A (4, 8) @ lora_B (6, 4) gives a (6, 8) update for a base weight of shape (6, 9)"),
        (LoraTerm(torch.zeros(4, 8), torch.zeros(6, 3), 1.0), (6, 8),
         "lora_A (4, 8) and lora_B (6, 3) disagree on the rank"),
        (LoraTerm(torch.zeros(4, 8), torch.zeros(6, 4), 1.0, embedding=True), (6, 8),
         "lora_embedding_A (4, 8) @ lora_embedding_B (6, 4) gives a (8, 6) update for a base weight of shape (6, 8)"),
        (DoraTerm(torch.zeros(4, 8), torch.zeros(6, 4), 1.0, magnitude=torch.ones(5)), (6, 8),
         "lora_magnitude_vector (5,) should be (6,) for a weight of shape (6, 8)"),
        (LoraBiasTerm(torch.zeros(5), 1.0), (6,), "lora_B.bias (5,) for a base bias of shape (6,)"),
    ],
)  # fmt: skip
def test_shape_problems_are_described(term, shape, message):
    assert term.problem(shape) == message


def test_dora_norm_uses_the_unmerged_base():
    """With an earlier adapter merged (W = W0 + Δ1), DoRA's norm is still ||W0 + Δ2|| (PEFT's forward)."""
    torch.manual_seed(0)
    w0 = torch.randn(5, 7)
    first = LoraTerm(torch.randn(2, 7), torch.randn(5, 2), 1.0)
    dora = DoraTerm(torch.randn(2, 7), torch.randn(5, 2), 0.5, magnitude=torch.rand(5) + 0.5)
    got = apply_terms(w0, [first, dora])
    d2 = dora.delta()
    factor = (dora.magnitude / torch.linalg.norm(w0 + d2, dim=1)).view(-1, 1)
    torch.testing.assert_close(got, factor * (w0 + first.delta() + d2), rtol=0, atol=0)


@pytest.mark.parametrize("chunk", [1, 5, 64, 10**9])
@pytest.mark.parametrize(("fan_in_fan_out", "embedding"), [(False, False), (True, False), (False, True)])
def test_buffered_merge_converts_the_base_in_row_chunks(chunk, fan_in_fan_out, embedding, monkeypatch):
    """W0 is converted to float32 a few rows at a time (elementwise, so the chunking cannot change a bit)."""
    from llmdeploy.merge import lora

    monkeypatch.setattr(lora, "_CHUNK", chunk)
    g = torch.Generator().manual_seed(chunk)
    base = torch.randn(37, 23, generator=g).bfloat16()
    if embedding:
        A, B = torch.randn(4, 37, generator=g), torch.randn(23, 4, generator=g)
    elif fan_in_fan_out:
        A, B = torch.randn(4, 37, generator=g), torch.randn(23, 4, generator=g)
    else:
        A, B = torch.randn(4, 23, generator=g), torch.randn(37, 4, generator=g)
    kw = dict(fan_in_fan_out=fan_in_fan_out, embedding=embedding)
    terms = [LoraTerm(A, B, 2.0, **kw), LoraTerm(A, B, 3.0, **kw)]
    assert torch.equal(apply_terms(base, terms, buffers=Scratch()), apply_terms(base, terms))
