"""Throughput bookkeeping (casa_megatron/training/throughput.py): the datasheet peak table, the
config override, and the iterator wrapper that counts what megatron's schedule pulls."""

from __future__ import annotations

import pytest
from support.vlm import IMAGE_SLOTS, random_batch, small_model_config, without_images


@pytest.mark.parametrize("name, precision, peak", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.4), ("NVIDIA H100 80GB HBM3", "fp8", 1978.9),
    ("NVIDIA H200", "bf16", 989.4), ("NVIDIA H100 PCIe", "bf16", 756.5), ("NVIDIA H100 PCIe", "fp8", 1513.0),
    ("NVIDIA H100 NVL", "bf16", None), ("NVIDIA A100-SXM4-80GB", "bf16", None),
    ("NVIDIA H100 80GB HBM3", None, None),  # fp32: no tensor-core peak to compare with
])
def test_datasheet_peak_by_device_name_and_precision(name, precision, peak):
    from casa_megatron.training.throughput import datasheet_peak_tflops

    assert datasheet_peak_tflops(name, precision) == peak


def test_configured_peak_wins_and_a_cpu_has_none():
    import torch

    from casa_megatron.config.schema import TrackingConfig, TrainConfig
    from casa_megatron.training.throughput import peak_tflops

    assert peak_tflops(TrainConfig(tracking=TrackingConfig(peak_tflops=123.0))) == 123.0
    if not torch.cuda.is_available():
        assert peak_tflops(TrainConfig()) is None


def test_meter_passes_batches_through_and_counts_each_once():
    from casa_megatron.training.flops import microbatch_flops
    from casa_megatron.training.throughput import FlopMeter

    cfg = small_model_config()
    batches = [random_batch(1), without_images(random_batch(2)), random_batch(3)]
    meter = FlopMeter(cfg, IMAGE_SLOTS).over(iter(batches))
    assert [next(meter) for _ in range(2)] == batches[:2]
    expected = [microbatch_flops(cfg, b, IMAGE_SLOTS).total for b in batches]
    assert meter.take() == sum(expected[:2]) and meter.take() == 0
    assert list(meter) == batches[2:] and meter.take() == expected[2]


def test_peak_tflops_must_be_positive():
    from casa_megatron.config import load_config
    from casa_megatron.config.errors import ConfigError
    from casa_megatron.config.schema import TrainConfig

    with pytest.raises(ConfigError, match="peak_tflops"):
        load_config(TrainConfig, "configs/tiny_cpu_synthetic.yaml", ["tracking.peak_tflops=0"])
    cfg = load_config(TrainConfig, "configs/tiny_cpu_synthetic.yaml", ["tracking.peak_tflops=989.4"])
    assert cfg.tracking.peak_tflops == 989.4


def test_meter_times_the_wait_for_each_step_s_micro_batches():
    import time

    from casa_megatron.training.throughput import FlopMeter

    def slow(batches, delay):
        for batch in batches:
            time.sleep(delay)
            yield batch

    batches = [random_batch(1), random_batch(2), random_batch(3)]
    meter = FlopMeter(small_model_config(), IMAGE_SLOTS).over(slow(batches, 0.2))
    next(meter), next(meter)
    meter.take()
    assert 0.4 <= meter.last_data_wait_s < 0.6  # two waits of 0.2 s, not the counting
    next(meter)
    meter.take()
    assert 0.2 <= meter.last_data_wait_s < 0.3
    meter.take()
    assert meter.last_data_wait_s == 0.0


def test_meter_keeps_each_pipeline_stage_s_flops_and_warns_when_unbalanced():
    """With the LM layers per stage, each step's FLOPs are also kept per stage (they add up to the
    step's); ``pipeline_balance`` is their mean / max, and a split that leaves one stage with most
    of the work gets a one-line warning naming the shares and the tool that suggests a split."""
    from casa_megatron.training.flops import microbatch_flops
    from casa_megatron.training.throughput import FlopMeter

    cfg = small_model_config()
    batches = [random_batch(1), random_batch(2)]
    for layers in ([1, 3], [3, 1]):
        meter = FlopMeter(cfg, IMAGE_SLOTS, layers).over(iter(batches))
        list(meter)
        total = meter.take()
        stages = [sum(sum(microbatch_flops(cfg, b, IMAGE_SLOTS).stages(layers)[k]) for b in batches) for k in (0, 1)]
        assert meter.last_stage_flops == stages and sum(stages) == total
        metrics = meter.pipeline_metrics()
        assert metrics["pipeline_balance"] == pytest.approx(total / 2 / max(stages))
        warning = meter.pipeline_warning(threshold=1.01)  # any imbalance at all
        assert warning and f"LM layers {layers[0]} + {layers[1]}" in warning and "pipeline_balance.py" in warning
        assert meter.pipeline_warning(threshold=metrics["pipeline_balance"]) is None
    # the interleaved schedule: per rank (virtual stages r, r + 2), the encoder's rank the heaviest
    meter = FlopMeter(cfg, IMAGE_SLOTS, [1, 1, 1, 1], ranks=2).over(iter(batches))
    list(meter)
    meter.take()
    warning = meter.pipeline_warning(threshold=1.01)
    assert warning and "2 model chunks per rank, LM layers per rank 2 + 2" in warning and "rank 0 sets" in warning
    assert FlopMeter(cfg, IMAGE_SLOTS).pipeline_metrics() == {}  # PP=1: nothing per stage
