"""The HTTP layer of ``bbfl serve``: :func:`create_app` (the FastAPI app and its routes), :func:`serve`
(run it under uvicorn) and :func:`spawn_server` (a ``bbfl serve`` subprocess for tests and benchmarks).

The routes authenticate, read the body within its size and time limits and hand it to the
:class:`~bbfl.serve.server.Server`; :class:`CatchAll` and :func:`_json_response` turn errors into JSON
answers. FastAPI, Starlette and uvicorn are imported inside the functions that need them (an optional
extra): importing this module does not import them.
"""

# no `from __future__ import annotations`: FastAPI must resolve the handlers' `Request` annotations
import hmac
import json
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from bbfl.blackbox import LocalBlackBox
from bbfl.processes import free_port, start_server_process
from bbfl.serve import validate
from bbfl.serve.batching import CLIENT_GONE
from bbfl.serve.server import ScoresRequest, ServeLimits, Server
from bbfl.serve.validate import APIError

SAFETENSORS = "application/octet-stream"
LOG = logging.getLogger("bbfl.serve")


class CatchAll:
    """ASGI wrapper answering an unexpected exception with a JSON 500 *without re-raising it*.

    Starlette's ``exception_handler(Exception)`` re-raises after answering, and uvicorn then closes the
    connection, resetting the client's next keep-alive request; a handled 500 leaves the connection usable.
    Every known bad input is a 4xx before it gets here; this is the backstop that logs the traceback.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        started = False

        async def tracked(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:
            if scope["type"] != "http" or started:
                raise  # too late for a clean answer: uvicorn closes the connection
            LOG.exception("unexpected error serving %s %s", scope.get("method"), scope.get("path"))
            await _json_response(500, f"internal error ({type(exc).__name__})", "server_error", None, send)


async def _json_response(
    status: int, message: str, kind: str, param: str | None, send: Callable, close: bool = False
) -> None:
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    raw = json.dumps(body, ensure_ascii=True).encode()  # ASCII: a lone surrogate in a message cannot break it
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    if close:  # the rest of the body may never come: the connection cannot carry another request
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": raw})


def create_app(blackbox: LocalBlackBox, token: str | None, limits: ServeLimits | None = None):
    """The ASGI app serving ``blackbox``. ``token=None`` turns authentication off (the CLI asks for it)."""
    import asyncio

    from fastapi import FastAPI, Request
    from fastapi.responses import Response
    from starlette.concurrency import run_in_threadpool

    server = Server(blackbox, token, limits or ServeLimits())
    app = FastAPI(title="bbfl serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    app.add_middleware(CatchAll)
    model_queue = asyncio.Lock()  # scores / features run one at a time, in arrival order (asyncio locks are FIFO)

    class _Answer(Response):
        """A JSON error sent as-is (ASCII, optional ``Connection: close``)."""

        def __init__(self, exc: APIError) -> None:
            super().__init__()
            self.exc = exc

        async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
            exc = self.exc
            message = exc.message.replace(server.bb.model_name, server.name)  # e.g. a BBFLError naming the model
            await _json_response(exc.status, message, exc.kind, exc.param, send, close=exc.status == 408)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> Response:
        return _Answer(exc)

    async def read(request: Request) -> bytes:
        """Authenticate, then read the body without ever holding more than the size limit, or waiting for it
        longer than the body timeout."""
        if server.token is not None:
            given = request.headers.get("authorization", "")
            if not (given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), server.token.encode())):
                raise APIError(401, "missing or wrong bearer token (Authorization: Bearer <token>)", "authentication")
        server.requests += 1
        limit = server.limits.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"request body of {int(declared)} bytes > limit {limit} bytes", "request_too_large")

        async def collect() -> bytes:
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise APIError(413, f"request body over the limit of {limit} bytes", "request_too_large")
                chunks.append(chunk)
            return b"".join(chunks)

        timeout = server.limits.body_timeout_s
        try:
            return await asyncio.wait_for(collect(), timeout)
        except asyncio.TimeoutError:
            raise APIError(408, f"request body not received within {timeout} s (--body-timeout)", "timeout") from None

    async def read_json(request: Request) -> dict:
        payload = validate.parse_json(await read(request))
        if payload.get("model") is not None:  # echoed back in the response
            validate.text(payload["model"], "model")
        return payload

    async def in_turn(request: Request, work: Callable, job: ScoresRequest) -> Any:
        """Run ``work(job)`` when the model queue reaches it, unless its client has gone by then: a backlog
        of abandoned requests (timed-out clients) must not keep the model busy."""
        async with model_queue:
            if await request.is_disconnected():
                server.abandoned += 1
                raise APIError(499, "the client closed the connection before its turn; not scored", "client_closed")
            return await run_in_threadpool(work, job)

    async def batched(request: Request, work: Callable, payload: dict) -> Any:
        """Run ``work(payload)`` (which queues on a Batcher) while watching for the client to disconnect: a
        job still queued when it does is dropped (see :class:`Batcher`)."""
        gone = threading.Event()

        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            gone.set()

        watcher = asyncio.ensure_future(watch())
        context = CLIENT_GONE.set(gone)
        try:
            return await run_in_threadpool(work, payload)
        finally:
            CLIENT_GONE.reset(context)
            watcher.cancel()

    @app.get("/health")
    async def health() -> dict:
        stats = server.bb.counter.stats.as_dict()
        batching = {
            name: {"requests": b.jobs, "model_calls": b.calls, "abandoned": b.abandoned}
            for name, b in (
                ("embeddings", server.embedding_batcher),
                ("next_token", server.next_token_batcher),
                ("echo", server.echo_batcher),
            )
        }
        return {
            "status": "ok",
            "model": server.name,
            "requests": server.requests,
            "abandoned": server.abandoned,
            "served": stats,
            "batching": batching,
        }

    @app.get("/v1/bbfl/info")
    async def info(request: Request) -> dict:
        await read(request)
        return server.info()

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        await read(request)
        return {"object": "list", "data": [{"id": server.name, "object": "model", "owned_by": "bbfl"}]}

    @app.post("/v1/bbfl/scores")
    async def scores(request: Request) -> Response:
        job = await run_in_threadpool(server.parse_scores, await read(request))
        out, tokens = await in_turn(request, server.scores, job)
        return Response(out, media_type=SAFETENSORS, headers={"x-bbfl-tokens": str(tokens)})

    @app.post("/v1/bbfl/features")
    async def features(request: Request) -> Response:
        job = await run_in_threadpool(server.parse_features, await read(request))
        return Response(await in_turn(request, server.features, job), media_type=SAFETENSORS)

    @app.post("/v1/bbfl/token_embeddings")
    async def token_embeddings(request: Request) -> Response:
        payload = await read_json(request)
        return Response(await run_in_threadpool(server.token_embeddings, payload), media_type=SAFETENSORS)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> dict:
        return await batched(request, server.embeddings, await read_json(request))

    @app.post("/v1/completions")
    async def completions(request: Request) -> dict:
        return await batched(request, server.completions, await read_json(request))

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> dict:
        return await batched(request, server.chat, await read_json(request))

    return app


def serve(
    blackbox: LocalBlackBox,
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    limits: ServeLimits | None = None,
) -> None:
    """Run the server until interrupted (uvicorn, one process; concurrent text requests are batched)."""
    import uvicorn

    uvicorn.run(create_app(blackbox, token, limits), host=host, port=port, log_level="warning")


def spawn_server(
    args: Sequence[str] = (), token: str | None = None, threads: int = 1, timeout: float = 120.0
) -> tuple[Any, str]:
    """Start ``bbfl serve ARGS`` as a subprocess on a free local port; return ``(process, url)`` once healthy.

    For tests, benchmarks and examples. ``token=None`` serves with ``--no-auth``. The caller stops the
    process (``terminate()``); a server that exits or stays unhealthy raises RuntimeError with its output.
    """
    import os
    import sys

    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    env.pop("BBFL_SERVE_TOKEN", None)
    if token is not None:
        env["BBFL_SERVE_TOKEN"] = token  # through the environment: never on a command line other users can read
    cmd = [sys.executable, "-m", "bbfl.cli", "serve", "--port", str(port), *args]
    if token is None:
        cmd.append("--no-auth")
    url = f"http://127.0.0.1:{port}"
    return start_server_process(cmd, url, env=env, timeout=timeout), url
