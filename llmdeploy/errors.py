"""Every exception llmdeploy raises on purpose.

Each class inherits :class:`LLMDeployError` *and* the built-in exception a caller
would naturally catch (``ValueError``, ``TypeError``, ...), so both
``except LLMDeployError`` and ``except ValueError`` work.  Messages name the
tensor, file or option at fault and say how to fix it.
"""

from __future__ import annotations


class LLMDeployError(Exception):
    """Base class of all llmdeploy errors."""


class UnsupportedQuantTypeError(LLMDeployError, ValueError):
    """A quantization type name or enum that llmdeploy cannot handle (in that direction)."""


class BlockSizeError(LLMDeployError, ValueError):
    """A row length that is not a multiple of the quantization type's block size."""


class NonFiniteValueError(LLMDeployError, ValueError):
    """NaN or infinity in data that is about to be quantized."""


class InputDTypeError(LLMDeployError, TypeError):
    """An array or tensor of a dtype or rank that cannot be quantized or dequantized."""


class NotSupportedYetError(LLMDeployError, NotImplementedError):
    """An option that is accepted by the signature but not implemented for this case."""


class MissingFileError(LLMDeployError, FileNotFoundError):
    """A file the export needs (config.json, tokenizer files, weights) is missing."""


class UnsupportedArchitectureError(LLMDeployError, ValueError):
    """A model architecture llmdeploy cannot export (the message lists the supported ones)."""


class QuantizedCheckpointError(LLMDeployError, ValueError):
    """A checkpoint that still holds quantized (e.g. bitsandbytes) tensors."""


class UnexpectedTensorError(LLMDeployError, ValueError):
    """A tensor the architecture does not expect; never silently dropped."""


class OutputExistsError(LLMDeployError, FileExistsError):
    """The output file or folder exists and overwrite=True was not given."""


class GGUFWriteError(LLMDeployError, ValueError):
    """Metadata or tensor data that does not match what was declared to the GGUF writer."""


class UnsupportedTokenizerError(LLMDeployError, ValueError):
    """A tokenizer llama.cpp's converter cannot export (e.g. a BPE pre-tokenizer llama.cpp does not know)."""


class InvalidOptionError(LLMDeployError, ValueError):
    """An option value that cannot be used (the message names the option and the accepted values)."""


class UnsupportedAdapterError(LLMDeployError, ValueError):
    """A PEFT adapter type or LoRA variant that cannot be merged (the message names what is supported)."""


class AdapterShapeError(LLMDeployError, ValueError):
    """An adapter whose tensors do not fit the base model's (the message names the first such tensor)."""


class UnmergedAdapterError(LLMDeployError, ValueError):
    """A LoRA module that the merge could not place onto a base tensor; never silently skipped."""


class QuantStateError(QuantizedCheckpointError):
    """A bitsandbytes 4-bit weight whose quantization state is missing, inconsistent or of an unknown kind."""


class HubError(LLMDeployError, RuntimeError):
    """A Hugging Face Hub request that failed (the message names the repo and the step; never the token)."""


class GGUFReadError(LLMDeployError, ValueError):
    """A file that is not a readable GGUF, or one whose contents llmdeploy cannot use (names the file and key)."""
