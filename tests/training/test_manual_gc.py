"""``manual_gc_interval`` (``training/manual_gc.py``): during training Python's automatic
collection is off and every rank collects at the same steps; afterwards it is as before."""

from __future__ import annotations

from support.dist import run_distributed


def _train(rank, world, run_dir):
    import gc
    from types import SimpleNamespace

    from casa_megatron.config import load_config
    from casa_megatron.config.schema import TrainConfig
    from casa_megatron.training import manual_gc, step as step_module

    seen = {"collects": 0, "enabled_in_steps": set()}

    def counting_collect(*args):
        seen["collects"] += 1
        return gc.collect(*args)

    # the collections manual_gc.py asks for (others, e.g. in a checkpoint writer, are not counted)
    manual_gc.gc = SimpleNamespace(collect=counting_collect, isenabled=gc.isenabled, disable=gc.disable,
                                   enable=gc.enable)
    forward = step_module.forward_step

    def watched(data, model):  # the collector's state inside every training step
        seen["enabled_in_steps"].add(gc.isenabled())
        return forward(data, model)

    import casa_megatron.training.loop as loop
    loop.forward_step = watched
    try:
        from casa_megatron.training.loop import train

        train(load_config(TrainConfig, "configs/tiny_cpu_synthetic.yaml", [
            f"run_dir={run_dir}", "train_steps=6", "optimizer.warmup_steps=1", "optimizer.wsd_decay_steps=0",
            "tracking.enabled=false", "manual_gc_interval=2"]))
    finally:
        manual_gc.gc = gc
    return {"collects": seen["collects"], "enabled_in_steps": sorted(seen["enabled_in_steps"]),
            "enabled_after": gc.isenabled()}


def test_collection_happens_at_the_chosen_steps_only(tmp_path):
    got, = run_distributed(_train, world_size=1, run_dir=str(tmp_path / "run"))
    # one at the start (what set-up left), then steps 2, 4 and 6
    assert got == {"collects": 4, "enabled_in_steps": [False], "enabled_after": True}
