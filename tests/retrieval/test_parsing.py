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
