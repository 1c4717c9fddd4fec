"""Finding and reading a model's config, and building its model from it on the meta device.

A model is named as the user names it: "default", a model folder, a config.json, a .gguf
file or a repo id in the local Hugging Face cache. :func:`load_config` finds its config and
reads it with transformers (no weights are read, nothing is downloaded), turning every way
that can fail into one line; :func:`build_meta_model` builds the causal LM it describes on
the meta device: every layer and shape, no memory. :func:`quiet_libraries` silences the
libraries' chatter while they work.

Importing this module imports neither torch nor transformers; the functions do, when called.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError, first_line


# -- quieting the libraries --------------------------------------------------------


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Silence library chatter (bitsandbytes kernel notices, transformers config warnings)."""
    bnb = logging.getLogger("bitsandbytes")
    level = bnb.level
    bnb.setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        bnb.setLevel(level)


# -- finding and reading a config -------------------------------------------------


@dataclass(frozen=True)
class _ConfigSource:
    display: str
    folder: Path
    config_file: Path | None = None  # a bare config.json path
    gguf_file: str | None = None  # a GGUF file in `folder`


def _locate(source: str, root: Path | None) -> _ConfigSource:
    """Where a model's config is. Lighter than models.resolve_source: no weights needed."""
    from . import models

    source = source.strip()
    if not source:
        raise UserError('model: empty; give "default", a model folder, a config.json, a .gguf file or a repo id')
    if source == "default":
        ref = models.resolve_source("default")
        if ref.converted:
            return _ConfigSource(ref.display, ref.path)
        return _ConfigSource(ref.display, ref.path.parent, gguf_file=ref.gguf_file)
    path = Path(source).expanduser()
    if not path.is_absolute() and root is not None:
        path = root / path
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            models.check_gguf(path)
            return _ConfigSource(source, path.parent, gguf_file=path.name)
        if path.suffix.lower() == ".json":
            return _ConfigSource(source, path.parent, config_file=path)
        raise UserError(f"model {source}: a file but neither a .gguf nor a config.json")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"model {source}: {path} has no config.json; give a Hugging Face model folder")
        return _ConfigSource(source, path)
    if models.REPO_ID.match(source):
        snapshot = models.hub_snapshot(source)
        if snapshot is not None:
            return _ConfigSource(source, snapshot)
        raise UserError(f"model {source}: not a folder here and not in the local Hugging Face cache "
                        "(nothing is downloaded); `tunedeck models` lists the models found")
    raise UserError(f"model {source}: no such folder or file")


def load_config(source: str, *, root: Path | None = None, trust_remote_code: bool = False) -> tuple[Any, str]:
    """(transformers config, display name) of ``source``: "default", a model folder, a
    config.json, a .gguf file or a repo id in the local HF cache. Reads no weights."""
    where = _locate(source, root)
    from transformers import AutoConfig

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if where.gguf_file:
        kwargs["gguf_file"] = where.gguf_file
    target = str(where.config_file or where.folder)
    if not where.gguf_file:
        from .models import config_problem

        raw = where.config_file or where.folder / "config.json"
        try:
            problem = config_problem(json.loads(raw.read_bytes().decode("utf-8-sig")))
        except (OSError, ValueError, RecursionError):
            problem = None  # transformers says what is wrong with it
        if problem:
            raise UserError(f"model {where.display}: {problem}")
    try:
        with quiet_libraries():
            config = AutoConfig.from_pretrained(target, **kwargs)
    except (OSError, ValueError, KeyError, RecursionError) as exc:
        raise _config_error(where, exc) from None
    except Exception as exc:  # corrupt GGUFs and configs whose values no model has fail any way they like
        if not where.gguf_file:
            raise UserError(f"model {where.display}: config.json describes no model this transformers can build "
                            f"({first_line(exc)})") from None
        raise UserError(f"model {where.display}: cannot read the GGUF header ({first_line(exc)}); "
                        "the file may be corrupt or incomplete") from None
    return config, where.display


def _config_error(where: _ConfigSource, exc: Exception) -> UserError:
    msg = first_line(exc)
    if "trust_remote_code" in str(exc) or "custom code" in msg:
        return UserError(f"model {where.display}: its config needs the model's own code; set "
                         "model.trust_remote_code = true only if you trust it")
    unknown = re.search(r"model type `([^`]*)`", msg)
    if unknown or "Unrecognized model" in msg:
        kind = f"model_type {unknown.group(1)!r}" if unknown else "its model_type"
        return UserError(f"model {where.display}: unknown architecture ({kind}): this transformers does not "
                         "know it; upgrade transformers, or set model.trust_remote_code = true if the "
                         "model ships its own code")
    if "not a valid JSON" in msg:
        return UserError(f"model {where.display}: config.json is not valid JSON")
    if where.gguf_file:
        return UserError(f"model {where.display}: cannot read the GGUF header ({msg}); the file may be corrupt")
    return UserError(f"model {where.display}: cannot read its config ({msg})")


def build_meta_model(config: Any, *, display: str = "model", trust_remote_code: bool = False) -> Any:
    """The causal LM of ``config`` on the meta device: every layer and shape, no memory.

    ``torch.device("meta")`` rather than accelerate's ``init_empty_weights``, which leaves
    tied input and output embeddings untied (and so counts them twice).
    """
    import torch
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)
    try:
        with quiet_libraries(), torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        msg = first_line(exc)
        if "Unrecognized configuration class" in msg:
            raise UserError(f"model {display}: {type(config).__name__} is not a causal language model") from None
        raise UserError(f"model {display}: cannot build it from its config ({msg})") from None
    except Exception as exc:  # model constructors assert on inconsistent config values in many ways
        raise UserError(f"model {display}: cannot build it from its config "
                        f"({exc.__class__.__name__}: {first_line(exc)})") from None
