"""Attacks on the node plugin's ``/metrics`` through the metrics files a pod's sidecar writes into its
emptyDir: the pod's containers can write there, so the files are the tenant's input."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from csi.node import metrics, podpath
from csi.node.launcher import EMPTY_DIR_NAME
from csi.node.state import SIDECAR, PublishRecord
from fusefs import metrics as server_metrics

VICTIM, ATTACKER = "11111111-2222-3333-4444-555555555555", "66666666-7777-8888-9999-000000000000"
Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


def record(uid: str, pod: str, volume_id: str, name: str) -> PublishRecord:
    return PublishRecord(volume_id=volume_id, target=f"/kubelet/pods/{uid}/volumes/kubernetes.io~csi/{name}/mount",
                         pid=0, start_time=0, read_only=True, fingerprint="f", launcher=SIDECAR, pod_uid=uid,
                         pod_namespace=pod.split("/")[0], pod_name=pod.split("/")[1], name=name)


def metrics_dir(root: Path, uid: str) -> Path:
    path = root.joinpath(*podpath.pod_dir_parts(uid, EMPTY_DIR_NAME), "metrics")
    path.mkdir(parents=True, exist_ok=True)
    return path


def forged(volume: str, pod: str, handles: int, padding: int = 0) -> str:
    """A file in the servers' format that claims ``volume`` and ``pod`` (padded with more series)."""
    lines = ["# HELP objfs_open_handles Open file handles", "# TYPE objfs_open_handles gauge",
             f'objfs_open_handles{{volume="{volume}",pod="{pod}"}} {handles}']
    lines += [f'objfs_open_handles{{volume="{volume}",pod="{pod}",pad="{i:08d}"}} 1' for i in range(padding)]
    return "\n".join(lines) + "\n"


def scrape(endpoint: metrics.PluginMetrics) -> Series:
    text = prometheus_client.generate_latest(endpoint.registry).decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def volumes_in(series: Series) -> set[str]:
    return {dict(labels).get("volume", "") for _, labels in series} - {""}


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The files the plugin opens, in order."""
    opened: list[str] = []
    real = metrics.read_file_at

    def spy(root: str, parts: tuple[str, ...], name: str) -> str | None:
        opened.append(os.path.join(root, *parts, name))
        return real(root, parts, name)

    monkeypatch.setattr(metrics, "read_file_at", spy)
    return opened


def test_a_file_cannot_speak_for_another_volume_or_pod(tmp_path: Path, reads: list[str]) -> None:
    """Attack: a malicious pod writes its server's metrics file with the labels of another tenant's volume
    and pod (volume="victim-vol", pod="team-a/victim"). The plugin took a file's labels as they were, so
    the pod could forge the victim's figures; now every sample gets the labels of the plugin's record
    for that file, whatever the file says."""
    records = [record(VICTIM, "team-a/victim", "victim-vol", "data"),
               record(ATTACKER, "team-b/mallory", "mallory-vol", "data")]
    server_metrics.Exporter({"volume": "victim-vol", "pod": "team-a/victim"}).write(
        str(metrics_dir(tmp_path, VICTIM) / "data.prom"))
    (metrics_dir(tmp_path, ATTACKER) / "data.prom").write_text(forged("victim-vol", "team-a/victim", 666))
    endpoint = metrics.PluginMetrics(str(tmp_path), None, None, records=lambda: records)
    got = scrape(endpoint)
    victim = frozenset({("volume", "victim-vol"), ("pod", "team-a/victim")})
    mallory = frozenset({("volume", "mallory-vol"), ("pod", "team-b/mallory")})
    assert got[("objfs_open_handles", victim)] == 0  # the victim's own figure, not the forged 666
    assert got[("objfs_open_handles", mallory)] == 666  # the forged sample, under the forger's name
    assert volumes_in(got) == {"victim-vol", "mallory-vol"}


def test_many_and_oversized_files_are_not_read(tmp_path: Path, reads: list[str],
                                               caplog: pytest.LogCaptureFixture) -> None:
    """Attack: a malicious pod writes 25 files of ~60 KiB each with made-up volumes, and makes its one real
    file 1 MiB. The plugin read every *.prom under every pod (1 MiB each: ~200 MiB RSS per scrape for 20
    files) and exported every volume they named; now it opens only the files of volumes its records
    have, skips one over 64 KiB with one log line however often it is scraped, and exports nothing of
    the made-up volumes."""
    records = [record(ATTACKER, "team-b/mallory", "mallory-vol", "data"),
               record(ATTACKER, "team-b/mallory", "mallory-big", "big")]
    where = metrics_dir(tmp_path, ATTACKER)
    for i in range(25):
        (where / f"extra-{i}.prom").write_text(forged(f"made-up-{i}", "team-b/mallory", 1, padding=900))
    (where / "data.prom").write_text(forged("mallory-vol", "x/y", 3))
    (where / "big.prom").write_text(forged("mallory-big", "x/y", 4, padding=16000))
    assert os.path.getsize(where / "big.prom") > 1 << 20 > max(os.path.getsize(p) for p in where.glob("extra-*"))
    endpoint = metrics.PluginMetrics(str(tmp_path), None, None, records=lambda: records)
    with caplog.at_level(logging.WARNING, logger="csi.node.metrics"):
        first, second = scrape(endpoint), scrape(endpoint)
    for got in (first, second):
        assert volumes_in(got) == {"mallory-vol"}
    assert len(reads) == 4 and all(not os.path.basename(p).startswith("extra-") for p in reads)
    assert sum("larger than" in r.getMessage() and "big.prom" in r.getMessage() for r in caplog.records) == 1


def test_files_read_per_pod_are_bounded(tmp_path: Path, reads: list[str], caplog: pytest.LogCaptureFixture) -> None:
    """Attack: a pod that mounts many objfs volumes (each one a record, each one a file) to make every
    scrape read without end. At most MAX_FILES_PER_DIR files are read per pod directory, with a log line."""
    count = metrics.MAX_FILES_PER_DIR + 8
    records = [record(ATTACKER, "team-b/mallory", f"vol-{i}", f"v{i}") for i in range(count)]
    for i in range(count):
        (metrics_dir(tmp_path, ATTACKER) / f"v{i}.prom").write_text(forged("whatever", "x/y", i))
    endpoint = metrics.PluginMetrics(str(tmp_path), None, None, records=lambda: records)
    with caplog.at_level(logging.WARNING, logger="csi.node.metrics"):
        got = scrape(endpoint)
    assert len(reads) == metrics.MAX_FILES_PER_DIR == len(volumes_in(got))
    assert any("more than" in r.getMessage() for r in caplog.records)


def test_a_symlinked_metrics_directory_is_not_followed(tmp_path: Path, reads: list[str]) -> None:
    """Attack: the pod replaces its metrics directory with a symlink to another pod's, so that the plugin
    reads the other pod's figures as its own (or any directory of the node). Not followed: nothing read."""
    records = [record(ATTACKER, "team-b/mallory", "mallory-vol", "data")]
    server_metrics.Exporter({"volume": "victim-vol"}).write(str(metrics_dir(tmp_path, VICTIM) / "data.prom"))
    mine = metrics_dir(tmp_path, ATTACKER)
    mine.rmdir()
    os.symlink(metrics_dir(tmp_path, VICTIM), mine)
    endpoint = metrics.PluginMetrics(str(tmp_path), None, None, records=lambda: records)
    assert volumes_in(scrape(endpoint)) == set()
