"""The LLM engine: paged KV cache, continuous batching, pipeline stages, sampling, streaming.

Public surface: `LLMEngine`, `AsyncLLMEngine`, the output dataclasses and the stage protocol.
"""

from internvl_core.engine.async_engine import AsyncLLMEngine
from internvl_core.engine.engine import LLMEngine
from internvl_core.engine.model_runner import ModelRunner
from internvl_core.engine.outputs import CompletedOutput, EngineStats, RequestOutput
from internvl_core.engine.pipeline import (
    LocalStageWorker,
    Pipeline,
    StageWorker,
    build_pipeline,
    split_layers,
)
from internvl_core.engine.structured import StructuredOutputs

__all__ = [
    "AsyncLLMEngine",
    "CompletedOutput",
    "EngineStats",
    "LLMEngine",
    "LocalStageWorker",
    "ModelRunner",
    "Pipeline",
    "RequestOutput",
    "StageWorker",
    "StructuredOutputs",
    "build_pipeline",
    "split_layers",
]
