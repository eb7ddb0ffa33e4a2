"""Multi-node: a local Ray cluster of several nodes (ray.cluster_utils.Cluster) on this machine."""

from __future__ import annotations

import threading
import time

import pyarrow.parquet as pq
import pytest
import ray
from catalog_support import job_config, small_catalog, write_catalog
from ray.cluster_utils import Cluster

from pipeline.config import validate_config
from pipeline.run import execute, prepare


@pytest.fixture
def cluster(ray_session):
    """Head without CPUs (it only drives) plus three 2-CPU workers; the session's Ray is restored afterwards."""
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                            "object_store_memory": 100 * 1024**2})
    workers = [cluster.add_node(num_cpus=2, object_store_memory=100 * 1024**2) for _ in range(3)]
    ray.init(address=cluster.address, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    cluster.wait_for_nodes()
    yield cluster, workers
    ray.shutdown()
    cluster.shutdown()


@pytest.mark.slow
def test_work_spreads_over_nodes_and_survives_losing_one(cluster, tmp_path):
    cluster, workers = cluster
    files = small_catalog(24)
    write_catalog(tmp_path / "in", files)
    config = job_config(str(tmp_path / "in"), str(tmp_path / "out"), model={"path": "catalog_test_engines:slow"},
                        compute={"batch_size": 2, "actors": {"min": 3, "max": 3}})
    cfg = validate_config(config)
    plan = prepare(cfg)
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(summary=execute(plan, cfg)))
    runner.start()
    parts = tmp_path / "out" / "_manifests"
    deadline = time.monotonic() + 240
    while len(list(parts.glob("run=*/part-*.parquet"))) < 2 and runner.is_alive():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert runner.is_alive(), "the job finished before a node could be removed"
    cluster.remove_node(workers[-1])  # a worker node disappears mid-run (actors, tasks and objects on it lost)
    runner.join(timeout=300)
    assert not runner.is_alive() and result["summary"]["ok"] == len(files)

    rows = pq.read_table(sorted(parts.glob("run=*/part-*.parquet"))).to_pandas()
    assert sorted(rows.source_key) == sorted(files) and set(rows.status) == {"ok"}  # each exactly once
    assert rows.node_id.nunique() >= 2  # spread over nodes
    assert set(rows.node_id) <= {node["NodeID"] for node in ray.nodes()}
