"""llmdeploy.gguf.tokenizer against llama.cpp itself (llama-cpp-python 0.3.36).

1. The converter: for each (architecture, tokenizer) the KVs equal the ``tokenizer.*`` KVs that
   ``convert_hf_to_gguf.py`` writes for the same folder: values, GGUF types and order.
2. The consumer: a vocab-only GGUF holding our KVs, loaded by llama.cpp, tokenizes like the
   tokenizer it came from (and like llama.cpp's own ``ggml-vocab-*.gguf.inp/.out`` vectors).
"""

from __future__ import annotations

import ast
import functools
import json
import pathlib
import re
import subprocess
import sys
import types
from typing import Any

import gguf
import pytest

from llmdeploy.errors import MissingFileError, UnsupportedTokenizerError
from llmdeploy.gguf import _pretokenizers
from llmdeploy.gguf.tokenizer import tokenizer_metadata
from llmdeploy.source import open_source

from .. import models
from ..llamacpp import _key, build_once, cache_dir, convert, source_dir

# Small bodies: the tokenizer is what is under test, and big vocabularies make big embeddings.
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)

# (architecture, tokenizer): the converter's vocab path
CASES = [
    ("LlamaForCausalLM", "tiny-spm"),  # SentencePiece (tokenizer.model)
    ("LlamaForCausalLM", "llama-spm"),  # no tokenizer.model: HF-fast fallback (LlamaHfVocab)
    ("LlamaForCausalLM", "phi-3"),  # LlamaHfVocab with added CONTROL/USER_DEFINED tokens
    ("LlamaForCausalLM", "llama-bpe"),  # BPE, Llama 3
    ("LlamaForCausalLM", "gpt-2"),  # BPE, gpt-2 pre-tokenizer
    ("MistralForCausalLM", "tiny-spm"),
    ("Qwen2ForCausalLM", "qwen2"),  # BPE, qwen2 pre-tokenizer
    ("Qwen3MoeForCausalLM", "qwen2"),  # BPE always (TextModel default)
    ("GemmaForCausalLM", "tiny-spm"),  # + eot 107, add_space_prefix False
    ("Gemma2ForCausalLM", "tiny-spm"),
    ("Gemma3ForCausalLM", "tiny-spm"),
    ("Phi3ForCausalLM", "tiny-spm"),  # Phi-3's own SentencePiece variant
    ("Phi3ForCausalLM", "gpt-2"),  # GPT2Tokenizer: BPE (the Phi-4 path)
]  # fmt: skip
IDS = [f"{arch.removesuffix('ForCausalLM')}-{tok}" for arch, tok in CASES]


@functools.lru_cache(maxsize=None)
def all_fields(path: pathlib.Path) -> dict[str, tuple[list[Any], Any]]:
    """``key -> (GGUF types, value)`` of every KV of a GGUF, in file order (read once: big vocabs are slow)."""
    reader = gguf.GGUFReader(path)
    return {k: (list(f.types), f.contents()) for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def fields(path: pathlib.Path, prefix: str = "tokenizer.") -> dict[str, tuple[list[Any], Any]]:
    return {k: v for k, v in all_fields(path).items() if k.startswith(prefix)}


def write_vocab_gguf(path: pathlib.Path, converted: pathlib.Path, kvs: list[tuple[str, Any, Any]]) -> pathlib.Path:
    """A vocab-only GGUF: the converter's non-tokenizer KVs, then ours."""
    kept = all_fields(converted)
    writer = gguf.GGUFWriter(path, kept["general.architecture"][1])
    for key, (value_types, value) in kept.items():
        # general.name: llama.cpp keys Phi-3 token fixes on it (and crashes if </s>, <unk>, <s> or
        # <|endoftext|> is missing), which a test vocabulary need not have.
        if key.startswith("tokenizer.") or key in ("general.architecture", "general.name"):
            continue
        sub_type = value_types[1] if value_types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, value_types[0], sub_type)
    for key, value, value_type in kvs:
        writer.add_key_value(key, value, value_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return path


def case_folder(arch: str, tok: str) -> pathlib.Path:
    return models.model_folder(arch, tokenizer=tok, **SMALL)


@pytest.fixture(scope="module")
def ours(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """case -> (converter GGUF, our vocab-only GGUF, our KVs), built once per module."""
    built: dict[str, tuple[pathlib.Path, pathlib.Path, list[Any]]] = {}
    out = tmp_path_factory.mktemp("vocab")

    def get(arch: str, tok: str) -> tuple[pathlib.Path, pathlib.Path, list[Any]]:
        name = f"{arch}-{tok}"
        if name not in built:
            folder = case_folder(arch, tok)
            converted = convert(folder)
            kvs = tokenizer_metadata(open_source(folder))
            built[name] = (converted, write_vocab_gguf(out / f"{name}.gguf", converted, kvs), kvs)
        return built[name]

    return get


# --------------------------------------------------------------------------- 1. the converter


@pytest.mark.parametrize(("arch", "tok"), CASES, ids=IDS)
def test_kvs_equal_the_converters(ours: Any, arch: str, tok: str) -> None:
    """Every tokenizer.* KV of convert_hf_to_gguf.py, same value, same GGUF type (and array item type), same order."""
    converted, mine, _ = ours(arch, tok)
    expected, got = fields(converted), fields(mine)
    assert list(got) == list(expected)
    for key in expected:
        assert got[key] == expected[key], key


def test_value_types_are_explicit(ours: Any) -> None:
    """Guards the contract with the writer: scalars typed as the converter types them, arrays as ARRAY."""
    _, _, kvs = ours("GemmaForCausalLM", "tiny-spm")
    by_key = {key: (value, value_type) for key, value, value_type in kvs}
    assert by_key["tokenizer.ggml.model"] == ("llama", gguf.GGUFValueType.STRING)
    assert by_key["tokenizer.ggml.eot_token_id"] == (107, gguf.GGUFValueType.UINT32)
    assert by_key["tokenizer.ggml.add_space_prefix"] == (False, gguf.GGUFValueType.BOOL)
    tokens, value_type = by_key["tokenizer.ggml.tokens"]
    assert value_type == gguf.GGUFValueType.ARRAY and len(tokens) == 512 and all(isinstance(t, str) for t in tokens)
    assert all(isinstance(s, float) for s in by_key["tokenizer.ggml.scores"][0])


def test_gemma3_turn_tokens_follow_the_converter(ours: Any, tmp_path: pathlib.Path) -> None:
    """Gemma 3's <start_of_turn>/<end_of_turn>: CONTROL when tokenizer_config marks them special.

    With ``added_tokens_decoder`` (how Google's Gemma 3 folders ship) the converter writes CONTROL;
    a folder saved by transformers 5 has no ``added_tokens_decoder``, and the converter then keeps
    the SentencePiece type: user-defined pieces become NORMAL.  We match it both ways.
    """
    folder = case_folder("Gemma3ForCausalLM", "tiny-spm")
    turn_ids = {"<start_of_turn>": 3, "<end_of_turn>": 4}  # user_defined_symbols of tiny-spm

    _, mine, _ = ours("Gemma3ForCausalLM", "tiny-spm")
    token_types = fields(mine)["tokenizer.ggml.token_type"][1]
    assert [token_types[i] for i in turn_ids.values()] == [gguf.TokenType.NORMAL] * 2

    google_style = tmp_path / folder.name
    google_style.mkdir()
    for f in folder.iterdir():
        (google_style / f.name).write_bytes(f.read_bytes())
    config = json.loads((google_style / "tokenizer_config.json").read_text())
    flags = dict(lstrip=False, normalized=False, rstrip=False, single_word=False, special=True)
    config["added_tokens_decoder"] = {str(i): dict(content=text, **flags) for text, i in turn_ids.items()}
    (google_style / "tokenizer_config.json").write_text(json.dumps(config))
    expected = fields(convert(google_style))
    kvs = tokenizer_metadata(open_source(google_style))
    mine = write_vocab_gguf(tmp_path / "ours.gguf", convert(google_style), kvs)
    got = fields(mine)
    assert got == expected
    assert [got["tokenizer.ggml.token_type"][1][i] for i in turn_ids.values()] == [gguf.TokenType.CONTROL] * 2
    # ... and llama.cpp then reads each turn marker as one token, as SentencePiece does.
    text = "Hi <start_of_turn>user\nHello!<end_of_turn>\n<start_of_turn>model\n"
    expected_ids = _sentencepiece_reference(google_style, mine)(text, False)
    assert llama_vocab(mine).tokenize(text.encode(), add_bos=False, special=True) == expected_ids
    assert expected_ids.count(turn_ids["<start_of_turn>"]) == 2


def test_phi3_without_tokenizer_model_is_refused_like_the_converter() -> None:
    """Phi-3 reads only tokenizer.model (unless GPT2Tokenizer): the converter fails, we say what is missing."""
    folder = case_folder("Phi3ForCausalLM", "phi-3")
    with pytest.raises(subprocess.CalledProcessError) as converter:
        convert(folder)
    assert b"tokenizer.model" in converter.value.stderr
    with pytest.raises(MissingFileError, match="tokenizer.model"):
        tokenizer_metadata(open_source(folder))


def test_unknown_bpe_pre_tokenizer_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Gemma 3 with Gemma 4's tokenizer (no tokenizer.model): the BPE path, a hash llama.cpp does not know."""
    monkeypatch.setattr(models, "tokenizer_folder", _tokenizer_folder_with_gemma4)
    folder = case_folder("Gemma3ForCausalLM", "gemma-4")
    with pytest.raises(subprocess.CalledProcessError) as converter:
        convert(folder)
    stderr = converter.value.stderr.decode()
    assert "BPE pre-tokenizer was not recognized" in stderr
    (converter_hash,) = re.findall(r"chkhsh:\s+([0-9a-f]{64})", stderr)
    with pytest.raises(UnsupportedTokenizerError, match=converter_hash):
        tokenizer_metadata(open_source(folder))


def test_no_tokenizer_files_is_a_clear_error(tmp_path: pathlib.Path) -> None:
    with pytest.raises(MissingFileError, match="tokenizer.save_pretrained"):
        tokenizer_metadata(types.SimpleNamespace(config={"architectures": ["LlamaForCausalLM"]}, folder=tmp_path))
    with pytest.raises(MissingFileError, match="tokenizer="):
        tokenizer_metadata(types.SimpleNamespace(config={"architectures": ["LlamaForCausalLM"]}, folder=None))


@pytest.mark.parametrize(
    ("arch", "tok"),
    [("Qwen2ForCausalLM", "qwen2"), ("LlamaForCausalLM", "tiny-spm")],
    ids=["Qwen2-qwen2", "Llama-tiny-spm"],
)
def test_tokenizer_object_gives_the_folders_kvs(ours: Any, arch: str, tok: str) -> None:
    """tokenizer= (an HF tokenizer object, no folder) is exported as its folder; its tokenizer.model comes along."""
    from transformers import AutoTokenizer

    _, _, kvs = ours(arch, tok)
    folder = case_folder(arch, tok)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    assert tokenizer_metadata(types.SimpleNamespace(config=open_source(folder).config, folder=None), tokenizer) == kvs


def test_pre_tokenizer_table_is_the_converters() -> None:
    """The hash table (data file) equals get_vocab_base_pre of the converter, later duplicates winning."""
    text = (source_dir() / "conversion" / "base.py").read_text(encoding="utf-8")
    body = text[text.index("def get_vocab_base_pre") : text.index("Marker: End get_vocab_base_pre")]
    assert ast.literal_eval(re.search(r"chktxt = (.*)\n", body).group(1)) == _pretokenizers.CHECK_TEXT
    table: dict[str, str] = {}
    for digest, name in re.findall(r'chkhsh == "([0-9a-f]{64})":\s*\n(?:\s*#.*\n)*\s*res = "([^"]+)"', body):
        table[digest] = name
    assert len(re.findall(r"chkhsh == ", body)) == len(re.findall(r'res = "', body))
    assert table == _pretokenizers.PRE_TOKENIZER_BY_HASH


_ADDED = ["<unk>", "<s>", "</s>", "<pad>", "<cls>", "<sep>", "<|eot|>"]
_POST_PROCESSORS = {
    "none": None,
    "byte-level": {"type": "ByteLevel"},
    "llama3": {"type": "Sequence", "processors": [
        {"type": "ByteLevel"},
        {"type": "TemplateProcessing",
         "single": [{"SpecialToken": {"id": "<s>"}}, {"Sequence": {"id": "A"}}],
         "pair": [{"SpecialToken": {"id": "<s>"}}, {"Sequence": {"id": "A"}}, {"SpecialToken": {"id": "<s>"}},
                  {"Sequence": {"id": "B"}}]},
    ]},
    "eos-last": {"type": "TemplateProcessing",
                 "single": [{"Sequence": {"id": "A"}}, {"SpecialToken": {"id": "</s>"}}],
                 "pair": [{"Sequence": {"id": "A"}}, {"SpecialToken": {"id": "</s>"}}, {"Sequence": {"id": "B"}},
                          {"SpecialToken": {"id": "</s>"}}]},
    "bert": {"type": "TemplateProcessing",
             "single": [{"SpecialToken": {"id": "<cls>"}}, {"Sequence": {"id": "A"}}, {"SpecialToken": {"id": "<sep>"}}],
             "pair": [{"SpecialToken": {"id": "<cls>"}}, {"Sequence": {"id": "A"}}, {"SpecialToken": {"id": "<sep>"}},
                      {"Sequence": {"id": "B"}}, {"SpecialToken": {"id": "<sep>"}}]},
    "pair-separator": {"type": "TemplateProcessing",
                       "single": [{"SpecialToken": {"id": "<s>"}}, {"Sequence": {"id": "A"}}],
                       "pair": [{"SpecialToken": {"id": "<s>"}}, {"Sequence": {"id": "A"}},
                                {"SpecialToken": {"id": "</s>"}}, {"SpecialToken": {"id": "</s>"}},
                                {"Sequence": {"id": "B"}}]},
    "roberta": {"type": "RobertaProcessing", "cls": ["<s>", 1], "sep": ["</s>", 2]},
    "eot-last": {"type": "TemplateProcessing",
                 "single": [{"SpecialToken": {"id": "<s>"}}, {"Sequence": {"id": "A"}}, {"SpecialToken": {"id": "<|eot|>"}}]},
    "unknown-first": {"type": "TemplateProcessing",
                      "single": [{"SpecialToken": {"id": "<pad>"}}, {"Sequence": {"id": "A"}}]},
}  # fmt: skip
_TOKENIZER_CONFIGS = {
    "missing": None,
    "empty": {},
    "llama": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": False,
              "add_eos_token": True, "chat_template": "{{ messages }}"},
    "bert": {"cls_token": "<cls>", "sep_token": "<sep>", "pad_token": {"content": "<pad>", "special": True}},
    "named-templates": {"eos_token": "</s>", "chat_template": [{"name": "default", "template": "a"},
                                                               {"name": "tool use", "template": "b"}]},
}  # fmt: skip
_NORMALIZERS = {
    "none": None,
    "lowercase": {"type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "Lowercase"}]},
    "bert": {"type": "BertNormalizer", "lowercase": False, "strip_accents": True},
}
_SPECIAL_VOCAB_DUMP = """
import json, sys
sys.path.insert(0, sys.argv[1])
from gguf.vocab import SpecialVocab
out = []
for folder, kwargs in json.loads(sys.argv[2]):
    v = SpecialVocab(folder, **kwargs)
    out.append([v.merges, list(v.special_token_ids.items()), list(v.add_special_token.items()), v.chat_template,
                v.normalizer_lowercase, v.normalizer_strip_accents])
print(json.dumps(out))
"""


def test_special_tokens_equal_the_converters_special_vocab(tmp_path: pathlib.Path) -> None:
    """_SpecialTokens == the converter's own gguf-py SpecialVocab (newer than PyPI's) on post-processor variants.

    Guards the places where PyPI's gguf 0.19 differs from llama.cpp 0.3.36's: ByteLevel defaults,
    post-processor over tokenizer_config precedence, unknown leading template tokens, normalizer flags.
    """
    from llmdeploy.gguf.tokenizer import _SpecialTokens

    runs: list[tuple[str, dict[str, Any]]] = []
    for i, (post, config, normalizer) in enumerate(
        (p, c, n) for p in _POST_PROCESSORS for c in _TOKENIZER_CONFIGS for n in _NORMALIZERS
    ):
        folder = tmp_path / f"{i}-{post}-{config}-{normalizer}"
        folder.mkdir()
        tokenizer_json = {
            "added_tokens": [{"id": i, "content": t, "special": True} for i, t in enumerate(_ADDED)],
            "normalizer": _NORMALIZERS[normalizer], "post_processor": _POST_PROCESSORS[post],
            "model": {"type": "BPE", "merges": [["a", "b"], ["a b", "c"]] if i % 2 else ["a b", "ab c"]},
        }  # fmt: skip
        (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json))
        if _TOKENIZER_CONFIGS[config] is not None:
            (folder / "tokenizer_config.json").write_text(json.dumps(_TOKENIZER_CONFIGS[config]))
        if i % 3 == 0:
            (folder / "chat_template.jinja").write_text("{{ jinja }}")
        config_json = {"eos_token_id": [2, 6], "pad_token_id": 3, "bos_token_id": 1}
        (folder / "config.json").write_text(json.dumps(config_json))
        runs.append((str(folder), {"load_merges": True}))
        runs.append((str(folder), {"n_vocab": 3, "special_token_types": ["prefix", "middle", "eot"]}))
    dumped = subprocess.run(
        [sys.executable, "-c", _SPECIAL_VOCAB_DUMP, str(source_dir() / "gguf-py"), json.dumps(runs)],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    for (folder, kwargs), expected in zip(runs, json.loads(dumped), strict=True):
        kinds = tuple(kwargs.get("special_token_types", ("bos", "eos", "unk", "sep", "pad", "cls", "mask")))
        load_merges, n_vocab = kwargs.get("load_merges", False), kwargs.get("n_vocab")
        got = _SpecialTokens(pathlib.Path(folder), load_merges=load_merges, kinds=kinds, n_vocab=n_vocab)
        assert [got.merges, list(map(list, got.ids.items())), list(map(list, got.add.items())), got.chat_template,
                got.lowercase, got.strip_accents] == expected, (folder, kwargs)  # fmt: skip


# --------------------------------------------------------------------------- 2. the consumer

TEXTS = [
    "Hello world",
    " Hello  World! How's it going?",
    "The quick brown fox jumps over the lazy dog.",
    "Ünïcödé tëxt, emoji 🙂🦙 and CJK 漢字かなカナ; нещо на Български",
    "tabs\tand  double  spaces\n\n\n   trailing   ",
    "    \n\t\t \n",
    "3.14159, 2.71828, 1e-5, 0xDEADBEEF, 1,000,000 and 1234567890",
    "def main(argv):\n    return sum(int(a) for a in argv[1:])  # 12345 67890\n",
    'if (x != y) { printf("%d\\n", x << 2); }',
]
# Where llama.cpp's converter itself writes a vocabulary that llama.cpp tokenizes differently from
# the source tokenizer.  We match the converter (test 1), so these fail on our file as on its.
LLAMA_HF_SCORES = (
    "no tokenizer.model: the converter's LlamaHfVocab gives every token score -1000, so llama.cpp's "
    "SentencePiece merges ignore the BPE ranks ('ied' -> '▁ied' instead of 'i' 'ed')"
)
USER_DEFINED_AS_NORMAL = (
    "tokenizer_config.json without added_tokens_decoder (transformers 5): the converter keeps the "
    "SentencePiece type, so user-defined pieces like <start_of_turn> are NORMAL and llama.cpp splits them"
)
CONVERTER_DIVERGES = {
    "text": {"LlamaForCausalLM-llama-spm": LLAMA_HF_SCORES, "LlamaForCausalLM-phi-3": LLAMA_HF_SCORES},
    "special": {
        "LlamaForCausalLM-llama-spm": LLAMA_HF_SCORES,
        "LlamaForCausalLM-phi-3": LLAMA_HF_SCORES,
        **{f"{arch}-tiny-spm": USER_DEFINED_AS_NORMAL for arch in (
            "LlamaForCausalLM", "MistralForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM")},
    },
}  # fmt: skip


def expect_converter_divergence(request: pytest.FixtureRequest, what: str, arch: str, tok: str) -> None:
    if reason := CONVERTER_DIVERGES[what].get(f"{arch}-{tok}"):
        request.applymarker(pytest.mark.xfail(strict=True, raises=AssertionError, reason=reason))


def reference(arch: str, tok: str, gguf_path: pathlib.Path) -> tuple[Any, list[str]]:
    """``encode(text, add_special)`` of the tokenizer the GGUF came from (None: unknown), and its added tokens."""
    folder = case_folder(arch, tok)
    if tok == "tiny-spm":
        return _sentencepiece_reference(folder, gguf_path), ["<start_of_turn>", "<end_of_turn>"]
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(folder))
    specials = [t.content for t in hf.added_tokens_decoder.values()][:8]
    return (lambda text, add_special: hf.encode(text, add_special_tokens=add_special)), specials


def _sentencepiece_reference(folder: pathlib.Path, gguf_path: pathlib.Path) -> Any:
    """tiny-spm's SentencePiece model, normalized the way llama.cpp's SPM tokenizer normalizes.

    The SentencePiece model is what the converter reads for every architecture (its HF tokenizer
    is a Llama one, which Gemma's export overrides with add_space_prefix False).  llama.cpp does no
    NFKC, keeps whitespace runs and adds the dummy prefix per ``add_space_prefix``; tiny-spm was
    trained with SentencePiece's defaults, so those are switched to match.
    """
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((folder / "tokenizer.model").read_bytes())
    add_space_prefix = fields(gguf_path).get("tokenizer.ggml.add_space_prefix", (None, True))[1]
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.precompiled_charsmap = b""
    proto.normalizer_spec.remove_extra_whitespaces = False
    proto.normalizer_spec.add_dummy_prefix = bool(add_space_prefix)
    processor = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    turn_markers = re.compile("(<start_of_turn>|<end_of_turn>)")

    def encode(text: str, add_special: bool) -> list[int] | None:
        if add_special:
            return None
        # Text between added tokens is tokenized piece by piece, each with its own dummy prefix
        # (llama.cpp's SPM rule, and HF's legacy Llama one).
        pieces = [p for p in turn_markers.split(text) if p]
        ids: list[int] = []
        for piece in pieces:
            ids += [processor.piece_to_id(piece)] if turn_markers.fullmatch(piece) else processor.encode(piece)
        return ids

    return encode


def llama_vocab(path: pathlib.Path) -> Any:
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


def vectors(tok: str) -> list[tuple[str, list[int]]]:
    """llama.cpp's test-tokenizer-0 vectors for the vocab ``tok`` was rebuilt from (none for tiny-spm)."""
    base = source_dir() / "models" / f"ggml-vocab-{tok}.gguf"
    if not base.with_name(base.name + ".inp").exists():
        return []
    inputs = base.with_name(base.name + ".inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    outputs = base.with_name(base.name + ".out").read_text(encoding="utf-8").splitlines()
    return [(text, [int(i) for i in ids.split()]) for text, ids in zip(inputs, outputs)]


@pytest.mark.parametrize(("arch", "tok"), CASES, ids=IDS)
def test_llama_cpp_tokenizes_text_like_the_tokenizer(
    ours: Any, request: pytest.FixtureRequest, arch: str, tok: str
) -> None:
    """llama.cpp on our vocab == the source tokenizer: ASCII, Unicode, whitespace runs, digits, code, BOS/EOS.

    Also over the inputs of llama.cpp's own tokenizer vectors for that vocab.
    """
    expect_converter_divergence(request, "text", arch, tok)
    _, mine, _ = ours(arch, tok)
    vocab = llama_vocab(mine)
    encode, _ = reference(arch, tok, mine)
    for text in TEXTS + [text for text, _ in vectors(tok)]:
        assert vocab.tokenize(text.encode(), add_bos=False, special=False) == encode(text, False), repr(text)
        if (with_specials := encode(text, True)) is not None:  # add_bos/add_eos as the tokenizer adds them
            assert vocab.tokenize(text.encode(), add_bos=True, special=False) == with_specials, repr(text)


@pytest.mark.parametrize(("arch", "tok"), CASES, ids=IDS)
def test_llama_cpp_parses_special_tokens_like_the_tokenizer(
    ours: Any, request: pytest.FixtureRequest, arch: str, tok: str
) -> None:
    """Added/special tokens in the text are single tokens for llama.cpp as for the tokenizer (token types)."""
    expect_converter_divergence(request, "special", arch, tok)
    _, mine, _ = ours(arch, tok)
    vocab = llama_vocab(mine)
    encode, specials = reference(arch, tok, mine)
    assert specials
    text = "".join(f"Turn {i}: {special}user\nHi there! " for i, special in enumerate(specials))
    assert vocab.tokenize(text.encode(), add_bos=False, special=True) == encode(text, False)


# The rebuilt qwen2 and gpt-2 tokenizers reproduce llama.cpp's vectors exactly.  The rebuilt llama-bpe
# drops Llama 3's ignore_merges (so the converter names it smaug-bpe, and 'Cửa Việt' splits
# differently), and llama-spm/phi-3 take the LlamaHfVocab path: their vector inputs are checked
# against their HF tokenizer above instead.
VECTOR_CASES = [(case, case_id) for case, case_id in zip(CASES, IDS) if case[1] in ("qwen2", "gpt-2")]


@pytest.mark.parametrize(("arch", "tok"), [c for c, _ in VECTOR_CASES], ids=[i for _, i in VECTOR_CASES])
def test_llama_cpp_vectors(ours: Any, arch: str, tok: str) -> None:
    """llama.cpp's own tokenizer test vectors (test-tokenizer-0: no BOS, no special parsing) on our vocab."""
    _, mine, _ = ours(arch, tok)
    vocab = llama_vocab(mine)
    cases = vectors(tok)
    assert len(cases) > 40
    for text, ids in cases:
        assert vocab.tokenize(text.encode(), add_bos=False, special=False) == ids, repr(text)


# --------------------------------------------------------------------------- helpers


def _tokenizer_folder_with_gemma4(name: str = "tiny-spm") -> pathlib.Path:
    """models.tokenizer_folder, plus gemma-4: AutoTokenizer cannot read that GGUF's config, GemmaTokenizer can."""
    if name != "gemma-4":
        return _MODELS_TOKENIZER_FOLDER(name)
    import transformers
    from transformers import GemmaTokenizer

    def build(target: pathlib.Path) -> None:
        tok = GemmaTokenizer.from_pretrained(str(source_dir() / "models"), gguf_file="ggml-vocab-gemma-4.gguf")
        tok.save_pretrained(str(target))

    return build_once(cache_dir() / "tokenizers" / f"gemma-4-{_key(transformers.__version__, 'GemmaTokenizer')}", build)


_MODELS_TOKENIZER_FOLDER = models.tokenizer_folder
