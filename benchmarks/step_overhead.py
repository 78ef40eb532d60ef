"""Host work per engine step, and how well it hides behind a (simulated) device.

A real LLMEngine over the tiny generator's checkpoint (hidden 64, so the model costs almost
nothing) runs steady decode batches of 1, 32, 128 and 256 sequences, streaming text on. Prints one
JSON line: `host_ms_per_step` (step wall time minus the model's own compute, per batch size, greedy
decode only: the step loop, `LLMEngine.step_tokens`), the same at 256 for decode mixed with a
prefill chunk and for sampling (top_p, penalties, seeds), `host_us_per_seq`, the output side's ms
per step (detokenization + stop strings, which run after the next step is submitted),
`overlap_step_ms` (period of full `step()`s, output side included, at 256 over a simulated device
of D ms per step) and the busy fraction of every stage at PP=2 and PP=4 (each stage D ms).

The simulated device: with D > 0 each stage hands its job to its own device thread (jobs run in
submission order, like one CUDA stream), which runs the real runner (input prep, embedding, head,
sampler; the layers are skipped) and pads the job to D ms with a sleep (releasing the GIL); the
stage's output is ready only when that job ends. One process and one GIL hold the engine and
every device thread, where real stage actors are separate processes: a device thread starts a
job only once it gets the GIL, so the engine's Python work (the output side) can hold a stage
start back by up to the interpreter's switch interval (5 ms), and on a loaded machine the PP
busy fractions read low.
"""

from __future__ import annotations

import argparse
import json
import platform
import queue
import random
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from internvl_core.config import EngineConfig, SamplingParams
from internvl_core.engine import LLMEngine, ModelRunner
from internvl_core.engine.batch import ScheduledBatch, StageOutput
from internvl_core.model.decoder import DecoderModel
from internvl_core.testing.tiny import make_tiny_checkpoint

BATCH_SIZES = (1, 32, 128, 256)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=30, help="timed decode steps per measurement")
    p.add_argument("--delay-ms", type=float, default=20.0, help="simulated device step time D")
    p.add_argument("--prompt-len", type=int, nargs=2, default=(8, 64), metavar=("MIN", "MAX"))
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-pp", action="store_true", help="skip the PP busy measurement")
    return p.parse_args()


class ComputeClock:
    """Sums the time spent inside the model's own modules (embedding, layers, norm, head)."""

    def __init__(self, model: DecoderModel) -> None:
        self.total_s = 0.0
        self._start = 0.0
        modules = [model.embedding, *model.layers, model.norm, model.lm_head]
        for module in modules:
            if module is not None:
                module.register_forward_pre_hook(self._pre)
                module.register_forward_hook(self._post)

    def _pre(self, *_: Any) -> None:
        self._start = time.perf_counter()

    def _post(self, *_: Any) -> None:
        self.total_s += time.perf_counter() - self._start


class SimulatedDevice:
    """One stream: jobs run in submission order on a thread; each takes at least `delay_s`."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.busy_s = 0.0
        self._jobs: queue.SimpleQueue[tuple[Future[Any], list[Future[Any]], Callable[..., Any]]]
        self._jobs = queue.SimpleQueue()
        threading.Thread(target=self._run, daemon=True).start()

    def launch(self, job: Callable[[list[Any]], Any], after: list[Future[Any]]) -> Future[Any]:
        """Run `job(results of after)` once `after` are done; its future resolves D ms after
        start (like a stream waiting on events of other streams)."""
        done: Future[Any] = Future()
        self._jobs.put((done, after, job))
        return done

    def _run(self) -> None:
        while True:
            done, after, job = self._jobs.get()
            prev = [future.result() for future in after]
            start = time.perf_counter()
            result = job(prev)
            # The tiny model's own compute is device work here: the job is padded to D ms.
            time.sleep(max(0.0, self.delay_s - (time.perf_counter() - start)))
            self.busy_s += time.perf_counter() - start
            done.set_result(result)


class SkippedLayer(torch.nn.Module):
    """A decoder layer of zero cost (the simulated device does the layers' work)."""

    def forward(self, hidden: torch.Tensor, *_: Any, **__: Any) -> torch.Tensor:
        return hidden  # [T, D]


class SimulatedStage:
    """StageWorker over a real runner. D = 0: runs at submit. D > 0: the device thread runs it
    (the host only enqueues, as with a GPU) and its output is ready D ms after it starts."""

    def __init__(self, runner: ModelRunner, delay_s: float) -> None:
        self.runner = runner
        self.delay_s = delay_s
        self.device = SimulatedDevice(delay_s)
        if delay_s > 0:
            # The layers' CPU compute would compete with the host for these 2 cores: a GPU's
            # does not. Tokens still come from the real head and sampler.
            model = runner.model
            model.layers = torch.nn.ModuleList(SkippedLayer() for _ in model.layers)
        self.clock = ComputeClock(runner.model)

    def plan_kv_blocks(self, config: EngineConfig) -> int:
        return self.runner.plan_kv_blocks(config)

    def init_kv_cache(self, num_blocks: int) -> None:
        self.runner.init_kv_cache(num_blocks)

    def submit(self, batch: ScheduledBatch, prev: Any, sources: Sequence[Any] = ()) -> Any:
        """Stage 0 gets `sources` (the last stage's outputs its run-ahead rows read), a later
        stage `prev` (the previous stage's output)."""
        if self.delay_s == 0:
            hidden = prev.hidden_states if prev is not None else None
            return self.runner.execute(batch, hidden, sources=sources)

        def job(after: list[StageOutput]) -> StageOutput:
            if prev is None:
                return self.runner.execute(batch, None, sources=after)
            return self.runner.execute(batch, after[0].hidden_states)

        return self.device.launch(job, [prev] if prev is not None else list(sources))

    def fetch(self, handle: Any) -> StageOutput:
        return handle if self.delay_s == 0 else handle.result()


@dataclass
class Setup:
    engine: LLMEngine
    stages: list[SimulatedStage]


def build(path: Path, args: argparse.Namespace, *, pp_size: int, delay_s: float) -> Setup:
    config = EngineConfig(
        block_size=args.block_size,
        max_num_seqs=256,
        max_num_batched_tokens=4096,
        max_model_len=1024,
        num_kv_blocks=256 * (args.prompt_len[1] + 4 * args.steps + 64) // args.block_size,
        pp_size=pp_size,
    )
    stages: list[SimulatedStage] = []

    def factory(index: int, lo: int, hi: int) -> SimulatedStage:
        model = DecoderModel.from_checkpoint(path, start_layer=lo, end_layer=hi)
        stages.append(SimulatedStage(ModelRunner(model, block_size=args.block_size), delay_s))
        return stages[-1]

    engine = LLMEngine.from_checkpoint(path, config, stage_factory=factory)
    return Setup(engine, stages)


def _prompts(num: int, args: argparse.Namespace, vocab: int) -> list[list[int]]:
    rng = random.Random(args.seed)
    return [
        [rng.randrange(3, vocab) for _ in range(rng.randint(*args.prompt_len))] for _ in range(num)
    ]


def _params(kind: str, index: int, max_tokens: int) -> SamplingParams:
    if kind == "sampled":
        return SamplingParams(
            max_tokens=max_tokens,
            ignore_eos=True,
            temperature=0.8,
            top_p=0.9,
            repetition_penalty=1.1,
            presence_penalty=0.2,
            seed=index,
        )
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True)


def fill(setup: Setup, num: int, args: argparse.Namespace, kind: str) -> None:
    """Add `num` long requests and step until every one of them decodes."""
    engine = setup.engine
    vocab = engine.model_arch.vocab_size - 16
    for i, prompt in enumerate(_prompts(num, args, vocab)):
        engine.add_request(f"{kind}-{num}-{i}", prompt, _params(kind, i, 4 * args.steps + 64))
    while engine.stats.num_waiting or any(
        s.num_output_tokens < 2 for s in engine.scheduler.running
    ):
        engine.step()


def drain(setup: Setup) -> None:
    engine = setup.engine
    for seq in list(engine.scheduler.running) + list(engine.scheduler.waiting):
        engine.abort(seq.request_id)
    while engine.has_unfinished():
        engine.step()


def timed_steps(
    setup: Setup, steps: int, *, mixed_prompt: list[int] | None = None
) -> tuple[list[float], list[float]]:
    """Per step: host ms of the step loop (wall minus model compute) and of the output side
    (detokenization, stop strings); optionally one new prefill per step."""
    engine, clocks = setup.engine, [s.clock for s in setup.stages]
    host_ms: list[float] = []
    output_ms: list[float] = []
    for i in range(steps):
        if mixed_prompt is not None:
            engine.add_request(f"mixed-{i}-{time.perf_counter()}", mixed_prompt, _params("", 0, 1))
        before = sum(c.total_s for c in clocks)
        start = time.perf_counter()
        if not hasattr(engine, "step_tokens"):  # an engine before the output side was split
            engine.step()
            host_ms.append(1e3 * (time.perf_counter() - start - sum(c.total_s for c in clocks)))
            host_ms[-1] += 1e3 * before
            output_ms.append(0.0)
            continue
        tokens = engine.step_tokens()
        wall = time.perf_counter() - start
        host_ms.append(1e3 * (wall - (sum(c.total_s for c in clocks) - before)))
        start = time.perf_counter()
        engine.output_processor.process(tokens)
        output_ms.append(1e3 * (time.perf_counter() - start))
    return host_ms, output_ms


def measure_host(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    setup = build(path, args, pp_size=1, delay_s=0.0)
    host: dict[str, float] = {}
    output: dict[str, float] = {}
    top = BATCH_SIZES[-1]
    for num in BATCH_SIZES:
        fill(setup, num, args, "greedy")
        loop_ms, output_ms = timed_steps(setup, args.steps)
        host[str(num)], output[str(num)] = statistics.median(loop_ms), statistics.median(output_ms)
        if num == top:
            loop_ms, _ = timed_steps(setup, args.steps, mixed_prompt=list(range(3, 67)))
            mixed = statistics.median(loop_ms)
        drain(setup)
    fill(setup, top, args, "sampled")
    sampled = statistics.median(timed_steps(setup, args.steps)[0])
    drain(setup)
    return {
        "host_ms_per_step": {k: round(v, 3) for k, v in host.items()},
        "host_us_per_seq": round(1e3 * host[str(top)] / top, 2),
        "host_ms_per_step_mixed_prefill": round(mixed, 3),
        "host_ms_per_step_sampled": round(sampled, 3),
        "output_side_ms_per_step": {k: round(v, 3) for k, v in output.items()},
    }


def steady_period(setup: Setup, args: argparse.Namespace) -> tuple[float, list[float]]:
    """Median step period (ms) of a steady 256-sequence decode, and each stage's busy fraction."""
    engine = setup.engine
    fill(setup, BATCH_SIZES[-1], args, "greedy")
    for _ in range(2 * len(setup.stages)):
        engine.step()
    busy0 = [s.device.busy_s for s in setup.stages]
    start = time.perf_counter()
    periods: list[float] = []
    for _ in range(args.steps):
        t = time.perf_counter()
        engine.step()
        periods.append(1e3 * (time.perf_counter() - t))
    wall = time.perf_counter() - start
    busy = [(s.device.busy_s - b) / wall for s, b in zip(setup.stages, busy0, strict=True)]
    drain(setup)
    return statistics.median(periods), busy


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    delay_s = args.delay_ms / 1e3
    result: dict[str, Any] = {"device": f"cpu ({platform.processor() or platform.machine()})"}
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_checkpoint(Path(tmp) / "tiny1", num_llm_layers=1)
        result.update(measure_host(path, args))
        period, _ = steady_period(build(path, args, pp_size=1, delay_s=delay_s), args)
        result["overlap_step_ms"] = round(period, 3)
        result["delay_ms"] = args.delay_ms
        if not args.skip_pp:
            path4 = make_tiny_checkpoint(Path(tmp) / "tiny4", num_llm_layers=4)
            for pp_size in (2, 4):
                # Each stage's device takes D ms per micro-batch.
                setup = build(path4, args, pp_size=pp_size, delay_s=delay_s)
                period, busy = steady_period(setup, args)
                result[f"pp{pp_size}_stage_busy"] = [round(b, 3) for b in busy]
                result[f"pp{pp_size}_step_ms"] = round(period, 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
