"""llmdeploy.gguf.tokenizer against llama.cpp itself (llama-cpp-python 0.3.36).

1. The converter: for each (architecture, tokenizer) the KVs equal the ``tokenizer.*`` KVs that
   ``convert_hf_to_gguf.py`` writes for the same folder (values, GGUF types and order), except the
   deviations documented in ``llmdeploy/gguf/tokenizer.py``, each checked against its own oracle.
2. The consumer: a vocab-only GGUF holding our KVs, loaded by llama.cpp, tokenizes like the HF
   tokenizer it came from (ASCII, Unicode, whitespace runs, digits, code, special tokens and
   chat-template markers), including where the converter's file does not, and reproduces
   llama.cpp's own ``ggml-vocab-*.gguf.inp/.out`` vectors.
"""

from __future__ import annotations

import ast
import functools
import json
import pathlib
import re
import shutil
import subprocess
import sys
import types
import unicodedata
from typing import Any

import gguf
import pytest
from gguf import TokenType

from llmdeploy.errors import MissingFileError, UnsupportedTokenizerError
from llmdeploy.gguf import _pretokenizers
from llmdeploy.gguf.tokenizer import tokenizer_metadata
from llmdeploy.source import open_source

from .. import models
from ..llamacpp import build_once, convert, source_dir

# Small bodies: the tokenizer is what is under test, and big vocabularies make big embeddings.
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)

# (architecture, tokenizer) the converter exports: its vocab path
CASES = [
    ("LlamaForCausalLM", "tiny-spm"),  # SentencePiece (tokenizer.model)
    ("LlamaForCausalLM", "llama-spm"),  # no tokenizer.model: the converter's LlamaHfVocab, our deviation 2
    ("LlamaForCausalLM", "phi-3"),  # the same, with added CONTROL/USER_DEFINED tokens
    ("LlamaForCausalLM", "llama-bpe"),  # BPE, Llama 3
    ("LlamaForCausalLM", "gpt-2"),  # BPE, gpt-2 pre-tokenizer
    ("MistralForCausalLM", "tiny-spm"),
    ("Qwen2ForCausalLM", "qwen2"),  # BPE, qwen2 pre-tokenizer
    ("Qwen3MoeForCausalLM", "qwen2"),  # BPE always (TextModel default)
    ("GemmaForCausalLM", "tiny-spm"),  # + eot 107, add_space_prefix False
    ("Gemma2ForCausalLM", "tiny-spm"),
    ("Gemma3ForCausalLM", "tiny-spm"),
    ("Gemma3ForCausalLM", "gemma-3"),  # Google's Gemma 3 tokenizer as transformers 5 saves it (no tokenizer.model): BPE
    ("Phi3ForCausalLM", "tiny-spm"),  # Phi-3's own SentencePiece variant
    ("Phi3ForCausalLM", "gpt-2"),  # GPT2Tokenizer: BPE (the Phi-4 path)
]  # fmt: skip
# (architecture, tokenizer) the converter refuses and we export: deviation 4
REFUSED = [
    ("Gemma3ForCausalLM", "gemma-4"),  # tokenizer.json only, a pre-tokenizer hash the converter does not know
    ("Phi3ForCausalLM", "phi-3"),  # Phi-3 without tokenizer.model
]  # fmt: skip


def case_id(arch: str, tok: str) -> str:
    return f"{arch.removesuffix('ForCausalLM')}-{tok}"


IDS = [case_id(*case) for case in CASES]
ALL, ALL_IDS = CASES + REFUSED, IDS + [case_id(*case) for case in REFUSED]

# The deviations of llmdeploy/gguf/tokenizer.py each case shows (the numbers of its docstring).
# tiny-spm: its tokenizer.json lists <unk> <s> </s> and the user-defined <start_of_turn> <end_of_turn>
# <|endoftext|> <|end|> as added tokens, and transformers 5 wrote no added_tokens_decoder.
ADDED_TOKENS_FROM_JSON = [case_id(arch, "tiny-spm") for arch in (  # 3 (and 1)
    "LlamaForCausalLM", "MistralForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM")]
REBUILT_FROM_JSON = ["Llama-llama-spm", "Llama-phi-3"]  # 2 (and 3)  # fmt: skip


@functools.lru_cache(maxsize=None)
def all_fields(path: pathlib.Path) -> dict[str, tuple[list[Any], Any]]:
    """``key -> (GGUF types, value)`` of every KV of a GGUF, in file order (read once: big vocabs are slow)."""
    reader = gguf.GGUFReader(path)
    return {k: (list(f.types), f.contents()) for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def fields(path: pathlib.Path, prefix: str = "tokenizer.") -> dict[str, tuple[list[Any], Any]]:
    return {k: v for k, v in all_fields(path).items() if k.startswith(prefix)}


def write_vocab_gguf(path: pathlib.Path, converted: pathlib.Path, kvs: list[tuple[str, Any, Any]]) -> pathlib.Path:
    """A vocab-only GGUF: the non-tokenizer KVs of a converter's file for the architecture, then ours."""
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
    """case -> (the converter's GGUF or None if it refuses the folder, our vocab-only GGUF, our KVs), built once."""
    built: dict[str, tuple[pathlib.Path | None, pathlib.Path, list[Any]]] = {}
    out = tmp_path_factory.mktemp("vocab")

    def get(arch: str, tok: str) -> tuple[pathlib.Path | None, pathlib.Path, list[Any]]:
        name = f"{arch}-{tok}"
        if name not in built:
            folder = case_folder(arch, tok)
            converted = None if (arch, tok) in REFUSED else convert(folder)
            # The architecture's other KVs, from the converter's file for the same model with tiny-spm.
            arch_kvs = converted or convert(case_folder(arch, "tiny-spm"))
            kvs = tokenizer_metadata(open_source(folder))
            built[name] = (converted, write_vocab_gguf(out / f"{name}.gguf", arch_kvs, kvs), kvs)
        return built[name]

    return get


def transformers4_twin(folder: pathlib.Path) -> pathlib.Path:
    """``folder`` as transformers 4 saves it: tokenizer_config.json also lists tokenizer.json's added tokens."""

    def build(target: pathlib.Path) -> None:
        shutil.copytree(folder, target)
        added = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["added_tokens"]
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        config["added_tokens_decoder"] = {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in added}
        (target / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")

    return build_once(folder.parent / f"{folder.name}-transformers4", build)


# --------------------------------------------------------------------------- 1. the converter


CONVERTER_EQUAL = [(case, i) for case, i in zip(CASES, IDS) if i not in REBUILT_FROM_JSON]


@pytest.mark.parametrize(("arch", "tok"), [c for c, _ in CONVERTER_EQUAL], ids=[i for _, i in CONVERTER_EQUAL])
def test_kvs_equal_the_converters(ours: Any, arch: str, tok: str) -> None:
    """Every tokenizer.* KV of convert_hf_to_gguf.py, same value, same GGUF type (and array item type), same order.

    Deviation 3 (added tokens read from tokenizer.json): the oracle is the converter's file for the
    same tokenizer saved by transformers 4, which also lists them in added_tokens_decoder.
    """
    converted, mine, _ = ours(arch, tok)
    expected, got = fields(converted), fields(mine)
    if case_id(arch, tok) in ADDED_TOKENS_FROM_JSON:
        assert got != expected
        expected = fields(convert(transformers4_twin(case_folder(arch, tok))))
    assert list(got) == list(expected)
    for key in expected:
        assert got[key] == expected[key], key


def _merge_pairs(tokenizer_json: dict[str, Any]) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in tokenizer_json["model"]["merges"]]


@pytest.mark.parametrize("tok", ["llama-spm", "phi-3"])
def test_rebuilt_vocab_differs_from_the_converters_only_in_scores_and_added_types(ours: Any, tok: str) -> None:
    """Deviation 2: no tokenizer.model. Tokens and every other KV are the converter's (LlamaHfVocab's);
    scores follow tokenizer.json's merges (the k-th token a merge makes scores above the k+1-th, tokens
    no merge makes below them all) instead of a flat -1000; types differ only on tokenizer.json's
    added tokens: CONTROL if special, else USER_DEFINED."""
    converted, mine, _ = ours("LlamaForCausalLM", tok)
    expected, got = fields(converted), fields(mine)
    assert list(got) == list(expected)
    for key in expected.keys() - {"tokenizer.ggml.scores", "tokenizer.ggml.token_type"}:
        assert got[key] == expected[key], key
    assert set(expected["tokenizer.ggml.scores"][1]) == {-1000.0}  # what the converter writes

    tokenizer_json = json.loads((models.tokenizer_folder(tok) / "tokenizer.json").read_text(encoding="utf-8"))
    added = {t["id"]: t for t in tokenizer_json["added_tokens"]}
    tokens, scores = got["tokenizer.ggml.tokens"][1], got["tokenizer.ggml.scores"][1]
    token_types, their_types = got["tokenizer.ggml.token_type"][1], expected["tokenizer.ggml.token_type"][1]
    for i, (mine_type, theirs) in enumerate(zip(token_types, their_types, strict=True)):
        if i in added:
            assert mine_type == (TokenType.CONTROL if added[i]["special"] else TokenType.USER_DEFINED), i
        else:
            assert mine_type == theirs, i
    assert any(token_types[i] != their_types[i] for i in added) == (tok == "phi-3")  # e.g. <|assistant|>

    vocab, made = tokenizer_json["model"]["vocab"], []
    for left, right in _merge_pairs(tokenizer_json):
        if left + right in vocab and left + right not in made:
            made.append(left + right)
    made_scores = [scores[vocab[token]] for token in made]
    assert all(a > b for a, b in zip(made_scores, made_scores[1:]))
    made_ids = {vocab[token] for token in made}
    others = [scores[i] for i, t in enumerate(token_types) if t == TokenType.NORMAL and i not in made_ids]
    assert others and max(others) < min(made_scores)
    assert [tokens[i] for i, t in enumerate(token_types) if t == TokenType.BYTE] == [f"<0x{b:02X}>" for b in range(256)]


def test_sentencepiece_user_defined_pieces_stay_user_defined(tmp_path: pathlib.Path) -> None:
    """Deviation 1: a bare tokenizer.model: its user_defined_symbols are USER_DEFINED (the converter: NORMAL),
    everything else is the converter's, and llama.cpp keeps them whole as SentencePiece does."""
    base = case_folder("Gemma3ForCausalLM", "tiny-spm")

    def build(target: pathlib.Path) -> None:
        tokenizer_files = shutil.ignore_patterns("tokenizer.json", "tokenizer_config.json", "*.jinja")
        shutil.copytree(base, target, ignore=tokenizer_files)

    folder = build_once(base.parent / f"{base.name}-tokenizer-model-only", build)
    converted = convert(folder)
    kvs = tokenizer_metadata(open_source(folder))
    mine = write_vocab_gguf(tmp_path / "ours.gguf", converted, kvs)
    expected, got = fields(converted), fields(mine)
    user_defined = [3, 4, 5, 6]  # tiny-spm's <start_of_turn> <end_of_turn> <|endoftext|> <|end|>
    theirs = list(expected["tokenizer.ggml.token_type"][1])
    assert [theirs[i] for i in user_defined] == [TokenType.NORMAL] * 4
    for i in user_defined:
        theirs[i] = TokenType.USER_DEFINED
    assert got["tokenizer.ggml.token_type"][1] == theirs
    assert {k: v for k, v in got.items() if k != "tokenizer.ggml.token_type"} == {
        k: v for k, v in expected.items() if k != "tokenizer.ggml.token_type"
    }
    processor = sentencepiece_like_llama_cpp(folder / "tokenizer.model", add_space_prefix=False)
    text = "Hi<start_of_turn>user\nHello there!<end_of_turn>\n<|end|>"
    # special=True: llama.cpp itself retypes <end_of_turn> and <|end|> CONTROL (end-of-generation texts)
    ids = llama_vocab(mine).tokenize(text.encode(), add_bos=False, special=True)
    assert ids == processor.encode(text)
    assert [i for i in ids if i in user_defined] == [3, 4, 6]


def sentencepiece_like_llama_cpp(model_file: pathlib.Path, *, add_space_prefix: bool) -> Any:
    """A SentencePiece model normalized the way llama.cpp's SPM tokenizer normalizes: no NFKC, whitespace
    runs kept, the dummy prefix as ``add_space_prefix`` says (tiny-spm was trained with SentencePiece's defaults)."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.precompiled_charsmap = b""
    proto.normalizer_spec.remove_extra_whitespaces = False
    proto.normalizer_spec.add_dummy_prefix = add_space_prefix
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


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


@pytest.mark.parametrize(
    ("arch", "tok", "refusal"),
    [("Gemma3ForCausalLM", "gemma-4", "BPE pre-tokenizer was not recognized"),
     ("Phi3ForCausalLM", "phi-3", "tokenizer.model")],
    ids=["Gemma3-gemma-4", "Phi3-phi-3"],
)  # fmt: skip
def test_converter_refuses_what_we_export(ours: Any, arch: str, tok: str, refusal: str) -> None:
    """Deviation 4: the converter fails on a SentencePiece tokenizer.json without tokenizer.model; we export it
    (the consumer tests below check llama.cpp tokenizes it like the HF tokenizer)."""
    with pytest.raises(subprocess.CalledProcessError) as converter:
        convert(case_folder(arch, tok))
    assert refusal in converter.value.stderr.decode()
    _, mine, _ = ours(arch, tok)
    got = fields(mine)
    assert got["tokenizer.ggml.model"][1] == "llama"
    assert len(got["tokenizer.ggml.tokens"][1]) == open_source(case_folder(arch, tok)).config["vocab_size"]


def test_gemma_and_gemma2_rebuild_like_gemma3_and_llama(ours: Any) -> None:
    """Deviation 4 for Gemma and Gemma 2 (the converter: FileNotFoundError): Llama's vocabulary, no space prefix."""
    folder = models.tokenizer_folder("llama-spm")
    _, _, llama = ours("LlamaForCausalLM", "llama-spm")
    vocab_keys = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type")
    for arch in ("GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM"):
        config = {"architectures": [arch], "vocab_size": 32000}
        kvs = tokenizer_metadata(types.SimpleNamespace(config=config, folder=folder))
        got = {key: value for key, value, _ in kvs}
        assert [got[key] for key in vocab_keys] == [value for key, value, _ in llama if key in vocab_keys], arch
        assert got["tokenizer.ggml.add_space_prefix"] is False


def test_rebuilt_vocab_is_padded_to_the_models_vocab_size() -> None:
    """Deviation 2: embeddings larger than the tokenizer get [PAD{i}] tokens (the converter's LlamaHfVocab writes
    none, and llama.cpp then refuses the file: token count != embedding rows)."""
    folder = models.tokenizer_folder("llama-spm")
    config = {"architectures": ["LlamaForCausalLM"], "vocab_size": 32008}
    kvs = tokenizer_metadata(types.SimpleNamespace(config=config, folder=folder))
    got = {key: value for key, value, _ in kvs}
    assert len(got["tokenizer.ggml.tokens"]) == 32008
    assert got["tokenizer.ggml.tokens"][32000:] == [f"[PAD{i}]" for i in range(32000, 32008)]
    assert got["tokenizer.ggml.token_type"][32000:] == [TokenType.UNUSED] * 8
    assert got["tokenizer.ggml.scores"][32000:] == [-10000.0] * 8


def test_unknown_bpe_pre_tokenizer_is_a_clear_error(tmp_path: pathlib.Path) -> None:
    """A byte-level BPE whose check-text ids llama.cpp does not know: both refuse, ours names the converter's hash."""
    folder = tmp_path / "qwen2-half-merges"
    shutil.copytree(case_folder("Qwen2ForCausalLM", "qwen2"), folder)
    tokenizer_json = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    tokenizer_json["model"]["merges"] = tokenizer_json["model"]["merges"][:50000]
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json), encoding="utf-8")
    with pytest.raises(subprocess.CalledProcessError) as converter:
        convert(folder)
    stderr = converter.value.stderr.decode()
    assert "BPE pre-tokenizer was not recognized" in stderr
    (converter_hash,) = re.findall(r"chkhsh:\s+([0-9a-f]{64})", stderr)
    with pytest.raises(UnsupportedTokenizerError, match=converter_hash):
        tokenizer_metadata(open_source(folder))


def test_phi3_without_a_sentencepiece_vocab_is_a_clear_error() -> None:
    """Phi-3 reads SentencePiece only (unless GPT2Tokenizer): a byte-level tokenizer.json is refused, saying why."""
    config = {"architectures": ["Phi3ForCausalLM"], "vocab_size": 151936}
    with pytest.raises(MissingFileError, match="tokenizer.model"):
        tokenizer_metadata(types.SimpleNamespace(config=config, folder=models.tokenizer_folder("qwen2")))


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
CHAT_MARKERS = (
    "<start_of_turn>", "<end_of_turn>", "<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eot_id|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
)  # fmt: skip
MESSAGES = [
    {"role": "user", "content": "Hi there! What's 2+2?"},
    {"role": "assistant", "content": "4. Anything else?"},
    {"role": "user", "content": "  Write\tcode:\n\ndef f(x): return x**2"},
]

# The HF tokenizer is the reference, as is, except where its whitespace rule is one no GGUF key carries:
LEGACY_WHITESPACE = (
    "llama.cpp's SPM tokenizer prefixes '▁' to every run of text (also after an added token, and before a "
    "leading space): SentencePiece's rule. This tokenizer.json's Metaspace(prepend_scheme='first') prefixes "
    "only the start of the text (module docstring of llmdeploy/gguf/tokenizer.py), so the reference is the "
    "tokenizer with SentencePiece's rule (a Prepend normalizer, as HF's legacy Llama tokenizers have)"
)
NO_PREFIX = (
    "a Gemma model given tiny-spm's Llama tokenizer: Gemma's converter (and we) write add_space_prefix "
    "False, what Gemma's own tokenizers do, so the reference is the tokenizer without its prefix"
)
NFC_TEXT = (
    "llama.cpp normalizes no Unicode, and Qwen2Tokenizer NFC-normalizes its input (module docstring of "
    "llmdeploy/gguf/tokenizer.py): both are given the text NFC-normalized ('a' + U+0300 -> U+00E0)"
)
NFC = {"Qwen2-qwen2": NFC_TEXT, "Qwen3Moe-qwen2": NFC_TEXT}
WHITESPACE = {
    **{case_id(arch, "tiny-spm"): LEGACY_WHITESPACE for arch in ("LlamaForCausalLM", "MistralForCausalLM", "Phi3ForCausalLM")},
    "Llama-llama-spm": LEGACY_WHITESPACE,
    **{case_id(arch, "tiny-spm"): NO_PREFIX for arch in ("GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM")},
}  # fmt: skip


def nfc(arch: str, tok: str, hf: Any) -> Any:
    """The text as the case compares it: NFC-normalized where the tokenizer normalizes so (``NFC``)."""
    normalizer = json.loads(hf.backend_tokenizer.to_str()).get("normalizer") or {}
    normalizes = any(n.get("type") == "NFC" for n in normalizer.get("normalizers", [normalizer]))
    assert (NFC_TEXT if normalizes else None) == NFC.get(case_id(arch, tok))
    return functools.partial(unicodedata.normalize, "NFC") if normalizes else (lambda text: text)


def reference(arch: str, tok: str, gguf_path: pathlib.Path) -> Any:
    """The HF tokenizer of the case's folder, with the whitespace rule of ``WHITESPACE`` where it has one."""
    from tokenizers import normalizers
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(case_folder(arch, tok)))
    backend = json.loads(hf.backend_tokenizer.to_str())
    pre = backend.get("pre_tokenizer") or {}
    first = any(
        p.get("type") == "Metaspace" and p.get("prepend_scheme") == "first" for p in pre.get("pretokenizers", [pre])
    )
    got = fields(gguf_path)
    prefix = got.get("tokenizer.ggml.add_space_prefix", (None, True))[1]
    rule = None
    if got["tokenizer.ggml.model"][1] == "llama" and first:
        assert backend.get("normalizer") is None
        rule = LEGACY_WHITESPACE if prefix else NO_PREFIX
        steps = [normalizers.Prepend("\u2581")] if prefix else []
        hf.backend_tokenizer.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "\u2581")])
        hf.backend_tokenizer.pre_tokenizer = None
    assert rule == WHITESPACE.get(case_id(arch, tok))
    return hf


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


@functools.lru_cache(maxsize=None)
def vector_inputs() -> tuple[str, ...]:
    """The inputs of all of llama.cpp's tokenizer vectors (whitespace, digits, code, scripts, emoji)."""
    texts: set[str] = set()
    for path in (source_dir() / "models").glob("ggml-vocab-*.gguf.inp"):
        texts.update(path.read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n"))
    return tuple(sorted(texts))


@pytest.mark.parametrize(("arch", "tok"), ALL, ids=ALL_IDS)
def test_llama_cpp_tokenizes_text_like_the_tokenizer(ours: Any, arch: str, tok: str) -> None:
    """llama.cpp on our vocab == the HF tokenizer: ASCII, Unicode, whitespace runs, digits, code, BOS/EOS.

    Over TEXTS and the inputs of all of llama.cpp's own tokenizer vectors.
    """
    _, mine, _ = ours(arch, tok)
    vocab = llama_vocab(mine)
    hf = reference(arch, tok, mine)
    prepare = nfc(arch, tok, hf)
    for text in map(prepare, TEXTS + list(vector_inputs())):
        expected = hf.encode(text, add_special_tokens=False)
        assert vocab.tokenize(text.encode(), add_bos=False, special=False) == expected, repr(text)
        # add_bos/add_eos as the tokenizer adds them
        assert vocab.tokenize(text.encode(), add_bos=True, special=False) == hf.encode(text), repr(text)


@pytest.mark.parametrize(("arch", "tok"), ALL, ids=ALL_IDS)
def test_llama_cpp_parses_special_tokens_like_the_tokenizer(ours: Any, arch: str, tok: str) -> None:
    """Added/special tokens and chat-template markers in the text are single tokens for llama.cpp as for the
    tokenizer (token types), in hand-made turns and in the tokenizer's rendered chat template."""
    _, mine, _ = ours(arch, tok)
    vocab = llama_vocab(mine)
    hf = reference(arch, tok, mine)
    added = [t.content for t in hf.added_tokens_decoder.values()]
    specials = added[:8] + [marker for marker in CHAT_MARKERS if marker in added[8:]]
    assert specials
    texts = ["".join(f"Turn {i}: {special}user\nHi there! " for i, special in enumerate(specials))]
    if hf.chat_template:
        texts.append(hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True))
    for text in texts:
        assert vocab.tokenize(text.encode(), add_bos=False, special=True) == hf.encode(text, add_special_tokens=False)


# The rebuilt qwen2 and gpt-2 tokenizers reproduce llama.cpp's vectors exactly, and so do our vocabularies
# rebuilt from the tokenizer.json of llama-spm, phi-3 and gemma-4 (deviation 2, no tokenizer.model), though
# llama.cpp made those vectors from the original SentencePiece models (and Gemma 4's own BPE). The rebuilt
# llama-bpe drops Llama 3's ignore_merges (so the converter names it smaug-bpe, and 'Cửa Việt' splits
# differently): its vector inputs are checked against its HF tokenizer above instead.
VECTOR_CASES = [
    (case, i) for case, i in zip(ALL, ALL_IDS) if case[1] in ("qwen2", "gpt-2", "llama-spm", "phi-3", "gemma-4")
]


@pytest.mark.parametrize(("arch", "tok"), [c for c, _ in VECTOR_CASES], ids=[i for _, i in VECTOR_CASES])
def test_llama_cpp_vectors(ours: Any, arch: str, tok: str) -> None:
    """llama.cpp's own tokenizer test vectors (test-tokenizer-0: no BOS, no special parsing) on our vocab."""
    _, mine, _ = ours(arch, tok)
    vocab = llama_vocab(mine)
    cases = vectors(tok)
    assert len(cases) > 40
    for text, ids in cases:
        assert vocab.tokenize(text.encode(), add_bos=False, special=False) == ids, repr(text)


def test_gemma3_turn_markers_are_single_tokens_as_in_googles_gguf(ours: Any) -> None:
    """Gemma 3 saved by transformers 5 (tokenizer.json only, the converter's BPE path): llama.cpp reads each
    turn marker as one token on our file, and tokenizes everything as on the GGUF llama.cpp's converter made
    from Google's own tokenizer.model (Gemma 3 270M)."""
    _, mine, _ = ours("Gemma3ForCausalLM", "gemma-3")
    vocab, google = llama_vocab(mine), llama_vocab(models.gemma3_gguf())
    chat = "<start_of_turn>user\nWhat's 2+2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>\n"
    ids = vocab.tokenize(chat.encode(), add_bos=True, special=True)
    assert ids[:2] == [2, 105] and ids.count(105) == 2 and ids.count(106) == 2
    for text in [chat, *TEXTS, *vector_inputs()]:
        for special in (False, True):
            assert vocab.tokenize(text.encode(), add_bos=True, special=special) == google.tokenize(
                text.encode(), add_bos=True, special=special
            ), repr(text)


def test_llama_cpp_spm_whitespace_is_sentencepieces_rule(ours: Any) -> None:
    """Why LEGACY_WHITESPACE exists: no GGUF makes llama.cpp's SPM tokenizer follow Metaspace(prepend_scheme='first').

    If this fails, llama.cpp changed its rule and the tokenizer can be the reference as is.
    """
    from transformers import AutoTokenizer

    _, mine, _ = ours("LlamaForCausalLM", "llama-spm")
    vocab = llama_vocab(mine)
    hf = AutoTokenizer.from_pretrained(str(case_folder("LlamaForCausalLM", "llama-spm")))
    for text, llama_cpp_pieces, hf_pieces in (
        (" Hello", ["▁", "▁Hello"], ["▁Hello"]),
        ("<s>Hello", ["<s>", "▁Hello"], ["<s>", "Hello"]),
    ):
        assert hf.convert_ids_to_tokens(vocab.tokenize(text.encode(), add_bos=False, special=True)) == llama_cpp_pieces
        assert hf.convert_ids_to_tokens(hf.encode(text, add_special_tokens=False)) == hf_pieces
