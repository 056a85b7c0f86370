"""Pushing the merged model or the adapter of a finished run, with its model card, to the Hugging Face Hub.

The token comes from HF_TOKEN or the saved login (huggingface_hub reads both); this module never
reads, prints or writes it.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from finetune import runs
from finetune.card import base_model_id, model_card
from finetune.errors import FinetuneError
from finetune.recipe import Recipe

log = logging.getLogger("finetune.hub")

COMMIT_MESSAGES = {"merged": "Upload merged model (finetune)", "adapter": "Upload adapter (finetune)"}
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


def _upload_files(folder: Path) -> list[Path]:
    # README.md is replaced by the card; hidden files are editor or partial-write debris.
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.name != "README.md"
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _stage(folder: Path, files: list[Path], card: str, recipe: Recipe, staging: Path) -> None:
    for file in files:
        target = staging / file.relative_to(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(file, target)  # no copy of multi-GB weights when the filesystem allows it
        except OSError:
            shutil.copy2(file, target)
    (staging / "README.md").write_text(card, encoding="utf-8")
    config = staging / "adapter_config.json"
    if config.is_file():
        # The adapter points at the base by a local path on the training machine; on the Hub it must name the base's
        # repo.
        data = json.loads(config.read_text(encoding="utf-8"))
        data["base_model_name_or_path"] = base_model_id(recipe) or recipe.model.base
        config.unlink()  # a hard link would otherwise rewrite the run's own file
        config.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _transport_errors() -> tuple[type[Exception], ...]:
    """Connection errors of the HTTP client huggingface_hub uses (httpx2 in 2.x, httpx before)."""
    errors = []
    for name in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(name).HTTPError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _hub_error(error: Exception, repo_id: str) -> FinetuneError:
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(error, OfflineModeIsEnabled):
        return FinetuneError(f"push {repo_id}: HF_HUB_OFFLINE is set; unset it (and TRANSFORMERS_OFFLINE) to push")
    if isinstance(error, HfHubHTTPError):
        status = error.response.status_code if error.response is not None else None
        if status == 401:
            return FinetuneError(
                f"push {repo_id}: the Hub rejected the token (401); set HF_TOKEN to a valid write token or run `hf "
                "auth login`"
            )
        if status == 403:
            return FinetuneError(
                f"push {repo_id}: the token may not write to this namespace (403); use a write token with access to "
                "it, or a repo id under your own user"
            )
        return FinetuneError(f"push {repo_id}: the Hub answered HTTP {status}; check the repo id and retry later")
    return FinetuneError(
        f"push {repo_id}: cannot reach the Hugging Face Hub ({type(error).__name__}); check the network and retry"
    )


def push(
    run_dir: str | os.PathLike,
    repo_id: str,
    what: str = "merged",
    private: bool = True,
    dry_run: bool = False,
    api=None,
) -> dict:
    """Upload the merged model or the adapter with its model card; returns the repo id, file list and commit URL.

    Pushing the same files again makes no new commit. `private` applies when the repo is created.
    """
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if what not in COMMIT_MESSAGES:
        raise FinetuneError(f"push: what must be merged or adapter, got {what!r}")
    if not REPO_ID.match(repo_id or ""):
        raise FinetuneError(
            f"push --repo-id: {repo_id!r} is not a Hub repo id; use namespace/name, e.g. "
            f"your-user/{Path(str(run_dir)).name}"
        )
    run_dir = Path(run_dir)
    recipe = runs.finished_recipe(run_dir)
    folder = runs.RunFolder(run_dir).merged if what == "merged" else runs.RunFolder(run_dir).adapter
    if what == "merged" and not (folder / "merge.json").is_file():
        raise FinetuneError(
            f"{run_dir}: no merged model yet; run `finetune merge {run_dir}` first, or push the adapter with --adapter"
        )
    files = _upload_files(folder)
    card = model_card(run_dir, merged=what == "merged", repo_id=repo_id)
    names = sorted([str(f.relative_to(folder)) for f in files] + ["README.md"])
    result = {
        "repo_id": repo_id,
        "what": what,
        "private": private,
        "files": names,
        "commit_message": COMMIT_MESSAGES[what],
    }
    if dry_run:
        log.info(
            "dry run: would push %d files from %s to %s (%s)",
            len(names),
            folder,
            repo_id,
            "private" if private else "public",
        )
        return {**result, "card": card, "url": None}

    api = api or HfApi()
    if not (api.token or get_token()):
        raise FinetuneError(
            f"push {repo_id}: no Hugging Face token; set HF_TOKEN to a write token or run `hf auth login`"
        )
    log.info("pushing %s (%d files) to %s", folder, len(names), repo_id)
    with tempfile.TemporaryDirectory(prefix=".push-", dir=run_dir) as staging:
        _stage(folder, files, card, recipe, Path(staging))
        try:
            api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
            commit = api.upload_folder(
                folder_path=staging, repo_id=repo_id, repo_type="model", commit_message=COMMIT_MESSAGES[what]
            )
        except (HfHubHTTPError, OfflineModeIsEnabled, OSError, *_transport_errors()) as e:
            raise _hub_error(e, repo_id) from None
    url = getattr(commit, "commit_url", None) or str(commit)
    log.info("pushed to %s", url)
    return {**result, "url": url}
