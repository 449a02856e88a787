"""The control socket: a ROUTER that turns request frames into handler calls and replies.

This is the one place where exceptions become error codes. Whatever arrives — random bytes,
extra frames, JSON that is not a request, a handler's own bug — the peer gets an error reply
and the loop goes on.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
from typing import Any, Awaitable, Callable

import zmq
import zmq.asyncio

from .protocol import (
    HEARTBEAT_S,
    SOCKET_MAX_MESSAGE_BYTES,
    ErrorCode,
    FluxgymError,
    error_reply,
    ok_reply,
    decode_request,
    request_id,
    salvage_id,
    validate_request,
    wants_heartbeat,
    working_reply,
)
from .states import InvalidTransition

log = logging.getLogger("fluxgymd.server")
Handler = Callable[[dict[str, Any]], Any | Awaitable[Any]]


async def handle_frames(frames: list[bytes], handlers: dict[str, Handler]) -> list[bytes]:
    """One request's frames (identity first) in, the reply's frames out."""
    identity, body = frames[0], frames[1:]
    # A DEALER sends [payload]; a REQ-style peer sends ["", payload]. Mirror what came.
    if len(body) == 2 and body[0] == b"":
        envelope, body = [identity, b""], body[1:]
    else:
        envelope = [identity]
    if len(body) != 1:
        return envelope + [error_reply(
            "", ErrorCode.BAD_FRAME,
            f"expected one frame holding a JSON request, got {len(body)} frames",
        )]
    rid = ""
    try:
        rid = salvage_id(body[0])
        obj = decode_request(body[0])
        rid = request_id(obj)  # from here on, even a refusal carries the caller's id
        req = validate_request(obj)
        result = handlers[req.op](req.args)
        if inspect.isawaitable(result):
            result = await result
        return envelope + [ok_reply(rid, result)]
    except FluxgymError as e:
        return envelope + [error_reply(rid, e.code, e.message, e.details)]
    except InvalidTransition as e:
        return envelope + [error_reply(rid, ErrorCode.INVALID_STATE, str(e))]
    except Exception as e:  # a bug of ours: say so, keep serving
        log.exception("request failed")
        return envelope + [error_reply(
            rid, ErrorCode.INTERNAL, f"internal error ({type(e).__name__}: {e}); see the "
            "daemon's log (journalctl -u fluxgymd)",
        )]


class ControlServer:
    def __init__(self, ctx: zmq.asyncio.Context, endpoint: str, handlers: dict[str, Handler]):
        self.handlers = handlers
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, SOCKET_MAX_MESSAGE_BYTES)
        # A reply to a peer that went away is dropped, not an error that stops the loop.
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.sock.bind(endpoint)

    async def serve(self) -> None:
        while True:
            frames = await self.sock.recv_multipart()
            if len(frames) < 1:
                continue
            # Slow ops (a cancel that waits) must not hold up everyone else's pings.
            asyncio.get_running_loop().create_task(self._answer(frames))

    async def _answer(self, frames: list[bytes]) -> None:
        answer = asyncio.ensure_future(handle_frames(frames, self.handlers))
        beat: list[bytes] | None = None
        while not (await asyncio.wait({answer}, timeout=HEARTBEAT_S))[0]:
            if beat is None:
                rid = wants_heartbeat(frames[-1]) if len(frames) >= 2 else None
                if rid is None:
                    await answer
                    break
                beat = frames[:-1] + [working_reply(rid)]  # the request's own envelope
            await self._send(beat)
        await self._send(answer.result())

    async def _send(self, frames: list[bytes]) -> None:
        try:
            await self.sock.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.ZMQError as e:
            log.debug("reply not delivered: %s", e)

    def close(self) -> None:
        self.sock.close(linger=0)
