#!/usr/bin/env python3
"""Does the whole machine stop now and then? A process that only sleeps measures it.

Usage: vm-stalls.py [--seconds S] [--sleep-us US] [--json]

Sleeps --sleep-us (default 500) at a time for --seconds (default 10) and counts the wake-ups
that came more than 2, 5 and 10 ms late. An idle process that wants the CPU for a few µs per
wake-up is late by milliseconds only when no vCPU runs at all: the guest's scheduler would
preempt any other task for it within a tick. So late wake-ups while something else runs mean
the host stopped the VM, for example its CPU bandwidth control (a quota per 100 ms period),
whose stops begin at one phase of the host's period: the report names the most common phases
(mod 100 ms of the wall clock) of the wake-ups over 5 ms late.

Run it next to a load (hot-path.sh's cases, host-stalls.sh does it for you) or next to
disk-probe.py, and once with nothing else running as the baseline. Python 3 only, no packages.
"""
import argparse
import collections
import json
import sys
import time


def measure(seconds, sleep_s):
    lates = []  # (wall-clock time of the wake-up, how late in seconds), over 1 ms only
    sleeps = 0
    latest = 0.0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t = time.perf_counter()
        time.sleep(sleep_s)
        late = time.perf_counter() - t - sleep_s
        sleeps += 1
        latest = max(latest, late)
        if late > 1e-3:
            lates.append((time.time(), late))
    return sleeps, latest, lates


def report(seconds, sleep_s, sleeps, latest, lates):
    over = lambda ms: sum(1 for _, late in lates if late > ms / 1000)
    phases = collections.Counter(int((at % 0.1) * 1000) for at, late in lates if late > 5e-3)
    return {
        "seconds": seconds,
        "sleep_us": round(sleep_s * 1e6),
        "sleeps": sleeps,
        "late_over_2ms": over(2),
        "late_over_5ms": over(5),
        "late_over_10ms": over(10),
        "late_max_ms": round(latest * 1000, 2),
        # The most common phases (whole ms mod 100 ms) of the wake-ups over 5 ms late.
        "phases_ms": [[phase, count] for phase, count in phases.most_common(3)],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--sleep-us", type=int, default=500)
    parser.add_argument("--json", action="store_true", help="one JSON object instead of text")
    args = parser.parse_args()
    if args.seconds <= 0 or args.sleep_us <= 0:
        sys.exit("vm-stalls.py: --seconds and --sleep-us must be positive")
    sleep_s = args.sleep_us / 1e6
    result = report(args.seconds, sleep_s, *measure(args.seconds, sleep_s))
    if args.json:
        print(json.dumps(result))
        return
    phases = ", ".join(f"{phase} ms: {count}" for phase, count in result["phases_ms"]) or "-"
    print(
        f"{result['sleeps']} sleeps of {result['sleep_us']} us in {args.seconds:g} s; "
        f"late over 2 / 5 / 10 ms: {result['late_over_2ms']} / {result['late_over_5ms']} / "
        f"{result['late_over_10ms']}, latest {result['late_max_ms']} ms; phases of those over "
        f"5 ms (mod 100 ms of the wall clock): {phases}"
    )


if __name__ == "__main__":
    main()
