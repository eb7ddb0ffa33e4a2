"""Multi-node: a local Ray cluster of several nodes (ray.cluster_utils.Cluster) on this machine."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

import pytest
import ray
from ray.cluster_utils import Cluster
from support.catalog import job_config, manifests, small_catalog, write_catalog

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
    monkeypatch.setenv("CATALOG_TEST_SLOW_S", "0.2")
    hold = marker_dir / "hold"  # while it exists no image finishes (catalog_test_engines._NodeMarked)
    for stale in [*marker_dir.glob("start-*"), *marker_dir.glob("done-*"), hold]:
        stale.unlink(missing_ok=True)
    files = small_catalog(24)
    write_catalog(tmp_path / "in", files)
    config = job_config(str(tmp_path / "in"), str(tmp_path / "out"),
                        model={"path": "support.engines:node_marked"},
                        compute={"batch_size": 2, "actors": {"min": 3, "max": 3}})
    cfg = validate_config(config)
    plan = prepare(cfg)
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(summary=execute(plan)))
    runner.start()
    by_id = {node.node_id: node for node in workers}
    deadline = time.monotonic() + 240
    # a worker node with an actor in the middle of an image, after some images were finished elsewhere; the hold
    # keeps that image unfinished until its node is gone
    def wait_for(condition, what: str):
        while not condition():
            assert runner.is_alive(), f"the job finished before {what}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.02)

    wait_for(lambda: len(list(marker_dir.glob("done-*"))) >= 4, "four images were finished")
    hold.write_text("")
    wait_for(lambda: any(node in by_id for node in _in_flight(marker_dir)), "work in flight on a worker node")
    lost = next(node for node in _in_flight(marker_dir) if node in by_id)
    # the machine vanishes: its workers and its raylet SIGKILLed at once (remove_node alone kills the raylet and
    # leaves a worker long enough to deliver the image it holds straight to the driver)
    for pid in {int(path.name.split("-")[2]) for path in marker_dir.glob(f"start-{lost}-*")}:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    cluster.remove_node(by_id[lost], allow_graceful=False)
    assert _in_flight(marker_dir).get(lost), "the removed node held no work in flight"
    hold.unlink()
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
