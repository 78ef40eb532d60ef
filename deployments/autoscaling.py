"""Stage-aware Serve autoscaling: the vision pool on queued tiles, LLM replicas on their engines.

In: Serve's `AutoscalingContext`, whose `aggregated_metrics` hold each replica's
`record_autoscaling_stats` means over the look-back window. Out: `(replicas, policy_state)`.
"""

# The policies are pure functions of the context; Serve (2.60, `autoscaling_state.py`) wraps
# every policy, custom ones included, with `_apply_autoscaling_config` (upscaling/downscaling
# factors, upscale/downscale delays kept in `policy_state`) and then clips to the
# capacity-adjusted bounds. Delays are therefore not re-implemented here: doing so would
# double them. The module imports nothing from this project because Serve cloudpickles it by
# value into the controller, which need not have the project on its path.

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ray.serve.config import AutoscalingContext

# Metric names shared by the replicas' `record_autoscaling_stats` and the policies.
PENDING_TILES = "vision_pending_tiles"
QUEUED_TILES = "vision_queued_tiles"  # policy state only: the estimate for caller-side queues
WAITING_SEQS = "llm_waiting_seqs"
RUNNING_SEQS = "llm_running_seqs"
KV_USAGE = "llm_kv_usage"

# `x / target` can land a hair above an integer (2 * 0.85 / 0.85); never add a replica for it.
_CEIL_SLACK = 1e-9


def clamp_replicas(desired: float, ctx: AutoscalingContext) -> int:
    """ceil(desired) within the capacity-adjusted [min, max] replicas."""
    wanted = math.ceil(desired - _CEIL_SLACK)
    low, high = ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas
    return max(low, min(high, wanted))


def replica_metric(ctx: AutoscalingContext, name: str) -> dict[Any, float] | None:
    """`name` per running replica that has reported it, or None while none has."""
    values = (ctx.aggregated_metrics or {}).get(name)
    return dict(values) if values else None


def desired_vision_replicas(pending_tiles: float, *, target_tiles_per_replica: float) -> float:
    """Replicas so that each holds `target_tiles_per_replica` tiles waiting or being encoded."""
    return pending_tiles / target_tiles_per_replica


def tiles_queued_at_callers(
    pending_tiles: float, running_requests: float, queued_requests: float
) -> float:
    """Tiles of the requests the pool has not accepted yet (its `max_ongoing_requests` is
    reached, so they wait at the callers' handles), at the mean tiles of the requests it holds
    and at least one each. Without them a pool full of small images would never look busy."""
    if queued_requests <= 0:
        return 0.0
    per_request = pending_tiles / running_requests if running_requests > 0 else 1.0
    return queued_requests * max(per_request, 1.0)


def desired_llm_replicas(
    num_replicas: int,
    total_waiting: float,
    total_kv_usage: float,
    *,
    target_waiting_per_replica: float,
    target_kv_usage: float,
) -> float:
    """Replicas for the engines' load (before ceil and bounds).

    KV: enough replicas that each uses `target_kv_usage` of its blocks, so KV above target
    scales out and KV well below it scales in. Waiting sequences: a queue above the target per
    replica asks for enough replicas to bring it back to target; a smaller queue still means
    every engine is full, so it forbids scaling in whatever the KV use (both must be low).
    """
    by_kv = total_kv_usage / target_kv_usage
    if total_waiting > target_waiting_per_replica * num_replicas:
        return max(total_waiting / target_waiting_per_replica, by_kv)
    if total_waiting > 0:
        return max(float(num_replicas), by_kv)
    return by_kv


class QueuedTilesPolicy:
    """Vision pool: ceil(pending tiles over all replicas / target_tiles_per_replica).

    Pending tiles are cache-miss tiles waiting for or inside an encoder batch (cache hits and
    text-only requests cost the pool nothing and do not count), plus an estimate for requests
    still queued at the callers (`tiles_queued_at_callers`).
    """

    def __init__(self, target_tiles_per_replica: float) -> None:
        assert target_tiles_per_replica > 0, "validated by AutoscalingOptions"
        self.target_tiles_per_replica = target_tiles_per_replica

    def __call__(self, ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
        tiles = replica_metric(ctx, PENDING_TILES)
        if tiles is None:  # no replica has reported yet: keep the current target
            return clamp_replicas(ctx.target_num_replicas, ctx), {}
        in_pool = sum(tiles.values())
        queued = tiles_queued_at_callers(
            in_pool, ctx.total_running_requests, ctx.total_queued_requests
        )
        desired = desired_vision_replicas(
            in_pool + queued, target_tiles_per_replica=self.target_tiles_per_replica
        )
        return clamp_replicas(desired, ctx), {PENDING_TILES: in_pool, QUEUED_TILES: queued}


class EngineQueuePolicy:
    """LLM replicas: waiting sequences per replica above a target or KV use above a target
    fraction scale out; scaling in needs both to be low (see `desired_llm_replicas`)."""

    def __init__(self, target_waiting_per_replica: float, target_kv_usage: float) -> None:
        assert target_waiting_per_replica > 0, "validated by AutoscalingOptions"
        assert 0 < target_kv_usage <= 1, "validated by AutoscalingOptions"
        self.target_waiting_per_replica = target_waiting_per_replica
        self.target_kv_usage = target_kv_usage

    def __call__(self, ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
        waiting = replica_metric(ctx, WAITING_SEQS)
        kv_usage = replica_metric(ctx, KV_USAGE)
        if waiting is None or kv_usage is None:  # no report yet: keep the current target
            return clamp_replicas(ctx.target_num_replicas, ctx), {}
        total_waiting = sum(waiting.values())
        total_kv = sum(kv_usage.values())
        num_replicas = max(ctx.current_num_replicas, len(waiting), 1)
        desired = desired_llm_replicas(
            num_replicas,
            total_waiting,
            total_kv,
            target_waiting_per_replica=self.target_waiting_per_replica,
            target_kv_usage=self.target_kv_usage,
        )
        state = {WAITING_SEQS: total_waiting, KV_USAGE: total_kv / num_replicas}
        return clamp_replicas(desired, ctx), state
