"""Project Gutenberg books: find the text offline first, strip the licence, cache the token ids.

A book resolves in this order: an explicit `path`; `<data_dir>/pg<id>.txt`; the team's offline copy
(`../shared/data/*/pg<id>.txt`, or `$GPTFT_SHARED_DATA`); a download from Project Gutenberg into
`data_dir`. Nothing is fetched when a local copy exists.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from gptft.errors import ConfigError
from gptft.utils.io import atomic_write_bytes

log = logging.getLogger(__name__)

GUTENBERG_URL = "https://www.gutenberg.org/cache/epub/{book}/pg{book}.txt"
REPO_ROOT = Path(__file__).resolve().parents[2]

# Both forms of a Gutenberg file carry these markers; the copy on gutenberg.org also has the licence
# before START and after END, so keeping only what lies between them strips both forms.
_START = re.compile(r"^\*\*\*\s*START OF (?:THE|THIS) PROJECT GUTENBERG E(?:BOOK|TEXT)[^\n]*$", re.I | re.M)
_END = re.compile(r"^\*\*\*\s*END OF (?:THE|THIS) PROJECT GUTENBERG E(?:BOOK|TEXT)[^\n]*$", re.I | re.M)


def shared_data_dirs() -> list[Path]:
    """Where the team's offline copies may lie: $GPTFT_SHARED_DATA, then ../shared/data beside the repo."""
    dirs = [Path(p) for p in os.environ.get("GPTFT_SHARED_DATA", "").split(os.pathsep) if p]
    dirs += [REPO_ROOT.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    return [d for d in dict.fromkeys(d.resolve() for d in dirs) if d.is_dir()]


def resolve_book(
    book: int,
    path: str | None = None,
    data_dir: str | Path = "data",
    download: bool = True,
    url: str = GUTENBERG_URL,
) -> Path:
    """The local file holding Gutenberg book `book`, downloading it into `data_dir` as a last resort."""
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise ConfigError(
                f"data.path={path} does not exist: point it at a text file, or unset it to use data.book"
            )
        return p
    name = f"pg{book}.txt"
    local = Path(data_dir) / name
    if local.is_file():
        return local
    for shared in shared_data_dirs():
        found = sorted(shared.glob(name)) + sorted(shared.glob(f"*/{name}"))
        if found:
            return found[0]
    if not download:
        raise ConfigError(
            f"data.book={book}: no local copy ({local} or ../shared/data/*/{name}) and data.download=false: "
            "put the file there or set data.path=FILE"
        )
    return _download(url.format(book=book), local, book)


def _download(url: str, dest: Path, book: int) -> Path:
    log.info("downloading %s -> %s", url, dest)
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            data = response.read()
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ConfigError(
            f"data.book={book}: no local copy and the download from {url} failed ({reason}): "
            f"save the book as {dest} or set data.path=FILE"
        ) from None
    return atomic_write_bytes(dest, data)


def strip_gutenberg(text: str) -> str:
    """The book between the `*** START OF ...` and `*** END OF ...` lines (the whole text if they are absent)."""
    start, end = _START.search(text), _END.search(text)
    if start and end and start.end() < end.start():
        return text[start.end() : end.start()].strip("\n") + "\n"
    if start:
        return text[start.end() :].strip("\n") + "\n"
    return text


def read_text(path: Path, setting: str = "data.path") -> str:
    """UTF-8 text with Unix newlines; a binary or empty file is a clear error, not garbage tokens."""
    raw = path.read_bytes()
    if b"\x00" in raw[:65536]:
        raise ConfigError(f"{setting}={path} is a binary file, not text: point it at a UTF-8 text file")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{setting}={path} is not UTF-8 text ({e.reason} at byte {e.start}): convert it to UTF-8"
        ) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def load_book_text(
    book: int = 829,
    path: str | None = None,
    data_dir: str | Path = "data",
    keep_header: bool = False,
    download: bool = True,
    url: str = GUTENBERG_URL,
) -> str:
    """The text of a Gutenberg book (or of any text file given as `path`), licence stripped unless kept."""
    file = resolve_book(book, path, data_dir, download, url)
    text = read_text(file, "data.path" if path else "data.book")
    if not keep_header:
        text = strip_gutenberg(text)
    if not text.strip():
        raise ConfigError(f"the corpus {file} is empty: point data.path at a file with text in it")
    log.info("corpus %s: %d characters", file, len(text))
    return text


def load_book_tokens(text: str, cache_dir: str | Path | None = None) -> torch.Tensor:
    """GPT-2 token ids of `text` as a 1-D int64 tensor, cached on disk under the text's sha256."""
    import torch  # here, not at the top: the config checks import this package and must stay light

    from gptft.text.tokenizer import gpt2_encoding

    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]
    cache = Path(cache_dir) / f"tokens-gpt2-{digest}.pt" if cache_dir else None
    if cache is not None and cache.is_file():
        return torch.load(cache, weights_only=True).long()
    ids = torch.tensor(gpt2_encoding().encode_ordinary(text), dtype=torch.int32)
    if cache is not None:
        import io

        buffer = io.BytesIO()
        torch.save(ids, buffer)
        atomic_write_bytes(cache, buffer.getvalue())
    return ids.long()
