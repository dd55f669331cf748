"""Config values: each kind of value checked and converted (:func:`convert`), the metrics
address, and the pattern matching the candidate rules use. Pure: no I/O."""
from __future__ import annotations

import dataclasses
import fnmatch
import ipaddress
import math
import re
from typing import Callable

from ..units import parse_size


# --- value parsing --------------------------------------------------------------------------------
def _as_bool(value, from_text: bool) -> bool:
    if isinstance(value, bool):
        return value
    if from_text and isinstance(value, str):
        low = value.strip().lower()
        if low in ("1", "true", "yes", "on", "y"):
            return True
        if low in ("0", "false", "no", "off", "n"):
            return False
    raise ValueError(f"expected true or false, got {value!r}")


def _as_list(value, from_text: bool) -> list:
    if isinstance(value, list):
        return value
    if from_text and isinstance(value, str):
        # environment and --set: comma-separated; empty string = empty list
        return [item.strip() for item in value.split(",") if item.strip()]
    raise ValueError(f"expected a list such as [\"a\", \"b\"], got {value!r}")


def _as_number(value, from_text: bool, parse: Callable, types: tuple, what: str):
    """``value`` as one of ``types`` (text parsed with ``parse`` when ``from_text``); never a bool,
    never infinite or NaN."""
    if isinstance(value, str) and from_text:
        try:
            value = parse(value.strip())
        except ValueError:
            raise ValueError(f"expected {what}, got {value!r}") from None
    if (isinstance(value, bool) or not isinstance(value, types)
            or (isinstance(value, float) and not math.isfinite(value))):
        raise ValueError(f"expected {what}, got {value!r}")
    return value


def convert(f: dataclasses.Field, value, from_text: bool = False):
    """Check and convert one value for field ``f``; ValueError says what was expected."""
    meta = f.metadata
    kind = meta["kind"]
    if kind == "size":
        out = parse_size(value)
    elif kind == "int":
        out = _as_number(value, from_text, int, (int,), "an integer")
    elif kind == "float":
        out = float(_as_number(value, from_text, float, (int, float), "a number"))
    elif kind == "bool":
        out = _as_bool(value, from_text)
    elif kind in ("str", "choice"):
        if not isinstance(value, str):
            raise ValueError(f"expected a string, got {value!r}")
        out = value.strip() if from_text else value
        if kind == "choice" and out not in meta["choices"]:
            raise ValueError(f"expected one of {', '.join(meta['choices'])}, got {value!r}")
    elif kind in ("globs", "regexes"):
        items = _as_list(value, from_text)
        for item in items:
            if not isinstance(item, str) or not item:
                raise ValueError(f"expected non-empty strings, got {item!r}")
            if kind == "regexes":
                try:
                    re.compile(item)
                except re.error as err:
                    raise ValueError(f"bad regular expression {item!r}: {err}") from None
        out = list(items)
    elif kind == "uids":
        items = _as_list(value, from_text)
        out = []
        for item in items:
            try:
                uid = int(item) if not isinstance(item, bool) else None
            except (TypeError, ValueError):
                uid = None
            if uid is None or uid < 0:
                raise ValueError(f"expected non-negative integer uids, got {item!r}")
            out.append(uid)
    else:  # pragma: no cover - a bug in the field table
        raise AssertionError(kind)
    lo, hi = meta["lo"], meta["hi"]
    if lo is not None and out < lo:
        raise ValueError(f"must be at least {lo}, got {value!r}")
    if hi is not None and out > hi:
        raise ValueError(f"must be at most {hi}, got {value!r}")
    return out


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[v6]:PORT`` → (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host or int(port) > 65535:
        raise ValueError(f"expected HOST:PORT such as 127.0.0.1:9847, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --- matching helpers used by the policy (pure) ---------------------------------------------------
def glob_match(patterns, text: str) -> bool:
    return bool(text) and any(fnmatch.fnmatchcase(text, p) for p in patterns)


def regex_search(patterns, text: str) -> bool:
    return bool(text) and any(re.search(p, text) for p in patterns)
