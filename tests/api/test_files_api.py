"""OpenAI's Files API on a live server, through the official SDK where it applies and raw sockets where the
HTTP edge matters: the round trip, pages newest first, ownership, uploads streamed to disk and refused
(413, 507, a real full disk) with nothing left behind, every bad form a 400 with OpenAI's error body, and
the sweeper removing what expired. The fake backends serve: files need no model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from embedserve.backends.fake import fake_backends
from embedserve.db import open_database
from embedserve.settings import Settings
from gates import wait_until
from rawhttp import connect, read_response
from support import LiveServer, free_port, live_server, private_data_dir, wait_until_ok

KEY = "sk-files-alice"
OTHER = "sk-files-bob"
PAGES = "sk-files-pages"
ADMIN = "sk-files-admin"
MAX_FILE_BYTES = 3 * 1024 * 1024
LINE = (
    b'{"custom_id": "%d", "method": "POST", "url": "/v1/embeddings", "body": {"model": "m", "input": "x"}}\n'
)
BOUNDARY = b"embedserve-test-boundary"


def jsonl(lines: int) -> bytes:
    return b"".join(LINE % i for i in range(lines))


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def files_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    data_dir = private_data_dir(tmp_path_factory.mktemp("files") / "data")
    settings = Settings(
        data_dir=data_dir,
        api_keys=[KEY, OTHER, PAGES],
        admin_keys=[ADMIN],
        max_file_bytes=MAX_FILE_BYTES,
        files_min_free=0,
    )
    with live_server(settings, backends=fake_backends(), wait_for="/health") as live:
        yield live


def sdk(server: LiveServer, key: str = KEY) -> OpenAI:
    return OpenAI(base_url=server.v1, api_key=key, max_retries=0)


def in_folder(folder: Path) -> list[str]:
    """What is in a files dir but its batch runner's lock (a dotfile, never a file of the store)."""
    return sorted(path.name for path in folder.iterdir() if path.name != ".runner.lock")


def files_dir(server: LiveServer) -> Path:
    return server.settings.files_path


def stored(server: LiveServer) -> set[str]:
    """What is in the files dir: the ids of the files, and any `.part`."""
    return set(in_folder(files_dir(server)))


def post_form(server: LiveServer, body: bytes, key: str = KEY, **headers: str) -> httpx.Response:
    return httpx.post(
        f"{server.v1}/files",
        content=body,
        headers={
            **auth(key),
            "Content-Type": f"multipart/form-data; boundary={BOUNDARY.decode()}",
            **headers,
        },
        timeout=60,
    )


def form(*parts: tuple[str, bytes, str | None], end: bool = True) -> bytes:
    """A multipart/form-data body of (name, value, filename) parts, in the order given."""
    body = b""
    for name, value, filename in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body += b"--%s\r\nContent-Disposition: %s\r\n\r\n%s\r\n" % (BOUNDARY, disposition.encode(), value)
    return body + (b"--%s--\r\n" % BOUNDARY if end else b"")


def assert_openai_error(
    response: httpx.Response, status: int, code: str, param: str | None
) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    error: dict[str, Any] = body["error"]
    assert (error["code"], error["param"]) == (code, param), error
    assert error["type"] == ("server_error" if status >= 500 else "invalid_request_error")
    assert error["message"]
    return error


def assert_still_serving(server: LiveServer) -> None:
    """The server takes a new upload (and lists it), and left no part of any refused one behind."""
    record = sdk(server).files.create(file=("after.jsonl", jsonl(2)), purpose="batch")
    assert record.bytes == len(jsonl(2))
    assert record.id in {f.id for f in sdk(server).files.list()}
    assert not [name for name in stored(server) if name.endswith(".part")]
    sdk(server).files.delete(record.id)


# ---- the round trip --------------------------------------------------------------------------------


def test_the_sdk_uploads_shows_lists_reads_and_deletes_a_file(
    files_server: LiveServer, tmp_path: Path
) -> None:
    data = jsonl(30_000)  # ~3 MB under the limit: several writes and reads
    assert MAX_FILE_BYTES - 200_000 < len(data) <= MAX_FILE_BYTES
    source = tmp_path / "requests.jsonl"
    source.write_bytes(data)
    client = sdk(files_server)
    before = time.time()
    with source.open("rb") as handle:
        created = client.files.create(file=handle, purpose="batch")
    assert created.id.startswith("file-") and created.object == "file"
    assert (created.bytes, created.filename, created.purpose, created.status) == (
        len(data),
        "requests.jsonl",
        "batch",
        "processed",
    )
    assert before - 1 <= created.created_at <= time.time()
    assert created.expires_at == created.created_at + 30 * 86400  # the default --file-expiry
    assert client.files.retrieve(created.id) == created
    assert client.files.content(created.id).content == data
    assert created.id in {f.id for f in client.files.list()}
    assert (files_dir(files_server) / created.id).read_bytes() == data
    deleted = client.files.delete(created.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (created.id, "file", True)
    with pytest.raises(openai.NotFoundError) as caught:
        client.files.retrieve(created.id)
    assert caught.value.code == "file_not_found"
    assert created.id not in stored(files_server)


def test_the_content_is_octet_stream_with_its_length_and_head_sends_no_body(files_server: LiveServer) -> None:
    record = sdk(files_server).files.create(file=("a.jsonl", jsonl(3)), purpose="batch")
    url = f"{files_server.v1}/files/{record.id}/content"
    response = httpx.get(url, headers=auth(KEY))
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/octet-stream"
    assert response.headers["content-length"] == str(len(jsonl(3))) and response.content == jsonl(3)
    head = httpx.head(url, headers=auth(KEY))
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(jsonl(3)))


def test_a_file_asked_to_expire_after_an_hour_says_so(files_server: LiveServer) -> None:
    created = sdk(files_server).files.create(
        file=("soon.jsonl", jsonl(1)),
        purpose="batch",
        expires_after={"anchor": "created_at", "seconds": 3600},
    )
    assert created.expires_at == created.created_at + 3600


def test_the_purpose_may_come_after_the_file(files_server: LiveServer) -> None:
    response = post_form(files_server, form(("file", jsonl(2), "late.jsonl"), ("purpose", b"batch", None)))
    assert response.status_code == 200, response.text
    assert response.json()["filename"] == "late.jsonl" and response.json()["bytes"] == len(jsonl(2))
    assert response.json()["id"] in stored(files_server)


def test_a_filename_keeps_its_unicode(files_server: LiveServer) -> None:
    """httpx (under the SDK) sends it as UTF-8 in the part's header."""
    name = "données Ā 🚀.jsonl"
    created = sdk(files_server).files.create(file=(name, jsonl(1)), purpose="batch")
    assert created.filename == name and sdk(files_server).files.retrieve(created.id).filename == name


def test_pages_come_newest_first_through_the_sdks_auto_pagination(files_server: LiveServer) -> None:
    client = sdk(files_server, PAGES)
    made = [client.files.create(file=(f"{i}.jsonl", jsonl(1)), purpose="batch").id for i in range(5)]
    page = client.files.list(limit=2)
    assert [f.id for f in page.data] == made[::-1][:2] and page.has_more is True
    assert [f.id for f in client.files.list(limit=2)] == made[::-1]  # the SDK follows `after`
    assert [f.id for f in client.files.list(limit=2, order="asc")] == made
    rest = client.files.list(after=made[2], limit=10)
    assert [f.id for f in rest.data] == made[1::-1] and rest.has_more is False
    raw = httpx.get(f"{files_server.v1}/files", params={"limit": 3}, headers=auth(PAGES)).json()
    assert raw["object"] == "list" and raw["has_more"] is True
    assert (raw["first_id"], raw["last_id"]) == (made[4], made[2])
    empty = httpx.get(
        f"{files_server.v1}/files", params={"purpose": "batch_output"}, headers=auth(PAGES)
    ).json()
    assert empty == {"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False}


# ---- ownership ---------------------------------------------------------------------------------------


def test_another_keys_file_is_404_everywhere_and_absent_from_its_list(files_server: LiveServer) -> None:
    mine = sdk(files_server).files.create(file=("mine.jsonl", jsonl(2)), purpose="batch")
    base = f"{files_server.v1}/files/{mine.id}"
    for method, url in (("GET", base), ("GET", f"{base}/content"), ("DELETE", base)):
        response = httpx.request(method, url, headers=auth(OTHER))
        error = assert_openai_error(response, 404, "file_not_found", "id")
        assert error["message"] == f"No such File object: {mine.id}"
    assert mine.id not in {f.id for f in sdk(files_server, OTHER).files.list()}
    admin = sdk(files_server, ADMIN)
    theirs = sdk(files_server, OTHER).files.create(file=("theirs.jsonl", jsonl(1)), purpose="batch")
    assert {mine.id, theirs.id} <= {f.id for f in admin.files.list()}
    assert admin.files.retrieve(mine.id) == mine
    assert admin.files.content(theirs.id).content == jsonl(1)
    assert sdk(files_server).files.retrieve(mine.id) == mine  # the owner's still, untouched
    assert admin.files.delete(theirs.id).deleted is True


def test_an_unknown_file_id_is_404_file_not_found(files_server: LiveServer) -> None:
    for method, path in (("GET", "file-nope"), ("GET", "file-nope/content"), ("DELETE", "file-nope")):
        response = httpx.request(method, f"{files_server.v1}/files/{path}", headers=auth(KEY))
        assert_openai_error(response, 404, "file_not_found", "id")


def test_a_file_an_unfinished_batch_reads_is_409_on_delete(files_server: LiveServer) -> None:
    record = sdk(files_server).files.create(file=("in.jsonl", jsonl(2)), purpose="batch")
    db = open_database(None, files_server.settings.data_dir)
    try:
        with db.transaction() as tx:
            tx.execute(
                "INSERT INTO batches (id, owner, status, endpoint, input_file_id, completion_window, "
                "output_bytes, error_bytes, total, completed, failed, input_tokens, queued_tokens, "
                "created_at, expires_at) VALUES ('batch_x', ?, 'in_progress', '/v1/embeddings', ?, '24h', "
                "0, 0, 0, 0, 0, 0, 0, 0, 0)",
                ("anyone", record.id),
            )
        response = httpx.delete(f"{files_server.v1}/files/{record.id}", headers=auth(KEY))
        assert "batch_x" in assert_openai_error(response, 409, "conflict", "file_id")["message"]
        assert sdk(files_server).files.retrieve(record.id) == record
        with db.transaction() as tx:
            tx.execute("UPDATE batches SET status = 'completed' WHERE id = 'batch_x'")
        assert sdk(files_server).files.delete(record.id).deleted is True
    finally:
        db.close()


# ---- uploads refused, nothing left -------------------------------------------------------------------


def _chunked_upload_head(server: LiveServer) -> bytes:
    return (
        b"POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
        b"Content-Type: multipart/form-data; boundary=%s\r\nTransfer-Encoding: chunked\r\n\r\n"
        % (KEY.encode(), BOUNDARY)
    )


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def test_a_streamed_upload_is_413_as_soon_as_it_passes_the_limit(files_server: LiveServer) -> None:
    """Chunked, no Content-Length: the answer comes while the client has more to send, and nothing of
    the upload is kept."""
    before = stored(files_server)
    opening = form(("purpose", b"batch", None))[: -len(b"--%s--\r\n" % BOUNDARY)]
    opening += b'--%s\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n' % BOUNDARY
    with connect(files_server) as sock:
        sock.sendall(_chunked_upload_head(files_server) + _chunk(opening))
        block = b"x" * 65536
        for _ in range(MAX_FILE_BYTES // len(block) + 4):  # past the limit; the body never ends
            sock.sendall(_chunk(block))
        answer = read_response(sock)
    assert answer.status == 413
    error = answer.json()["error"]
    assert (error["code"], error["param"]) == ("payload_too_large", "file")
    assert str(MAX_FILE_BYTES) in error["message"]
    assert stored(files_server) == before
    assert_still_serving(files_server)


def test_a_declared_length_over_the_limit_is_413_before_any_byte_is_read(files_server: LiveServer) -> None:
    with connect(files_server) as sock:
        sock.sendall(
            b"POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
            b"Content-Type: multipart/form-data; boundary=%s\r\nContent-Length: %d\r\n\r\n"
            % (KEY.encode(), BOUNDARY, MAX_FILE_BYTES * 2)
        )  # and no body at all: the answer cannot wait for it
        answer = read_response(sock)
    assert answer.status == 413 and answer.json()["error"]["code"] == "payload_too_large"
    assert_still_serving(files_server)


def test_a_file_one_byte_over_the_limit_is_413_and_one_at_it_is_kept(files_server: LiveServer) -> None:
    before = stored(files_server)
    over = httpx.post(
        f"{files_server.v1}/files",
        headers=auth(KEY),
        files={"file": ("over.jsonl", b"a" * (MAX_FILE_BYTES + 1))},
        data={"purpose": "batch"},
        timeout=60,
    )
    assert_openai_error(over, 413, "payload_too_large", "file")
    assert stored(files_server) == before
    at = sdk(files_server).files.create(file=("at.jsonl", b"a" * MAX_FILE_BYTES), purpose="batch")
    assert at.bytes == MAX_FILE_BYTES
    sdk(files_server).files.delete(at.id)


def test_an_upload_is_on_disk_as_it_arrives_and_a_client_that_leaves_leaves_nothing(
    files_server: LiveServer,
) -> None:
    before = stored(files_server)
    opening = b'--%s\r\nContent-Disposition: form-data; name="file"; filename="f.jsonl"\r\n\r\n' % BOUNDARY

    def parts() -> list[Path]:
        return [p for p in files_dir(files_server).iterdir() if p.name.endswith(".part")]

    with connect(files_server) as sock:
        sock.sendall(_chunked_upload_head(files_server) + _chunk(opening))
        for _ in range(24):  # 1.5 MiB of a file that never ends
            sock.sendall(_chunk(b"y" * 65536))
        wait_until(lambda: any(p.stat().st_size >= 1 << 20 for p in parts()), "the upload reached the disk")
    wait_until(lambda: stored(files_server) == before, "the left upload was removed")
    assert_still_serving(files_server)


def test_an_upload_that_stalls_for_the_request_timeout_is_503_and_keeps_nothing(tmp_path: Path) -> None:
    settings = Settings(data_dir=private_data_dir(tmp_path / "data"), request_timeout=1)
    opening = b'--%s\r\nContent-Disposition: form-data; name="file"; filename="f.jsonl"\r\n\r\n' % BOUNDARY
    with live_server(settings, backends=fake_backends(), wait_for="/health") as live, connect(live) as sock:
        sock.sendall(
            b"POST /v1/files HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=%s\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n%s" % (BOUNDARY, _chunk(opening + b"z" * 65536))
        )  # and then nothing
        answer = read_response(sock)
        assert answer.status == 503 and answer.json()["error"]["code"] == "request_timeout"
        assert answer.headers["retry-after"].isdigit()
        assert in_folder(settings.files_path) == []
        assert httpx.get(f"{live.v1}/files").status_code == 200


@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [
        (form(("purpose", b"batch", None)), 400, "missing_required_parameter", "file"),
        (form(("file", jsonl(1), "a.jsonl")), 400, "missing_required_parameter", "purpose"),
        (
            form(("purpose", b"fine-tune", None), ("file", jsonl(1), "a.jsonl")),
            400,
            "invalid_value",
            "purpose",
        ),
        (
            form(("file", jsonl(1), "a.jsonl"), ("purpose", b"assistants", None)),
            400,
            "invalid_value",
            "purpose",
        ),
        (form(("purpose", b"batch", None), ("file", b"", "empty.jsonl")), 400, "invalid_value", "file"),
        (form(("purpose", b"batch", None), ("file", jsonl(1), "a"), end=False), 400, "invalid_value", None),
        (b"not a form at all", 400, "invalid_value", None),
        (
            form(("purpose", b"batch", None), ("file", b"1", "a"), ("file", b"2", "b")),
            400,
            "invalid_value",
            "file",
        ),
        (form(("purpose", b"batch" * 300, None), ("file", b"1", "a")), 400, "invalid_value", "purpose"),
        (
            form(
                ("purpose", b"batch", None),
                ("expires_after[anchor]", b"created_at", None),
                ("expires_after[seconds]", b"60", None),
                ("file", b"1", "a"),
            ),
            400,
            "invalid_value",
            "expires_after.seconds",
        ),
    ],
    ids=[
        "no-file-part",
        "no-purpose",
        "wrong-purpose-first",
        "wrong-purpose-after-the-file",
        "empty-file",
        "no-closing-boundary",
        "no-parts",
        "two-files",
        "purpose-too-long",
        "expires-too-soon",
    ],
)
def test_a_bad_upload_form_is_400_naming_what_and_keeps_nothing(
    files_server: LiveServer, body: bytes, status: int, code: str, param: str | None
) -> None:
    before = stored(files_server)
    assert_openai_error(post_form(files_server, body), status, code, param)
    assert stored(files_server) == before
    assert_still_serving(files_server)


@pytest.mark.parametrize("content_type", ["application/json", "multipart/form-data", "text/plain", None])
def test_an_upload_that_is_not_multipart_is_400(files_server: LiveServer, content_type: str | None) -> None:
    headers = auth(KEY) | ({"Content-Type": content_type} if content_type else {})
    response = httpx.post(f"{files_server.v1}/files", content=b'{"purpose": "batch"}', headers=headers)
    assert "multipart/form-data" in assert_openai_error(response, 400, "invalid_value", None)["message"]
    assert_still_serving(files_server)


def test_the_sdk_raises_bad_request_for_a_purpose_the_server_does_not_take(files_server: LiveServer) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        sdk(files_server).files.create(file=("a.jsonl", jsonl(1)), purpose="fine-tune")
    assert caught.value.code == "invalid_value" and "'batch'" in caught.value.message
    assert_still_serving(files_server)


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "10001"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"order": "x"}, "order"),
    ],
)
def test_bad_list_parameters_are_400_naming_them(
    files_server: LiveServer, query: dict[str, str], param: str
) -> None:
    response = httpx.get(f"{files_server.v1}/files", params=query, headers=auth(KEY))
    assert_openai_error(response, 400, "invalid_value", param)
    assert_still_serving(files_server)


def test_every_files_route_needs_a_key(files_server: LiveServer) -> None:
    for method, path in (
        ("POST", ""),
        ("GET", ""),
        ("GET", "/file-x"),
        ("GET", "/file-x/content"),
        ("DELETE", "/file-x"),
    ):
        response = httpx.request(method, f"{files_server.v1}/files{path}")
        assert_openai_error(response, 401, "invalid_api_key", None)


# ---- the disk's reserve, and a disk really full ---------------------------------------------------


def test_an_upload_that_would_pass_the_disks_reserve_is_507_and_keeps_nothing(tmp_path: Path) -> None:
    data_dir = private_data_dir(tmp_path / "data")
    stats = os.statvfs(tmp_path)
    settings = Settings(data_dir=data_dir, files_min_free=stats.f_bavail * stats.f_frsize + (1 << 30))
    with live_server(settings, backends=fake_backends(), wait_for="/health") as live:
        response = httpx.post(
            f"{live.v1}/files", files={"file": ("a.jsonl", jsonl(10))}, data={"purpose": "batch"}, timeout=60
        )
        assert_openai_error(response, 507, "insufficient_storage", "file")
        assert response.headers["retry-after"].isdigit()
        assert in_folder(settings.files_path) == []
        assert httpx.get(f"{live.v1}/files").json()["data"] == []  # still serving, and no record


@pytest.fixture
def full_disk_server(tmp_path: Path, tiny_dense_model: Path) -> Iterator[tuple[str, Path]]:
    """`embedserve serve` whose files dir is a 2 MB tmpfs, mounted in a mount namespace of its own (an
    unprivileged user namespace: no root needed) -> (its URL, its files dir as the test sees it). It
    serves a tiny model: quick to load, and the files need none."""
    files = tmp_path / "files"
    files.mkdir()
    port = free_port()
    script = 'mount -t tmpfs -o size=2m,mode=0700 none "$0" && exec "$@"'
    command = [sys.executable, "-m", "embedserve", "serve", "--port", str(port), "--log-level", "warning"]
    command += ["--data-dir", str(private_data_dir(tmp_path / "data")), "--files-dir", str(files)]
    command += ["--files-min-free", "0", "--max-file-bytes", "10MB", "--model", str(tiny_dense_model)]
    proc = subprocess.Popen(
        ["unshare", "--map-root-user", "--mount", "sh", "-c", script, str(files), *command],
        env={**os.environ, "EMBEDSERVE_API_KEYS": ""},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_until_ok(f"{base}/ready", alive=lambda: proc.poll() is None)
        except RuntimeError:
            proc.kill()
            raise AssertionError(
                f"the server in its mount namespace did not start: {proc.communicate()[1]!r}"
            ) from None
        # The tmpfs is seen only from inside the namespace: through the server process's own root.
        yield base, Path(f"/proc/{proc.pid}/root") / files.relative_to("/")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)


def test_an_upload_that_fills_the_disk_is_507_keeps_nothing_and_the_next_one_fits(
    full_disk_server: tuple[str, Path],
) -> None:
    base, files = full_disk_server
    assert os.statvfs(files).f_blocks * os.statvfs(files).f_frsize == 2 * 1024 * 1024  # the tmpfs itself
    response = httpx.post(
        f"{base}/v1/files",
        files={"file": ("big.jsonl", b"x" * 3_000_000)},
        data={"purpose": "batch"},
        timeout=60,
    )
    assert_openai_error(response, 507, "insufficient_storage", "file")
    assert "retry-after" in response.headers
    assert in_folder(files) == []
    # 1.8 MB fits only if nothing of the 3 MB one was kept.
    fits = httpx.post(
        f"{base}/v1/files",
        files={"file": ("next.jsonl", b"y" * 1_800_000)},
        data={"purpose": "batch"},
        timeout=60,
    )
    assert fits.status_code == 200, fits.text
    assert in_folder(files) == [fits.json()["id"]]
    assert httpx.get(f"{base}/v1/files/{fits.json()['id']}/content").content == b"y" * 1_800_000


# ---- expiry ------------------------------------------------------------------------------------------


def test_the_sweeper_removes_a_file_once_it_has_expired(tmp_path: Path) -> None:
    settings = Settings(data_dir=private_data_dir(tmp_path / "data"), file_expiry=1, sweep_interval=0.1)
    with live_server(settings, backends=fake_backends(), wait_for="/health") as live:
        client = OpenAI(base_url=live.v1, api_key="unused", max_retries=0)
        record = client.files.create(file=("a.jsonl", jsonl(1)), purpose="batch")
        assert record.expires_at == record.created_at + 1
        wait_until(lambda: not (settings.files_path / record.id).exists(), "the sweeper removed the file")
        with pytest.raises(openai.NotFoundError):
            client.files.retrieve(record.id)
        assert list(client.files.list()) == []
