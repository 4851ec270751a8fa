#!/usr/bin/env python3
"""Compares an Autobahn fuzzingclient report with the committed expectations.

usage: compare.py REPORT_DIR EXPECTED_JSON [--summary FILE] [--exclude PREFIXES] [--update]

Every case's behavior and close behavior must equal EXPECTED_JSON's (durations are ignored).
Independently of the expectations, FAILED, UNCLEAN, WRONG CODE, FAILED BY CLIENT and
UNIMPLEMENTED always fail, and so does a missing case. --exclude takes comma-separated case
prefixes (e.g. "12.,13.") that this run left out on purpose. --update rewrites EXPECTED_JSON.
"""
import argparse
import collections
import json
import os
import sys

BAD = {"FAILED", "UNCLEAN", "WRONG CODE", "FAILED BY CLIENT", "UNIMPLEMENTED", "MISSING"}


def case_key(case):
    return tuple(int(p) for p in case.split("."))


def find_index(report_dir):
    for dirpath, _, files in os.walk(report_dir):
        if "index.json" in files:
            return os.path.join(dirpath, "index.json")
    sys.exit("compare: no index.json under %s (did the client run?)" % report_dir)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("report_dir")
    ap.add_argument("expected")
    ap.add_argument("--summary")
    ap.add_argument("--exclude", default="")
    ap.add_argument("--update", action="store_true")
    args = ap.parse_args()
    excluded = tuple(p for p in args.exclude.split(",") if p)

    index = json.load(open(find_index(args.report_dir)))
    if len(index) != 1:
        sys.exit("compare: expected one agent in the report, got %s" % list(index))
    agent, cases = next(iter(index.items()))
    got = {c: [r["behavior"], r["behaviorClose"]] for c, r in cases.items()}

    if args.update:
        rows = ['  "%s": %s' % (c, json.dumps(got[c])) for c in sorted(got, key=case_key)]
        with open(args.expected, "w") as f:
            f.write("{\n" + ",\n".join(rows) + "\n}\n")
        print("compare: wrote %d cases to %s" % (len(got), args.expected))

    expected = json.load(open(args.expected))
    wanted = {c: v for c, v in expected.items() if not c.startswith(excluded)}
    problems = []
    for case in sorted(set(wanted) | set(got), key=case_key):
        want, have = wanted.get(case), got.get(case, ["MISSING", "MISSING"])
        if case.startswith(excluded):
            continue
        if set(have) & BAD:
            problems.append("%-8s %s / %s" % (case, have[0], have[1]))
        elif want is None:
            problems.append("%-8s %s / %s (not in expected.json)" % (case, have[0], have[1]))
        elif want != have:
            problems.append("%-8s %s / %s, expected %s / %s" % (case, have[0], have[1], *want))

    counts = collections.Counter(r[0] for r in got.values())
    closes = collections.Counter(r[1] for r in got.values())
    groups = collections.defaultdict(collections.Counter)
    for case, (behavior, _) in got.items():
        groups[case.split(".")[0]][behavior] += 1
    lines = ["Autobahn|Testsuite fuzzingclient against examples/echo (agent %s)" % agent, ""]
    for group in sorted(groups, key=int):
        c = groups[group]
        lines.append("%5s.x %4d cases: %s" % (group, sum(c.values()),
                     ", ".join("%s %d" % kv for kv in sorted(c.items()))))
    lines.append("")
    lines.append("behaviors: " + ", ".join("%s %d" % kv for kv in sorted(counts.items())))
    lines.append("close:     " + ", ".join("%s %d" % kv for kv in sorted(closes.items())))
    informational = sorted((c for c, r in got.items() if r[0] != "OK"), key=case_key)
    if informational:
        lines.append("not OK (informational by design): " + " ".join(informational))
    ok = len(got) - len(problems)
    lines.append("autobahn: %d cases, %d as expected, %d problems" % (len(got), ok, len(problems)))
    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    for p in problems:
        print("  PROBLEM " + p)
    if args.summary and not problems and not excluded:
        with open(args.summary, "w") as f:
            f.write(text)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
