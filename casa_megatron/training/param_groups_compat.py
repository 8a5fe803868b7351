"""Resume checkpoints saved before biases and 1-D parameters got param groups of their own.

Until 2026-12-07 every parameter of one learning rate shared one param group, so weight decay
reached norm scales and biases too (``training/optimizer.py`` has the fix). Now these
parameters sit in groups with ``wd_mult = 0``. megatron-core matches a checkpoint's param groups
to the running optimizer's by ``(wd_mult, lr_mult, is_expert_parallel, is_decoupled_lr)``, so an
older checkpoint failed to load: ``KeyError: (0.0, 1.0, False, False)`` with the distributed
optimizer, ``Cannot merge two lists with different lengths`` without it. An upgrade must not
leave a run unable to resume.

Nothing per parameter lives in a param group: Adam's moments and the fp32 master weights are
saved under each parameter's name and load wherever that parameter now is. A group holds
hyperparameters, which the config sets again after every load
(``checkpoint._restore_hyperparameters``), and, in the ``fully_reshardable`` format, Adam's
``step``. So a group the checkpoint lacks is taken from the saved group that differs from it
only in ``wd_mult``, with the running group's ``wd_mult``.

Each optimizer state dict here is the ``"optimizer"`` entry of a dist checkpoint: a dict with
``param_groups`` somewhere below ``"optimizer"`` keys, or, for a chain of optimizers (several
model chunks), one such dict per integer key.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, Iterator, List, Optional, Tuple

from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject
from megatron.core.optimizer.optimizer import param_group_identifier_keys


class ParamGroupMismatch(RuntimeError):
    """The checkpoint's param groups cannot be matched to the running optimizer's."""


def _group_key(group: dict) -> Tuple:
    return tuple(group[k] for k in param_group_identifier_keys)


def _holders(state: Any) -> Iterator[Tuple[Any, dict]]:
    """(path, dict holding ``param_groups``) for each optimizer of a (chained) state dict."""
    if not isinstance(state, dict):
        return
    if "param_groups" in state:
        yield (), state
        return
    for key, value in state.items():
        if key == "optimizer" or isinstance(key, int):
            for path, holder in _holders(value):
                yield (key, *path), holder


def _unwrapped(value: Any) -> Any:
    return value.unwrap() if isinstance(value, LocalNonpersistentObject) else value


def _index(path: Tuple) -> int:
    """Which optimizer of a chain a state dict path belongs to (0 without a chain)."""
    return path[0] if path and isinstance(path[0], int) else 0


def running_groups(optimizer, request: dict) -> Dict[int, List[dict]]:
    """Per optimizer of the (chained) running optimizer, its param groups' identifying settings,
    and, where the load request lists them (the non-distributed optimizer), each group's runtime
    ``params`` as the request holds them, taken before the load mutates the request."""
    out = {i: [{k: g[k] for k in param_group_identifier_keys} for g in opt.optimizer.param_groups]
           for i, opt in enumerate(getattr(optimizer, "chained_optimizers", [optimizer]))}
    for path, holder in _holders(request):
        groups = out.get(_index(path), [])
        if len(holder["param_groups"]) == len(groups):
            for group, requested in zip(groups, holder["param_groups"]):
                if "params" in requested:
                    group["params"] = copy.copy(_unwrapped(requested["params"]))
    return out


def fit_request(request: dict, saved_common: Optional[dict]) -> None:
    """Give the request as many param groups as the checkpoint holds, where they are listed
    side by side (the non-distributed optimizer: its saved list and the requested one are
    merged element by element); ``regroup`` restores the running groups after the load."""
    if saved_common is None:
        return
    saved = dict(_holders(saved_common.get("optimizer")))
    for path, holder in _holders(request):
        if path in saved and len(saved[path]["param_groups"]) != len(holder["param_groups"]):
            first = holder["param_groups"][0]
            holder["param_groups"] = [first] * len(saved[path]["param_groups"])


def regroup(loaded: dict, running: Dict[int, List[dict]]) -> bool:
    """Make each loaded optimizer state hold one param group per running group, in the running
    order. True if a checkpoint of the older grouping was adapted; a checkpoint of the current
    grouping is left as megatron reads it."""
    adapted = False
    for path, holder in _holders(loaded):
        groups = running.get(_index(path))
        if groups is None:
            continue
        saved = holder["param_groups"]
        saved_keys = {_group_key(g) for g in saved}
        if len(saved) == len(groups) and all(_group_key(g) in saved_keys for g in groups):
            continue
        rebuilt = []
        for group in groups:
            key = _group_key(group)
            template = next((g for g in saved if _group_key(g) == key), None) or next(
                (g for g in saved if _group_key(g)[1:] == key[1:]), None)
            if template is None:
                raise ParamGroupMismatch(
                    f"the checkpoint's optimizer has no param group like the running one "
                    f"{dict(zip(param_group_identifier_keys, key))} (saved: {sorted(saved_keys)})")
            rebuilt.append({**template, **group})  # the running wd_mult and params
        holder["param_groups"] = rebuilt
        adapted = True
    return adapted
