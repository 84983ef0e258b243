"""Files to plain text: PDF (pypdf), DOCX (python-docx), PPTX (python-pptx),
HTML, and text or source files in UTF-8, UTF-16 or single-byte encodings.

Runs in a worker thread (it is CPU-bound and the libraries are synchronous).
A file we cannot read raises ParseError with the code OpenAI reports in
``last_error``: ``unsupported_file`` for a kind we do not handle,
``invalid_file`` for a file of a known kind that is broken or has no text.
"""

from __future__ import annotations

import codecs
import html.parser
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Literal

ErrorCode = Literal["unsupported_file", "invalid_file"]

# Source and markup files are read as text (OpenAI's file_search list, abridged).
TEXT_EXTENSIONS = frozenset(
    {
        ".txt",
        ".md",
        ".markdown",
        ".rst",
        ".csv",
        ".tsv",
        ".json",
        ".jsonl",
        ".xml",
        ".yaml",
        ".yml",
        ".toml",
        ".ini",
        ".cfg",
        ".log",
        ".tex",
        ".py",
        ".pyi",
        ".js",
        ".mjs",
        ".ts",
        ".tsx",
        ".jsx",
        ".java",
        ".kt",
        ".scala",
        ".c",
        ".h",
        ".cc",
        ".cpp",
        ".hpp",
        ".cs",
        ".go",
        ".rs",
        ".rb",
        ".php",
        ".pl",
        ".sh",
        ".bash",
        ".zsh",
        ".ps1",
        ".sql",
        ".swift",
        ".m",
        ".r",
        ".lua",
        ".dart",
        ".css",
        ".scss",
        ".vue",
        ".svelte",
    }
)
HTML_EXTENSIONS = frozenset({".html", ".htm", ".xhtml"})


class ParseError(Exception):
    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code: ErrorCode = code
        self.message = message


def extract_text(path: Path, filename: str) -> str:
    """The file's text; ParseError if it has none we can read."""
    suffix = Path(filename).suffix.lower()
    reader = _READERS.get(suffix)
    if reader is None:
        if suffix in TEXT_EXTENSIONS or not suffix:
            reader = _read_text
        elif suffix in HTML_EXTENSIONS:
            reader = _read_html
        else:
            raise ParseError("unsupported_file", f"Files with extension [{suffix}] are not supported for retrieval.")
    try:
        text = reader(path)
    except ParseError:
        raise
    except Exception as exc:  # each library has its own error family
        raise ParseError("invalid_file", f"The file could not be parsed: {type(exc).__name__}.") from exc
    if not text.strip():
        raise ParseError("invalid_file", "The file contains no text that could be extracted.")
    if "\x00" in text:
        # PostgreSQL's text columns refuse a NUL character, which SQLite
        # stores: the file's chunks failed its ingestion on one database
        # and not the other. One can come from a PDF's or a document's
        # text, UTF-16 that decodes to one, or text past decode()'s
        # sample. Written as U+FFFD, as decode() writes what it cannot
        # read, on both databases alike.
        text = text.replace("\x00", "\ufffd")
    return text


def decode(data: bytes) -> str:
    """Bytes to text: BOMs first, then UTF-8, then UTF-16 without a BOM
    (recognised by its NUL bytes), then Windows-1252 for legacy text.
    Binary data (NULs that are not UTF-16) is refused."""
    for bom, encoding in (
        (codecs.BOM_UTF8, "utf-8-sig"),
        (codecs.BOM_UTF16_LE, "utf-16"),
        (codecs.BOM_UTF16_BE, "utf-16"),
    ):
        if data.startswith(bom):
            return data.decode(encoding, errors="replace")
    sample = data[:4096]
    if b"\x00" in sample:
        even_nuls, odd_nuls = sample[0::2].count(0), sample[1::2].count(0)
        if odd_nuls > len(sample) // 4 and even_nuls < odd_nuls // 8:
            return data.decode("utf-16-le", errors="replace")
        if even_nuls > len(sample) // 4 and odd_nuls < even_nuls // 8:
            return data.decode("utf-16-be", errors="replace")
        raise ParseError("invalid_file", "The file is binary, not text.")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")


def _read_text(path: Path) -> str:
    return decode(path.read_bytes())


class _HTMLText(html.parser.HTMLParser):
    """Visible text of a page, without its navigation.

    Generated sites repeat their navigation on every page (a Sphinx page has
    its sidebar, a nav bar twice and a footer: 13% of the words of Python's
    library docs). Indexed, that text matches every query about anything and
    dilutes each page's own words. So regions marked as navigation (nav,
    footer, aside, ARIA landmark roles, the usual Sphinx and theme classes)
    are dropped, and when the page marks its main content (``<main>``,
    ``role="main"``, ``<article>``) only that is kept.
    """

    SKIP = frozenset({"script", "style", "head", "noscript", "template", "nav", "footer", "aside", "svg", "button"})
    SKIP_ROLES = frozenset({"navigation", "contentinfo", "banner", "search", "complementary"})
    SKIP_CLASSES = frozenset(
        {"sphinxsidebar", "related", "footer", "mobile-nav", "headerlink", "navbar", "breadcrumb", "breadcrumbs"}
    )
    MAIN_TAGS = frozenset({"main", "article"})
    BLOCK = frozenset({"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "section", "dt", "dd"})
    # Elements without an end tag never open a region.
    VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.main_parts: list[str] = []
        # (tag, depth of that tag name) of the region being skipped / of main.
        self.skip: tuple[str, int] | None = None
        self.main: tuple[str, int] | None = None
        self.found_main = False

    def _skipped(self, tag: str, attrs: list[tuple[str, str | None]]) -> bool:
        if tag in self.SKIP:
            return True
        values = dict(attrs)
        if (values.get("role") or "") in self.SKIP_ROLES:
            return True
        return not self.SKIP_CLASSES.isdisjoint((values.get("class") or "").split())

    def _is_main(self, tag: str, attrs: list[tuple[str, str | None]]) -> bool:
        return tag in self.MAIN_TAGS or dict(attrs).get("role") == "main"

    def _emit(self, text: str) -> None:
        self.parts.append(text)
        if self.main is not None:
            self.main_parts.append(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self.skip is not None:
            if tag == self.skip[0]:
                self.skip = (tag, self.skip[1] + 1)
            return
        if tag not in self.VOID and self._skipped(tag, attrs):
            self.skip = (tag, 1)
            return
        if self.main is not None and tag == self.main[0]:
            self.main = (tag, self.main[1] + 1)
        elif self.main is None and tag not in self.VOID and self._is_main(tag, attrs):
            self.main, self.found_main = (tag, 1), True
        if tag in self.BLOCK:
            self._emit("\n")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self.skip is None and tag in self.BLOCK:
            self._emit("\n")

    def handle_endtag(self, tag: str) -> None:
        if self.skip is not None:
            if tag == self.skip[0]:
                depth = self.skip[1] - 1
                self.skip = (tag, depth) if depth else None
            return
        if tag in self.BLOCK:
            self._emit("\n")
        if self.main is not None and tag == self.main[0]:
            depth = self.main[1] - 1
            self.main = (tag, depth) if depth else None

    def handle_data(self, data: str) -> None:
        if self.skip is None:
            self._emit(data)

    def text(self) -> str:
        main = "".join(self.main_parts)
        return main if self.found_main and main.strip() else "".join(self.parts)


def html_to_text(markup: str) -> str:
    parser = _HTMLText()
    parser.feed(markup)
    parser.close()
    lines = (" ".join(line.split()) for line in parser.text().splitlines())
    return "\n".join(line for line in lines if line)


def _read_html(path: Path) -> str:
    return html_to_text(decode(path.read_bytes()))


def _read_pdf(path: Path) -> str:
    import pypdf  # imported lazily: only the worker thread parsing a PDF pays for it

    reader = pypdf.PdfReader(str(path))
    if reader.is_encrypted:
        raise ParseError("invalid_file", "The PDF is encrypted.")
    return "\n\n".join(page.extract_text() or "" for page in reader.pages)


def _require_zip(path: Path, kind: str) -> None:
    if not zipfile.is_zipfile(path):
        raise ParseError("invalid_file", f"The file is not a valid {kind} document.")


def _read_docx(path: Path) -> str:
    import docx

    _require_zip(path, "DOCX")
    document = docx.Document(str(path))
    parts = [paragraph.text for paragraph in document.paragraphs]
    for table in document.tables:
        for row in table.rows:
            parts.append(" | ".join(cell.text for cell in row.cells))
    return "\n".join(parts)


def _read_pptx(path: Path) -> str:
    import pptx

    _require_zip(path, "PPTX")
    presentation = pptx.Presentation(str(path))
    slides: list[str] = []
    for slide in presentation.slides:
        texts = [shape.text_frame.text for shape in slide.shapes if shape.has_text_frame]
        slides.append("\n".join(texts))
    return "\n\n".join(slides)


_READERS: dict[str, Callable[[Path], str]] = {".pdf": _read_pdf, ".docx": _read_docx, ".pptx": _read_pptx}
