"""Parsers for the linearizability test corpus (``../shared/lincheck-corpus``).

The corpus (from Porcupine's test data) holds:

- ``jepsen/etcd_NNN.log``: Jepsen etcd runs against one compare-and-set register,
  lines ``INFO  jepsen.util - PROCESS<ws>TYPE<ws>F<ws>VALUE``; other lines are noise;
- ``kv/cNN-{ok,bad}.txt``: EDN-like maps ``{:process P, :type :invoke|:ok, :f
  :get|:put|:append, :key "K", :value "V"}`` for a string map with append;
- ``VERDICTS.tsv``: ``file<TAB>linearizable`` (``true`` / ``false``) for every file.

Both formats are turned into ordinary :class:`~jepsen_lite.history.Op` histories; the
line order is the real-time order and the line number becomes ``index`` and ``time``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jepsen_lite.checkers.linearizable import (
    CASRegisterModel,
    KVRegisterModel,
    LinearizabilityResult,
    Model,
    check_linearizable,
)
from jepsen_lite.history import HistoryError, Op, OpType

__all__ = [
    "CORPUS_ENV",
    "CorpusEntry",
    "CorpusError",
    "check_corpus",
    "check_corpus_file",
    "corpus_dir",
    "load_corpus_file",
    "load_verdicts",
    "model_for",
    "parse_etcd_log",
    "parse_kv_log",
]

CORPUS_ENV = "KVCLUSTER_LINCHECK_CORPUS"
"""Environment variable overriding the corpus directory."""

_ETCD_KEY = "register"


class CorpusError(ValueError):
    """The corpus is missing or a corpus file cannot be parsed."""


def corpus_dir() -> Path:
    """The corpus directory: ``$KVCLUSTER_LINCHECK_CORPUS``, else the shared copy
    beside the repository (``<repo>/../shared/lincheck-corpus``) when there is
    one, else the unmodified copy vendored in ``jepsen-lite/tests/lincheck-corpus``
    (MIT, from Porcupine; so a clone alone can run the tests).

    Does not check that it exists.
    """
    env = os.environ.get(CORPUS_ENV)
    if env:
        return Path(env).expanduser().resolve()
    package_root = Path(__file__).resolve().parents[1]  # jepsen_lite -> jepsen-lite
    shared = package_root.parents[1] / "shared" / "lincheck-corpus"  # beside the repo
    if (shared / "VERDICTS.tsv").is_file():
        return shared
    return package_root / "tests" / "lincheck-corpus"


@dataclass(frozen=True)
class CorpusEntry:
    """One line of ``VERDICTS.tsv``."""

    name: str  # relative path, e.g. "jepsen/etcd_000.log"
    path: Path
    linearizable: bool


def load_verdicts(directory: Path | None = None) -> list[CorpusEntry]:
    """Read ``VERDICTS.tsv`` (header ``file<TAB>linearizable``)."""
    d = corpus_dir() if directory is None else directory
    tsv = d / "VERDICTS.tsv"
    if not tsv.is_file():
        raise CorpusError(
            f"linearizability corpus not found: {tsv} does not exist "
            f"(set {CORPUS_ENV} to the lincheck-corpus directory)"
        )
    entries: list[CorpusEntry] = []
    for lineno, line in enumerate(tsv.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        cols = line.split("\t")
        if lineno == 1 and cols[0] == "file":
            continue
        if len(cols) != 2 or cols[1] not in ("true", "false"):
            raise CorpusError(f"{tsv}:{lineno}: expected 'file<TAB>true|false', got {line!r}")
        entries.append(CorpusEntry(cols[0], d / cols[0], cols[1] == "true"))
    return entries


# ----------------------------------------------------------------------------- etcd logs

_ETCD_LINE = re.compile(
    r"^INFO\s+jepsen\.util\s+-\s+(?P<process>\d+)\s+:(?P<type>invoke|ok|fail|info)"
    r"\s+:(?P<f>read|write|cas)\s+(?P<value>.*?)\s*$"
)
_INT = re.compile(r"^-?\d+$")
_PAIR = re.compile(r"^\[\s*(\S+)\s+(\S+)\s*\]$")


def _edn_scalar(text: str) -> Any:
    if text == "nil":
        return None
    if _INT.match(text):
        return int(text)
    if text.startswith(":"):
        return text[1:]  # keyword such as :timed-out
    raise ValueError(f"unsupported value {text!r}")


def _etcd_value(text: str) -> Any:
    m = _PAIR.match(text)
    if m:
        return [_edn_scalar(m.group(1)), _edn_scalar(m.group(2))]
    return _edn_scalar(text)


def parse_etcd_log(lines: Iterable[str], *, source: str = "<etcd log>") -> list[Op]:
    """Parse a Jepsen etcd CAS-register log into a history on one key.

    ``:ok`` / ``:fail`` / ``:info`` complete the process's pending invocation. A
    completion whose value is a keyword (``:timed-out``) keeps the invocation's value
    and records the keyword as ``extra["error"]``.
    """
    history: list[Op] = []
    pending: dict[int, Op] = {}
    for lineno, line in enumerate(lines, start=1):
        m = _ETCD_LINE.match(line.rstrip("\n"))
        if m is None:
            continue  # noise
        process = int(m.group("process"))
        typ = m.group("type")
        f = m.group("f")
        try:
            value = _etcd_value(m.group("value"))
        except ValueError as e:
            raise CorpusError(f"{source}:{lineno}: {e}") from e
        extra: dict[str, Any] = {}
        if typ == "invoke":
            op = Op(len(history), "invoke", process, lineno, f, _ETCD_KEY, value)
            pending[process] = op
        else:
            inv = pending.pop(process, None)
            if inv is None:
                raise CorpusError(f"{source}:{lineno}: completion without invocation")
            if isinstance(value, str):
                extra["error"] = value
                value = inv.value
            op = Op(len(history), _op_type(typ), process, lineno, f, _ETCD_KEY, value, extra)
        history.append(op)
    return history


def _op_type(text: str) -> OpType:
    if text == "invoke":
        return "invoke"
    if text == "ok":
        return "ok"
    if text == "fail":
        return "fail"
    if text == "info":
        return "info"
    raise CorpusError(f"unknown op type {text!r}")


# ----------------------------------------------------------------------------- kv logs

_EDN_TOKEN = re.compile(
    r"""\s*(?:
        (?P<open>\{) | (?P<close>\}) | (?P<comma>,)
      | "(?P<string>(?:[^"\\]|\\.)*)"
      | :(?P<keyword>[^\s,{}"]+)
      | (?P<atom>[^\s,{}"]+)
    )""",
    re.VERBOSE,
)
_EDN_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\"}


def _parse_edn_map(line: str) -> dict[str, Any]:
    """Parse a flat EDN map of keyword keys to strings, keywords, integers or nil."""
    tokens: list[tuple[str, Any]] = []
    pos = 0
    text = line.strip()
    while pos < len(text):
        m = _EDN_TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            raise ValueError(f"cannot parse EDN at column {pos + 1}: {text[pos : pos + 20]!r}")
        pos = m.end()
        kind = m.lastgroup
        if kind == "comma":
            continue
        if kind == "string":
            raw = m.group("string")
            tokens.append(("string", re.sub(r"\\(.)", lambda e: _EDN_ESCAPES[e.group(1)], raw)))
        elif kind == "keyword":
            tokens.append(("keyword", m.group("keyword")))
        elif kind == "atom":
            tokens.append(("atom", _edn_scalar(m.group("atom"))))
        else:
            tokens.append((kind or "", None))
    if len(tokens) < 2 or tokens[0][0] != "open" or tokens[-1][0] != "close":
        raise ValueError("expected a {...} map")
    body = tokens[1:-1]
    if len(body) % 2:
        raise ValueError("map has an odd number of forms")
    result: dict[str, Any] = {}
    for (kk, k), (vk, v) in zip(body[::2], body[1::2], strict=True):
        if kk != "keyword":
            raise ValueError(f"map key must be a keyword, got {k!r}")
        result[k] = v if vk != "keyword" else ":" + v
    return result


def parse_kv_log(lines: Iterable[str], *, source: str = "<kv log>") -> list[Op]:
    """Parse a Porcupine key-value log (``{:process P, :type :invoke, :f :get, ...}``)."""
    history: list[Op] = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            d = _parse_edn_map(line)
            process = d["process"]
            typ = str(d["type"]).lstrip(":")
            f = str(d["f"]).lstrip(":")
            key = d.get("key")
            if not isinstance(process, int) or not isinstance(key, str):
                raise ValueError("process must be an integer and key a string")
        except (KeyError, ValueError) as e:
            raise CorpusError(f"{source}:{lineno}: {e}") from e
        history.append(Op(len(history), _op_type(typ), process, lineno, f, key, d.get("value")))
    return history


# ----------------------------------------------------------------------------- running


def model_for(name: str) -> Model[Any]:
    """The model a corpus file is checked against (by its directory)."""
    if name.startswith("jepsen/"):
        return CASRegisterModel(initial=None)
    if name.startswith("kv/"):
        return KVRegisterModel(initial="")
    raise CorpusError(f"unknown corpus file kind: {name}")


def load_corpus_file(path: Path, name: str | None = None) -> list[Op]:
    """Parse one corpus file into a history (format chosen by its directory)."""
    label = name if name is not None else f"{path.parent.name}/{path.name}"
    lines = path.read_text(encoding="utf-8").splitlines()
    if label.startswith("jepsen/"):
        return parse_etcd_log(lines, source=str(path))
    if label.startswith("kv/"):
        return parse_kv_log(lines, source=str(path))
    raise CorpusError(f"unknown corpus file kind: {label}")


def check_corpus_file(
    entry: CorpusEntry | Path,
    *,
    max_steps: int | None = 10_000_000,
    time_limit_s: float | None = 60.0,
) -> LinearizabilityResult:
    """Parse and check one corpus file with the model for its kind."""
    if isinstance(entry, CorpusEntry):
        path, name = entry.path, entry.name
    else:
        path, name = entry, f"{entry.parent.name}/{entry.name}"
    history = load_corpus_file(path, name)
    try:
        return check_linearizable(
            history, model_for(name), max_steps=max_steps, time_limit_s=time_limit_s
        )
    except HistoryError as e:
        raise CorpusError(f"{path}: {e}") from e


def check_corpus(
    entries: Sequence[CorpusEntry] | None = None,
) -> list[tuple[CorpusEntry, LinearizabilityResult]]:
    """Check every corpus file listed in ``VERDICTS.tsv``."""
    todo = load_verdicts() if entries is None else entries
    return [(e, check_corpus_file(e)) for e in todo]
