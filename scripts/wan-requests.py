#!/usr/bin/env python3
"""Summarises an `imgstore server --log-format json` request log.

    scripts/wan-requests.py SERVER_LOG

Per request kind (method and path, ids folded): how many, bytes in and out
per request, milliseconds in the handler (reading the body included, so an
upload's time on the link counts) — and over the whole log, the requests
the server had in flight: the time-weighted mean while any was, and the
most at once. A request's interval is [logged time - ms, logged time].
"""
import collections
import datetime
import json
import re
import sys


def when(ts):
    return datetime.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def kind(method, path):
    path = re.sub(r"/[0-9a-f]{16,}", "/{id}", path)
    return f"{method} {path}"


def main():
    reqs = []
    for line in open(sys.argv[1]):
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if e.get("message") != "request":
            continue
        end = when(e["timestamp"])
        reqs.append((kind(e["method"], e["path"]), end - e["ms"] / 1000, end,
                     e["bytes_in"], e["bytes_out"], e["ms"]))
    if not reqs:
        print("no requests logged")
        return
    by = collections.defaultdict(list)
    for r in reqs:
        by[r[0]].append(r)
    print(f"{'request':34} {'count':>6} {'in KiB/req':>11} {'out KiB/req':>12} {'ms mean':>8} {'ms max':>7}")
    for k, rs in sorted(by.items(), key=lambda kv: -len(kv[1])):
        n = len(rs)
        print(f"{k:34} {n:6d} {sum(r[3] for r in rs) / n / 1024:11.1f} "
              f"{sum(r[4] for r in rs) / n / 1024:12.1f} {sum(r[5] for r in rs) / n:8.1f} "
              f"{max(r[5] for r in rs):7d}")
    # Requests in flight: sweep over interval ends.
    ev = sorted([(r[1], 1) for r in reqs] + [(r[2], -1) for r in reqs])
    cur = peak = 0
    busy = area = 0.0
    last = ev[0][0]
    for t, d in ev:
        if cur > 0:
            busy += t - last
            area += cur * (t - last)
        last = t
        cur += d
        peak = max(peak, cur)
    span = reqs and (max(r[2] for r in reqs) - min(r[1] for r in reqs))
    print(f"requests in flight: mean {area / busy if busy else 0:.1f} while any, "
          f"most {peak}; busy {busy:.1f} s of {span:.1f} s")


main()
