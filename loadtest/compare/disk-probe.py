#!/usr/bin/env python3
"""How fast this disk makes a small write durable, the two ways allotd's journal can do it.

Usage: disk-probe.py [DIR] [--bytes N] [--writes N] [--busy N] [--gap-us US]

Writes a 64 MiB file of zeros in DIR (default: the current directory; put it on the disk of
allotd's data directory), then appends N writes of --bytes each to it:
  fdatasync     pwrite through the page cache, then fdatasync (durability = "fsync" before
                write-through, and the fallback where O_DIRECT is refused)
  write-through pwrite on a descriptor opened O_DIRECT | O_DSYNC (allotd's journal now)
and prints wall time and the process's kernel and user CPU time per write, wall-time
percentiles, and how many writes took over 1, 5 and 10 ms. The file is deleted afterwards.

--busy N runs N processes that only spin (at nice 19, so the guest's scheduler always runs the
probe first) while it measures, and --gap-us sleeps between writes, as a daemon's commit
thread waits for work. On a VM whose vCPUs are capped by the host, writes then wait for the
host: the slow ones end together at one phase of the host's 100 ms bandwidth period, or of its
scheduler tick. The report names the most common phases of the slow writes' ends (mod 100 ms
of the wall clock). Python 3 only, no packages.
"""
import argparse
import collections
import mmap
import os
import resource
import subprocess
import sys
import time

SIZE = 64 << 20


def run(path, mode, writes, size, gap):
    flags = os.O_WRONLY
    if mode == "write-through":
        flags |= os.O_DIRECT | os.O_DSYNC
    fd = os.open(path, flags)
    buf = mmap.mmap(-1, size)  # page-aligned, as O_DIRECT needs
    buf.write(b"y" * size)
    lat = []
    slow_ends = []  # wall-clock end of each write over 1 ms
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    busy = 0.0
    for i in range(writes):
        t = time.perf_counter()
        os.pwrite(fd, buf, (i * size) % SIZE)
        if mode == "fdatasync":
            os.fdatasync(fd)
        took = time.perf_counter() - t
        lat.append(took)
        busy += took
        if took > 1e-3:
            slow_ends.append(time.time())
        if gap:
            time.sleep(gap)
    after = resource.getrusage(resource.RUSAGE_SELF)
    os.close(fd)
    lat.sort()
    us = lambda q: lat[min(len(lat) - 1, int(len(lat) * q))] * 1e6
    over = lambda ms: sum(1 for x in lat if x > ms / 1e3)
    print(
        f"{mode:13} {size:7} B  wall {busy / writes * 1e6:6.0f} us  "
        f"sys {(after.ru_stime - before.ru_stime) / writes * 1e6:5.1f} us  "
        f"user {(after.ru_utime - before.ru_utime) / writes * 1e6:5.1f} us  "
        f"p50 {us(0.5):5.0f}  p99 {us(0.99):6.0f}  p99.9 {us(0.999):6.0f}  max {lat[-1] * 1e6:6.0f} us  "
        f"over 1 / 5 / 10 ms: {over(1)} / {over(5)} / {over(10)}"
    )
    if len(slow_ends) >= 5:
        # Phases in 0.5 ms bins: a host throttle releases every waiting write at once.
        phases = collections.Counter(round((end % 0.1) * 2000) / 2 for end in slow_ends)
        top = ", ".join(f"{phase:.1f} ms: {count}" for phase, count in phases.most_common(4))
        print(f"{'':13} ends of the writes over 1 ms, mod 100 ms of the wall clock (0.5 ms bins): {top}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", nargs="?", default=".")
    parser.add_argument("--bytes", type=int, default=4096, help="bytes per write, a multiple of 4096")
    parser.add_argument("--writes", type=int, default=3000)
    parser.add_argument("--busy", type=int, default=0, help="spinning processes (nice 19) while measuring")
    parser.add_argument("--gap-us", type=int, default=0, help="sleep between writes")
    args = parser.parse_args()
    if args.bytes <= 0 or args.bytes % 4096 or args.bytes > SIZE:
        parser.error("--bytes must be a positive multiple of 4096, at most 64 MiB")
    if args.writes <= 0:
        parser.error("--writes must be positive")
    if args.busy < 0 or args.gap_us < 0:
        parser.error("--busy and --gap-us must not be negative")
    path = os.path.join(args.dir, f"allot-disk-probe.{os.getpid()}")
    try:
        with open(path, "wb") as file:  # written blocks, like a journal segment
            zeros = bytes(1 << 20)
            for _ in range(SIZE >> 20):
                file.write(zeros)
            file.flush()
            os.fsync(file.fileno())
        spin = "import os\nos.nice(19)\nwhile True: pass"
        spinners = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(args.busy)]
        try:
            for _ in range(2):
                for mode in ("fdatasync", "write-through"):
                    run(path, mode, args.writes, args.bytes, args.gap_us / 1e6)
        finally:
            for spinner in spinners:
                spinner.kill()
                spinner.wait()
    finally:
        if os.path.exists(path):
            os.unlink(path)


if __name__ == "__main__":
    main()
