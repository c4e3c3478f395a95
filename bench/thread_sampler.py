"""Every INTERVAL seconds until killed: the busiest threads of the machine over the interval (CPU share, the CPU each
last ran on, process and thread names), one JSON line per sample: what shares a CPU with the job's decode loop.

    python3 bench/thread_sampler.py OUT.jsonl [INTERVAL]
"""
import json
import os
import sys
import time

TICK = os.sysconf("SC_CLK_TCK")


def sample() -> dict:
    threads = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            process = open(f"/proc/{pid}/comm").read().strip()
            for tid in os.listdir(f"/proc/{pid}/task"):
                stat = open(f"/proc/{pid}/task/{tid}/stat").read()
                name, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
                threads[int(tid)] = (int(rest[11]) + int(rest[12]), int(rest[36]), int(pid), process, name)
        except (OSError, ValueError, IndexError):
            continue
    return threads


def main() -> None:
    out, interval = sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 2.0
    before, at = sample(), time.time()
    with open(out, "a") as f:
        while True:
            time.sleep(interval)
            now, when = sample(), time.time()
            busy = []
            for tid, (ticks, cpu, pid, process, name) in now.items():
                used = (ticks - before.get(tid, (ticks,))[0]) / TICK / (when - at)
                if used > 0.05:
                    busy.append({"pid": pid, "tid": tid, "process": process, "thread": name, "cpu": cpu,
                                 "share": round(used, 2)})
            f.write(json.dumps({"t": round(when, 1), "busy": sorted(busy, key=lambda b: -b["share"])[:16]}) + "\n")
            f.flush()
            before, at = now, when


if __name__ == "__main__":
    main()
