"""The SDK's REST calls against a real node: lifecycle, commands, files,
snapshots and the typed errors."""

import asyncio
import hashlib
import os
import time

import pytest
import wrenn
from wrenn import AsyncCapsule, Capsule, WrennClient
from wrenn.exceptions import (
    WrennAuthenticationError,
    WrennConflictError,
    WrennNotFoundError,
    WrennValidationError,
)
from wrenn.models import Status


def test_create_with_and_without_timeout():
    with Capsule(wait=True) as plain:
        info = plain.get_info()
        assert info.status == Status.running
        assert info.timeout_sec == 0
        assert info.template
        assert info.created_at.tzinfo is not None
    # 1-59 s are raised to 60: an inactivity timer, never a kill.
    with Capsule(timeout=5, wait=True) as timed:
        assert timed.get_info().timeout_sec == 60
        assert timed.is_running()


def test_async_create_and_commands():
    async def main():
        capsule = await AsyncCapsule.create(timeout=120, wait=True)
        try:
            assert (await capsule.get_info()).status == Status.running
            result = await capsule.commands.run("echo async")
            assert result.stdout == "async\n"
            assert result.exit_code == 0
        finally:
            await capsule.destroy()

    asyncio.run(main())


def test_list_and_get(capsule):
    listed = Capsule.list()
    assert capsule.capsule_id in [c.id for c in listed]
    client = WrennClient()
    assert client.capsules.get(capsule.capsule_id).id == capsule.capsule_id


def test_run_stdout_stderr_exit_code_envs_cwd(capsule):
    result = capsule.commands.run("echo out; echo err >&2; exit 3")
    assert (result.stdout, result.stderr, result.exit_code) == ("out\n", "err\n", 3)
    result = capsule.commands.run('echo "$GREETING"; pwd', envs={"GREETING": "hi"}, cwd="/tmp")
    assert result.stdout == "hi\n/tmp\n"
    assert result.duration_ms is not None


def test_run_timeout_is_an_agent_error(capsule):
    with pytest.raises(wrenn.exceptions.WrennAgentError) as err:
        capsule.commands.run("sleep 30", timeout=2)
    assert "timeout" in err.value.message


def test_background_list_kill(capsule):
    handle = capsule.commands.run("sleep 300", background=True, tag="sleeper")
    assert handle.pid > 0
    assert handle.tag == "sleeper"
    running = capsule.commands.list()
    assert any(p.pid == handle.pid and p.tag == "sleeper" for p in running)
    capsule.commands.kill(handle.pid)
    deadline = time.time() + 10
    while any(p.pid == handle.pid for p in capsule.commands.list()):
        assert time.time() < deadline, "the killed process is still listed"
        time.sleep(0.2)
    generated = capsule.commands.run("sleep 1", background=True)
    assert generated.tag.startswith("proc-")


def test_files(capsule):
    capsule.files.write("/tmp/sdk/a.txt", "hello files")
    assert capsule.files.read("/tmp/sdk/a.txt") == "hello files"
    capsule.files.write("/tmp/sdk/b.bin", bytes(range(256)))
    assert capsule.files.read_bytes("/tmp/sdk/b.bin") == bytes(range(256))
    entries = {e.name: e for e in capsule.files.list("/tmp/sdk")}
    assert entries["a.txt"].type.value == "file"
    assert entries["a.txt"].size == len("hello files")
    assert entries["a.txt"].modified_at > 1_600_000_000
    assert capsule.files.exists("/tmp/sdk/a.txt")
    assert not capsule.files.exists("/tmp/sdk/missing")
    made = capsule.files.make_dir("/tmp/sdk/dir/sub")
    assert made.type.value == "directory"
    assert made.permissions.startswith("d")
    assert capsule.files.make_dir("/tmp/sdk/dir/sub").name == "sub"
    capsule.files.remove("/tmp/sdk/a.txt")
    assert not capsule.files.exists("/tmp/sdk/a.txt")
    with pytest.raises(WrennNotFoundError):
        capsule.files.read("/tmp/sdk/a.txt")


def test_stream_upload_and_download_50_mib(capsule):
    size = 50 << 20
    chunk = os.urandom(1 << 20)
    want = hashlib.sha256()

    def chunks():
        for i in range(size // len(chunk)):
            piece = bytes([i % 256]) + chunk[1:]
            want.update(piece)
            yield piece

    capsule.files.upload_stream("/tmp/big.bin", chunks())
    got = hashlib.sha256()
    total = 0
    for piece in capsule.files.download_stream("/tmp/big.bin"):
        got.update(piece)
        total += len(piece)
    assert total == size
    assert got.hexdigest() == want.hexdigest()
    inside = capsule.commands.run("sha256sum /tmp/big.bin").stdout.split()[0]
    assert inside == want.hexdigest()


def test_pause_connect_resume_ping():
    c = Capsule(wait=True)
    try:
        c.commands.run("echo kept > /tmp/state")
        paused = c.pause()
        assert paused.status in (Status.paused, Status.pausing)
        with pytest.raises(WrennConflictError):
            c.pause()
        # connect resumes a paused capsule.
        again = Capsule.connect(c.capsule_id)
        assert again.get_info().status == Status.running
        assert again.commands.run("cat /tmp/state").stdout == "kept\n"
        again.ping()
        with pytest.raises(WrennConflictError):
            again.resume()
        again.pause()
        assert again.resume().status == Status.running
    finally:
        c.destroy()


def test_snapshot_then_capsule_from_it():
    client = WrennClient()
    with Capsule(wait=True) as source:
        source.commands.run("echo from-snapshot > /root/marker")
        snapshot = source.create_snapshot(name="sdk-snap", overwrite=True)
        assert snapshot.name == "sdk-snap"
        assert snapshot.type.value == "snapshot"
    names = {t.name: t for t in client.snapshots.list()}
    assert names["sdk-snap"].type.value == "snapshot"
    assert all(t.type.value == "base" for t in client.snapshots.list(type="base"))
    with Capsule(template="sdk-snap", wait=True) as clone:
        assert clone.commands.run("cat /root/marker").stdout == "from-snapshot\n"
    client.snapshots.delete("sdk-snap")
    assert "sdk-snap" not in {t.name for t in client.snapshots.list()}
    with pytest.raises(WrennNotFoundError):
        client.snapshots.delete("sdk-snap")


def test_destroy_then_not_found():
    c = Capsule(wait=True)
    c.destroy(wait=True)
    with pytest.raises(WrennNotFoundError):
        WrennClient().capsules.get(c.capsule_id)
    with pytest.raises(WrennNotFoundError):
        Capsule.connect("sb-doesnotexist")


def test_validation_error():
    with pytest.raises(WrennValidationError):
        Capsule(vcpus=0)


def test_wrong_key_is_an_authentication_error():
    keyed = os.environ["WRENN_TEST_KEYED_URL"]
    with pytest.raises(WrennAuthenticationError):
        WrennClient(api_key="wrong", base_url=keyed).capsules.list()
    right = os.environ["WRENN_TEST_KEYED_KEY"]
    assert WrennClient(api_key=right, base_url=keyed).capsules.list() == []
