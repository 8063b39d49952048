"""Uploading a saved pruned model to the Hub: exactly the files a user of the model needs, never a token.

Trainer's own push uploads the whole output directory (checkpoints, optimizer states, training
arguments); :func:`push_model_directory` uploads only :func:`hub_files`, validates the card's
metadata first and refuses any file that contains the token.
"""

from __future__ import annotations

import os
import re
from importlib import metadata
from pathlib import Path

from huggingface_hub import HfApi, ModelCard

from .card import CARD_FILE

# Top-level files of a saved pruned model that belong on the Hub (checkpoints, optimizer states and
# training arguments stay local).
HUB_FILE_PATTERNS = (
    r"config\.json",
    r"(model|pytorch_model)(-\d+-of-\d+)?\.safetensors",
    r"model\.safetensors\.index\.json",
    r"[A-Za-z_][A-Za-z0-9_]*\.py",  # the remote-code files save_pretrained copies (modeling.py, ...)
    r"pruning_(config|plan|report)\.json",
    r"preprocessor_config\.json",
    r"README\.md",
)


def hub_files(directory: str | os.PathLike) -> list[str]:
    """The top-level files of a saved pruned model that :func:`push_model_directory` uploads."""
    directory = Path(directory)
    return sorted(
        entry.name
        for entry in directory.iterdir()
        if entry.is_file() and any(re.fullmatch(pattern, entry.name) for pattern in HUB_FILE_PATTERNS)
    )


def push_model_directory(
    directory: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload pruned model (hf_vitprune)",
    create_pr: bool = False,
    endpoint: str | None = None,
):
    """Upload a saved pruned model (weights, config, remote code, pruning files, card) to ``repo_id``.

    Creates the repo if needed, validates the card's metadata with the Hub, then commits
    :func:`hub_files` of ``directory`` in one commit. Refuses (ValueError) to upload a file that
    contains the token. Returns the ``CommitInfo``.
    """
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory} holds no config.json; save the model there first (save_pretrained).")
    files = hub_files(directory)
    from huggingface_hub import get_token

    secret = token if isinstance(token, str) else get_token()
    if secret:
        needle = secret.encode()
        leaking = [name for name in files if needle in (directory / name).read_bytes()]
        if leaking:
            raise ValueError(
                f"Refusing to upload: {', '.join(leaking)} contain(s) your Hub token. Remove it and save again."
            )
    api = HfApi(endpoint=endpoint, token=token, library_name="hf_vitprune", library_version=_version())
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if CARD_FILE in files and endpoint is None:
        # ModelCard.validate talks to the configured endpoint (HF_ENDPOINT) and sends no token
        ModelCard((directory / CARD_FILE).read_text(encoding="utf-8")).validate()
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=directory,
        allow_patterns=files,
        commit_message=commit_message,
        revision=revision,
        create_pr=create_pr,
    )


def _version() -> str:
    try:
        return metadata.version("hf_vitprune")
    except metadata.PackageNotFoundError:
        return "unknown"
