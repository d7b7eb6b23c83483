"""The man-page retrieval set: roff parsing, and a clear error when the Debian packages are missing."""

from __future__ import annotations

import pytest

from vembed.data.manpage_data import package_pages, parse_page
from vembed.errors import DataError

PAGE = r""".\" a comment
.TH open 2 2023-02-05 "Linux man-pages 6.03"
.SH NAME
open, openat, creat \- open and possibly create a file
.SH SYNOPSIS
.BI "int open(const char *" pathname ", int " flags );
.SH DESCRIPTION
The
.BR open ()
system call opens the file specified by
.IR pathname .
.PP
Second paragraph with \fBbold\fP text.
.SH RETURN VALUE
Nothing here counts.
"""


def test_parse_page_takes_summary_and_description_without_roff():
    title, summary, description = parse_page(PAGE)
    assert title == "open, openat, creat"
    assert summary == "open and possibly create a file"
    assert description.startswith("The open() system call opens the file specified by pathname.")
    assert "Second paragraph with bold text." in description
    assert "Nothing here" not in description and "\\f" not in description


def test_so_redirects_and_pages_without_summary_are_skipped():
    assert parse_page(".so man3/printf.3\n") is None
    assert parse_page(".SH NAME\nfoo\n.SH DESCRIPTION\ntext\n") is None


def test_missing_package_names_the_install_command():
    with pytest.raises(DataError, match="apt-get install"):
        package_pages(("vembed-no-such-package",))
