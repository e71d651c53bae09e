"""Readers of hostile input: file names, small JSON object files and safetensors headers.

Whatever is read here came from someone else (a directory being published, an upload, a stored
record): it is size-capped, type-checked and bounded before anything uses it, and no length it
claims is trusted. Each reader returns what it found and what is wrong, never raises for bad input.
"""

from __future__ import annotations

import json
import math
import struct
import unicodedata
from pathlib import Path
from typing import Any

from adapterdeck.core.formats import json_type_name, shown

DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}  # fmt: skip
MAX_JSON_BYTES = 1 << 20  # adapter_config.json, adapterdeck.json
MAX_JSON_DEPTH = 64
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit


def file_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a file of an adapter, or None when it is a plain file name.

    Applies to names in a directory being published, in an upload and in a stored manifest:
    nothing may name a path outside the directory it is written to.
    """
    if not isinstance(name, str) or not name:
        return "an empty file name"
    if name in (".", "..") or "/" in name or "\\" in name:
        return f"file name {shown(name)} is a path, not a plain file name"
    if "\x00" in name:
        return f"file name {shown(name)} contains a NUL character"
    if any(unicodedata.category(c) == "Cs" for c in name):
        return f"file name {shown(name)} is not valid UTF-8"
    if any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in name):
        return f"file name {shown(name)} contains control or invisible characters"
    if len(name.encode("utf-8")) > 255:
        return f"file name {shown(name)} is longer than 255 bytes"
    return None


def _depth(value: Any) -> int:
    """How deeply a decoded JSON value nests (iteratively: a hostile value must not exhaust the stack)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, level)
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, level + 1) for child in children if isinstance(child, dict | list))
    return deepest


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def read_json_object(
    path: Path, limit: int = MAX_JSON_BYTES, *, allow_nan: bool = False
) -> tuple[dict[str, Any] | None, str | None]:
    """A small JSON object file, or the reason it is not one: size, encoding, syntax, nesting, type.

    NaN and Infinity (Python's extension to JSON) are refused unless ``allow_nan``: PostgreSQL's
    JSON columns refuse them too.
    """
    size = path.stat().st_size
    if size > limit:
        return None, f"{path.name} is {size:,} bytes; the limit for it is {limit:,}"
    try:
        text = path.read_bytes().decode("utf-8")
        value = json.loads(text) if allow_nan else json.loads(text, parse_constant=_no_constant)
    except UnicodeDecodeError as exc:
        return None, f"{path.name} is not UTF-8 text (byte {exc.start + 1})"
    except RecursionError:
        return None, f"{path.name} nests JSON more than {MAX_JSON_DEPTH} levels deep"
    except ValueError as exc:  # JSONDecodeError, and integers too long to convert
        where = f" at line {exc.lineno} column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc).split(";")[0]
        return None, f"{path.name} is not valid JSON: {reason}{where}"
    if not isinstance(value, dict):
        return None, f"{path.name} must hold a JSON object; it holds a JSON {json_type_name(value)}"
    if _depth(value) > MAX_JSON_DEPTH:
        return None, f"{path.name} nests JSON more than {MAX_JSON_DEPTH} levels deep"
    return value, None


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], list[str]]:
    """The tensors of a safetensors file, and what is wrong with the file (empty when sound).

    Checks what the safetensors loader checks, without trusting the file: the header length
    against the file's size (before reading it), the header's shape, each tensor's dtype, shape and
    byte range, and that the tensors tile the data exactly (no overlap, no gap, nothing missing).
    """
    name = path.name
    header, data_bytes, problem = _header(path)
    if header is None:
        return {}, [problem]
    problems: list[str] = []
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        problems.append(f"{name}: __metadata__ must map names to strings")
    tensors: dict[str, Any] = {}
    for key, info in header.items():
        problem = _entry_problem(f"{name}: tensor {shown(key, 60)}", info)
        if problem:
            problems.append(problem)
        else:
            tensors[key] = info
    spans = sorted((info["data_offsets"][0], info["data_offsets"][1], key) for key, info in tensors.items())
    end = max((stop for _, stop, _ in spans), default=0)
    if end > data_bytes:
        problems.append(
            f"{name} is truncated: its header needs {end} bytes of data, the file has {data_bytes}"
        )
    elif not problems:
        problems = _tiling_problems(name, spans, end, data_bytes)
    return tensors, problems


def _header(path: Path) -> tuple[dict[str, Any] | None, int, str]:
    """A safetensors file's decoded header and how many bytes of data follow it, or why it has none."""
    name, size = path.name, path.stat().st_size
    if size < 8:
        return None, 0, f"{name} is {size} bytes: too short to be safetensors"
    with path.open("rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        if length > size - 8:
            return (
                None,
                0,
                (
                    f"{name}: header length {length} does not fit the file ({size} bytes); "
                    "truncated, or not a safetensors file?"
                ),
            )
        if length > MAX_HEADER_BYTES:
            return None, 0, f"{name}: the header is {length:,} bytes; the limit is {MAX_HEADER_BYTES:,}"
        raw = fh.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        return (
            None,
            0,
            f"{name}: the header is not UTF-8 text (byte {exc.start + 9}); not a safetensors file?",
        )
    except RecursionError:
        return None, 0, f"{name}: the header nests JSON too deeply; not a safetensors header"
    except ValueError as exc:
        return None, 0, f"{name}: the header is not valid JSON ({str(exc).split(';')[0]})"
    if not isinstance(header, dict):
        return None, 0, f"{name}: the header is a JSON {json_type_name(header)}, not an object"
    return header, size - 8 - length, ""


def _entry_problem(label: str, info: Any) -> str | None:
    """What is wrong with one tensor's header entry: its fields, dtype, shape and byte range."""
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        return f"{label} has a malformed header entry (needs dtype, shape and data_offsets)"
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        return f"{label} has unknown dtype {shown(str(dtype), 40)}"
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        return f"{label}: shape must be a list of non-negative integers, got {shown(str(shape), 60)}"
    if (
        not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets))
        or offsets[0] > offsets[1]
    ):
        return f"{label}: data_offsets must be [start, end] with 0 <= start <= end"
    start, stop = offsets
    if stop - start != math.prod(shape) * DTYPE_BYTES[dtype]:
        return f"{label} {dtype}{shown(str(shape), 60)} does not fill its {stop - start} bytes"
    return None


def _tiling_problems(name: str, spans: list[tuple[int, int, str]], end: int, data_bytes: int) -> list[str]:
    """Overlaps and gaps between the tensors' byte ranges (sorted by start), and bytes past the last."""
    problems: list[str] = []
    previous_stop, previous = 0, None
    for start, stop, key in spans:
        if start < previous_stop:
            problems.append(f"{name}: tensors {shown(previous or '', 60)} and {shown(key, 60)} overlap")
        elif start > previous_stop:
            gap = start - previous_stop
            problems.append(f"{name}: {gap} bytes before tensor {shown(key, 60)} belong to no tensor")
        previous_stop, previous = max(previous_stop, stop), key
    if end < data_bytes:
        problems.append(f"{name}: {data_bytes - end} bytes after the last tensor belong to no tensor")
    return problems
