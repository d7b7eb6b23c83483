"""A second real retrieval set, from the Linux man-pages project (Debian `manpages`, `manpages-dev`).

Query: the one-line summary of a page's NAME section ("open and possibly create a file").
Positive: the page's title and the start of its DESCRIPTION section, with the roff markup removed.
The pages are prose written by other people than the docstrings of the demo set, about
system calls, library functions, file formats and concepts (sections 2, 3, 4, 5, 7).

    apt-get install manpages manpages-dev      # Debian/Ubuntu; the builder refuses without them
"""

from __future__ import annotations

import gzip
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

from vembed.data import Record
from vembed.data.demo_data import write_retrieval_dataset
from vembed.errors import DataError

PACKAGES = ("manpages", "manpages-dev")
SECTIONS = ("2", "3", "4", "5", "7")
_FONT = re.compile(r"\\f[BIRP]|\\f\(..|\\f\[[A-Z]*\]")
_ESCAPES = {r"\-": "-", r"\(em": "-", r"\(en": "-", r"\(aq": "'", r"\(dq": '"', r"\e": "\\", r"\~": " ", r"\ ": " ",
            r"\&": "", r"\%": "", r"\(lq": '"', r"\(rq": '"', r"\(bu": "*", r"\|": "", r"\^": ""}
_TEXT_MACROS = {".B", ".I", ".BR", ".IR", ".RB", ".RI", ".BI", ".IB", ".SM", ".SB"}


def package_pages(packages: tuple[str, ...] = PACKAGES) -> list[Path]:
    """The man page files the Debian packages installed (regular files, not links), sorted."""
    pages: list[Path] = []
    for pkg in packages:
        try:
            listing = subprocess.run(["dpkg", "-L", pkg], capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            raise DataError(
                f"man pages: Debian package {pkg!r} is not installed; run `apt-get install {' '.join(packages)}`"
            ) from None
        for line in listing.splitlines():
            path = Path(line)
            section = path.parent.name.removeprefix("man")
            if (
                path.suffix == ".gz"
                and path.parent.parent == Path("/usr/share/man")
                and section in SECTIONS
                and path.is_file()
                and not path.is_symlink()
            ):
                pages.append(path)
    if not pages:
        raise DataError(f"man pages: {', '.join(packages)} installed no pages under /usr/share/man (dpkg excludes?)")
    return sorted(set(pages))


def _plain(line: str) -> str:
    """One roff line as text: macro name dropped, quotes and font escapes removed."""
    if line.startswith((".", "'")):
        macro, _, rest = line.partition(" ")
        if macro not in _TEXT_MACROS:
            return ""
        args = [a or b for a, b in re.findall(r'"([^"]*)"|(\S+)', rest)]
        # Alternating-font macros join their arguments: .BR open () -> open()
        line = " ".join(args) if macro in (".B", ".I", ".SM", ".SB") else "".join(args)
    line = _FONT.sub("", line)
    for esc, rep in _ESCAPES.items():
        line = line.replace(esc, rep)
    return re.sub(r"\\[a-zA-Z(*][^ ]?", "", line).strip()


def parse_page(text: str) -> tuple[str, str, str] | None:
    """(title, NAME summary, DESCRIPTION start) of one roff page; None for a `.so` redirect or no summary."""
    lines = text.splitlines()
    if any(ln.startswith(".so ") for ln in lines[:5]):
        return None
    sections: dict[str, list[str]] = {}
    current = None
    for raw in lines:
        if raw.startswith(".SH"):
            current = raw[3:].strip().strip('"').upper()
            sections.setdefault(current, [])
        elif current is not None and not raw.startswith('.\\"'):
            if raw.startswith((".PP", ".P ", ".LP", ".TP", ".IP", ".SS")) or raw == ".P":
                sections[current].append("\n")
            else:
                sections[current].append(_plain(raw))
    name = " ".join(t for t in sections.get("NAME", []) if t.strip())
    title, sep, summary = name.partition(" - ")
    desc_paragraphs = [
        " ".join(p.split()) for p in " ".join(sections.get("DESCRIPTION", [])).split("\n") if p.strip()
    ]
    if not sep or not summary.strip() or not desc_paragraphs:
        return None
    description = ""
    for para in desc_paragraphs:  # whole paragraphs up to ~400 characters
        description = f"{description} {para}".strip()
        if len(description) >= 200:
            break
    return " ".join(title.split()), " ".join(summary.split()), description[:500]


def manpage_pairs(pages: list[Path] | None = None) -> Iterator[Record]:
    seen: set[str] = set()
    for path in pages if pages is not None else package_pages():
        parsed = parse_page(gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace"))
        if parsed is None:
            continue
        title, summary, description = parsed
        if len(summary) < 12 or len(description) < 60 or summary.lower() in seen:
            continue
        seen.add(summary.lower())
        yield Record(query=summary, positive=f"{title}: {description}")


def build_manpage_dataset(out_dir: str | Path, eval_fraction: float = 0.2, max_train: int = 2000) -> dict[str, str | int]:
    """The man-page set, written like the demo set (train, eval, corpus)."""
    return write_retrieval_dataset(manpage_pairs(), out_dir, eval_fraction, max_train)
