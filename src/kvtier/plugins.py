"""Loading user classes (policies, cascade policies, tiers) named in the config by module path."""

from __future__ import annotations

import importlib
import inspect
from typing import TypeVar

from kvtier.config import ConfigError

T = TypeVar("T")


def load_class(module_path: str, name: str, base: type[T], *, path_key: str, name_key: str) -> type[T]:
    """``module_path.name``, checked to be a subclass of ``base``; ConfigError names the key at fault."""
    try:
        module = importlib.import_module(module_path)
    except ImportError as e:
        raise ConfigError(path_key, f"an importable module ({e})", module_path) from e
    cls = getattr(module, name, None)
    if not (inspect.isclass(cls) and issubclass(cls, base)):
        raise ConfigError(name_key, f"a {base.__name__} subclass defined in {module_path}", name)
    return cls
