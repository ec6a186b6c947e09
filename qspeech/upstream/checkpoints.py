"""Finding, downloading and safely reading upstream checkpoints in s3prl's formats."""

from __future__ import annotations

import hashlib
import os
import pickle
import urllib.error
import urllib.request
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from tqdm import tqdm

from qspeech.atomic import atomic_path
from qspeech.errors import CheckpointError
from qspeech.upstream.registry import checkpoint_formats, get_arch

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets"


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def s3prl_cache_dir() -> Path:
    """s3prl's download cache (`s3prl.util.download`), so files s3prl already fetched are reused."""
    return Path(os.environ.get("S3PRL_DOWNLOAD_DIR", Path.home() / ".cache" / "s3prl" / "download"))


def s3prl_cache_path(url: str) -> Path:
    # Same naming as s3prl.util.download._urls_to_filepaths: sha256(url).<basename>.
    return s3prl_cache_dir() / f"{hashlib.sha256(url.encode()).hexdigest()}.{Path(url).name}"


def download(url: str, dst: Path, timeout: float = 30.0) -> Path:
    """Download to a temp file beside dst, then rename: an interrupted download leaves no bad file."""
    req = urllib.request.Request(url, headers={"User-Agent": "qspeech"})
    with urllib.request.urlopen(req, timeout=timeout) as resp, atomic_path(dst) as tmp:
        total = int(resp.headers.get("Content-Length") or 0) or None
        with open(tmp, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, desc=dst.name) as bar:
            while chunk := resp.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))
    return dst


def resolve(name: str, url: str | None, ckpt: str | None, asset: str | None) -> Path:
    """The local file for an upstream: model.ckpt, else the packaged asset, else s3prl's cache/URL."""
    if ckpt:
        path = Path(ckpt).expanduser()
        if not path.is_file():
            raise CheckpointError(f"model.ckpt={ckpt}: no such file; give the path of an s3prl checkpoint")
        return path
    if asset:
        path = ASSET_DIR / asset
        if not path.is_file():
            raise CheckpointError(
                f"the packaged checkpoint for {name} ({path}) is missing; rebuild it with `make assets`, "
                f"pass model.ckpt=PATH, or use model.init=random"
            )
        return path
    if not url:
        raise CheckpointError(f"model {name} has no URL, asset or model.ckpt; pass model.ckpt=PATH")
    path = s3prl_cache_path(url)
    if path.is_file():
        return path
    try:
        return download(url, path)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        reason = getattr(e, "reason", e)
        raise CheckpointError(
            f"cannot download the {name} checkpoint from {url} ({reason}); with no network, copy the file "
            f"to {path} or pass model.ckpt=/path/to/{Path(url).name}"
        ) from None


def _unreadable(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{path} is not a readable checkpoint ({why}): it is corrupt, truncated or another "
                           "kind of file; re-download it or pass another model.ckpt")


def _blocked_global(e: Exception) -> str | None:
    """The class/function a well-formed pickle wanted that weights_only refused, or None when the failure is
    something else (garbage bytes, a truncated stream): only the former is a file one might choose to trust."""
    for line in str(e).splitlines():
        if "unsupported global" in line.lower():  # "Unsupported global: GLOBAL x.y", "load unsupported GLOBAL x.y"
            words = line.replace(":", " ").split()
            i = next((k for k, w in enumerate(words) if w == "GLOBAL"), None)
            return words[i + 1] if i is not None and i + 1 < len(words) else "a Python object"
    return None


def load(path: Path, trust: bool = False) -> dict:
    """torch.load with weights_only=True unless the user trusts the file (model.trust_checkpoint=true).
    Only a well-formed file whose pickle names non-tensor objects is offered the trust switch; corrupt or
    truncated files are called that, since unpickling them fully would not help and may run code."""
    if path.is_file() and path.stat().st_size == 0:
        raise _unreadable(path, "0 bytes")
    try:
        with warnings.catch_warnings():  # a non-torch pickle makes torch warn before it fails: one line only
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            state = torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as e:
        blocked = None if trust else _blocked_global(e)
        if blocked is None:
            raise _unreadable(path, "not a valid pickle") from None
        raise CheckpointError(
            f"{path} holds objects other than tensors and plain containers ({blocked}), which a safe load "
            "refuses; if you trust the file and its source, pass model.trust_checkpoint=true"
        ) from None
    except Exception as e:  # truncated zip, random bytes, wrong file type...
        raise _unreadable(path, type(e).__name__) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not an s3prl checkpoint (a {type(state).__name__}, not a dict)")
    return state


def check_format(state: dict, arch: str, path: Path) -> None:
    """The keys of `arch`'s s3prl format are there and each config / weights entry is a mapping, so a file
    of the wrong kind is one line here rather than a TypeError in the model builder."""
    keys = get_arch(arch).checkpoint_keys
    missing = [k for k in keys if k not in state]
    if missing:
        found = next((f for f, fkeys in checkpoint_formats().items() if all(k in state for k in fkeys)), None)
        hint = f"it looks like a '{found}' checkpoint" if found else f"its keys are {sorted(map(str, state))[:6]}"
        raise CheckpointError(
            f"{path} is not an s3prl {arch} checkpoint (missing {', '.join(missing)}; {hint}); "
            f"check model= matches the file"
        )
    bad = [k for k in keys if not isinstance(state[k], Mapping)]
    if bad:
        raise CheckpointError(f"{path} is not an s3prl {arch} checkpoint ({', '.join(bad)} should be a mapping, "
                              f"not {type(state[bad[0]]).__name__}); check model= matches the file")
