#!/usr/bin/env python3
"""How fast this disk makes a small write durable, the two ways allotd's journal can do it.

Usage: disk-probe.py [DIR] [--bytes N] [--writes N]

Writes a 64 MiB file of zeros in DIR (default: the current directory; put it on the disk of
allotd's data directory), then appends N writes of --bytes each to it:
  fdatasync     pwrite through the page cache, then fdatasync (durability = "fsync" before
                write-through, and the fallback where O_DIRECT is refused)
  write-through pwrite on a descriptor opened O_DIRECT | O_DSYNC (allotd's journal now)
and prints wall time and the process's kernel and user CPU time per write, and wall-time
percentiles. The file is deleted afterwards. Python 3 only, no packages.
"""
import argparse
import mmap
import os
import resource
import time

SIZE = 64 << 20


def run(path, mode, writes, size):
    flags = os.O_WRONLY
    if mode == "write-through":
        flags |= os.O_DIRECT | os.O_DSYNC
    fd = os.open(path, flags)
    buf = mmap.mmap(-1, size)  # page-aligned, as O_DIRECT needs
    buf.write(b"y" * size)
    lat = []
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    for i in range(writes):
        t = time.perf_counter()
        os.pwrite(fd, buf, (i * size) % SIZE)
        if mode == "fdatasync":
            os.fdatasync(fd)
        lat.append(time.perf_counter() - t)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    os.close(fd)
    lat.sort()
    us = lambda q: lat[min(len(lat) - 1, int(len(lat) * q))] * 1e6
    print(
        f"{mode:13} {size:7} B  wall {wall / writes * 1e6:6.0f} us  "
        f"sys {(after.ru_stime - before.ru_stime) / writes * 1e6:5.1f} us  "
        f"user {(after.ru_utime - before.ru_utime) / writes * 1e6:5.1f} us  "
        f"p50 {us(0.5):5.0f}  p99 {us(0.99):6.0f}  p99.9 {us(0.999):6.0f} us"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", nargs="?", default=".")
    parser.add_argument("--bytes", type=int, default=4096, help="bytes per write, a multiple of 4096")
    parser.add_argument("--writes", type=int, default=3000)
    args = parser.parse_args()
    if args.bytes <= 0 or args.bytes % 4096 or args.bytes > SIZE:
        parser.error("--bytes must be a positive multiple of 4096, at most 64 MiB")
    if args.writes <= 0:
        parser.error("--writes must be positive")
    path = os.path.join(args.dir, f"allot-disk-probe.{os.getpid()}")
    try:
        with open(path, "wb") as file:  # written blocks, like a journal segment
            zeros = bytes(1 << 20)
            for _ in range(SIZE >> 20):
                file.write(zeros)
            file.flush()
            os.fsync(file.fileno())
        for _ in range(2):
            for mode in ("fdatasync", "write-through"):
                run(path, mode, args.writes, args.bytes)
    finally:
        if os.path.exists(path):
            os.unlink(path)


if __name__ == "__main__":
    main()
