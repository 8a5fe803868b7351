"""megatron DDP + (distributed) AdamW + learning-rate schedule, from our config.

Two learning rates: parameters tagged ``casa_new`` (CASA projections and norms, the projector,
gates) train at ``lr_new``; pretrained ones at ``lr_pretrained`` (the paper: 1e-4 / 1e-5). Both
follow the same warmup -> constant -> decay shape, scaled to their own peak.

Weight decay skips biases and every 1-D parameter (norm scales, gates, DoRA magnitudes), as
Megatron-LM does by default. megatron-core applies that rule only when it is handed no
``config_overrides``; ours (the two learning rates) used to replace it, so every norm and bias
of a recipe with ``weight_decay > 0`` was pulled towards zero.
"""

from __future__ import annotations

from typing import Tuple

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer, get_standard_config_overrides
from megatron.core.optimizer.optimizer_config import ParamKey
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from casa_megatron.compat.optimizer_checkpoint import fix_fully_reshardable_save
from casa_megatron.compat.param_group_matching import fix_param_group_matching
from casa_megatron.config.schema import TrainConfig
from casa_megatron.model.chunks import ModelChunks
from casa_megatron.model.token_rows import TOKEN_ROWS, zero_frozen_rows


def wrap_ddp(model: ModelChunks, cfg: TrainConfig) -> ModelChunks:
    """megatron DDP around each of this rank's model chunks (``model/chunks.py``)."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
        overlap_param_gather=cfg.parallel.overlap_param_gather,
        bucket_size=cfg.parallel.ddp_bucket_size,
        use_distributed_optimizer=cfg.optimizer.use_distributed_optimizer,
        check_for_nan_in_grad=True,
    )
    for chunk in model:
        # read by megatron's schedules (how the loss is normalised) and by DDP when it is built
        # (no 1/DP pre-scaling of gradients when finalize_model_grads divides by the global
        # token count)
        chunk.config.calculate_per_token_loss = cfg.calculate_per_token_loss
    # Chunks after the first keep one bucket each (Megatron-LM's choice): their gradient
    # reduction overlaps the other chunks' backward anyway.
    ddps = ModelChunks([DistributedDataParallel(config=chunk.config, ddp_config=ddp_config, module=chunk,
                                                disable_bucketing=i > 0) for i, chunk in enumerate(model)])
    for chunk in model:
        config = chunk.config
        # megatron's schedules call these: no grad sync inside micro-batch accumulation, then one
        # finalisation (DP reduce / reduce-scatter, SP norm all-reduce) after the last micro-batch.
        config.no_sync_func = ddps[0].no_sync if len(ddps) == 1 else [d.no_sync for d in ddps]
        if len(ddps) > 1 and cfg.parallel.overlap_grad_reduce:
            # the interleaved schedule starts each chunk's reduction after its last backward
            # (Megatron-LM's --align-grad-reduce, its default)
            config.grad_sync_func = [d.start_grad_sync for d in ddps]
        config.finalize_model_grads_func = finalize_then_zero_frozen_rows if cfg.model.trainable_tokens \
            else finalize_model_grads
    return ddps


def finalize_then_zero_frozen_rows(model, *args, **kwargs):
    """megatron's gradient finalisation, then the frozen rows of ``model.trainable_tokens``'
    tables zeroed on ``main_grad`` (model/token_rows.py), before clipping and the step."""
    result = finalize_model_grads(model, *args, **kwargs)
    zero_frozen_rows(model)
    return result


def finish_param_gather(ddp: ModelChunks) -> None:
    """Bring every rank's copy of the weights up to date before reading them outside a forward.

    With ``parallel.overlap_param_gather`` the distributed optimizer's updated shards reach the
    other data-parallel ranks during the next forward, bucket by bucket, in the modules' forward
    pre-hooks; until then each rank's weights are current only in its own shard. A checkpoint
    saved at that moment would hold the previous step's values for everything outside rank 0's
    shard (measured on the tiny DP=2 run: 22 weight tensors one Adam step behind). Megatron-LM
    syncs around its saves too (``disable_forward_pre_hook(param_sync=True)``). A no-op without
    overlap."""
    for chunk in ddp:
        if chunk.ddp_config.use_distributed_optimizer and chunk.ddp_config.overlap_param_gather:
            chunk.start_param_sync(force_sync=True)


def build_optimizer(ddp_model: ModelChunks, cfg: TrainConfig):
    opt = cfg.optimizer
    config = MegatronOptimizerConfig(
        optimizer="adam",
        lr=opt.lr_pretrained,
        min_lr=opt.lr_pretrained * opt.min_lr_ratio,
        weight_decay=opt.weight_decay,
        adam_beta1=opt.adam_beta1,
        adam_beta2=opt.adam_beta2,
        adam_eps=opt.adam_eps,
        clip_grad=opt.clip_grad,
        bf16=cfg.precision.bf16,
        params_dtype=torch.bfloat16 if cfg.precision.bf16 else torch.float32,
        use_distributed_optimizer=opt.use_distributed_optimizer,
    )
    overrides = get_standard_config_overrides(config)  # no weight decay on biases and 1-D parameters
    overrides[ParamKey(attr="casa_new")] = {"max_lr": opt.lr_new, "min_lr": opt.lr_new * opt.min_lr_ratio}
    # vocabulary tables that train in a few rows only (model.trainable_tokens): decay would move the others
    overrides[ParamKey(attr=TOKEN_ROWS)] = {"wd_mult": 0.0}
    optimizer = get_megatron_optimizer(config, ddp_model.chunks, config_overrides=overrides)
    fix_fully_reshardable_save(optimizer)  # several buckets: megatron-core 0.16.1 saves shifted states
    fix_param_group_matching(optimizer)  # non-distributed optimizer: groups sharing a key load wrongly
    return optimizer, build_scheduler(optimizer, cfg)


def build_scheduler(optimizer, cfg: TrainConfig) -> OptimizerParamScheduler:
    opt = cfg.optimizer
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=opt.lr_pretrained,
        min_lr=opt.lr_pretrained * opt.min_lr_ratio,
        lr_warmup_steps=opt.warmup_steps,
        lr_decay_steps=cfg.train_steps,
        lr_decay_style=opt.decay_style,
        start_wd=opt.weight_decay,
        end_wd=opt.weight_decay,
        wd_incr_steps=cfg.train_steps,
        wd_incr_style="constant",
        wsd_decay_steps=opt.wsd_decay_steps if opt.decay_style == "WSD" else None,
        lr_wsd_decay_style="linear" if opt.decay_style == "WSD" else None,
        # On resume the schedule follows the config (an extended train_steps, a new LR) and only
        # the step count comes from the checkpoint: megatron's --override-opt_param-scheduler.
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )


def current_lrs(optimizer, cfg: TrainConfig) -> Tuple[float, float]:
    """(lr of new weights, lr of pretrained weights) right now, told apart by their peak lr
    (the distributed optimizer's groups hold shard copies, which carry no tags)."""
    new = pre = 0.0
    for group in optimizer.param_groups:
        if group["max_lr"] == cfg.optimizer.lr_new:
            new = group["lr"]
        if group["max_lr"] == cfg.optimizer.lr_pretrained:
            pre = group["lr"]
    return new, pre
