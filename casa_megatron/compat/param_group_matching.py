"""Resume with the non-distributed optimizer when two param groups share megatron's group key.

megatron-core (0.16.1) matches a loaded checkpoint's param groups to the running optimizer's by
``(wd_mult, lr_mult, is_expert_parallel, is_decoupled_lr)``
(``MegatronOptimizer._filter_and_reorder_param_groups``, used by ``FP32Optimizer`` and
``Float16OptimizerWithFloat16Params``). It keeps one saved group per key in a dict and hands
that same dict object to every running group with the key, setting its ``params`` each time:
all of them end up with the last group's parameters, and torch's ``load_state_dict`` refuses
("a parameter group that doesn't match the size of optimizer's group"). Our two learning rates
(``casa_new`` at ``lr_new``, the rest at ``lr_pretrained``) differ in ``max_lr``, which is not
part of the key, so every ``optimizer.use_distributed_optimizer=false`` run failed to resume
(measured: the tiny config, saved at step 3, could not be loaded at all). The distributed
optimizer copies each group and is not affected.

The replacement pairs the k-th running group of a key with the k-th saved group of that key,
copies it, and keeps the positional ``params`` megatron uses (the request's runtime order).
"""

from __future__ import annotations

from typing import Dict, List

from megatron.core.optimizer.optimizer import param_group_identifier_keys


def _key(group: dict) -> tuple:
    # NeMo spells some keys with a ``pre_`` prefix; megatron accepts both
    return tuple(group[k] if k in group else group[f"pre_{k}"] for k in param_group_identifier_keys)


def match_param_groups(current_groups: List[Dict], state_dict_groups: List[Dict]) -> List[Dict]:
    """One copied saved group per running group, matched by key in order of appearance."""
    if len(state_dict_groups) != len(current_groups):
        raise ValueError(f"the checkpoint holds {len(state_dict_groups)} optimizer param groups, the running "
                         f"optimizer {len(current_groups)}")
    by_key: Dict[tuple, List[Dict]] = {}
    for group in state_dict_groups:
        by_key.setdefault(_key(group), []).append(group)
    used: Dict[tuple, int] = {}
    out = []
    for current, saved_position in zip(current_groups, state_dict_groups):
        key = _key(current)
        candidates = by_key.get(key, [])
        k = used.get(key, 0)
        if k >= len(candidates):
            raise ValueError(f"no saved optimizer param group left for the running group with key "
                             f"{dict(zip(param_group_identifier_keys, key))}; saved keys: {sorted(by_key)}")
        used[key] = k + 1
        out.append({**candidates[k], "params": saved_position["params"]})
    return out


def fix_param_group_matching(optimizer) -> int:
    """Give every optimizer in ``optimizer`` (a megatron optimizer or a chain) the matching
    above; returns how many were patched."""
    patched = 0
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if hasattr(opt, "_filter_and_reorder_param_groups"):
            opt._filter_and_reorder_param_groups = match_param_groups  # instance attribute: no self
            patched += 1
    return patched


__all__ = ["fix_param_group_matching", "match_param_groups"]
