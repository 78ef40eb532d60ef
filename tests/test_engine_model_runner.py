"""ModelRunner: metadata from a ScheduledBatch, image splicing, chunked prefill, KV sizing,
run-ahead rows fed from earlier batches' samples."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from internvl_core.config import EngineConfig, ModelArchitecture, SamplingParams
from internvl_core.engine.batch import SamplingRequest, ScheduledBatch, StageOutput
from internvl_core.engine.kv_cache import kv_block_bytes, plan_num_blocks
from internvl_core.engine.model_runner import ModelRunner
from internvl_core.engine.sampler import SamplerOutput
from internvl_core.errors import InternVLError
from internvl_core.model.attention_metadata import AttentionMetadata
from internvl_core.model.decoder import DecoderModel

BLOCK = 4


def _batch(
    query_lens: list[int],
    context_lens: list[int],
    tables: list[list[int]],
    tokens: list[int],
    *,
    sample_flags: list[bool] | None = None,
    prompt_lens: list[int] | None = None,
    **kw: object,
) -> ScheduledBatch:
    flags = sample_flags if sample_flags is not None else [True] * len(query_lens)
    sampling = [
        SamplingRequest(f"r{i}", SamplingParams(), [], [], ()) for i, f in enumerate(flags) if f
    ]
    return ScheduledBatch(
        batch_id=0,
        request_ids=[f"r{i}" for i in range(len(query_lens))],
        input_token_ids=tokens,
        query_lens=query_lens,
        context_lens=context_lens,
        prompt_lens=prompt_lens or [c + q for c, q in zip(context_lens, query_lens, strict=True)],
        block_tables=tables,
        sample_flags=flags,
        sampling=sampling,
        block_size=BLOCK,
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def model(tiny_qwen2: Path) -> DecoderModel:
    return DecoderModel.from_checkpoint(tiny_qwen2, dtype=torch.float32)


def _runner(model: DecoderModel, num_blocks: int = 32) -> ModelRunner:
    runner = ModelRunner(model, block_size=BLOCK)
    runner.init_kv_cache(num_blocks)
    return runner


def test_prepare_input_matches_per_token_reference(model: DecoderModel) -> None:
    runner = _runner(model)
    tables = [[3, 7], [1], [5, 2, 9]]
    batch = _batch([1, 3, 5], [5, 0, 4], tables, list(range(9)), sample_flags=[True, False, True])
    inputs = runner.prepare_input(batch)
    ref = AttentionMetadata.for_contiguous([1, 3, 5], [6, 3, 9], tables, BLOCK)
    assert inputs.positions.tolist() == [5, 0, 1, 2, 4, 5, 6, 7, 8]
    assert inputs.attn.slot_mapping.tolist() == ref.slot_mapping.tolist()
    assert inputs.attn.block_tables.tolist() == ref.block_tables.tolist()
    assert inputs.attn.seq_lens == [6, 3, 9] and inputs.attn.query_lens == [1, 3, 5]
    assert inputs.sample_indices.tolist() == [0, 8]
    assert inputs.attn.long_rope_mask is None
    decode = runner.prepare_input(_batch([1, 1], [5, 8], [[3, 7], [1, 2, 4]], [1, 2]))
    assert decode.positions.tolist() == [5, 8] and decode.attn.slot_mapping.tolist() == [29, 16]


def test_long_rope_mask_follows_reference_length(tiny_phi3: Path) -> None:
    arch = ModelArchitecture.from_checkpoint(tiny_phi3).llm
    assert arch.rope_scaling is not None and arch.rope_scaling.type == "longrope"
    threshold = arch.rope_scaling.original_max_position_embeddings
    assert threshold is not None
    runner = ModelRunner(DecoderModel(arch, device="meta"), block_size=BLOCK)
    table = list(range(threshold // BLOCK + 2))
    # seq 0: prefill chunk of a prompt longer than the threshold -> long everywhere;
    # seq 1: decode at position threshold - 1 (reference = threshold) -> short;
    # seq 2: decode at position threshold (reference threshold + 1) -> long.
    batch = _batch(
        [2, 1, 1],
        [0, threshold - 1, threshold],
        [table, table, table],
        [1, 2, 3, 4],
        prompt_lens=[threshold + 1, 10, 10],
    )
    runner.device = torch.device("cpu")
    inputs = runner.prepare_input(batch)
    assert inputs.attn.long_rope_mask is not None
    assert inputs.attn.long_rope_mask.tolist() == [True, True, False, True]


def test_chunked_prefill_and_decode_match_one_shot(model: DecoderModel) -> None:
    tokens = torch.randint(
        0, model.arch.vocab_size, (11,), generator=torch.Generator().manual_seed(1)
    )
    ids = tokens.tolist()
    whole = _runner(model)
    table = [0, 1, 2]
    ref = whole.execute(_batch([11], [0], [table], ids))
    assert ref.sampled is not None
    chunked = _runner(model)
    first = chunked.execute(_batch([4], [0], [[6]], ids[:4], sample_flags=[False]))
    assert first.sampled is not None and first.sampled.token_ids == []
    second = chunked.execute(_batch([7], [4], [[6, 2, 9]], ids[4:]))
    assert second.sampled is not None
    assert second.sampled.token_ids == ref.sampled.token_ids


def test_image_rows_are_spliced_on_stage_zero(model: DecoderModel) -> None:
    width = model.arch.hidden_size
    image = torch.randn(3, width, generator=torch.Generator().manual_seed(2))  # [rows, D]
    ids = [5, 6, 7, 8, 9, 10]
    runner = _runner(model)
    batch = _batch(
        [6], [0], [[0, 1]], ids, image_embeds=image, image_token_indices=[1, 2, 3]
    )  # fmt: skip
    out = runner.execute(batch)
    # Reference: splice by hand into a fresh cache, run the model, argmax the last row.
    ref_runner = _runner(model)
    inputs = ref_runner.prepare_input(batch)
    with torch.inference_mode():
        embeds = model.embed_tokens(inputs.input_ids).clone()  # [T, D]
        embeds[1:4] = image
        assert ref_runner.kv_cache is not None
        hidden = model(embeds, inputs.positions, ref_runner.kv_cache.tensors, inputs.attn)
        logits = model.compute_logits(hidden[-1:])  # [1, V]
    assert out.sampled is not None and out.sampled.token_ids == logits.argmax(-1).tolist()
    # The cache holds the K/V of the spliced rows: equal to the reference, unlike plain text.
    plain = _runner(model)
    plain.execute(_batch([6], [0], [[0, 1]], ids))
    caches = [r.kv_cache.tensors[0][:, 0] for r in (runner, ref_runner, plain)]  # type: ignore[union-attr]
    torch.testing.assert_close(caches[0], caches[1])  # [2, block, K, d]
    torch.testing.assert_close(caches[0][:, 0], caches[2][:, 0])  # token 0 is text in both
    assert not torch.allclose(caches[0][:, 1], caches[2][:, 1])


def test_seeded_generators_live_until_finished(model: DecoderModel) -> None:
    runner = _runner(model)
    params = SamplingParams(temperature=1.0, seed=7)
    batch = _batch([2], [0], [[0]], [1, 2])
    batch.sampling = [SamplingRequest("r0", params, [], [], ())]
    runner.execute(batch)
    generator = runner._generators["r0"]
    assert generator is not None
    batch2 = _batch([1], [2], [[0]], [3], finished_request_ids=["r0"])
    batch2.sampling = [SamplingRequest("r0", params, [], [], ())]
    runner.execute(batch2)
    assert runner._generators["r0"] is not generator, "a finished id starts a fresh generator"


def test_kv_planning(model: DecoderModel) -> None:
    arch = model.arch
    per_block = kv_block_bytes(arch, 2, 16, torch.float32)
    assert per_block == 2 * 16 * arch.num_key_value_heads * arch.head_dim * 4 * 2
    cpu = torch.device("cpu")
    assert plan_num_blocks(EngineConfig(num_kv_blocks=7), block_bytes=per_block, device=cpu) == 7
    budget = EngineConfig(kv_cache_memory_bytes=10 * per_block + 5)
    assert plan_num_blocks(budget, block_bytes=per_block, device=cpu) == 10
    small = EngineConfig(max_num_seqs=2, max_model_len=64)
    assert plan_num_blocks(small, block_bytes=per_block, device=cpu) == 2 * 4
    with pytest.raises(InternVLError, match="kv_cache_memory_bytes is 5 bytes; one KV block"):
        plan_num_blocks(EngineConfig(kv_cache_memory_bytes=5), block_bytes=per_block, device=cpu)
    runner = ModelRunner(model, block_size=16)
    assert runner.kv_block_bytes() == per_block
    assert runner.plan_kv_blocks(EngineConfig(kv_cache_memory_bytes=3 * per_block)) == 3
    runner.init_kv_cache(3)
    assert runner.kv_cache is not None and runner.kv_cache.num_bytes == 3 * per_block


def test_plain_greedy_batches_skip_the_sampler_set_up(model: DecoderModel) -> None:
    runner = _runner(model)
    batch = _batch([2, 2], [0, 0], [[0], [1]], [1, 2, 3, 4])
    batch.sampling = [
        SamplingRequest("r0", SamplingParams(seed=1), [], [], ()),
        SamplingRequest("r1", SamplingParams(), [], [], ()),
    ]
    assert all(r.plain_greedy for r in batch.sampling)
    out = runner.execute(batch)
    assert runner._generators == {}, "greedy rows never draw: no generator is made"
    mixed = _runner(model)
    batch.sampling = [
        *batch.sampling[:1],
        SamplingRequest("r1", SamplingParams(top_logprobs=1), [], [], ()),
    ]
    assert not batch.sampling[1].plain_greedy
    ref = mixed.execute(batch)
    assert out.sampled is not None and ref.sampled is not None
    assert out.sampled.token_ids == ref.sampled.token_ids


def test_run_ahead_rows_take_ids_from_the_sampling_batches(model: DecoderModel) -> None:
    """Placeholder rows read the sources' samples concatenated in order, on the device or read
    back (a Ray stage's output arrives as host ids): the same as the ids written out."""
    ids = [5, 9]  # the "sampled" ids: 5 from batch 3 (row 1), 9 from batch 4 (row 0)
    ref = _runner(model).execute(_batch([1, 1, 1], [2, 3, 1], [[0], [1], [2]], [7, *ids]))
    sources = [
        StageOutput(3, sampled=SamplerOutput(device_token_ids=torch.tensor([11, 5]))),
        StageOutput(4, sampled=SamplerOutput(token_ids=[9, 12, 13])),
    ]
    batch = _batch(
        [1, 1, 1],
        [2, 3, 1],
        [[0], [1], [2]],
        [7, 0, 0],
        deferred_token_rows=[1, 2],
        deferred_sample_rows=[1, 2],  # row 1 of batch 3; row 0 of batch 4 (after 3's 2)
        deferred_source_batch_ids=[3, 4],
    )
    out = _runner(model).execute(batch, sources=sources)
    assert out.sampled is not None and ref.sampled is not None
    assert out.sampled.token_ids == ref.sampled.token_ids
    with pytest.raises(AssertionError, match="in order"):
        _runner(model).execute(batch, sources=sources[::-1])
