"""Metrics, stats, usage, the event feed and the inactivity timer, read
through the SDK from a real node."""

import datetime
import threading
import time

from wrenn import Capsule, WrennClient
from wrenn.models import Status


def test_metrics(capsule):
    capsule.commands.run("true")
    metrics = WrennClient().capsules.metrics(capsule.capsule_id)
    assert metrics.points, "a running capsule has at least one sample"
    point = metrics.points[-1]
    assert 0 <= point.cpu_pct <= 100
    assert point.mem_bytes > 16 << 20, "the VM's resident memory"
    assert point.disk_bytes > 0
    assert abs(point.timestamp_unix - time.time()) < 120
    assert WrennClient().capsules.metrics(capsule.capsule_id, range="1h").range.value == "1h"


def test_stats_and_usage(capsule):
    client = WrennClient()
    stats = client.capsules.stats(range="5m")
    assert stats.current.running_count >= 1
    assert stats.current.vcpus_reserved >= 1
    assert stats.peaks.running_count >= stats.current.running_count
    series = stats.series
    assert len(series.labels) == len(series.running) == len(series.vcpus) == len(series.memory_mb)
    assert series.running[-1] >= 1
    usage = client.capsules.usage()
    today = datetime.datetime.now(datetime.timezone.utc).date()
    assert usage.to == today
    points = {p.date: p for p in usage.points}
    assert points[today].cpu_minutes > 0
    assert points[today].ram_mb_minutes > 0


def test_event_feed():
    client = WrennClient()
    seen = []
    connected = threading.Event()

    def listen():
        for event in client.events.stream():
            seen.append(event)
            if event.event.value == "connected":
                connected.set()
            if event.event.value == "capsule.destroy":
                return

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    assert connected.wait(30), "no connected event"
    c = Capsule(wait=True)
    c.pause()
    c.resume()
    c.destroy()
    listener.join(60)
    names = [e.event.value for e in seen if e.resource is None or e.resource.id == c.capsule_id]
    assert names[0] == "connected"
    for wanted in ("capsule.create", "capsule.pause", "capsule.resume", "capsule.destroy"):
        assert wanted in names, f"{wanted} missing from {names}"
    assert names.index("capsule.pause") < names.index("capsule.resume")


def test_inactivity_pauses_and_ping_keeps_running():
    idle = Capsule(timeout=60, wait=True)
    busy = Capsule(timeout=60, wait=True)
    try:
        start = time.time()
        while time.time() - start < 150:
            busy.ping()
            if idle.get_info().status == Status.paused:
                break
            time.sleep(10)
        waited = time.time() - start
        assert idle.get_info().status == Status.paused, "not paused after 150 s idle"
        assert waited >= 50, f"paused after only {waited:.0f} s"
        assert busy.get_info().status == Status.running
        # Any use resumes it and restarts the timer.
        assert Capsule.connect(idle.capsule_id).commands.run("echo back").stdout == "back\n"
    finally:
        idle.destroy()
        busy.destroy()
