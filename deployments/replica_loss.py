"""A replica or pipeline stage that died under a request. The ingress tells it from other
failures (a 503 with Retry-After, not a 500; a request that got no token yet starts again); an
LLM replica whose engine died leaves at once, so that Serve routes around it and replaces it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import ray
from ray.exceptions import RayActorError

from internvl_core.errors import EngineDeadError

logger = logging.getLogger(__name__)

# Starts again of a request whose replica died before its first token; a non-streaming one
# whose replica died later starts again once more. A request that kills every replica it meets
# takes 3 with it, at most.
REPLICA_LOST_RETRIES = 1
REPLICA_LOST_RETRY_AFTER_S = 1


def replica_lost(exc: BaseException) -> EngineDeadError | None:
    """The failure as a 503 the client may retry, if a replica or stage died under the request.

    Ray raises RayActorError (ActorDiedError, ActorUnavailableError) from a call to a replica
    that died; Serve raises a RayServeException caused by one when an upstream replica died (a
    vision replica, for the LLM call that takes its result); a replica whose pipeline stage died
    answers EngineDeadError until Serve replaces it. Without this, the first two were 500s.
    """
    cause: BaseException | None = exc
    for _ in range(8):  # the __cause__ chain; Ray's own wrappers are unwrapped by the caller
        if cause is None:
            return None
        if isinstance(cause, EngineDeadError):
            return cause
        if isinstance(cause, RayActorError):
            return EngineDeadError(f"a replica died under this request ({type(cause).__name__})")
        cause = cause.__cause__
    return None


def cancel_stream(stream: AsyncIterator[Any]) -> None:
    """Cancel a handle's stream (a DeploymentResponseGenerator); other iterators are left."""
    cancel = getattr(stream, "cancel", None)
    if cancel is not None:
        cancel()


async def leave_when_engine_dies(stream: AsyncGenerator[Any, None]) -> AsyncIterator[Any]:
    """`stream`; when it fails with EngineDeadError (a stage or the step loop died, and an engine
    never recovers) the replica leaves at once.

    A live replica with a dead engine answers each request with a fast 503, so the router, which
    favours the least busy replica, sends it most of the traffic until a health check fails (up
    to health_check_period_s later). A dead actor is routed around at once (the ingress starts a
    request that got no token again) and Serve replaces it.
    """
    try:
        async for item in stream:
            yield item
    except EngineDeadError:
        _leave_replica()
        raise
    finally:
        await stream.aclose()  # a cancelled caller aborts the engine request (frees its KV)


def _leave_replica() -> None:
    context = ray.get_runtime_context() if ray.is_initialized() else None
    if context is None or context.get_actor_id() is None:
        return  # a plain object in a test, not a replica
    logger.error("engine dead: this LLM replica exits so that Serve replaces it")
    ray.kill(context.current_actor, no_restart=True)
