"""Hub ids (`org/name`): downloaded once with huggingface_hub into the normal HF cache.

Only the files a ViT needs are fetched: config.json, preprocessor_config.json and the weights
(model.safetensors, sharded safetensors, else pytorch_model.bin), plus OpenCLIP's
open_clip_config.json and open_clip_*.safetensors (a repo holding only an OpenCLIP release
then loads too; one holding both layouts is read through config.json).

Network reads go through hub_http (timeouts, a progress deadline, size bounds); any failure
ends in one line naming its cause, and no `.incomplete` file of the failed download stays in
the cache.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ModelNotFoundError, OfflineError, VitError

CONFIG_FILES = ["config.json", "preprocessor_config.json", "open_clip_config.json"]
SAFETENSORS_FILES = [
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*.safetensors",
    "open_clip_*.safetensors",
]
PICKLE_FILES = ["pytorch_model.bin", "open_clip_pytorch_model.bin"]


def _offline() -> bool:
    # Read at call time: huggingface_hub reads its environment once, at import.
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _cache_dir() -> str | None:
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None  # huggingface_hub's own default (~/.cache/huggingface/hub)


def _has_weights(folder: Path) -> bool:
    return any(
        (folder / name).is_file()
        for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
    ) or _is_openclip(folder)


def _is_openclip(folder: Path) -> bool:
    return (
        any(path.is_file() for path in folder.glob("open_clip_*model.safetensors"))
        or (folder / "open_clip_pytorch_model.bin").is_file()
    )


def _remove_incomplete(repo_id: str) -> None:
    """Partial files a failed download left in the cache (huggingface_hub keeps them to resume
    later; a half file must not look like a download)."""
    from huggingface_hub.constants import HF_HUB_CACHE

    folder = Path(_cache_dir() or HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))
    try:
        partial = list((folder / "blobs").glob("*.incomplete"))
    except OSError:
        return
    for path in partial:
        path.unlink(missing_ok=True)


def download(repo_id: str, revision: str | None = None, quiet: bool = False) -> Path:
    """The local snapshot folder of a hub model, downloading what is missing."""
    try:
        return _download(repo_id, revision, quiet)
    except BaseException:
        if not _offline():
            _remove_incomplete(repo_id)
        raise


def _download(repo_id: str, revision: str | None, quiet: bool) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils import logging as hub_logging

    from .hub_http import HubUnreachable, cause_of, install

    install()
    hub_logging.set_verbosity_error()  # its retry chatter would add lines to our one
    offline = _offline()
    how = (
        f"run `vit fetch {repo_id}` once while online (without HF_HUB_OFFLINE=1), "
        "or pass a local model folder"
    )
    retry = "check the network, HF_ENDPOINT and any proxy, then try again"
    if quiet:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()

    def snapshot(patterns: list[str], local: bool) -> Path:
        return Path(
            str(
                snapshot_download(
                    repo_id,
                    allow_patterns=patterns,
                    revision=revision,
                    cache_dir=_cache_dir(),
                    local_files_only=local,
                )
            )
        )

    def snapshots(local: bool) -> Path:
        folder = snapshot(CONFIG_FILES + SAFETENSORS_FILES, local)
        if not _has_weights(folder):
            folder = snapshot(CONFIG_FILES + PICKLE_FILES, local)
        return folder

    try:
        try:
            folder = snapshots(offline)
        except HubUnreachable as unreachable:
            # The hub client gave up at once (hub_http): a model already in the cache is
            # used as huggingface_hub would after its retries; else the cause is named.
            try:
                folder = snapshots(True)
            except Exception:
                raise unreachable from None
    except GatedRepoError:
        raise ModelNotFoundError(
            f"{repo_id}: a gated model; accept its terms on huggingface.co "
            "and log in with `hf auth login`"
        ) from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(
            f"{repo_id}: no such model on the Hugging Face hub (or it is private); check the id"
        ) from None
    except RevisionNotFoundError:
        raise ModelNotFoundError(f"{repo_id}: no revision {revision!r}") from None
    except LocalEntryNotFoundError as error:
        if offline:
            raise OfflineError(
                f"{repo_id} is not in the local cache and HF_HUB_OFFLINE=1; {how}"
            ) from None
        cause = cause_of(error.__cause__ or error)
        raise OfflineError(
            f"{repo_id} is not in the local cache and the hub cannot be reached ({cause}); {retry}"
        ) from None
    except Exception as error:  # any failure of the network stack: one line, its cause named
        if isinstance(error, VitError):
            raise
        if offline:
            raise OfflineError(
                f"{repo_id} is not in the local cache and HF_HUB_OFFLINE=1; {how}"
            ) from None
        cause = cause_of(error)
        raise OfflineError(f"{repo_id}: download failed: {cause}; {retry}") from None
    if not ((folder / "config.json").is_file() or _is_openclip(folder)) or not _has_weights(folder):
        if offline:
            raise OfflineError(
                f"{repo_id} is only partly in the local cache and HF_HUB_OFFLINE=1; {how}"
            )
        raise ModelNotFoundError(
            f"{repo_id}: the repository has no config.json "
            "with model.safetensors or pytorch_model.bin"
        )
    return folder
