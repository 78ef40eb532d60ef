"""A replica or pipeline stage that died under a request: how the ingress tells, so that it
answers a 503 with Retry-After (not a 500) and starts a request that got no token yet again.

In: the exception a handle call raised (Ray's wrappers already unwrapped). Out: EngineDeadError.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from ray.exceptions import RayActorError

from internvl_core.errors import EngineDeadError

REPLICA_LOST_RETRIES = 1  # a request that kills every replica it meets takes 2 with it, at most
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
