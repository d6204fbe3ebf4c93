"""Request ids: the client's sane `X-Request-Id`, or a new one, goes to Sobot, comes back to the
client, and is on every log line written while the request is handled (and on no other)."""

from __future__ import annotations

import asyncio
import re
import uuid

import aiohttp
import pytest

from proxy.testing.fake_sobot import FAULT_HEADER, FakeSobot
from tests.conftest import CapturedLogs, eventually, send_raw

HEADER = "X-Request-Id"
KEY = "request-id-client-key-0123456789"


def is_uuid(value: str) -> bool:
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False


def answer_id(answer: bytes) -> str | None:
    """The X-Request-Id of a raw answer, if it has one."""
    found = re.search(rb"(?im)^x-request-id: *([^\r]*)\r$", answer.split(b"\r\n\r\n", 1)[0])
    return None if found is None else found.group(1).decode()


@pytest.mark.parametrize(
    "fault",
    [None, "download=200000", "html502"],
    ids=["echo", "streamed-download", "upstream-error"],
)
async def test_a_clients_id_goes_upstream_comes_back_and_is_logged(
    proxy, fake: FakeSobot, logs: CapturedLogs, fault
):
    request_id = "order-service:7f3a2b91"
    headers = {HEADER: request_id} if fault is None else {HEADER: request_id, FAULT_HEADER: fault}
    response = await proxy.get("/api/file", headers=headers)
    await response.read()
    assert response.headers.getall(HEADER) == [request_id]
    assert fake.received[-1].headers.getall(HEADER) == [request_id]
    [line] = logs.events("request")
    assert line["request_id"] == request_id


async def test_a_request_without_an_id_gets_a_new_one_each_time(
    proxy, fake: FakeSobot, logs: CapturedLogs
):
    ids = []
    for _ in range(3):
        response = await proxy.post("/api/5/user/save", data=b"{}")
        assert response.status == 200
        ids.append(response.headers[HEADER])
        assert fake.received[-1].headers[HEADER] == ids[-1]
    assert all(is_uuid(value) for value in ids)
    assert len(set(ids)) == 3
    assert [line["request_id"] for line in logs.events("request")] == ids


@pytest.mark.parametrize(
    "request_id",
    [
        "01ARZ3NDEKTSV4RRFFQ69G5FAV",  # a ULID
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # a W3C traceparent
        "svc/api@host:8080+retry=1.2_x",
        "x" * 128,
    ],
    ids=["ulid", "traceparent", "punctuated", "128-chars"],
)
async def test_sane_ids_are_kept(proxy, fake: FakeSobot, logs: CapturedLogs, request_id):
    response = await proxy.get("/api/echo", headers={HEADER: request_id})
    assert response.headers[HEADER] == request_id
    assert fake.received[-1].headers[HEADER] == request_id
    assert logs.events("request")[-1]["request_id"] == request_id


@pytest.mark.parametrize(
    "given",
    [
        b"",
        b"two words",
        b"x" * 129,
        b'quo"ted',
        b"<script>alert(1)</script>",
        b"id;drop=1",
        b"caf\xc3\xa9",
        b"tab\there",
    ],
    ids=["empty", "space", "129-chars", "quote", "markup", "semicolon", "non-ascii", "tab"],
)
async def test_an_insane_id_is_replaced_by_a_new_one(
    proxy, fake: FakeSobot, logs: CapturedLogs, given
):
    answer = await send_raw(
        proxy,
        b"GET /api/echo HTTP/1.1\r\nHost: p\r\nX-Request-Id: " + given + b"\r\n"
        b"Connection: close\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 200")
    replaced = answer_id(answer)
    assert replaced is not None
    assert is_uuid(replaced)
    assert fake.received[-1].headers.getall(HEADER) == [replaced]
    assert logs.events("request")[-1]["request_id"] == replaced
    if given:
        assert given not in logs.raw  # the client's made-up value is never logged


async def test_of_two_ids_the_first_is_kept_and_only_it_goes_upstream(proxy, fake: FakeSobot):
    response = await proxy.get("/api/echo", headers=[(HEADER, "first-id"), (HEADER, "second-id")])
    assert response.headers.getall(HEADER) == ["first-id"]
    assert fake.received[-1].headers.getall(HEADER) == ["first-id"]


# --- every line of the request, and only those ------------------------------------------------


async def test_a_warning_logged_mid_request_carries_its_id(
    proxy, fake: FakeSobot, logs: CapturedLogs
):
    """`truncate` breaks off a non-JSON answer after its headers: `upstream_aborted`."""
    response = await proxy.get(
        "/api/file", headers={HEADER: "cut-short-1", FAULT_HEADER: "truncate"}
    )
    assert response.headers[HEADER] == "cut-short-1"
    with pytest.raises(aiohttp.ClientPayloadError):  # the body never completes
        await response.read()
    [aborted] = logs.events("upstream_aborted")
    assert aborted["request_id"] == "cut-short-1"
    assert logs.events("request")[-1]["request_id"] == "cut-short-1"


async def test_a_shared_get_token_is_not_logged_as_one_requests(
    proxy, fake: FakeSobot, logs: CapturedLogs
):
    """A rejected young token: `young_token_rejected` belongs to the request; the get_token it
    leads to serves every waiting request, so its line carries no request's id."""
    assert (await proxy.get("/api/echo")).status == 200
    fake.script({"ret_code": "900001", "ret_msg": "token is empty"})
    async with asyncio.timeout(10):
        response = await proxy.get("/api/echo", headers={HEADER: "replayed-1"})
    assert (await response.json())["ret_code"] == "000000"
    assert fake.stats.get_token_calls == 2
    [young] = logs.events("young_token_rejected")
    assert young["request_id"] == "replayed-1"
    calls = logs.events("get_token")
    assert len(calls) == 2
    assert all("request_id" not in call for call in calls), calls
    request = logs.events("request")[-1]
    assert (request["request_id"], request["attempts"]) == ("replayed-1", 2)


async def test_a_get_token_started_by_an_expiry_is_not_logged_as_that_requests(
    proxy, fake: FakeSobot, logs: CapturedLogs
):
    assert (await proxy.get("/api/echo")).status == 200
    fake.expire_token()
    response = await proxy.get("/api/echo", headers={HEADER: "expired-1"})
    assert (await response.json())["ret_code"] == "000000"
    assert fake.stats.get_token_calls == 2
    assert [call.get("request_id") for call in logs.events("get_token")] == [None, None]


async def test_lines_outside_a_request_carry_no_id(proxy, fake: FakeSobot, logs: CapturedLogs):
    for i in range(3):
        assert (await proxy.get("/api/echo", headers={HEADER: f"kept-alive-{i}"})).status == 200
    assert (await proxy.get("/healthz")).status == 200
    requests = logs.events("request")
    others = [line for line in logs.events() if line["event"] != "request"]
    assert len(requests) == 3  # /healthz is not logged as a request
    assert others  # the token's fetch, at least
    assert all(line["request_id"].startswith("kept-alive-") for line in requests)
    assert all("request_id" not in line for line in others), others


async def test_a_cancelled_requests_line_carries_its_id(proxy, fake: FakeSobot, logs: CapturedLogs):
    assert (await proxy.get("/api/echo")).status == 200
    _, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(
        f"GET /api/slow HTTP/1.1\r\nHost: p\r\n{HEADER}: leaver-1\r\n"
        f"{FAULT_HEADER}: stall\r\n\r\n".encode()
    )
    await writer.drain()

    async def arrived() -> bool:
        return fake.stats.open_requests == 1

    await eventually(arrived)
    assert fake.received[-1].headers[HEADER] == "leaver-1"
    writer.close()

    async def logged() -> bool:
        return any(line["path"] == "/api/slow" for line in logs.events("request"))

    await eventually(logged)
    [line] = [line for line in logs.events("request") if line["path"] == "/api/slow"]
    assert line["request_id"] == "leaver-1"
    assert line["error"].startswith("cancelled")


# --- the proxy's own answers ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "request_line", "headers", "status"),
    [
        ({"client_keys": (KEY,)}, b"GET /api/echo", b"", b"401"),
        ({}, b"GET /nowhere", b"", b"404"),
        ({}, b"GET /api/../etc/passwd", b"", b"400"),
        ({"allow_methods": ("GET",)}, b"DELETE /api/echo", b"", b"403"),
        ({"max_body": 1000}, b"POST /api/5/file", b"Content-Length: 5000\r\n", b"413"),
        (
            {"max_body": 1000},
            b"POST /api/5/file",
            b"Content-Length: 5000\r\nExpect: 100-continue\r\n",
            b"413",
        ),
        ({"client_keys": (KEY,)}, b"POST /api/5/file", b"Expect: 100-continue\r\n", b"401"),
        ({}, b"POST /api/5/file", b"Content-Length: 0\r\nExpect: teapot\r\n", b"417"),
        ({}, b"GET /api/get_token?appid=x&create_time=1&sign=y", b"", b"200"),
    ],
    ids=[
        "401",
        "404",
        "400",
        "403",
        "413",
        "413-expect",
        "401-expect",
        "417-expect",
        "local-get-token",
    ],
)
async def test_the_proxys_own_answers_carry_the_id(
    make_proxy, fake: FakeSobot, logs: CapturedLogs, changes, request_line, headers, status
):
    proxy = await make_proxy(**changes)
    answer = await send_raw(
        proxy,
        request_line
        + b" HTTP/1.1\r\nHost: p\r\nX-Request-Id: own-answer-1\r\n"
        + headers
        + b"Connection: close\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 " + status), answer[:200]
    # The proxy's own code for its status; Sobot's protocol code for the local get_token.
    code = b"90000" if status == b"200" else b"980" + status
    assert b'"ret_code":"' + code in answer
    assert answer_id(answer) == "own-answer-1"
    [line] = logs.events("request")
    assert line["request_id"] == "own-answer-1"
    assert line["status"] == int(status)
    assert fake.stats.api_calls == 0
