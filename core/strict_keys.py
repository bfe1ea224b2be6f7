"""Keys a document has that its pydantic model does not know, at any depth.

Pydantic ignores unknown keys by default, and the specs must keep doing so where they are read back (a block
saved by an older FIRST may hold a field that has since gone). A file an operator writes by hand is another
matter: ``max_instance: 4`` silently ignored is a fleet that does not do what its file says. So files are checked
with this first, and every stray key is named with its path and, where one is close, the key that was meant.
"""

from __future__ import annotations

import difflib
import types
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel


def unknown_keys(model: type[BaseModel], data: object, where: str = "") -> list[str]:
    """Each key in ``data`` (a mapping meant for ``model``) that ``model`` has no field for, as
    ``path.to.key`` (with a "did you mean" where a field's name is close); nested models, lists and dicts of
    models are followed. Values of the wrong type are left to validation, which names them itself."""
    if not isinstance(data, dict):
        return []
    fields = {}
    for name, info in model.model_fields.items():
        fields[name] = info.annotation
        if isinstance(info.alias, str):
            fields[info.alias] = info.annotation
    out: list[str] = []
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(model.model_fields), n=1)
            out.append(f"{path}: unknown key" + (f" (did you mean {close[0]!r}?)" if close else ""))
            continue
        out += _inside(fields[key], value, path)
    return out


def _inside(annotation: Any, value: object, path: str) -> list[str]:
    """Unknown keys within ``value``, a value of type ``annotation``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return unknown_keys(annotation, value, path)
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType):
        models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        return _inside(models[0], value, path) if len(models) == 1 else []
    if origin in (list, tuple, set, frozenset) and args and isinstance(value, list):
        return [p for i, item in enumerate(value) for p in _inside(args[0], item, f"{path}[{i}]")]
    if origin is dict and len(args) == 2 and isinstance(value, dict):
        return [p for k, item in value.items() for p in _inside(args[1], item, f"{path}.{k}")]
    return []
