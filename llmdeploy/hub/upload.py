"""Upload to the Hugging Face Hub: export into a temporary folder, add a model card, make one commit.

Every push creates the repo if needed (``exist_ok``), then sends all files in a single commit with
huggingface_hub's own API (``HfApi.create_repo`` and ``HfApi.create_commit``: large files go through
LFS or Xet as the Hub decides). A ``README.md`` that is already among the files, or already in the
repo, is kept: a card is generated only when there is none.

The token comes from ``token=`` or huggingface_hub's usual sources (``HF_TOKEN``, the token stored
by ``hf auth login``). It never appears in messages or logs: Hub errors are re-raised as
:class:`~llmdeploy.errors.HubError` naming the repo, the step and the fix, scrubbed of the token.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import pathlib
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, get_token
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import HFValidationError, validate_repo_id

from ..errors import HubError, InvalidOptionError
from .card import build_model_card, collect_files, detect_kind, looks_like_hub_id, read_json_object

__all__ = ["push_folder", "push_to_hub_gguf", "push_to_hub_merged"]

logger = logging.getLogger("llmdeploy")

_TOKEN_LIKE = re.compile(r"hf_[A-Za-z0-9]{16,}")


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The "could not reach the server" exceptions of the HTTP clients huggingface_hub versions use."""
    found: list[type[BaseException]] = []
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "ConnectionError")):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(found)


_TRANSPORT_ERRORS = _transport_errors()


def push_to_hub_gguf(
    model: Any,
    repo_id: str,
    *,
    tokenizer: Any = None,
    quantization: str | Sequence[str] = "q8_0",
    token: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    endpoint: str | None = None,
    **export_kwargs: Any,
) -> str:
    """Export a model to GGUF and upload the files, with a model card, in one commit.

    The repo is created first (if missing), so a token problem shows before the export runs.
    The files are written by :func:`llmdeploy.save_pretrained_gguf` into a temporary folder,
    which is removed afterwards, also on error.

    Args:
        model: what :func:`llmdeploy.save_pretrained_gguf` takes (a model folder or an in-memory model).
        repo_id: the Hub repo, ``"user/name"`` or ``"org/name"``.
        tokenizer: passed to :func:`~llmdeploy.save_pretrained_gguf`.
        quantization: one GGUF file type or a list (``"q4_k_m"``, ``["q4_k_m", "q8_0"]``).
        token: a Hub access token with write access; default: ``HF_TOKEN`` or the token stored by
            ``hf auth login``.
        private: create the repo private (True) or public (False); default: the Hub's default for the
            namespace. Ignored when the repo exists.
        commit_message: default ``"Upload <QUANTS> GGUF with llmdeploy"``.
        endpoint: the Hub's URL; default ``HF_ENDPOINT`` or https://huggingface.co.
        **export_kwargs: more options of :func:`~llmdeploy.save_pretrained_gguf` (``model_name``,
            ``max_file_size``, ``threads``, ``progress`` ...).

    Returns:
        The URL of the commit.

    Raises:
        HubError: a Hub request failed (the message names the repo, the step and the fix).
        InvalidOptionError: ``repo_id`` is not a valid repo id.
        LLMDeployError: any error of the export (raised before anything is uploaded).
    """
    from ..gguf.export import save_pretrained_gguf
    from ..gguf.plan import file_type

    names = [quantization] if isinstance(quantization, str) else list(quantization)
    quants = dict.fromkeys(file_type(q).name.upper() for q in names)  # unknown names fail before any request
    hub = _Hub(repo_id, token=token, endpoint=endpoint)
    hints = _base_hints(model, export_kwargs.get("base"))
    hub.create_repo(private=private)
    with tempfile.TemporaryDirectory(prefix="llmdeploy-push-") as tmp:
        save_pretrained_gguf(model, tmp, tokenizer=tokenizer, quantization=quantization, **export_kwargs)
        files = collect_files(tmp)
        card = _card(files, "gguf", repo_id, hints)
        return hub.commit(files, card, commit_message or f"Upload {', '.join(quants)} GGUF with llmdeploy")


def push_to_hub_merged(
    model: Any,
    repo_id: str,
    *,
    tokenizer: Any = None,
    save_method: str = "merged_16bit",
    token: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    endpoint: str | None = None,
    **merge_kwargs: Any,
) -> str:
    """Save a LoRA fine-tune merged (or its adapter alone) and upload it, with a model card, in one commit.

    The repo is created first (if missing); the folder is written by
    :func:`llmdeploy.save_pretrained_merged` into a temporary folder, removed afterwards, also on error.
    The card's relation to the base model is ``finetune`` for a merged model and ``adapter`` for
    ``save_method="lora"`` (library ``peft``).

    Args:
        model: what :func:`llmdeploy.save_pretrained_merged` takes (a ``peft.PeftModel`` or an adapter folder).
        repo_id: the Hub repo, ``"user/name"`` or ``"org/name"``.
        tokenizer: passed to :func:`~llmdeploy.save_pretrained_merged`.
        save_method: ``"merged_16bit"`` (default) or ``"lora"`` (the adapter alone).
        token: a Hub access token with write access; default: ``HF_TOKEN`` or the stored token.
        private: create the repo private or public; ignored when the repo exists.
        commit_message: default ``"Upload merged model with llmdeploy"`` / ``"Upload LoRA adapter with llmdeploy"``.
        endpoint: the Hub's URL; default ``HF_ENDPOINT`` or https://huggingface.co.
        **merge_kwargs: more options of :func:`~llmdeploy.save_pretrained_merged` (``base``, ``dtype``,
            ``max_shard_size``, ``adapter_names``).

    Returns:
        The URL of the commit.

    Raises:
        HubError: a Hub request failed (the message names the repo, the step and the fix).
        InvalidOptionError: ``repo_id`` or ``save_method`` is invalid (checked before any request).
        LLMDeployError: any error of the merge (raised before anything is uploaded).
    """
    from ..merge.memory import is_peft_model
    from ..merge.merge import check_save_method, save_pretrained_merged

    method = check_save_method(save_method)
    hub = _Hub(repo_id, token=token, endpoint=endpoint)
    hints = _base_hints(model, merge_kwargs.get("base"))
    hub.create_repo(private=private)
    kind = "lora" if method == "lora" else "merged"
    with tempfile.TemporaryDirectory(prefix="llmdeploy-push-") as tmp:
        out = pathlib.Path(tmp) / "model"
        save_pretrained_merged(model, out, tokenizer=tokenizer, save_method=method, **merge_kwargs)
        files = collect_files(out)
        if kind == "lora" and is_peft_model(model) and "README.md" in files:
            # PEFT's save_pretrained wrote a template card into our temporary folder (not the user's
            # file): ours replaces it, keeping its tags (e.g. the trainer's) but not "base_model:..." ones,
            # which the Hub derives from base_model itself (PEFT writes them with local paths too).
            peft_card = ModelCard.load(files.pop("README.md"), ignore_metadata_errors=True)
            tags = [t for t in (peft_card.data.tags or []) if isinstance(t, str)]
            hints["tags"] = [t for t in tags if not t.startswith("base_model:")]
        card = _card(files, kind, repo_id, hints)
        default = "Upload LoRA adapter with llmdeploy" if kind == "lora" else "Upload merged model with llmdeploy"
        return hub.commit(files, card, commit_message or default)


def push_folder(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    endpoint: str | None = None,
) -> str:
    """Upload an existing folder, or a list of files and folders, in one commit.

    A model card is added when there is no ``README.md`` among the files (nor in the repo), for what
    the files hold: ``.gguf`` files → a GGUF card; ``adapter_config.json`` → a LoRA adapter card;
    ``config.json`` with safetensors → a merged-model card. Nothing in the given folders is modified.

    Args:
        paths: a folder (its files keep their relative paths), a file, or a list of them (files land
            at the repo's root under their own names).
        repo_id: the Hub repo, ``"user/name"`` or ``"org/name"``.
        token: a Hub access token with write access; default: ``HF_TOKEN`` or the stored token.
        private: create the repo private or public; ignored when the repo exists.
        commit_message: default ``"Upload <N> files with llmdeploy"``.
        endpoint: the Hub's URL; default ``HF_ENDPOINT`` or https://huggingface.co.

    Returns:
        The URL of the commit.

    Raises:
        MissingFileError: a path that does not exist.
        InvalidOptionError: an invalid ``repo_id``, no files, or two files for one repo path.
        GGUFReadError: a ``.gguf`` file that is not a readable GGUF (before any upload).
        HubError: a Hub request failed (the message names the repo, the step and the fix).
    """
    hub = _Hub(repo_id, token=token, endpoint=endpoint)
    files = collect_files(paths)
    kind = detect_kind(files)
    card = _card(files, kind, repo_id, {}) if kind and "README.md" not in files else None
    hub.create_repo(private=private)
    n = len(files) + (card is not None)
    return hub.commit(files, card, commit_message or f"Upload {n} file{'s' * (n != 1)} with llmdeploy")


# -- model cards ------------------------------------------------------------------------------------


def _base_hints(model: Any, base: Any = None) -> dict[str, Any]:
    """The base model's Hub id and a local folder carrying its licence, as far as ``model`` tells them."""
    names: list[Any] = [str(base)] if base is not None else []
    local: pathlib.Path | None = None
    if isinstance(model, (str, os.PathLike)):
        folder = pathlib.Path(model)
        adapter = read_json_object(folder / "adapter_config.json")
        if adapter:
            names.append(adapter.get("base_model_name_or_path"))
        else:
            names.append(read_json_object(folder / "config.json").get("_name_or_path"))
            local = folder  # a full model folder: the files derive from it, and its README has its licence
    else:
        peft_config = getattr(model, "peft_config", None)
        if isinstance(peft_config, dict) and peft_config:
            active = getattr(model, "active_adapter", None)
            active = active[0] if isinstance(active, (list, tuple)) and active else active
            cfg = peft_config.get(active) if isinstance(active, str) else None
            names.append(getattr(cfg or next(iter(peft_config.values())), "base_model_name_or_path", None))
        names.append(getattr(model, "name_or_path", None))
        names.append(getattr(getattr(model, "config", None), "_name_or_path", None))
    hub_id = next((n for n in names if looks_like_hub_id(n)), None)
    folder = local or next((pathlib.Path(n) for n in names if isinstance(n, str) and n and os.path.isdir(n)), None)
    return {"base_model": hub_id, "base_folder": folder}


def _card(files: Mapping[str, pathlib.Path], kind: str | None, repo_id: str, hints: dict[str, Any]) -> ModelCard | None:
    if kind is None or "README.md" in files:
        return None
    return build_model_card(
        files,
        kind=kind,
        repo_id=repo_id,
        base_model=hints.get("base_model"),
        base_folder=hints.get("base_folder"),
        tags=hints.get("tags", ()),
    )


# -- the Hub ----------------------------------------------------------------------------------------


class _Hub:
    """One repo on one Hub endpoint, with every request's errors turned into :class:`HubError`."""

    def __init__(self, repo_id: str, *, token: str | None, endpoint: str | None) -> None:
        try:
            validate_repo_id(repo_id)
        except HFValidationError as e:
            raise InvalidOptionError(f"repo_id={repo_id!r} is not a Hub repo id ({e}); use 'user/name'") from None
        if not isinstance(repo_id, str) or "/" not in repo_id:
            raise InvalidOptionError(
                f"repo_id={repo_id!r} has no namespace; use 'user/name' (or 'org/name') "
                "so the repo lands where you expect"
            )
        import llmdeploy

        self.repo_id = repo_id
        self.api = HfApi(
            endpoint=endpoint, token=token, library_name="llmdeploy", library_version=llmdeploy.__version__
        )
        self.endpoint = self.api.endpoint
        self._secret = token if isinstance(token, str) and token else get_token()
        if not self._secret:
            raise HubError(
                f"no Hugging Face token to push to {repo_id}: log in with `hf auth login`, set HF_TOKEN, "
                "or pass token= (an access token with write access)"
            )

    def create_repo(self, *, private: bool | None) -> None:
        with self._step("create repo"):
            self.api.create_repo(self.repo_id, private=private, exist_ok=True, repo_type="model")

    def commit(self, files: Mapping[str, pathlib.Path], card: ModelCard | None, message: str) -> str:
        """One commit adding ``files`` (and ``card`` as README.md unless the repo has one); the commit URL."""
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in files.items()]
        if card is not None:
            if self._has_readme():
                logger.warning(
                    "%s already has a README.md: it is kept and no model card is generated (upload a README.md "
                    "among the files to replace it)",
                    self.repo_id,
                )
            else:
                operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(card).encode()))
        total = sum(p.stat().st_size for p in files.values())
        logger.info("uploading %d files (%.1f MB) to %s in one commit", len(operations), total / 1e6, self.repo_id)
        with self._step("upload"):
            info = self.api.create_commit(self.repo_id, operations, commit_message=message, repo_type="model")
        logger.info("pushed to %s: %s", self.repo_id, info.commit_url)
        return str(info.commit_url)

    def _has_readme(self) -> bool:
        with self._step("read repo info"):
            info = self.api.model_info(self.repo_id)
        return any(s.rfilename == "README.md" for s in info.siblings or [])

    @contextlib.contextmanager
    def _step(self, step: str) -> Iterator[None]:
        try:
            yield
        except HubError:
            raise
        except Exception as e:  # sorted by _hub_error; anything else is re-raised as is
            error = self._hub_error(step, e)
            if error is None:
                raise
            raise error from None  # the original holds the request (and its Authorization header): not chained

    def _hub_error(self, step: str, e: BaseException) -> HubError | None:
        http = _find(e, HfHubHTTPError)
        where = f"{self.repo_id} ({self.endpoint})"
        if http is not None:
            step = _step_of(_request_url(http), step)
            status = http.response.status_code
            phrase = getattr(http.response, "reason_phrase", None) or getattr(http.response, "reason", None)
            reason = (http.server_message or phrase or "").strip().rstrip(".")
            upload = f" while uploading {_quoted_path(e)}" if _quoted_path(e) else ""
            rid = f" (request id {http.request_id})" if http.request_id else ""
            said = f": {reason}" if reason else ""
            text = f"Hub {step} failed for {where}{upload}: HTTP {status}{said}{rid}. {self._fix(status, step)}"
            return HubError(self._scrub(text))
        transport = _find(e, _TRANSPORT_ERRORS) if _TRANSPORT_ERRORS else None
        if transport is not None:
            text = (
                f"Hub {step} failed for {where}: cannot reach the Hub ({type(transport).__name__}: {transport}). "
                "Check the network connection and the endpoint (endpoint= or HF_ENDPOINT)"
            )
            return HubError(self._scrub(text))
        if isinstance(e, ValueError) and "README.md" in str(e):
            return HubError(
                self._scrub(
                    f"Hub validate README.md failed for {where}: {e}. Fix the YAML block at the top of README.md"
                )
            )
        if isinstance(e, (ValueError, OSError, RuntimeError)):
            return HubError(self._scrub(f"Hub {step} failed for {where}: {type(e).__name__}: {e}"))
        return None

    def _fix(self, status: int, step: str) -> str:
        namespace = self.repo_id.split("/")[0]
        if step == "validate README.md" and status == 400:
            return "Fix the YAML block at the top of README.md (a mapping of the Hub's model card keys)"
        if status == 401:
            return (
                "The token was not accepted: log in with `hf auth login` (or set HF_TOKEN), or pass token= "
                "with a valid access token"
            )
        if status == 403:
            return (
                f"The token may not write to {self.repo_id}: use a token with the 'write' role (or a fine-grained "
                f"token allowed to write to '{namespace}'), or push to a namespace you can write to"
            )
        if status == 404:
            return f"Check the repo id, and that the token's account can write to '{namespace}'"
        if status == 409:
            return "The repo changed during the push (or a conflicting operation is running); push again"
        if status == 413:
            return "A file is larger than the Hub accepts; split GGUF files with max_file_size= (e.g. '40GB')"
        if status == 429:
            return "The Hub rate-limited the requests; wait a few minutes and push again"
        if status >= 500:
            return "The Hub had a server error; push again later (uploaded large files are not sent twice)"
        return "See the Hub's message for the cause"

    def _scrub(self, text: str) -> str:
        if self._secret:
            text = text.replace(self._secret, "***")
        return _TOKEN_LIKE.sub("hf_***", text)


def _find(e: BaseException | None, kind: type[BaseException] | tuple[type[BaseException], ...]) -> Any:
    """``e`` or the first exception of its ``__cause__``/``__context__`` chain that is a ``kind``."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, kind):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _request_url(error: HfHubHTTPError) -> str:
    try:
        return str(error.response.request.url)
    except (RuntimeError, AttributeError):  # httpx raises when a response carries no request
        return ""


def _quoted_path(e: BaseException) -> str | None:
    """The file named by huggingface_hub's "Error while uploading 'x' to the Hub." wrapper, if that is ``e``."""
    m = re.search(r"uploading '([^']+)'", str(e))
    return f"'{m.group(1)}'" if m else None


def _step_of(url: str, default: str) -> str:
    """Which step of a push a failed request belongs to, from its URL."""
    if "/api/repos/create" in url:
        return "create repo"
    if "/api/validate-yaml" in url:
        return "validate README.md"
    if re.search(r"/api/models/[^/]+/[^/]+/commit/", url):
        return "commit"
    if re.search(r"/api/models/[^/]+/[^/]+/?$", url):
        return "read repo info"
    if "/preupload/" in url or "/info/lfs/" in url:
        return "upload"
    return default
