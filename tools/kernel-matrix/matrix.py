#!/usr/bin/env python3
"""Kernel-feature matrix for vfio-multifd (python3 standard library only).

Runs the end-to-end transfer (`vfio-multifd demo`, which verifies every byte and config blob
at the destination) once per cell: the default path, every single-feature mask, the all-off
mask, io_uring off, SQPOLL actually used, and io_uring refused by a real seccomp filter
(ENOSYS and EPERM, through `seccomp-exec`). Columns: the host kernel, and Debian kernels
booted under qemu-system-x86_64 TCG through tools/vfio-lab/lab.sh (6.1 from bookworm, 6.12
from bookworm-security), where the same cells run in a busybox initramfs on the guest's
loopback. Prints a table of cells (pass/fail, throughput relative to the column's default
cell) and the path each cell took, or one JSON object with --json. Exit status 0 only if
every cell of every column verified.

    tools/kernel-matrix/matrix.py                       # host + 6.1 + 6.12
    tools/kernel-matrix/matrix.py --kernels host --json
    tools/kernel-matrix/matrix.py --update-readme       # also rewrite README.md's last result
"""

import argparse
import datetime
import json
import os
import signal
import statistics
import struct
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
LAB = os.path.join(REPO, "tools", "vfio-lab", "lab.sh")
CELLS_SH = os.path.join(HERE, "matrix-cells.sh")
README = os.path.join(HERE, "README.md")
TARGET = "x86_64-unknown-linux-gnu"

# Cells in table order (the same names as matrix-cells.sh).
CELLS = [
    "default", "send-zc", "fixed-buffers", "linked-chains", "defer-taskrun", "coop-taskrun",
    "sqpoll", "buffer-ring", "all", "io-uring", "sqpoll-on", "seccomp-enosys", "seccomp-eperm",
]
CELL_DOC = {
    "default": "nothing forbidden",
    "all": "--forbid all (every io_uring feature off, io_uring itself on)",
    "io-uring": "VFIO_MULTIFD_FORBID=io-uring (threads engine)",
    "sqpoll-on": "VFIO_MULTIFD_SQPOLL=1 --forbid defer-taskrun,coop-taskrun (SQPOLL ring)",
    "seccomp-enosys": "seccomp filter: io_uring_setup -> ENOSYS",
    "seccomp-eperm": "seccomp filter: io_uring_setup -> EPERM",
}
# Guest columns: name -> (Debian kernel ABI, package version or None for apt's candidate,
# suite, ABI prefix to fall back on when the pin has left the archive). None as ABI: the lab's
# own pin (6.12, with its fallback).
GUESTS = {
    "6.1": ("6.1.0-50", "6.1.176-1", "bookworm", "6.1.0-"),
    "6.12": (None, None, "bookworm-security", "6.12."),
}
ERRNO_TEXT = {"seccomp-enosys": ("ENOSYS", "os error 38"), "seccomp-eperm": ("EPERM", "os error 1")}
BEGIN, END = "<!-- matrix:begin -->", "<!-- matrix:end -->"


def log(msg):
    print(f"[matrix] {msg}", file=sys.stderr, flush=True)


def run_group(cmd, timeout, **kw):
    """Runs cmd in its own process group; on timeout kills the whole group (demo helpers,
    qemu) and returns what it printed so far. Returns (returncode, stdout, stderr)."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True, **kw)
    try:
        out, err = p.communicate(timeout=timeout)
        return p.returncode, out, err
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        return 124, out, err + f"\n(killed after {timeout} s)"


def is_static(path):
    """True when the ELF file has no PT_INTERP (no dynamic loader)."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:
            return False
        phoff, = struct.unpack_from("<Q", head, 32)
        phentsize, phnum = struct.unpack_from("<HH", head, 54)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != 3 for i in range(phnum))


def build_static(target_dir, timeout):
    """Builds vfio-multifd and seccomp-exec static (the guest has no libc); returns paths."""
    env = dict(os.environ, CARGO_TARGET_DIR=target_dir,
               RUSTFLAGS="-C target-feature=+crt-static")
    cmd = [os.environ.get("CARGO", "cargo"), "build", "-q", "--release", "--target", TARGET,
           "-p", "vfio-multifd", "-p", "seccomp-exec"]
    log(f"building static binaries into {target_dir}")
    t0 = time.time()
    rc, out, err = run_group(cmd, timeout, cwd=REPO, env=env)
    if rc != 0:
        raise SystemExit(f"static build failed (exit {rc}):\n{out}{err}")
    log(f"built in {time.time() - t0:.0f} s")
    out = os.path.join(target_dir, TARGET, "release")
    bins = os.path.join(out, "vfio-multifd"), os.path.join(out, "seccomp-exec")
    for b in bins:
        if not is_static(b):
            raise SystemExit(f"{b} is dynamically linked")
    return bins


def parse_lines(lines):
    """MATRIX-* lines -> {kernel, probe, cells: {cell: {path, runs: [...]}}, ended}."""
    col = {"kernel": None, "uname": None, "probe": None, "cells": {}, "ended": False,
           "profile": None}
    last = {}
    for raw in lines:
        line = raw.rstrip("\r\n")
        if line.startswith("  | "):
            line = line[4:]
        if not line.startswith("MATRIX-"):
            continue
        tag, _, rest = line.partition(" ")
        if tag == "MATRIX-KERNEL":
            col["kernel"] = rest.strip()
        elif tag == "MATRIX-UNAME":
            col["uname"] = rest.strip()
        elif tag == "MATRIX-PROFILE":
            col["profile"] = rest.strip()
        elif tag == "MATRIX-PROBE":
            col["probe"] = loads(rest)
        elif tag == "MATRIX-END":
            col["ended"] = True
        elif tag in ("MATRIX-PATH", "MATRIX-RUN", "MATRIX-JSON", "MATRIX-LOG"):
            cell, _, rest = rest.partition(" ")
            c = col["cells"].setdefault(cell, {"path": None, "runs": []})
            if tag == "MATRIX-PATH":
                c["path"] = loads(rest)
                continue
            run, _, rest = rest.partition(" ")
            if tag == "MATRIX-RUN":
                fields = dict(w.split("=", 1) for w in rest.split() if "=" in w)
                r = {"run": run, "rc": int(fields.get("rc", "-1")),
                     "wall_ms": int(fields.get("wall_ms", "0")), "why": fields.get("why"),
                     "summary": None, "log": []}
                c["runs"].append(r)
                last[(cell, run)] = r
            elif (cell, run) in last:
                if tag == "MATRIX-JSON":
                    last[(cell, run)]["summary"] = loads(rest)
                else:
                    last[(cell, run)]["log"].append(rest)
    return col


def loads(text):
    text = text.strip()
    if not text or text.startswith("null"):
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def short_path(path):
    """Compact data path of a probe's JSON: `uring dt fixed link zc`."""
    if not path or "data_path" not in path:
        return "?"
    p = path["data_path"]
    if p["engine"] != "uring":
        return "threads"
    setup = {"single-issuer+defer-taskrun": "defer", "coop-taskrun": "coop",
             "sqpoll": "sqpoll", "plain": "plain"}.get(p["setup"], p["setup"])
    return " ".join(["uring", setup, p["buffers"], "link" if p["chains"] == "linked" else "unlink",
                     "zc" if p["send"] == "send-zc" else "send"])


PATH_FIELDS = ("engine", "setup", "buffers", "chains", "send")


def path_mismatches(run, predicted, summary):
    """Reasons the path a demo run took (both sides, from its JSON) differs from the path
    probe predicted under the same mask; without this a cell whose rings ignore the mask still
    passes, as the bytes verify either way."""
    reasons = []
    for key, side in (("path", "source"), ("dest_path", "destination")):
        taken = summary.get(key)
        if not taken:
            reasons.append(f"{run}: the {side} reported no path taken")
            continue
        if taken.get("rings_disagree"):
            reasons.append(f"{run}: the {side}'s rings took different paths: "
                           + "; ".join(taken["rings_disagree"]))
        for field in PATH_FIELDS:
            if taken.get(field) != predicted.get(field):
                reasons.append(f"{run}: {side} {field}: predicted {predicted.get(field)}, "
                               f"taken {taken.get(field)}")
    return reasons


def evaluate(col, cells):
    """Adds pass/reasons/throughput to each cell of a parsed column."""
    usable = True
    if col["probe"] is not None:
        usable = bool(col["probe"]["io_uring"]["usable"])
    results = []
    for name in cells:
        c = col["cells"].get(name, {"path": None, "runs": []})
        reasons = []
        runs = c["runs"]
        for kind in ("check", "perf"):
            if not any(r["run"] == kind for r in runs):
                reasons.append(f"{kind}: did not run" + ("" if col["ended"] else
                                                         " (the column stopped early)"))
        for r in runs:
            if r["run"] == "setup":
                reasons.append(f"not run: {r['why']}")
                continue
            s = r["summary"]
            if r["rc"] != 0:
                reasons.append(f"{r['run']}: exit status {r['rc']}"
                               + (" (timeout)" if r["rc"] in (124, 143) else ""))
            if s is None:
                reasons.append(f"{r['run']}: no JSON summary")
                errs = [l for l in r["log"] if "ERROR" in l or "error" in l]
                if errs:
                    reasons.append(f"{r['run']}: {errs[-1][:300]}")
                continue
            if s.get("verified") is not True:
                reasons.append(f"{r['run']}: destination did not verify the bytes: "
                               f"{s.get('error', 'no error given')}")
            want = "threads" if name in ("io-uring",) or name.startswith("seccomp") or not usable \
                else "uring"
            for side in ("engine", "dest_engine"):
                if s.get(side) != want:
                    reasons.append(f"{r['run']}: {side} {s.get(side)}, expected {want}")
            if c["path"] is not None:
                reasons += path_mismatches(r["run"], c["path"]["data_path"], s)
            elif col["probe"] is not None:
                reasons.append(f"{r['run']}: no probe prediction to compare the path taken with")
            if name in ERRNO_TEXT:
                errno, os_error = ERRNO_TEXT[name]
                text = "\n".join(r["log"])
                if not ("io_uring unavailable" in text and "io_uring_setup" in text
                        and "using the threads engine" in text and os_error in text):
                    reasons.append(f"{r['run']}: no log line saying io_uring_setup was refused "
                                   f"({errno}) and the threads engine ran")
        if c["path"] is not None and name.startswith("seccomp"):
            why = c["path"]["data_path"].get("why_threads") or ""
            if c["path"]["data_path"]["engine"] != "threads" or ERRNO_TEXT[name][0] not in why:
                reasons.append(f"probe under the filter does not explain {ERRNO_TEXT[name][0]}")
        perf = [r["summary"]["throughput_gib_s"] for r in runs
                if r["run"] == "perf" and r["summary"] and r["summary"].get("throughput_gib_s")]
        engine = next((r["summary"]["engine"] for r in runs if r["summary"]), None)
        results.append({
            "cell": name, "pass": not reasons, "reasons": reasons, "engine": engine,
            "path": short_path(c["path"]),
            "data_path": (c["path"] or {}).get("data_path"),
            "throughput_gib_s": statistics.median(perf) if perf else None,
            "runs": [{k: r[k] for k in ("run", "rc", "wall_ms")} | {
                "verified": (r["summary"] or {}).get("verified"),
                "bytes": (r["summary"] or {}).get("bytes"),
                "throughput_gib_s": (r["summary"] or {}).get("throughput_gib_s"),
                "notes": (r["summary"] or {}).get("notes", []),
            } for r in runs],
        })
    base = next((r["throughput_gib_s"] for r in results if r["cell"] == "default"), None)
    for r in results:
        t = r["throughput_gib_s"]
        r["relative"] = round(t / base, 3) if t and base else None
    return results


def run_host(args, bin_path, seccomp):
    cmd = ["sh", CELLS_SH, "--bin", bin_path, "--seccomp-exec", seccomp, "--profile", "host",
           "--perf-reps", str(args.perf_reps), "--cells", ",".join(args.cells)]
    log("host column: " + " ".join(cmd))
    t0 = time.time()
    rc, out, err = run_group(cmd, args.column_timeout)
    log(f"host column took {time.time() - t0:.0f} s (exit {rc})")
    if rc != 0:
        log(err.strip()[-2000:])
    return out.splitlines()


def apt_candidate(pkg):
    try:
        out = subprocess.run(["apt-cache", "policy", pkg], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.splitlines():
        if "Candidate:" in line:
            v = line.split(":", 1)[1].strip()
            return None if v == "(none)" else v
    return None


def resolve_guest(name, lab_work):
    """(abi, pkg version) for a guest column: the pin, or the newest of its series apt knows."""
    abi, ver, _suite, prefix = GUESTS[name]
    if abi is None:
        return None, None
    if os.path.exists(os.path.join(lab_work, f"k-{abi}", ".image.ok")):
        return abi, ver
    if apt_candidate(f"linux-image-{abi}-amd64-unsigned"):
        return abi, ver if ver and apt_has(f"linux-image-{abi}-amd64-unsigned", ver) else None
    try:
        names = subprocess.run(["apt-cache", "pkgnames", f"linux-image-{prefix}"],
                               capture_output=True, text=True, timeout=60).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        names = []
    abis = sorted({n[len("linux-image-"):-len("-amd64-unsigned")] for n in names
                   if n.endswith("-amd64-unsigned") and "cloud" not in n and "rt-" not in n},
                  key=lambda a: [int(x) for x in a.replace("-", ".").split(".") if x.isdigit()])
    if not abis:
        raise SystemExit(f"neither the pinned kernel {abi} nor any {prefix}* is in the apt archive")
    log(f"pinned kernel {abi} is gone from the archive; using {abis[-1]}")
    return abis[-1], None


def apt_has(pkg, ver):
    return subprocess.run(["apt-cache", "show", f"{pkg}={ver}"], capture_output=True,
                          timeout=60).returncode == 0


def run_guest(args, name, bin_path, seccomp, lab_work, runs_dir):
    abi, ver = resolve_guest(name, lab_work)
    guest_cmd = ("sh /bin/matrix-cells.sh --bin /bin/vfio-multifd --seccomp-exec /bin/seccomp-exec"
                 f" --profile guest --perf-reps {args.guest_perf_reps} --timeout {args.cell_timeout}"
                 f" --cells {','.join(args.cells)}")
    cmd = ["bash", LAB, "--no-mtty", "--guest-bin", bin_path, "--guest-bin", seccomp,
           "--guest-bin", CELLS_SH, "--guest-cmd", guest_cmd, "--timeout", str(args.guest_timeout),
           "--log", os.path.join(runs_dir, f"serial-{name}.log")]
    if abi:
        cmd[2:2] = ["--kernel-version", abi] + (["--kernel-pkg-version", ver] if ver else [])
    log(f"guest column {name}: booting {abi or 'the lab pin'} under TCG")
    t0 = time.time()
    env = dict(os.environ, LAB_WORK=lab_work)
    # lab.sh may first download the kernel (apt-get download) before its qemu timeout starts.
    rc, out, err = run_group(cmd, args.guest_timeout + 600, env=env)
    with open(os.path.join(runs_dir, f"lab-{name}.out"), "w") as f:
        f.write(out + "\n--- stderr ---\n" + err)
    log(f"guest column {name} took {time.time() - t0:.0f} s (lab.sh exit {rc})")
    lines = out.splitlines()
    if not any(l.startswith("  | MATRIX-END") for l in lines):
        tail = [l for l in (out + err).splitlines() if l.strip()][-15:]
        log(f"guest column {name} did not finish; lab.sh said:\n  " + "\n  ".join(tail))
    return lines


def render_table(result):
    cols = result["columns"]
    heads = [f"{c['kernel'] or c['name']}" + (" (host)" if c["name"] == "host" else "")
             for c in cols]
    rows = []
    for i, cell in enumerate(result["cells"]):
        row = [cell]
        for c in cols:
            r = c["cells"][i]
            rel = f" {r['relative']:.2f}x" if r["relative"] is not None else ""
            row.append(("PASS" if r["pass"] else "FAIL") + rel)
        rows.append(row)
    paths = [[cell] + [c["cells"][i]["path"] for c in cols]
             for i, cell in enumerate(result["cells"])]
    out = [f"Kernel matrix {result['date']}: PASS = the destination verified every byte and "
           "config blob; Nx = throughput relative to the column's default cell"]
    out += fmt_table(["cell"] + heads, rows)
    out += ["", "Path each cell took (probe with the cell's mask, checked against what demo's "
            "rings took on both sides): engine, ring setup, buffers, chains, send"]
    out += fmt_table(["cell"] + heads, paths)
    base = [f"{c['kernel'] or c['name']}: default {c['default_gib_s']:.2f} GiB/s"
            for c in cols if c.get("default_gib_s")]
    if base:
        out += ["", "Default-cell throughput (perf transfer): " + "; ".join(base)]
    fails = [(c, r) for c in cols for r in c["cells"] if not r["pass"]]
    if fails:
        out += ["", "Failures:"]
        for c, r in fails:
            out += [f"  {c['kernel'] or c['name']} {r['cell']}: {reason}" for reason in r["reasons"]]
    out += ["", "ALL CELLS VERIFIED" if result["pass"] else "SOME CELLS FAILED"]
    return "\n".join(out)


def fmt_table(head, rows):
    widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
    line = lambda r: "  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip()
    return [line(head), line(["-" * w for w in widths])] + [line(r) for r in rows]


def update_readme(result, table):
    text = open(README).read() if os.path.exists(README) else f"{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        text += f"\n{BEGIN}\n{END}\n"
    kernels = "; ".join(f"{c['kernel'] or c['name']} ({c['uname'] or '?'})"
                        for c in result["columns"])
    block = (f"{BEGIN}\nLast run: {result['date']} on {result['host']}; kernels: {kernels}.\n\n"
             f"```\n{table}\n```\n{END}")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(README, "w") as f:
        f.write(head + block + tail)
    log(f"wrote the result into {README}")


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernels", default="host,6.1,6.12",
                    help="columns, comma separated: host, 6.1, 6.12 (default: all three)")
    ap.add_argument("--cells", default=",".join(CELLS), help="cells, comma separated")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--bin", help="vfio-multifd for the host column (default: the static build)")
    ap.add_argument("--seccomp-exec", help="seccomp-exec for the host column (default: static)")
    ap.add_argument("--target-dir", default=os.path.join(REPO, "target", "kernel-matrix"),
                    help="cargo target dir of the static build (default: target/kernel-matrix)")
    ap.add_argument("--lab-work", default=os.environ.get(
        "LAB_WORK", os.path.join(REPO, "tools", "vfio-lab", "work")),
        help="the VFIO lab's cache of kernels and busybox (default: tools/vfio-lab/work)")
    ap.add_argument("--perf-reps", type=int, default=3, help="host throughput runs per cell")
    ap.add_argument("--guest-perf-reps", type=int, default=3,
                    help="guest throughput runs per cell")
    ap.add_argument("--cell-timeout", type=int, default=120, help="seconds per transfer")
    ap.add_argument("--column-timeout", type=int, default=900, help="seconds for the host column")
    ap.add_argument("--guest-timeout", type=int, default=900, help="seconds per guest boot")
    ap.add_argument("--build-timeout", type=int, default=1200)
    ap.add_argument("--update-readme", action="store_true",
                    help="write the table into tools/kernel-matrix/README.md")
    ap.add_argument("--self-test", action="store_true",
                    help="check the path comparison on fabricated reports and exit")
    args = ap.parse_args()
    if args.self_test:
        return self_test()
    args.cells = [c for c in args.cells.split(",") if c]
    kernels = [k for k in args.kernels.split(",") if k]
    for k in kernels:
        if k != "host" and k not in GUESTS:
            ap.error(f"unknown kernel column {k}; known: host, {', '.join(GUESTS)}")
    for c in args.cells:
        if c not in CELLS:
            ap.error(f"unknown cell {c}; known: {', '.join(CELLS)}")

    guests = [k for k in kernels if k != "host"]
    static = None
    if guests or not (args.bin and args.seccomp_exec):
        static = build_static(args.target_dir, args.build_timeout)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    runs_dir = os.path.join(args.target_dir, "runs", stamp)
    os.makedirs(runs_dir, exist_ok=True)

    columns = []
    for k in kernels:
        if k == "host":
            lines = run_host(args, args.bin or static[0], args.seccomp_exec or static[1])
        else:
            lines = run_guest(args, k, static[0], static[1], args.lab_work, runs_dir)
        with open(os.path.join(runs_dir, f"cells-{k}.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
        col = parse_lines(lines)
        cells = evaluate(col, args.cells)
        default = next((r for r in cells if r["cell"] == "default"), None)
        columns.append({
            "name": k, "kernel": col["kernel"], "uname": col["uname"],
            "how": "host" if k == "host" else f"qemu-system-x86_64 TCG guest ({GUESTS[k][2]})",
            "profile": col["profile"], "complete": col["ended"],
            "default_gib_s": default["throughput_gib_s"] if default else None,
            "probe": col["probe"], "cells": cells,
        })
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host": f"{os.uname().sysname} {os.uname().release}",
        "cells": args.cells, "cell_doc": CELL_DOC, "runs_dir": runs_dir,
        "pass": all(r["pass"] for c in columns for r in c["cells"]) and all(
            c["complete"] for c in columns),
        "columns": columns,
    }
    table = render_table(result)
    if args.json:
        print(json.dumps(result))
    else:
        print(table)
    if args.update_readme:
        update_readme(result, table)
    return 0 if result["pass"] else 1


def self_test():
    """The path comparison on fabricated lines: a cell whose demo took another path than probe
    predicted must fail naming the field; a matching one must pass."""
    predicted = {"engine": "uring", "setup": "single-issuer+defer-taskrun", "buffers": "plain",
                 "chains": "linked", "send": "send-zc"}
    # The reviewer's regression: fixed-buffers forbidden, probe says plain, rings registered.
    taken = dict(predicted, buffers="fixed")
    summary = {"verified": True, "engine": "uring", "dest_engine": "uring",
               "path": taken, "dest_path": predicted}
    probe = {"io_uring": {"usable": True}}
    def column(summary):
        lines = [f"MATRIX-PROBE {json.dumps(probe)}",
                 f"MATRIX-PATH fixed-buffers {json.dumps({'data_path': predicted})}"]
        for run in ("check", "perf"):
            lines += [f"MATRIX-RUN fixed-buffers {run} rc=0 wall_ms=1 rep=1",
                      f"MATRIX-JSON fixed-buffers {run} {json.dumps(summary)}"]
        return evaluate(parse_lines(lines + ["MATRIX-END"]), ["fixed-buffers"])[0]
    bad = column(summary)
    want = "check: source buffers: predicted plain, taken fixed"
    good = column(dict(summary, path=predicted))
    missing = column({k: v for k, v in summary.items() if k != "dest_path"} | {"path": predicted})
    split = column(dict(summary, path=dict(predicted, rings_disagree=["a", "b"])))
    failures = []
    if bad["pass"] or want not in bad["reasons"]:
        failures.append(f"a fixed/plain mismatch did not fail the cell: {bad['reasons']}")
    if not good["pass"]:
        failures.append(f"a matching path failed the cell: {good['reasons']}")
    if missing["pass"]:
        failures.append("a side reporting no path passed")
    if split["pass"]:
        failures.append("rings disagreeing passed")
    for f in failures:
        print(f"self-test: {f}", file=sys.stderr)
    print("self-test: " + ("FAIL" if failures else "ok"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
