import http.server
import threading
from functools import partial

import pytest

from gptft.errors import ConfigError
from gptft.text.corpus import load_book_text, resolve_book, shared_data_dirs, strip_gutenberg

LICENCE_HEADER = (
    "The Project Gutenberg eBook of Gulliver's Travels\r\n\r\nThis ebook is for the use of anyone anywhere "
    "in the United States and most other parts of the world at no cost.\r\n\r\n"
)
LICENCE_FOOTER = (
    "\r\n\r\nSection 1. General Terms of Use and Redistributing Project Gutenberg electronic works\r\n"
)


def test_offline_copies_are_found():
    assert shared_data_dirs(), "../shared/data must lie beside the repo"
    assert resolve_book(829).name == "pg829.txt"
    assert resolve_book(2701).name == "pg2701.txt"


def test_strip_the_offline_form(book_text):
    assert book_text.startswith("GULLIVER’S TRAVELS")
    assert "*** START OF" not in book_text and "*** END OF" not in book_text
    assert book_text.rstrip().endswith("home in England.")


def test_strip_the_gutenberg_org_form(tmp_path, book_text):
    """The site's copy: licence header before START, licence after END, CRLF newlines, a BOM."""
    raw = (resolve_book(829).read_text(encoding="utf-8")).replace("\n", "\r\n")
    site_copy = tmp_path / "pg829.txt"
    site_copy.write_bytes(("\ufeff" + LICENCE_HEADER + raw + LICENCE_FOOTER).encode("utf-8"))
    assert load_book_text(path=str(site_copy)) == book_text
    kept = load_book_text(path=str(site_copy), keep_header=True)
    assert kept.startswith("The Project Gutenberg eBook") and "Section 1." in kept


def test_text_without_markers_is_kept_whole():
    assert strip_gutenberg("just some text\n") == "just some text\n"


def test_data_folder_wins_over_shared_copy(tmp_path):
    (tmp_path / "pg829.txt").write_text("*** START OF THE PROJECT GUTENBERG EBOOK 829 ***\nlocal\n")
    assert resolve_book(829, data_dir=tmp_path) == tmp_path / "pg829.txt"
    assert load_book_text(829, data_dir=tmp_path) == "local\n"


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_download_into_data_folder(tmp_path):
    """The last resort: fetch pg<id>.txt over HTTP (a loopback server standing in for gutenberg.org)."""
    served = tmp_path / "site"
    served.mkdir()
    (served / "pg999999.txt").write_text(
        "header\n*** START OF THE PROJECT GUTENBERG EBOOK 999999 ***\nA tiny book.\n*** END OF THE PROJECT GUTENBERG EBOOK 999999 ***\nfooter"
    )
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/pg{{book}}.txt"
        data = tmp_path / "data"
        assert load_book_text(999999, data_dir=data, url=url) == "A tiny book.\n"
        assert (data / "pg999999.txt").is_file()
        with pytest.raises(ConfigError, match=r"data\.book=999998.*download"):
            load_book_text(999998, data_dir=data, url=url)  # 404
    finally:
        server.shutdown()


def test_no_copy_and_no_download_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.book=999997.*data\.download=false"):
        resolve_book(999997, data_dir=tmp_path, download=False)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty"),
        (b"\n\n  \n", "empty"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00", "binary"),
        (b"caf\xe9 latin-1", "UTF-8"),
    ],
)
def test_bad_corpus_files(tmp_path, content, message):
    bad = tmp_path / "corpus.txt"
    bad.write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        load_book_text(path=str(bad))


def test_missing_path():
    with pytest.raises(ConfigError, match=r"data\.path=/no/such/book.txt does not exist"):
        load_book_text(path="/no/such/book.txt")
