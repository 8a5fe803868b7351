"""``model.trainable_tokens`` (``model/token_rows.py``): with the LM frozen, the listed ids' rows
of the embedding and output tables train and no other row moves, even under weight decay; their
gradient is the one the fully trainable model gets; TP=2 + SP (ids on both vocabulary shards) and
PP=2 with tied embeddings (the first/last-stage weight copies) follow the one-process run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from support.dist import run_distributed

from casa_megatron.config import load_config
from casa_megatron.config.errors import ConfigError
from casa_megatron.config.schema import TrainConfig

TINY = "configs/tiny_cpu_synthetic.yaml"
ROWS = [4, 6, 14]  # the colour question (read, data/synthetic.py), a colour and a side answer (produced)
FROZEN = ["model.freeze_lm=true", f"model.trainable_tokens=[{','.join(map(str, ROWS))}]"]
RUN = ["train_steps=4", "log_interval=1", "checkpoint.save_interval=4", "optimizer.warmup_steps=1",
       "optimizer.wsd_decay_steps=0", "optimizer.weight_decay=0.1", "tracking.enabled=false"]
TABLES = ("embedding.word_embeddings.weight", "output_layer.weight")


def _cfg(overrides):
    return load_config(TrainConfig, TINY, list(overrides))


def test_the_option_is_checked():
    with pytest.raises(ConfigError, match="every row trains already"):
        _cfg(["model.trainable_tokens=[4]"])
    with pytest.raises(ConfigError, match=r"ids \[16\] outside the vocabulary"):
        _cfg(["model.freeze_lm=true", "model.trainable_tokens=[4,16]"])
    with pytest.raises(ConfigError, match="lists an id twice"):
        _cfg(["model.freeze_lm=true", "model.trainable_tokens=[4,4]"])


def test_a_resume_must_keep_them_and_a_pretrained_start_may_add_them():
    from casa_megatron.training.resume import MAY_CHANGE, MUST_MATCH, classify

    assert classify("model.trainable_tokens") == MUST_MATCH  # the optimizer state holds the tables or not
    assert classify("model.trainable_tokens", weights_only=True) == MAY_CHANGE


def _gradients(rank, world):
    """One step's finalised gradients of the vocabulary tables: frozen LM + trainable rows, and
    the whole LM trainable, on the same micro-batches."""
    import dataclasses

    import torch
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from casa_megatron.data import make_train_iterator
    from casa_megatron.model.build import build_vlm
    from casa_megatron.model.chunks import ModelChunks
    from casa_megatron.parallel import initialize_parallel
    from casa_megatron.training.optimizer import build_optimizer, wrap_ddp
    from casa_megatron.training.step import forward_step

    out = {}
    for name, overrides in (("rows", FROZEN), ("full", [])):
        cfg = _cfg(overrides)
        initialize_parallel(1, 1, cfg.seed)
        model = build_vlm(cfg.model, cfg.parallel, cfg.data.image_seq_length, torch.float32, cfg.precision)
        ddp = wrap_ddp(ModelChunks([model]), cfg)
        build_optimizer(ddp, cfg)  # as in training (param groups); no step is taken
        data_cfg = dataclasses.replace(cfg.data, temporal_patch_size=cfg.model.vision.temporal_patch_size)
        data = make_train_iterator(data_cfg, cfg.micro_batch_size, rank, world, 0, fusion="casa")
        ddp[0].zero_grad_buffer()
        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=data, model=ddp.chunks,
                                    num_microbatches=2, seq_length=54, micro_batch_size=2)
        params = dict(model.named_parameters())
        out[name] = {t: params[t].main_grad.clone().numpy() for t in TABLES}
        out[name + "_trainable"] = sorted(n for n, p in params.items() if p.requires_grad)
    return out


def test_the_rows_get_the_fully_trainable_models_gradient_and_the_rest_none():
    got, = run_distributed(_gradients, world_size=1)
    assert "embedding.word_embeddings.weight" in got["rows_trainable"]
    assert not [n for n in got["rows_trainable"] if n.startswith("decoder.") and n.endswith("mlp.linear_fc1.weight")]  # the LM stays frozen
    others = [r for r in range(16) if r not in ROWS]
    for table in TABLES:
        rows, full = got["rows"][table], got["full"][table]
        np.testing.assert_allclose(rows[ROWS], full[ROWS], rtol=1e-5, atol=1e-7, err_msg=table)
        assert not rows[others].any(), table
        assert full[others].any()  # the whole model's gradient reaches other rows: the zeros are the mask's
    assert got["rows"]["output_layer.weight"][ROWS].any(axis=1).all()
    assert got["rows"]["embedding.word_embeddings.weight"][4].any()  # a token the answers read


def _train(rank, world, run_dir, overrides):
    from casa_megatron.training.loop import train

    train(_cfg([*RUN, *FROZEN, f"run_dir={run_dir}", *overrides]))


def _initial_tables(rank, world, overrides):
    import torch

    from casa_megatron.model.build import build_vlm
    from casa_megatron.parallel import initialize_parallel

    cfg = _cfg([*RUN, *FROZEN, *overrides])
    initialize_parallel(1, 1, cfg.seed)
    model = build_vlm(cfg.model, cfg.parallel, cfg.data.image_seq_length, torch.float32, cfg.precision)
    params = dict(model.named_parameters())
    return {t: params[t].detach().clone().numpy() for t in TABLES if t in params}


def _final_tables(run_dir):
    from casa_megatron.training.checkpoint import read_tensors

    tensors = read_tensors(run_dir / "checkpoints/iter_0000004")
    return {t: tensors[t].numpy() for t in TABLES if t in tensors}


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


LAYOUTS = {  # name -> (overrides, world size)
    "tp2_sp": (["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"], 2),
    "pp2_tied": (["parallel.pipeline_model_parallel_size=2", "model.lm.tie_word_embeddings=true"], 2),
}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    runs = {}
    for tied in (False, True):
        overrides = ["model.lm.tie_word_embeddings=true"] if tied else []
        run_dir = tmp_path_factory.mktemp("rows") / "run"
        run_distributed(_train, world_size=1, run_dir=str(run_dir), overrides=overrides)
        initial, = run_distributed(_initial_tables, world_size=1, overrides=overrides)
        runs[tied] = (run_dir, initial)
    return runs


def test_only_the_listed_rows_move_under_weight_decay(one_process):
    run_dir, initial = one_process[False]
    final = _final_tables(run_dir)
    others = [r for r in range(16) if r not in ROWS]
    for table in TABLES:
        np.testing.assert_array_equal(final[table][others], initial[table][others], err_msg=table)
    assert (final["output_layer.weight"][ROWS] != initial["output_layer.weight"][ROWS]).any(axis=1).all()
    assert (final["embedding.word_embeddings.weight"][4] != initial["embedding.word_embeddings.weight"][4]).any()
    losses = _losses(run_dir)
    assert len(losses) == 4 and all(np.isfinite(losses))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_parallel_layouts_follow_the_one_process_run(one_process, tmp_path, layout):
    overrides, world = LAYOUTS[layout]
    tied = "model.lm.tie_word_embeddings=true" in overrides
    ref_dir, initial = one_process[tied]
    run_dir = tmp_path / "run"
    run_distributed(_train, world_size=world, run_dir=str(run_dir), overrides=overrides)
    assert _losses(run_dir) == pytest.approx(_losses(ref_dir), rel=1e-5)
    ref, got = _final_tables(ref_dir), _final_tables(run_dir)
    others = [r for r in range(16) if r not in ROWS]
    for table in ref:
        np.testing.assert_allclose(got[table], ref[table], rtol=0, atol=1e-5, err_msg=table)
        np.testing.assert_array_equal(got[table][others], initial[table][others], err_msg=table)


def _masked_rows(rank, world):
    """Per table, the global vocabulary rows this TP rank keeps (its shard's start + mask)."""
    import torch

    from casa_megatron.model.build import build_vlm
    from casa_megatron.model.token_rows import ROW_MASK
    from casa_megatron.parallel import initialize_parallel

    cfg = _cfg([*FROZEN, "parallel.tensor_model_parallel_size=2"])
    initialize_parallel(2, 1, cfg.seed)
    model = build_vlm(cfg.model, cfg.parallel, cfg.data.image_seq_length, torch.float32, cfg.precision)
    params = dict(model.named_parameters())
    rows = params[TABLES[0]].shape[0]
    return {t: [rank * rows + int(i) for i in getattr(params[t], ROW_MASK).nonzero()] for t in TABLES}


def test_each_vocabulary_shard_keeps_the_rows_it_holds():
    """At TP=2 each rank holds 8 of the 16 rows: ids 4 and 6 are rank 0's, 14 rank 1's."""
    first, second = run_distributed(_masked_rows, world_size=2)
    for table in TABLES:
        assert first[table] == [4, 6] and second[table] == [14], table


def test_in_bf16_the_other_rows_stay_bit_for_bit(tmp_path):
    """bf16 weights with fp32 main copies (distributed optimizer): the frozen rows' main copies
    take no step, so their bf16 weights are the initial ones to the bit."""
    import torch

    from casa_megatron.training.checkpoint import read_tensors

    bf16 = ["precision.bf16=true"]
    run_distributed(_train, world_size=1, run_dir=str(tmp_path / "run"), overrides=bf16)
    initial, = run_distributed(_initial_bf16, world_size=1, overrides=bf16)
    final = read_tensors(tmp_path / "run/checkpoints/iter_0000004")
    others = [r for r in range(16) if r not in ROWS]
    for table in TABLES:
        assert final[table].dtype == torch.bfloat16
        got = final[table].float().numpy()  # bf16 -> fp32 is exact
        np.testing.assert_array_equal(got[others], initial[table][others], err_msg=table)
        assert (got[ROWS] != initial[table][ROWS]).any(), table


def _initial_bf16(rank, world, overrides):
    import torch

    from casa_megatron.model.build import build_vlm
    from casa_megatron.parallel import initialize_parallel

    cfg = _cfg([*RUN, *FROZEN, *overrides])
    initialize_parallel(1, 1, cfg.seed)
    model = build_vlm(cfg.model, cfg.parallel, cfg.data.image_seq_length, torch.bfloat16, cfg.precision)
    params = dict(model.named_parameters())
    return {t: params[t].detach().float() for t in TABLES}  # exact; numpy has no bf16
