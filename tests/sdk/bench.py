"""`make bench` (agent/benches/sdk.rs): the SDK's view of a node's speed.
Prints one JSON object of seconds per operation on its last line."""

import json
import os
import sys
import time

from wrenn import Capsule

SANDBOXES = int(os.environ.get("WRENN_BENCH_SANDBOXES", "3"))
EXECS = 20
SIZE = 50 << 20


def timed(samples, f):
    start = time.perf_counter()
    out = f()
    samples.append(time.perf_counter() - start)
    return out


def main():
    took = {"create": [], "run": [], "stream": [], "upload": [], "download": []}
    chunk = os.urandom(1 << 20)
    for i in range(SANDBOXES):
        capsule = timed(took["create"], lambda: Capsule(wait=True))
        try:
            for _ in range(EXECS):
                timed(took["run"], lambda: capsule.commands.run("true"))
            for _ in range(EXECS):
                timed(took["stream"], lambda: list(capsule.commands.stream("true")))
            timed(took["upload"], lambda: capsule.files.upload_stream(
                "/tmp/bench.bin", (chunk for _ in range(SIZE // len(chunk)))))
            timed(took["download"], lambda: sum(
                len(p) for p in capsule.files.download_stream("/tmp/bench.bin")))
        finally:
            capsule.destroy()
    print(json.dumps(took))


if __name__ == "__main__":
    sys.exit(main())
