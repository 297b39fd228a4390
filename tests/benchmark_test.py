"""grad_jax.benchmark's batch-1 latency part runs both paths and names the CPU."""

from grad_jax import benchmark


def test_latency_part_reports_both_paths_and_the_cpu():
    from grad_jax.configs import tiny

    result = benchmark.run_benchmark(tiny.get_config(), 2, 1, False, ["latency"], 2)
    latency = result["latency_batch1"]
    for name in ("predictor", "exported"):
        assert latency[name]["samples"] == 4  # 2 images x 2 passes
        assert 0 < latency[name]["p50_ms"] <= latency[name]["p95_ms"]
    assert result["cpu_model"] and isinstance(result["cpu_vector_extensions"], list)


def test_sample_files_decode_to_mvtec_like_sizes():
    for data in benchmark.sample_files(2):
        image = benchmark.decode(data)
        assert image.dtype.name == "uint8" and image.shape[2] == 3
        assert 600 <= min(image.shape[:2]) and max(image.shape[:2]) <= 1000


def test_a_config_that_deploys_knn_is_timed_as_grad():
    """configs/folder.py deploys the kNN kind; random weights have no memory bank, so the
    benchmark times GRAD (what it compares with PyTorch) instead of failing for want of one."""
    from grad_jax.configs import tiny

    config = tiny.get_config()
    config.model.kind = "knn"
    result = benchmark.run_benchmark(config, 2, 1, False, ["latency"], 1)
    assert result["latency_batch1"]["exported"]["samples"] == 2
