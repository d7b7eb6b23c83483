"""A small, real retrieval set built from the documentation that ships with Python.

Query: the summary line of a standard-library docstring. Positive: the object's
signature and the rest of its docstring. No download, and the same on every
machine with the same Python version.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

from vembed.data import Record, split_records, write_records

MODULES = (
    "argparse", "array", "ast", "asyncio", "base64", "bisect", "builtins", "calendar", "cmath", "codecs",
    "collections", "concurrent.futures", "configparser", "contextlib", "copy", "csv", "dataclasses",
    "datetime", "decimal", "difflib", "email.message", "email.utils", "enum", "filecmp", "fnmatch",
    "fractions", "ftplib", "functools", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "html",
    "http.client", "imaplib", "inspect", "io", "ipaddress", "itertools", "json", "locale", "logging",
    "lzma", "mailbox", "math", "mimetypes", "multiprocessing", "operator", "os", "os.path", "pathlib",
    "pickle", "pkgutil", "platform", "plistlib", "poplib", "pprint", "queue", "random", "re", "sched",
    "secrets", "selectors", "shelve", "shlex", "shutil", "signal", "smtplib", "socket", "sqlite3",
    "ssl", "statistics", "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "time", "timeit", "tokenize", "traceback", "types", "typing", "unicodedata",
    "urllib.parse", "urllib.request", "uuid", "warnings", "wave", "weakref", "xml.etree.ElementTree",
    "zipfile", "zlib",
)


def _signature(obj: object) -> str:
    try:
        signature = str(inspect.signature(obj))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "(...)"
    # A sentinel default reads `<object object at 0x7f...>`: an address that changes with every process.
    return re.sub(r" at 0x[0-9a-fA-F]+", "", signature)


def _members(module_name: str) -> Iterator[tuple[str, object]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = importlib.import_module(module_name)
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)):
            continue
        if getattr(obj, "__module__", None) not in (module_name, module.__name__) and module_name != "builtins":
            continue
        yield f"{module_name}.{name}", obj
        if inspect.isclass(obj):
            for mname, meth in sorted(vars(obj).items()):
                if not mname.startswith("_") and (inspect.isfunction(meth) or inspect.ismethoddescriptor(meth)):
                    yield f"{module_name}.{name}.{mname}", meth


def docstring_pairs() -> Iterator[Record]:
    for module_name in MODULES:
        try:
            members = list(_members(module_name))
        except ImportError:
            continue
        for qualname, obj in members:
            doc = inspect.getdoc(obj) or ""
            lines = [ln.strip() for ln in doc.strip().splitlines()]
            if len(lines) < 3 or not lines[0]:
                continue
            summary = lines[0]
            body = " ".join(ln for ln in lines[1:] if ln)
            if not 15 <= len(summary) <= 200 or len(body) < 40 or summary.startswith(qualname.rsplit(".", 1)[-1] + "("):
                continue
            yield Record(query=summary, positive=f"{qualname}{_signature(obj)}: {body[:400]}")


def write_retrieval_dataset(
    records: Iterable[Record], out_dir: str | Path, eval_fraction: float = 0.2, max_train: int = 2000
) -> dict[str, str | int]:
    """Write train.jsonl, eval.jsonl and corpus.jsonl (train positives as distractors)."""
    paths = {name: Path(out_dir) / f"{name}.jsonl" for name in ("train", "eval", "corpus")}
    split = split_records(records, eval_fraction=eval_fraction, seed=0)
    train = split.train[:max_train]
    write_records(train, paths["train"])  # creates out_dir
    write_records(split.eval, paths["eval"])
    with paths["corpus"].open("w", encoding="utf-8") as fh:
        for r in train:
            fh.write(json.dumps({"text": r.positive}) + "\n")
    return {**{name: str(path) for name, path in paths.items()}, "n_train": len(train), "n_eval": len(split.eval)}


def build_demo_dataset(out_dir: str | Path, eval_fraction: float = 0.2, max_train: int = 2000) -> dict[str, str | int]:
    """The docstring demo set (see write_retrieval_dataset)."""
    return write_retrieval_dataset(docstring_pairs(), out_dir, eval_fraction, max_train)
