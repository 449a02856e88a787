import json

import pytest

from fluxgymd.protocol import (
    MAX_MESSAGE_BYTES, PROTOCOL_VERSION, ErrorCode, FluxgymError, parse_request, request,
)


def code_of(payload: bytes) -> ErrorCode:
    with pytest.raises(FluxgymError) as e:
        parse_request(payload)
    return e.value.code


def test_round_trip():
    req = parse_request(request("show", {"job": "3"}, rid="7"))
    assert (req.id, req.op, req.args) == ("7", "show", {"job": "3", "events": 50})


@pytest.mark.parametrize("payload,code", [
    (b"\xff\xfe\x00garbage", ErrorCode.BAD_JSON),
    (b"{not json", ErrorCode.BAD_JSON),
    (b"[1, 2]", ErrorCode.BAD_JSON),
    (json.dumps({"v": 99, "id": "1", "op": "ping"}).encode(), ErrorCode.UNSUPPORTED_VERSION),
    (json.dumps({"v": PROTOCOL_VERSION, "id": "1"}).encode(), ErrorCode.BAD_REQUEST),
    (json.dumps({"v": PROTOCOL_VERSION, "id": [], "op": "ping"}).encode(), ErrorCode.BAD_REQUEST),
    (json.dumps({"v": PROTOCOL_VERSION, "id": "1", "op": "explode"}).encode(), ErrorCode.UNKNOWN_OP),
    (json.dumps({"v": PROTOCOL_VERSION, "id": "1", "op": "ping", "args": []}).encode(),
     ErrorCode.BAD_ARGS),
    (request("show", {}), ErrorCode.BAD_ARGS),
    (request("show", {"job": 3}), ErrorCode.BAD_ARGS),
    (request("logs", {"job": "a", "lines": True}), ErrorCode.BAD_ARGS),
    (request("ping", {"bogus": 1}), ErrorCode.BAD_ARGS),
    (request("logs", {"job": "a", "lines": -1}), ErrorCode.BAD_ARGS),
    (request("logs", {"job": "a", "lines": 10**9}), ErrorCode.BAD_ARGS),
    (request("list", {"states": "running"}), ErrorCode.BAD_ARGS),
    (b" " * (MAX_MESSAGE_BYTES + 1), ErrorCode.TOO_LARGE),
])
def test_bad_requests_get_a_stable_code(payload, code):
    assert code_of(payload) is code


def test_unknown_op_message_lists_the_known_ones():
    with pytest.raises(FluxgymError) as e:
        parse_request(request("stauts"))
    assert "submit" in e.value.message and "ping" in e.value.message
