"""fetch-weights: hash-verified, atomic, never overwriting, explicit about unverifiable files. The transport
is mocked: no test touches the network."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest

from onestep_sr.cli import main as cli_main
from onestep_sr.downloads import catalog, fetch
from onestep_sr.downloads.catalog import PublishedFile

CONTENT = b"published weights \x00\x01" * 1000


def _git_blob_id(data: bytes) -> str:
    """git hash-object, computed independently of fetch.file_hashes."""
    return hashlib.sha1(b"blob " + str(len(data)).encode() + b"\0" + data).hexdigest()


def test_git_blob_id_matches_git():
    assert _git_blob_id(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"  # `echo hello | git hash-object --stdin`


@pytest.fixture
def served(monkeypatch):
    requests = []

    def open_url(url, timeout=60):
        requests.append(url)
        if "broken" in url:
            raise OSError("connection reset")
        return io.BytesIO(CONTENT)

    monkeypatch.setattr(fetch, "open_url", open_url)
    return requests


def _entry(**changes) -> PublishedFile:
    values = dict(name="w.pkl", url="https://example.org/w.pkl", directory="onestep_sr", page="https://example.org",
                  git_blob_sha1=_git_blob_id(CONTENT))
    return PublishedFile(**{**values, **changes})


def test_download_is_verified_then_renamed(served, tmp_path):
    path = fetch.fetch_file(_entry(), tmp_path, report=lambda _: None)
    assert path.read_bytes() == CONTENT and served == ["https://example.org/w.pkl"]
    assert list(tmp_path.iterdir()) == [path]
    sha = hashlib.sha256(CONTENT).hexdigest()
    assert fetch.fetch_file(_entry(git_blob_sha1=None, sha256=sha), tmp_path, report=lambda _: None) == path
    assert len(served) == 1  # present and verified: not downloaded again


def test_wrong_content_leaves_nothing(served, tmp_path):
    with pytest.raises(fetch.FetchError, match="not the published file.*nothing was kept"):
        fetch.fetch_file(_entry(git_blob_sha1="0" * 40), tmp_path)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(fetch.FetchError, match="failed: connection reset"):
        fetch.fetch_file(_entry(url="https://example.org/broken"), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_existing_different_file_is_never_overwritten(served, tmp_path):
    (tmp_path / "w.pkl").write_bytes(b"the user's file")
    with pytest.raises(fetch.FetchError, match="exists but is not the published file.*left untouched"):
        fetch.fetch_file(_entry(), tmp_path)
    assert (tmp_path / "w.pkl").read_bytes() == b"the user's file" and served == []


def test_unverifiable_and_browser_only_files(served, tmp_path):
    with pytest.raises(fetch.FetchError, match="--allow-unverified"):
        fetch.fetch_file(_entry(git_blob_sha1=None), tmp_path)
    lines = []
    fetch.fetch_file(_entry(git_blob_sha1=None), tmp_path, allow_unverified=True, report=lines.append)
    assert f"UNVERIFIED, sha256 {hashlib.sha256(CONTENT).hexdigest()}" in lines[0]
    with pytest.raises(fetch.FetchError, match="put it in"):
        fetch.fetch_file(catalog.HERO_SR_PKL, tmp_path)
    assert served == ["https://example.org/w.pkl"]


def test_cli_fetches_every_method_file_and_reports_each_failure(served, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(catalog.METHOD_FILES, "osediff", (
        (_entry(name="osediff.pkl"), _entry(name="other.pkl", git_blob_sha1=None)), catalog.SD21_BASE))
    code = cli_main(["fetch-weights", "osediff", "--dir", str(tmp_path / "onestep_sr")])
    out = capsys.readouterr().out
    assert code == 1 and (tmp_path / "onestep_sr" / "osediff.pkl").is_file()
    assert "error: other.pkl: no published hash" in out and "v2-1_512-ema-pruned.safetensors" in out


def test_catalog_facts():
    for entry in catalog.ALL_FILES:
        assert entry.url.startswith("https://") and entry.directory in ("checkpoints", "onestep_sr", "clip_vision")
        if entry.git_blob_sha1:  # pinned to the commit whose tree gave the hash
            assert "raw.githubusercontent.com" in entry.url and len(entry.git_blob_sha1) == 40
    assert Path(catalog.OSEDIFF_PKL.url).name == "osediff.pkl"
