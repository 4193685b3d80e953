"""A small block-style YAML writer for the deployment files (no PyYAML on edge installs).

`to_yaml` takes what the generators build: dicts (kept in insertion order), lists, strings,
ints, bools and None. A string is written plain when YAML reads it back as that same string,
else double-quoted with JSON escapes (a JSON string is a valid YAML double-quoted scalar), so
`"7000"`, `"true"`, `"*"` or `"a: b"` stay strings. A short list of scalars is written
on one line (`[a, b]`). `to_yaml_stream` joins documents with `---`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

FLOW_WIDTH = 80  # a list of scalars up to this wide is written on one line
_PLAIN = re.compile(r"(-+(?=[A-Za-z])|[A-Za-z_/.])[A-Za-z0-9_/.,=+@-]*( [A-Za-z0-9_/.,=+@()-]+)*")
_RESERVED = re.compile(r"(?i)(y|n|yes|no|true|false|on|off|null|~|[-+]?\.?(inf|nan|[0-9].*))")


def scalar(value: Any, flow: bool = False) -> str:
    """One YAML scalar that reads back as `value` (inside `[...]` when `flow`)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return json.dumps(value)
    text = str(value)
    if (_PLAIN.fullmatch(text) and not _RESERVED.fullmatch(text)
            and not (flow and "," in text)):
        return text
    return json.dumps(text)


def _lines(value: Any, indent: str) -> Iterable[str]:
    if isinstance(value, dict):
        for key, item in value.items():
            head = f"{indent}{scalar(key)}:"
            if isinstance(item, dict) and item or isinstance(item, list) and not _flow(item):
                yield head
                yield from _lines(item, indent + "  ")
            else:
                yield f"{head} {_inline(item)}"
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, dict) and item or isinstance(item, list) and not _flow(item):
                nested = list(_lines(item, indent + "  "))
                yield f"{indent}- {nested[0].lstrip()}"
                yield from nested[1:]
            else:
                yield f"{indent}- {_inline(item)}"
    else:
        yield indent + scalar(value)


def _flow(value: list) -> str | None:
    """`[a, b]` for a short list of scalars, else None (written as a block)."""
    if any(isinstance(item, dict | list) for item in value):
        return None
    text = "[" + ", ".join(scalar(item, flow=True) for item in value) + "]"
    return text if len(text) <= FLOW_WIDTH else None


def _inline(value: Any) -> str:
    if isinstance(value, dict):
        return "{}"
    if isinstance(value, list):
        return _flow(value) or "[]"
    return scalar(value)


def to_yaml(document: Any) -> str:
    """A dict or list as block-style YAML text ending in a newline."""
    return "\n".join(_lines(document, "")) + "\n"


def to_yaml_stream(documents: Iterable[Any]) -> str:
    """Several documents in one file, separated by `---` (a Kubernetes manifest)."""
    return "---\n".join(to_yaml(doc) for doc in documents)
