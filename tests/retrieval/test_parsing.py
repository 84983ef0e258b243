"""Parsing files to text: formats, encodings, and the error codes of bad files."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.retrieval import parse
from tests.retrieval import documents

TEXT = "Grüße: naïve café, 東京."


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("name", "data", "expected"),
    [
        ("a.txt", TEXT.encode(), TEXT),
        ("a.md", TEXT.encode("utf-8-sig"), TEXT),
        ("a.txt", TEXT.encode("utf-16"), TEXT),
        ("a.txt", TEXT.encode("utf-16-le"), TEXT),
        ("a.txt", TEXT.encode("utf-16-be"), TEXT),
        ("a.csv", "naïve,café".encode("cp1252"), "naïve,café"),
        ("a.json", b'{"k": "value"}', '{"k": "value"}'),
        ("main.py", b"def f():\n    return 1\n", "def f():\n    return 1\n"),
        ("upload", b"no extension at all", "no extension at all"),
        (
            "a.html",
            b"<html><head><title>t</title><style>p{}</style></head>"
            b"<body><p>One &amp; two</p><div>Three</div></body></html>",
            "One & two\nThree",
        ),
    ],
)
def test_text_formats_and_encodings(tmp_path: Path, name: str, data: bytes, expected: str) -> None:
    assert parse.extract_text(_write(tmp_path, name, data), name) == expected


def test_office_and_pdf(tmp_path: Path) -> None:
    pdf = parse.extract_text(_write(tmp_path, "a.pdf", documents.pdf(["First line (1)", "Second line"])), "a.pdf")
    assert pdf.split("\n") == ["First line (1)", "Second line"]
    docx = parse.extract_text(_write(tmp_path, "a.docx", documents.docx(["Para one", "Para two"])), "a.docx")
    assert docx.split("\n") == ["Para one", "Para two"]
    pptx = parse.extract_text(_write(tmp_path, "a.pptx", documents.pptx(["Title. Body text"])), "a.pptx")
    assert "Body text" in pptx


@pytest.mark.parametrize(
    ("name", "data", "code"),
    [
        ("a.exe", b"MZ", "unsupported_file"),
        ("a.png", b"\x89PNG\r\n", "unsupported_file"),
        ("a.pdf", b"not a pdf", "invalid_file"),
        ("a.docx", b"not a zip", "invalid_file"),
        ("a.pptx", b"PK\x03\x04broken", "invalid_file"),
        ("a.txt", b"\x00\x01\x02\x03\xff\xfe\x00\x00binary", "invalid_file"),
        ("a.txt", b"  \n\t ", "invalid_file"),
        ("a.pdf", documents.pdf([]), "invalid_file"),
    ],
)
def test_bad_files(tmp_path: Path, name: str, data: bytes, code: str) -> None:
    with pytest.raises(parse.ParseError) as exc:
        parse.extract_text(_write(tmp_path, name, data), name)
    assert exc.value.code == code and exc.value.message


SPHINX_PAGE = b"""<html><head><title>bisect</title></head><body>
<div class="mobile-nav"><nav class="nav-content" role="navigation">Python 3.11 Menu Search</nav></div>
<div class="related" role="navigation"><ul><li>index</li><li>modules</li><li>next: heapq</li></ul></div>
<div class="document"><div class="documentwrapper"><div class="bodywrapper"><div class="body" role="main">
<section><h1>bisect \xe2\x80\x94 Array bisection algorithm<a class="headerlink" href="#x">\xc2\xb6</a></h1>
<p>Keep a list in sorted order <img src="x.png"> without sorting it again.</p><br>
<div class="highlight"><pre>bisect_left(a, x)</pre></div></section>
</div></div></div>
<div class="sphinxsidebar" role="navigation"><div class="sphinxsidebarwrapper"><h3>Table of Contents</h3>
<p>Previous topic: heapq</p></div></div></div>
<div class="footer">Copyright 2001-2023 Python Software Foundation</div>
</body></html>"""


def test_html_keeps_the_content_and_drops_the_navigation(tmp_path: Path) -> None:
    text = parse.extract_text(_write(tmp_path, "bisect.html", SPHINX_PAGE), "bisect.html")
    assert text == (
        "bisect \u2014 Array bisection algorithm\n"
        "Keep a list in sorted order without sorting it again.\n"
        "bisect_left(a, x)"
    )


def test_html_without_a_marked_main_keeps_everything_but_navigation(tmp_path: Path) -> None:
    page = (
        b"<html><body><nav><a>Home</a><a>About</a></nav><h1>Title</h1><div><div>Nested</div> body</div>"
        b"<aside>related links</aside><footer>fine print</footer><p>End</p></body></html>"
    )
    assert parse.extract_text(_write(tmp_path, "p.html", page), "p.html") == "Title\nNested\nbody\nEnd"
