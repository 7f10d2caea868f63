"""Reading the package's JSON files (factors, host fits, kernel curves) with one
clear error line each."""

import json
import pathlib
from collections.abc import Callable
from typing import Any


def read_json_file(
    path: str | pathlib.Path,
    what: str,
    parse: Callable[[Any], Any],
    errors: tuple[type[Exception], ...] = (ValueError,),
):
    """``parse`` of the JSON in ``path``; a missing file, bad JSON or one of
    ``errors`` from ``parse`` is one ``ValueError`` line naming ``what`` and
    ``path``."""
    path = pathlib.Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path}: is a folder, expected a JSON file")
    if not path.is_file():
        raise ValueError(f"{what} not found: {path}")
    try:
        d = json.loads(path.read_text(), object_pairs_hook=_no_repeated_keys)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {path} is not valid JSON: {e}") from None
    except ValueError as e:  # a repeated key
        raise ValueError(f"{what} {path}: {e}") from None
    try:
        return parse(d)
    except errors as e:
        raise ValueError(f"{what} {path}: {e}") from None


def _no_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refusing a key written twice (``json`` keeps the last one
    silently, so an edit above it would be lost)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears twice in one object")
        out[key] = value
    return out
