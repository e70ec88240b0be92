"""The training-throughput benchmark runs every cell and reports ratios to contiguous fp32
(a smoke run with tiny counts; no figure is asserted)."""
from flannel.benchmarks.train_throughput import format_table, measure_training_throughput


def test_training_throughput_benchmark_smoke():
    result = measure_training_throughput(["squeezenet1_1"], size=64, batch=2, steps=1, warmup=0)
    rows = result["rows"]
    assert [(r["precision"], r["layout"]) for r in rows] == [
        ("fp32", "contiguous"), ("fp32", "channels_last"), ("bf16", "contiguous"),
        ("bf16", "channels_last")]
    assert rows[0]["ratio_to_fp32"] == 1.0 and all(r["images_per_s"] > 0 for r in rows)
    table = format_table(result)
    assert result["machine"]["cpu"] in table and "| squeezenet1_1 | bf16 | channels_last |" in table
