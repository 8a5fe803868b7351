"""``ModelChunks``: one module over a rank's model chunks whose state-dict keys are
``<chunk>.<key>`` and whose checkpoint keys are the chunks' own (so checkpoints do not depend on
how many chunks wrote them; the interleaved runs in tests/training/test_checkpoint.py resume
across layouts on that)."""

from __future__ import annotations

from support.dist import run_distributed


def _keys(rank, world):
    import torch
    from support.vlm import IMAGE_SLOTS, small_model_config

    from casa_megatron.config import ParallelConfig
    from casa_megatron.model.build import build_model_chunks, build_vlm
    from casa_megatron.parallel import initialize_parallel

    initialize_parallel(1, 1, seed=0)
    chunks = build_model_chunks(small_model_config(), ParallelConfig(), IMAGE_SLOTS)
    initialize_parallel(1, 1, seed=0)
    alone = build_vlm(small_model_config(), ParallelConfig(), IMAGE_SLOTS)
    assert len(chunks) == 1 and chunks.chunks == [chunks[0]] and chunks.config is chunks[0].config
    sharded, reference = chunks.sharded_state_dict(), alone.sharded_state_dict()
    assert set(sharded) == set(chunks.state_dict()) == {f"0.{k}" for k in reference}
    assert {k: v.key for k, v in sharded.items()} == {f"0.{k}": v.key for k, v in reference.items()}
    for name, value in alone.state_dict().items():  # the same initial weights as the model alone
        torch.testing.assert_close(chunks.state_dict()[f"0.{name}"], value, rtol=0, atol=0)
    return len(sharded)


def test_state_dict_keys_are_prefixed_and_checkpoint_keys_are_not():
    assert run_distributed(_keys, world_size=1)[0] > 50
