"""Hub ids (`org/name`): downloaded once with huggingface_hub into the normal HF cache.

Only the files a ViT needs are fetched: config.json, preprocessor_config.json and the weights
(model.safetensors, sharded safetensors, else pytorch_model.bin), plus OpenCLIP's
open_clip_config.json and open_clip_*.safetensors (a repo holding only an OpenCLIP release
then loads too; one holding both layouts is read through config.json).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ModelNotFoundError, OfflineError

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


def download(repo_id: str, revision: str | None = None, quiet: bool = False) -> Path:
    """The local snapshot folder of a hub model, downloading what is missing."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = _offline()
    how = (
        f"run `vit fetch {repo_id}` once while online (without HF_HUB_OFFLINE=1), "
        "or pass a local model folder"
    )
    if quiet:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()

    def snapshot(patterns: list[str]) -> Path:
        return Path(
            str(
                snapshot_download(
                    repo_id,
                    allow_patterns=patterns,
                    revision=revision,
                    cache_dir=_cache_dir(),
                    local_files_only=offline,
                )
            )
        )

    try:
        folder = snapshot(CONFIG_FILES + SAFETENSORS_FILES)
        if not _has_weights(folder):
            folder = snapshot(CONFIG_FILES + PICKLE_FILES)
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
    except LocalEntryNotFoundError:
        state = "offline (HF_HUB_OFFLINE=1)" if offline else "the hub cannot be reached"
        raise OfflineError(f"{repo_id} is not in the local cache and {state}; {how}") from None
    except (HfHubHTTPError, OSError) as error:
        if offline:
            raise OfflineError(
                f"{repo_id} is not in the local cache and HF_HUB_OFFLINE=1; {how}"
            ) from None
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise OfflineError(f"{repo_id}: download failed ({first}); {how}") from None
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
