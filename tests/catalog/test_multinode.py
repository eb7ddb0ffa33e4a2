"""Multi-node: a local Ray cluster of several nodes (ray.cluster_utils.Cluster) on this machine."""

from __future__ import annotations

import threading
import time

import pytest
import ray
from catalog_support import job_config, manifests, small_catalog, write_catalog
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


def _in_flight(marker_dir) -> dict[str, int]:
    """Node id -> images started and not finished there (engine markers; see catalog_test_engines.node_marked)."""
    started = {p.name[len("start-"):] for p in marker_dir.glob("start-*")}
    done = {p.name[len("done-"):] for p in marker_dir.glob("done-*")}
    counts: dict[str, int] = {}
    for name in started - done:
        node = name.split("-")[0]
        counts[node] = counts.get(node, 0) + 1
    return counts


@pytest.mark.slow
def test_work_spreads_over_nodes_and_survives_losing_one(cluster, marker_dir, tmp_path, monkeypatch):
    cluster, workers = cluster
    monkeypatch.setenv("CATALOG_TEST_SLOW_S", "0.5")  # long enough for a batch to be caught in flight
    for stale in [*marker_dir.glob("start-*"), *marker_dir.glob("done-*")]:
        stale.unlink()
    files = small_catalog(24)
    write_catalog(tmp_path / "in", files)
    config = job_config(str(tmp_path / "in"), str(tmp_path / "out"),
                        model={"path": "catalog_test_engines:node_marked"},
                        compute={"batch_size": 2, "actors": {"min": 3, "max": 3}})
    cfg = validate_config(config)
    plan = prepare(cfg)
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(summary=execute(plan, cfg)))
    runner.start()
    by_id = {node.node_id: node for node in workers}
    deadline = time.monotonic() + 240
    # a worker node with an actor in the middle of an image, after some batches were committed elsewhere
    while True:
        assert runner.is_alive(), "the job finished before a node could be removed"
        assert time.monotonic() < deadline, "timed out waiting for work in flight"
        busy = [node for node, count in _in_flight(marker_dir).items() if count and node in by_id]
        if busy and len(list(marker_dir.glob("done-*"))) >= 4:
            break
        time.sleep(0.02)
    lost = busy[0]
    cluster.remove_node(by_id[lost], allow_graceful=False)  # its raylet and every process on it killed at once
    assert _in_flight(marker_dir).get(lost), "the removed node held no work in flight"
    runner.join(timeout=300)
    assert not runner.is_alive() and result["summary"]["ok"] == len(files)

    rows = manifests(tmp_path / "out")
    assert sorted(rows.source_key) == sorted(files) and set(rows.status) == {"ok"}  # each exactly once
    alive = {node["NodeID"]: node["Alive"] for node in ray.nodes()}
    assert alive[lost] is False  # the node really went away (ray.nodes() lists dead nodes too)
    survivors = set(by_id) - {lost}
    assert all(alive[node] for node in survivors)
    # images started on the lost node that it never delivered (the one in flight at least) were redone by the
    # survivors: fewer rows name the lost node than images it started
    started_there = len(list(marker_dir.glob(f"start-{lost}-*")))
    assert (rows.node_id == lost).sum() < started_there
    assert set(rows.node_id) <= set(by_id) and rows.node_id.isin(survivors).sum() > len(files) // 2
