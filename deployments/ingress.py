"""HTTP ingress: OpenAI routes, composition of the stages per request, the SSE body.
Error mapping and SSE framing live in `http_io.py`.

In: starlette requests. Out: OpenAI JSON / server-sent events. Large arrays never materialise
here: for a request with media, the Preprocess response is passed by reference to the vision
pool and the LLM replica. A text-only request is tokenized here and goes to the LLM by value.
Admission is taken before the body is read; every chat request's outcome is counted once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from deployments.auth import ApiKeyAuth
from deployments.choice_streams import first_events, merge
from deployments.events import ChoiceAccumulator, GenerationEvent, running_usage, unwrap_error
from deployments.http_io import app_path, error_response, request_id_of, sse
from deployments.metrics import DISCONNECT_STATUS, IngressMetrics
from deployments.preprocess import PreprocessDeployment
from deployments.replica_loss import (
    REPLICA_LOST_RETRIES,
    cancel_stream,
    replica_lost,
)
from deployments.request_body import MAX_BODY_BYTES, parse_chat_request, read_body
from internvl_core.errors import (
    AuthenticationError,
    EngineOverloadedError,
    ModelNotFoundError,
)
from internvl_core.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChunkChoice,
    Delta,
    ModelCard,
    ModelList,
    completion_id,
)
from internvl_core.serve_args import ServeArgs

logger = logging.getLogger(__name__)

NON_STREAM_INTERVAL_S = 3600.0


class IngressDeployment:
    """Routes `/v1/chat/completions`, `/v1/models`, `/health`; composes the stage handles."""

    def __init__(
        self,
        preprocess: Any,
        vision: Any,
        llm: Any,
        *,
        model_name: str,
        max_model_len: int,
        max_inflight: int,
        stream_interval_s: float = 0.0,
        text_args: ServeArgs | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
        metrics: IngressMetrics | None = None,
        auth: ApiKeyAuth | None = None,
    ) -> None:
        self.preprocess = preprocess
        # With `text_args`, text-only requests are prepared here: a template and a tokenizer
        # call cost less than the hop to the Preprocess deployment, which keeps all media work.
        self.text_preparer: Any | None = (
            PreprocessDeployment(text_args) if text_args is not None else None
        )
        self.vision = vision
        self.llm = llm
        # Media requests carry pixel and embedding arrays: every hop goes by reference, so the
        # arrays move replica to replica through the object store, never through here (a
        # DeploymentResponse argument of a by-value call would be resolved here first).
        # Text-only requests carry a few KB: by value over gRPC costs about half the CPU per
        # call (1.4 vs 3.8 core-ms unary, 2.4 vs 5.9 streamed; deployments/serve_env.py).
        self._text_route = _Route(
            preprocess.options(_by_reference=False),
            None,
            llm.options(stream=True, _by_reference=False),
        )
        self._media_route = _Route(
            preprocess.options(_by_reference=True),
            vision.options(_by_reference=True),
            llm.options(stream=True, _by_reference=True),
        )
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.max_inflight = max_inflight
        self.stream_interval_s = stream_interval_s
        self.max_body_bytes = max_body_bytes
        self.inflight = 0
        self.metrics = metrics if metrics is not None else IngressMetrics()
        self.auth = auth  # None: no API keys configured, every route open

    async def __call__(self, request: Request) -> Response:
        path, method = app_path(request), request.method
        chat = path == "/v1/chat/completions" and method == "POST"
        if (refused := self._authenticate(request, path)) is not None:
            if chat:
                self.metrics.request_done(str(refused.status_code), 0.0)
            return refused
        if chat:
            return await self._counted_chat(request)
        try:
            if path == "/v1/models" and method == "GET":
                return self._models()
            if path in ("/health", "/v1/health") and method == "GET":
                return await self._health()
            raise ModelNotFoundError(f"no route for {method} {path}")
        except Exception as e:  # every failure becomes OpenAI error JSON
            return error_response(e)

    def _authenticate(self, request: Request, path: str) -> Response | None:
        """A 401 in OpenAI error JSON for a `/v1/*` request without a valid key, when keys are
        configured; None lets the request through (`/health` is always open)."""
        if self.auth is None or not self.auth.guards(path):
            return None
        try:
            self.auth.check(request.headers.get("authorization"))
        except AuthenticationError as e:
            response = error_response(e)
            response.headers["www-authenticate"] = "Bearer"
            return response
        return None

    def _models(self) -> JSONResponse:
        card = ModelCard(id=self.model_name, max_model_len=self.max_model_len)
        return JSONResponse(ModelList(data=[card]).model_dump())

    async def _health(self) -> JSONResponse:
        checks = {"preprocess": self.preprocess, "vision": self.vision, "llm": self.llm}
        status: dict[str, str] = {}
        for name, handle in checks.items():
            try:
                await asyncio.wait_for(handle.health.remote(), timeout=10)
                status[name] = "ok"
            except Exception as e:  # a stage that cannot answer is not ready
                status[name] = f"unhealthy: {type(unwrap_error(e)).__name__}"
        ready = all(v == "ok" for v in status.values())
        return JSONResponse(
            {"status": "ok" if ready else "unavailable", "stages": status},
            status_code=200 if ready else 503,
        )

    async def _counted_chat(self, request: Request) -> Response:
        """One chat request, its outcome counted once: the HTTP status of the answer, or
        DISCONNECT_STATUS when the client left first. A stream counts itself when it ends."""
        start = time.perf_counter()
        try:
            response = await self._chat(request, start)
        except (asyncio.CancelledError, ClientDisconnect) as e:
            self.metrics.request_done(DISCONNECT_STATUS, time.perf_counter() - start)
            if isinstance(e, asyncio.CancelledError):
                raise
            return Response(status_code=int(DISCONNECT_STATUS))  # nobody is left to read it
        except Exception as e:  # every failure becomes OpenAI error JSON
            response = error_response(e)
        if not isinstance(response, StreamingResponse):
            self.metrics.request_done(str(response.status_code), time.perf_counter() - start)
        return response

    async def _parse(self, request: Request) -> ChatCompletionRequest:
        parsed = await parse_chat_request(await read_body(request, self.max_body_bytes))
        if parsed.model != self.model_name:
            raise ModelNotFoundError(
                f"model {parsed.model!r} is not served here; available: {self.model_name!r}",
                param="model",
            )
        return parsed

    async def _chat(self, request: Request, start: float) -> Response:
        # The slot is taken before the body is read: a slow or large upload holds one too.
        if self.inflight >= self.max_inflight:
            raise EngineOverloadedError(
                f"{self.inflight} requests in flight; max_inflight is {self.max_inflight}"
            )
        self.inflight += 1
        slot = _Slot(self, start)
        try:
            parsed = await self._parse(request)
            request_id, headers = request_id_of(request)
            streams, first = await self._open(parsed, request_id)  # errors before headers
        except BaseException:
            slot.release()
            raise
        if any(event.token_ids for event, _ in first):
            self.metrics.first_token(min(at for event, at in first if event.token_ids) - start)
        if parsed.stream:
            body = self._stream_body(parsed, request_id, streams, first, slot)
            # A body the server never iterates (client gone before the first byte) never runs
            # its `finally`; releasing the slot when the generator is collected covers that.
            weakref.finalize(body, slot.release, DISCONNECT_STATUS)
            return StreamingResponse(body, media_type="text/event-stream", headers=headers)
        try:
            response = await self._complete_or_restart(parsed, request_id, streams, first)
            response.headers.update(headers)
            return response
        finally:
            slot.release()

    async def _start(
        self, parsed: ChatCompletionRequest, request_id: str
    ) -> list[AsyncIterator[Any]]:
        logger.debug(
            "request %s: %d messages, stream=%s", request_id, len(parsed.messages), parsed.stream
        )
        has_media = any(
            not isinstance(m.content, str | None) and any(p.type != "text" for p in m.content)
            for m in parsed.messages
        )
        route = self._media_route if has_media else self._text_route
        if has_media or self.text_preparer is None:
            prepared = route.preprocess.prepare.remote(parsed, request_id)
        else:
            prepared = await self.text_preparer.prepare(parsed, request_id)
        if route.vision is not None:  # the LLM gets the vision pool's EncodedRequest only
            prepared = route.vision.encode.remote(prepared)
        llm = route.llm
        # Non-streaming callers need only the first event (errors) and the final one.
        interval = self.stream_interval_s if parsed.stream else NON_STREAM_INTERVAL_S
        return [llm.generate.remote(prepared, None, i, interval) for i in range(parsed.n)]

    async def _open(
        self, parsed: ChatCompletionRequest, request_id: str, *, retries: int = REPLICA_LOST_RETRIES
    ) -> tuple[list[AsyncIterator[Any]], list[tuple[GenerationEvent, float]]]:
        """`_start` and each stream's first event (with its arrival time). A request whose
        replica died before its first event (nothing sent to the client yet) starts again, at
        most `retries` times, under a fresh engine id; Serve routes it to a live replica.
        """
        for attempt in range(retries + 1):
            attempt_id = f"{request_id}.retry{attempt}" if attempt else request_id
            streams = await self._start(parsed, attempt_id)
            try:
                return streams, await first_events(streams)
            except Exception as e:
                lost = replica_lost(unwrap_error(e))
                if lost is None or attempt == retries:
                    raise
                logger.warning("request %s: %s; starting it again", request_id, lost.message)
                for stream in streams:  # choices on live replicas stop (and free their KV)
                    cancel_stream(stream)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _complete_or_restart(
        self,
        parsed: ChatCompletionRequest,
        request_id: str,
        streams: list[AsyncIterator[Any]],
        first: list[tuple[GenerationEvent, float]],
    ) -> JSONResponse:
        """`_complete`. The client of a non-streaming request has seen nothing yet, so one whose
        replica died mid-generation starts again from scratch, once (a seed gives the same answer).
        """
        try:
            return await self._complete(streams, first)
        except Exception as e:
            lost = replica_lost(unwrap_error(e))
            if lost is None:
                raise
            logger.warning("request %s: %s mid-generation; starting it again", request_id, lost)
            for stream in streams:
                cancel_stream(stream)
        restart_id = f"{request_id}.restart"
        streams, first = await self._open(parsed, restart_id, retries=0)
        return await self._complete(streams, first)

    async def _complete(
        self, streams: list[AsyncIterator[Any]], first: list[tuple[GenerationEvent, float]]
    ) -> JSONResponse:
        async def drain(i: int) -> ChoiceAccumulator:
            acc = ChoiceAccumulator(i)
            acc.add(*first[i])
            async for raw in streams[i]:
                acc.add(GenerationEvent.from_wire(raw), time.perf_counter())
            return acc

        accs = await asyncio.gather(*(drain(i) for i in range(len(streams))))
        for acc in accs:
            self._choice_done(acc)
        response = ChatCompletionResponse(
            id=completion_id(),
            model=self.model_name,
            choices=[acc.choice() for acc in accs],
            usage=ChoiceAccumulator.usage(accs),
        )
        return JSONResponse(response.model_dump(exclude_none=True))

    def _choice_done(self, acc: ChoiceAccumulator) -> None:
        if acc.last_at is not None:
            self.metrics.choice_done(acc.first_token_at, acc.last_at, acc.num_output_tokens)

    async def _stream_body(
        self,
        parsed: ChatCompletionRequest,
        request_id: str,
        streams: list[AsyncIterator[Any]],
        first: list[tuple[GenerationEvent, float]],
        slot: _Slot,
    ) -> AsyncIterator[str]:
        chunk_id = completion_id()
        accs = [ChoiceAccumulator(i) for i in range(len(streams))]
        events = [event for event, _ in first]
        options = parsed.stream_options
        status = DISCONNECT_STATUS  # until the stream ends one way or the other
        try:
            for i in range(len(streams)):
                role = ChunkChoice(index=i, delta=Delta(role="assistant", content=""))
                yield sse(self._chunk(chunk_id, [role], running_usage(options, accs, events)))
            for acc, (event, at) in zip(accs, first, strict=True):
                acc.add(event, at)
            async for index, event in merge(streams, events):
                if event is not first[index][0]:
                    accs[index].add(event, time.perf_counter())
                choice = accs[index].chunk_choice(event)
                if choice is not None:
                    usage = running_usage(options, accs, events)
                    yield sse(self._chunk(chunk_id, [choice], usage))
            if parsed.stream_options and parsed.stream_options.include_usage:
                usage = ChoiceAccumulator.usage(accs)
                yield sse(self._chunk(chunk_id, [], usage=usage.model_dump()))
            status = "200"
            for acc in accs:
                self._choice_done(acc)
        except Exception as e:  # in-flight failure: an error event, then the stream ends
            logger.warning("request %s failed mid-stream: %r", request_id, e)
            error = error_response(e)
            status = str(error.status_code)
            yield sse(json.loads(error.body))
        finally:  # a disconnect (CancelledError, GeneratorExit) keeps DISCONNECT_STATUS
            slot.release(status)
        yield sse("[DONE]")

    def _chunk(
        self, chunk_id: str, choices: list[ChunkChoice], usage: dict[str, int] | None = None
    ) -> dict[str, Any]:
        chunk = ChatCompletionChunk(id=chunk_id, model=self.model_name, choices=choices)
        payload = chunk.model_dump(exclude_none=True)
        # OpenAI chunks always carry finish_reason (null until the last one).
        for dumped, choice in zip(payload["choices"], choices, strict=True):
            dumped["finish_reason"] = choice.finish_reason
        if usage is not None:
            payload["usage"] = usage
        return payload


@dataclass(frozen=True)
class _Route:
    """The stage handles one request goes through, each with its transport chosen."""

    preprocess: Any
    vision: Any | None
    llm: Any  # streaming


class _Slot:
    """An admitted request's in-flight slot, given back exactly once whichever path gets there
    first; a stream's outcome is counted then (a unary one by `_counted_chat`)."""

    def __init__(self, ingress: IngressDeployment, start: float) -> None:
        self.ingress: IngressDeployment | None = ingress
        self.start = start

    def release(self, status: str | None = None) -> None:
        ingress, self.ingress = self.ingress, None
        if ingress is None:
            return
        ingress.inflight -= 1
        if status is not None:
            ingress.metrics.request_done(status, time.perf_counter() - self.start)
