#!/usr/bin/env python3
"""Checks an Autobahn fuzzingclient report (index.json) for one agent.

usage: check.py INDEX_JSON AGENT [--expect N] [--expect-cases FILE]
                [--allow-unimplemented] [--quiet]

index.json layout (written by `wstest -m fuzzingclient`):
    {agent: {case_id: {"behavior": ..., "behaviorClose": ...,
                       "duration": ms, "remoteCloseCode": ..., "reportfile": ...}}}

A case is clean when
    behavior      in {OK, NON-STRICT, INFORMATIONAL}
    behaviorClose in {OK, INFORMATIONAL}
Everything else (FAILED, WRONG CODE, UNCLEAN, FAILED BY CLIENT, NO_CLOSE and
UNIMPLEMENTED -- the latter means 12.*/13.* ran without permessage-deflate
being negotiated) is a failure, unless --allow-unimplemented is given, which
accepts UNIMPLEMENTED (for servers that deliberately lack deflate).

Also fails when the number of cases is not the expected one (--expect N),
or when cases listed in --expect-cases (JSON array of case ids) are missing.

Exit status: 0 clean, 1 failures / missing cases, 2 unusable input.
"""

import argparse
import collections
import json
import os
import sys

GOOD_BEHAVIOR = {"OK", "NON-STRICT", "INFORMATIONAL"}
GOOD_CLOSE = {"OK", "INFORMATIONAL"}


def case_key(case_id):
    out = []
    for part in case_id.split("."):
        try:
            out.append((0, int(part)))
        except ValueError:
            out.append((1, part))
    return out


def load_case_report(index_dir, entry):
    name = entry.get("reportfile")
    if not name:
        return {}
    path = os.path.join(index_dir, name)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def short(s, limit=300):
    s = " ".join(str(s).split())
    return s if len(s) <= limit else s[: limit - 4] + " ..."


def main(argv=None):
    ap = argparse.ArgumentParser(
        description="Check an Autobahn fuzzingclient index.json for one agent.")
    ap.add_argument("index_json")
    ap.add_argument("agent")
    ap.add_argument("--expect", type=int, default=None,
                    help="exact number of cases that must be present")
    ap.add_argument("--expect-cases", default=None,
                    help="JSON file with the list of case ids that must be present")
    ap.add_argument("--allow-unimplemented", action="store_true",
                    help="accept UNIMPLEMENTED (server without permessage-deflate)")
    ap.add_argument("--quiet", action="store_true", help="only print failures and the verdict")
    args = ap.parse_args(argv)

    try:
        with open(args.index_json, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, ValueError) as e:
        print("check.py: cannot read %s: %s" % (args.index_json, e), file=sys.stderr)
        return 2
    if args.agent not in index:
        print("check.py: agent %r not in %s (agents: %s)"
              % (args.agent, args.index_json, ", ".join(sorted(index)) or "none"), file=sys.stderr)
        print("RESULT: FAIL (no results for agent %r)" % args.agent)
        return 1

    good_behavior = set(GOOD_BEHAVIOR)
    good_close = set(GOOD_CLOSE)
    if args.allow_unimplemented:
        good_behavior.add("UNIMPLEMENTED")
        good_close.add("UNIMPLEMENTED")

    cases = index[args.agent]
    index_dir = os.path.dirname(os.path.abspath(args.index_json))
    ids = sorted(cases, key=case_key)

    by_behavior = collections.Counter(cases[c].get("behavior") for c in ids)
    by_close = collections.Counter(cases[c].get("behaviorClose") for c in ids)
    failures = [c for c in ids
                if cases[c].get("behavior") not in good_behavior
                or cases[c].get("behaviorClose") not in good_close]

    problems = []
    if args.expect is not None and len(ids) != args.expect:
        problems.append("expected %d cases, report has %d" % (args.expect, len(ids)))
    if args.expect_cases:
        with open(args.expect_cases, encoding="utf-8") as f:
            expected_ids = json.load(f)
        missing = sorted(set(expected_ids) - set(ids), key=case_key)
        extra = sorted(set(ids) - set(expected_ids), key=case_key)
        if missing:
            problems.append("%d expected cases missing from the report: %s%s"
                            % (len(missing), " ".join(missing[:40]),
                               " ..." if len(missing) > 40 else ""))
        if extra:
            problems.append("%d unexpected cases in the report: %s"
                            % (len(extra), " ".join(extra[:40])))

    print("Autobahn report %s, agent %r: %d cases" % (args.index_json, args.agent, len(ids)))
    if not args.quiet:
        print("  behavior:      " + ", ".join("%s=%d" % kv for kv in sorted(by_behavior.items(), key=str)))
        print("  behaviorClose: " + ", ".join("%s=%d" % kv for kv in sorted(by_close.items(), key=str)))
        total_ms = sum(int(cases[c].get("duration") or 0) for c in ids)
        slow = sorted(ids, key=lambda c: -int(cases[c].get("duration") or 0))[:5]
        print("  total case time %.1fs; slowest: %s" % (
            total_ms / 1000.0,
            ", ".join("%s=%dms" % (c, int(cases[c].get("duration") or 0)) for c in slow)))
        nonstrict = [c for c in ids if cases[c].get("behavior") in ("NON-STRICT",)]
        if nonstrict:
            print("  NON-STRICT (accepted): " + " ".join(nonstrict))

    if failures:
        print("FAILING CASES (%d):" % len(failures))
        for c in failures:
            e = cases[c]
            rep = load_case_report(index_dir, e)
            print("  %s: behavior=%s behaviorClose=%s remoteCloseCode=%s duration=%sms"
                  % (c, e.get("behavior"), e.get("behaviorClose"),
                     e.get("remoteCloseCode"), e.get("duration")))
            if rep:
                print("      description: " + short(rep.get("description", "")))
                print("      expectation: " + short(rep.get("expectation", "")))
                print("      result:      " + short(rep.get("result", "")))
                print("      resultClose: " + short(rep.get("resultClose", "")))
            if e.get("reportfile"):
                print("      report:      " + os.path.join(index_dir, e["reportfile"]))
    for p in problems:
        print("PROBLEM: " + p)

    if failures or problems:
        print("RESULT: FAIL (%d failing cases, %d cases in report%s)" % (
            len(failures), len(ids),
            ", expected %d" % args.expect if args.expect is not None else ""))
        return 1
    print("RESULT: PASS (%d cases clean)" % len(ids))
    return 0


if __name__ == "__main__":
    sys.exit(main())
