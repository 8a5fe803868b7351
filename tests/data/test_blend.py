"""Weighted blends: exact proportions, DP-disjoint shards, and kill-and-resume mid-epoch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from data.helpers import solid_png, write_shard_dir
from test_loader import _same

from casa_megatron.data.blend import BlendOrder
from casa_megatron.data.config import DataConfig
from casa_megatron.data.loader import make_train_iterator


def test_every_prefix_holds_its_share_over_thousands_of_draws():
    weights = [0.5, 0.3, 0.2]
    blend = BlendOrder([40, 7, 13], weights, rank=0, world=1, seed=3)
    counts = [0, 0, 0]
    for n in range(1, 4001):
        (source, draw), = blend.draws(counts, 1)
        assert draw == counts[source] - 1  # draws of a source are consecutive
        # after any prefix, every source is within one sample of its share (not just on average)
        assert all(abs(c - w * n) <= 1 for c, w in zip(counts, weights)), (n, counts)
    assert counts == [2000, 1200, 800]


def test_small_sources_are_upsampled_epoch_by_epoch():
    blend = BlendOrder([10, 3], [1, 1], rank=0, world=1, seed=0)
    drawn = [blend.sample_index(s, d) for s, d in blend.draws([0, 0], 60) if s == 1]
    for e in range(10):  # every epoch of the 3-sample source is a permutation of it
        assert sorted(drawn[3 * e:3 * e + 3]) == [0, 1, 2]


def _multi_source(tmp_path) -> Path:
    """A second source: 9 two-image samples in LLaVA format, one of them broken (2 placeholders, 1 image)."""
    samples = {}
    for i in range(9):
        n_img = 1 if i == 4 else 2
        rec = {"conversations": [{"from": "human", "value": "<image>\n<image>\nwhich picture has more shapes ?"},
                                 {"from": "gpt", "value": "the first"}]}
        samples[f"m{i}"] = {**{f"{j}.png": solid_png(56, 56 + 28 * j, (20 * i, 90, 0)) for j in range(n_img)},
                            "json": json.dumps(rec).encode()}
    return write_shard_dir(tmp_path / "multi", samples, per_shard=4)


def _cfg(tiny_dataset, multi, **kw) -> DataConfig:
    base = dict(sources=[{"path": str(tiny_dataset["shards"]), "weight": 3}, {"path": str(multi), "weight": 1}],
                seq_length=128, image_seq_length=192, num_workers=2, pack_buffer=8, log_interval=0)
    base.update(kw)
    return DataConfig(**base)


def test_loader_blend_proportions_and_dp_shards(tiny_dataset, tmp_path):
    multi = _multi_source(tmp_path)
    keys = {}
    for rank in (0, 1):
        it = make_train_iterator(_cfg(tiny_dataset, multi), 2, rank, 2, seed=1)
        seen = []
        while it.stats()["samples_seen"] < 40:
            next(it)
            seen += [i.key for i in it.last_batch_samples]
        n_a, n_b = it.stats()["samples_by_source"]
        assert abs(n_a - 3 * n_b) <= 4 and n_a + n_b == it.stats()["samples_seen"]  # draws, skips included
        assert it.skip_counts() == {"image_count_mismatch": 1} or rank == 0  # m4 lives on rank 1
        keys[rank] = seen
        it.close()
    # first epoch of each source: ranks read disjoint halves
    first_epoch = {r: {k for k in keys[r][:8] if k.startswith("m")} for r in keys}
    assert not first_epoch[0] & first_epoch[1]


def _run_until_killed(cfg_json: str, state_path: str, batches: int) -> None:
    """Child process: ``batches`` batches, write the state atomically, decode ahead, then SIGKILL."""
    cfg = DataConfig(**json.loads(cfg_json))
    it = make_train_iterator(cfg, 2, 0, 1, seed=4)
    for _ in range(batches):
        next(it)
    tmp = state_path + ".tmp"
    Path(tmp).write_text(json.dumps(it.state_dict()))
    os.replace(tmp, state_path)
    next(it)  # work in flight past the checkpoint, then die without any cleanup
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.parametrize("worker_type", ["thread"])
def test_kill_and_resume_mid_epoch_gives_the_same_sequence(tiny_dataset, tmp_path, worker_type):
    multi = _multi_source(tmp_path)
    cfg = _cfg(tiny_dataset, multi, worker_type=worker_type, pack_buffer=16, image_seq_length=128)
    reference = make_train_iterator(cfg, 2, 0, 1, seed=4)
    expected, expected_keys = [], []
    for _ in range(12):
        expected.append(next(reference))
        expected_keys.append([(i.key, i.ref) for i in reference.last_batch_samples])
    reference.close()

    state_path = tmp_path / "state.json"
    fields = {k: getattr(cfg, k) for k in ("sources", "seq_length", "image_seq_length", "num_workers",
                                            "pack_buffer", "log_interval", "worker_type")}
    code = ("import sys; sys.path[:0] = [sys.argv[1]]; from test_blend import _run_until_killed; "
            "_run_until_killed(sys.argv[2], sys.argv[3], 5)")
    proc = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parents[1]), json.dumps(fields),
                           str(state_path)], cwd=Path(__file__).parents[2], capture_output=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)})
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    state = json.loads(state_path.read_text())
    assert state["buffer"] and state["counts"][0] % 22  # mid-epoch of the big source, samples waiting

    resumed = make_train_iterator(cfg, 2, 0, 1, seed=4)
    resumed.load_state_dict(state)
    for k in range(5, 12):
        batch = next(resumed)
        assert [(i.key, i.ref) for i in resumed.last_batch_samples] == expected_keys[k], f"batch {k}"
        assert _same(batch, expected[k]), f"batch {k} differs after resume"
    assert resumed.skip_counts() == Counter(reference.skip_counts())
    resumed.close()


def test_single_source_state_of_version_1_still_loads(tiny_dataset):
    cfg = DataConfig(source=str(tiny_dataset["shards"]), seq_length=128, image_seq_length=160, num_workers=2,
                     pack_buffer=6, log_interval=0)
    it = make_train_iterator(cfg, 2, 0, 1, seed=2)
    expected = [next(it) for _ in range(6)]
    it.close()
    it = make_train_iterator(cfg, 2, 0, 1, seed=2)
    for _ in range(4):
        next(it)
    v2 = it.state_dict()
    n = v2["counts"][0]
    v1 = {**{k: v2[k] for k in ("kind", "seed", "dp_rank", "dp_size", "skipped_by_reason", "pack_stats")},
          "version": 1, "num_samples": 22, "epoch": n // 22, "position": n % 22,
          "buffer": [[d // 22, d % 22] for _, d in v2["buffer"]],
          "counters": {**v2["counters"], "good_in_epoch": v2["good_in_epoch"][0]}}
    resumed = make_train_iterator(cfg, 2, 0, 1, seed=2)
    resumed.load_state_dict(v1)
    for k in range(4, 6):
        assert _same(next(resumed), expected[k])
    resumed.close()
