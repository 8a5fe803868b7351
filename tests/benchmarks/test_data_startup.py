"""benchmarks/data_startup.py runs end to end on a few small shards and a small JSON list: every
variant sees the same samples, the saved indexes and the JSON offsets hold and pickle less than
the objects they replace, and the epoch orders of the two sampler variants agree."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def test_the_benchmark_compares_the_variants_on_the_same_samples(tmp_path, capsys):
    from benchmarks import data_startup

    out = tmp_path / "r.json"
    assert data_startup.main(["--shards", "3", "--per-shard", "40", "--reads", "50", "--json-samples", "300",
                              "--order-samples", "1000", "100000001", "--dp", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    before, first, later = result["sources"]
    assert [r["kind"] for r in result["sources"]] == ["scan (before)", "first start", "later start"]
    assert before["samples"] == first["samples"] == later["samples"] == 120
    assert later["held_bytes_per_sample"] < before["held_bytes_per_sample"] / 4
    assert later["pickled_bytes"] < before["pickled_bytes"] / 4
    assert later["index_bytes_on_disk_per_sample"] > 0 and before["index_bytes_on_disk_per_sample"] is None
    whole, first_json, later_json = result["json_list"]
    assert whole["samples"] == first_json["samples"] == later_json["samples"] == 300
    for offsets in (first_json, later_json):
        assert offsets["held_bytes_per_sample"] < whole["held_bytes_per_sample"] / 10
        assert offsets["pickled_bytes"] < whole["pickled_bytes"] / 4
    assert later_json["peak_mb"] < first_json["peak_mb"]  # the saved spans: the file is not read whole
    old, new, stateless, big_new, big_stateless = result["epoch_order"]
    assert [r["samples"] for r in result["epoch_order"]] == [1000, 1000, 1000, 100_000_001, 100_000_001]
    assert big_stateless["peak_bytes"] < big_new["peak_bytes"] / 100  # no array at all
    assert old["first"] == new["first"] and new["held_bytes"] < old["held_bytes"]
    assert stateless["held_bytes"] < new["held_bytes"]
    assert "| later start |" in capsys.readouterr().out
