#!/usr/bin/env python3
"""Side-by-side benchmark: Portico, a plain Pingora proxy and nginx, in one run.

The method is in bench/README.md. In short, on a 2-core machine:
  - every proxy under test is pinned to CPU 0 with one worker;
  - the upstream (nginx `return 200`, one worker), the load generator and this driver run on CPU 1;
  - throughput rounds are interleaved (the order rotates each round) and medians reported;
  - CPU per request comes from /proc/PID/stat (utime + stime), so it means something whichever
    side saturates first;
  - latency: everything moves onto CPU 1, one connection, `wrk --latency`;
  - memory: N idle keep-alive connections (one request each, then held), VmRSS before, while
    held and after they close;
  - h2c: h2load (nghttp2-client) against Portico and nginx.

Usage: bench/run [--duration 5] [--rounds 3] [--idle 10000] [--json FILE] [--only SECTION ...]
       bench/bench.py --parse-samples DIR     (prints what the parsers read from recorded output)

Everything started is stopped by PID on exit, Ctrl-C included.
"""

import argparse
import base64
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROXY_CPU = 0
LOAD_CPU = 1
# Open files for every process the bench starts: the hard limit, at most 65536.
NOFILE = min(65536, resource.getrlimit(resource.RLIMIT_NOFILE)[1])

# ---------------------------------------------------------------------------------------------
# Parsers (tested by tests/bench_parser.rs on the recorded samples in bench/samples/)
# ---------------------------------------------------------------------------------------------

_UNITS_US = {"us": 1.0, "ms": 1000.0, "s": 1_000_000.0, "m": 60_000_000.0}


def duration_us(text):
    """wrk's durations ('812.00us', '1.20ms', '2.00s') in microseconds."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*(us|ms|s|m)\s*", text)
    if not m:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(m.group(1)) * _UNITS_US[m.group(2)]


def _count(text):
    """wrk's counts may carry a suffix: '77.12k'."""
    m = re.fullmatch(r"([0-9.]+)([kMG]?)", text.strip())
    if not m:
        raise ValueError(f"not a count: {text!r}")
    return float(m.group(1)) * {"": 1, "k": 1e3, "M": 1e6, "G": 1e9}[m.group(2)]


def parse_wrk(text):
    """What a wrk run says: requests, seconds, rps, errors, and the latency distribution when
    run with --latency (p50/p75/p90/p99 in µs)."""
    out = {}
    m = re.search(r"^\s*(\d+) requests in ([0-9.]+\w+),", text, re.M)
    if not m:
        raise ValueError("wrk output without a 'requests in' line")
    out["requests"] = int(m.group(1))
    out["seconds"] = duration_us(m.group(2)) / 1e6
    m = re.search(r"^Requests/sec:\s+([0-9.]+)", text, re.M)
    if not m:
        raise ValueError("wrk output without 'Requests/sec'")
    out["rps"] = float(m.group(1))
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    out["non_2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    out["socket_errors"] = sum(int(g) for g in m.groups()) if m else 0
    percentiles = {}
    for p, value in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)\s*$", text, re.M):
        percentiles[f"p{p}_us"] = duration_us(value)
    out.update(percentiles)
    return out


def parse_h2load(text):
    """What an h2load run says: requests done/succeeded/failed, rps, status classes."""
    out = {}
    m = re.search(r"^finished in ([0-9.]+\w+), ([0-9.]+) req/s", text, re.M)
    if not m:
        raise ValueError("h2load output without a 'finished in' line")
    out["seconds"] = duration_us(m.group(1)) / 1e6
    out["rps"] = float(m.group(2))
    m = re.search(
        r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored",
        text,
        re.M,
    )
    if not m:
        raise ValueError("h2load output without a 'requests:' line")
    out["requests"] = int(m.group(3))
    out["succeeded"] = int(m.group(4))
    out["failed"] = int(m.group(5)) + int(m.group(6))
    m = re.search(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text, re.M)
    out["non_2xx"] = sum(int(g) for g in m.groups()[1:]) if m else 0
    return out


def parse_samples(directory):
    """Every recorded sample parsed, for the parser test: {file name: parsed}."""
    parsed = {}
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name)) as f:
            text = f.read()
        if name.startswith("wrk"):
            parsed[name] = parse_wrk(text)
        elif name.startswith("h2load"):
            parsed[name] = parse_h2load(text)
    return parsed


# ---------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------


class Processes:
    """Everything this run starts, stopped by PID on exit."""

    def __init__(self, work):
        self.work = work
        self.started = []

    def start(self, name, argv, cpu, env=None):
        log = open(os.path.join(self.work, f"{name}.log"), "wb")

        def child():
            os.sched_setaffinity(0, {cpu})
            resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))

        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, preexec_fn=child, env=env, cwd=ROOT
        )
        self.started.append((name, proc))
        return proc

    def stop_all(self):
        for _, proc in reversed(self.started):
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 5
        for _, proc in self.started:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def log_tail(self, name):
        try:
            with open(os.path.join(self.work, f"{name}.log"), "rb") as f:
                return f.read()[-2000:].decode(errors="replace")
        except OSError:
            return ""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, procs, name, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{name} exited at start:\n{procs.log_tail(name)}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"{name} never opened port {port}:\n{procs.log_tail(name)}")


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state): utime is field 14, stime field 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def pin(pid, cpu):
    """Every thread of the process onto `cpu`."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), {cpu})


# ---------------------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------------------


def ensure_tools():
    """Installs nginx, wrk and h2load when missing (Debian/Ubuntu)."""
    missing = [t for t in ("nginx", "wrk", "h2load", "openssl") if not shutil.which(t)]
    if not missing:
        return
    packages = {"nginx": "nginx-light", "wrk": "wrk", "h2load": "nghttp2-client", "openssl": "openssl"}
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    print(f"installing {', '.join(missing)} ...", file=sys.stderr)
    subprocess.run(sudo + ["apt-get", "update", "-qq"], check=False)
    subprocess.run(
        sudo + ["apt-get", "install", "-y", "-qq"] + [packages[t] for t in missing],
        check=True,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
    )
    # The Debian package starts a system nginx on port 80; the bench does not need it.
    subprocess.run(sudo + ["systemctl", "stop", "nginx"], check=False, stderr=subprocess.DEVNULL)


def build(skip):
    if skip:
        return
    subprocess.run(
        ["cargo", "build", "--release", "-p", "portico", "-p", "portico-bench-baseline", "--bins"],
        cwd=ROOT,
        check=True,
    )


def nginx_conf(work, name, http_body):
    d = os.path.join(work, name)
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, "nginx.conf")
    with open(path, "w") as f:
        f.write(
            f"""worker_processes 1;
worker_rlimit_nofile {NOFILE};
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections {NOFILE}; }}
http {{
  access_log off;
  {http_body}
}}
"""
        )
    return ["nginx", "-c", path, "-p", d]


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def rs256_token(key_file):
    """A token Portico's jwt plugin accepts, signed with the test fixture key by openssl."""
    header = b64url(json.dumps({"alg": "RS256", "typ": "JWT"}).encode())
    claims = {"sub": "bench", "exp": int(time.time()) + 3600, "iat": int(time.time())}
    payload = b64url(json.dumps(claims).encode())
    signing_input = f"{header}.{payload}".encode()
    signature = subprocess.run(
        ["openssl", "dgst", "-sha256", "-sign", key_file],
        input=signing_input,
        capture_output=True,
        check=True,
    ).stdout
    return f"{header}.{payload}.{b64url(signature)}"


FULL_CHAIN = [
    ("jwt", "{ algorithms: [RS256], public_key_file: tests/fixtures/jwt/rsa.pub }"),
    (
        "headers",
        "{ request: { set: { x-client: '${client_ip}' } }, response: { set: { x-route: '${route}' } } }",
    ),
    ("rate_limit", "{ requests: 1000000, per: 1s, key: ip }"),
    ("canary", "{ upstream: canary, percent: 0 }"),
]


def portico_conf(path, listeners, admin, upstream, plugins):
    listen = ", ".join(
        f"{{ address: 127.0.0.1:{port}{', http2: true' if h2 else ''} }}" for port, h2 in listeners
    )
    chain = "".join(f"\n      - {name}: {body}" for name, body in plugins) or " []"
    with open(path, "w") as f:
        f.write(
            f"""server: {{ threads: 1, work_stealing: false, grace_period_seconds: 0,
          graceful_shutdown_timeout_seconds: 1 }}
listeners: [{listen}]
admin: {{ address: 127.0.0.1:{admin} }}
access_log: {{ enabled: false }}
limits: {{ keepalive_requests: 1000000 }}
upstreams:
  up: {{ endpoints: [127.0.0.1:{upstream}] }}
  canary: {{ endpoints: [127.0.0.1:{upstream}] }}
routes:
  - name: bench
    upstream: up
    plugins:{chain}
"""
        )


def plugins_available(binary, work, upstream):
    """The full-chain plugins this build has: each one tried alone with `portico -t`."""
    have = []
    for name, body in FULL_CHAIN:
        path = os.path.join(work, f"probe-{name}.yaml")
        portico_conf(path, [(free_port(), False)], free_port(), upstream, [(name, body)])
        ok = subprocess.run([binary, "-t", "-c", path], cwd=ROOT, capture_output=True).returncode == 0
        if ok:
            have.append((name, body))
    return have


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------


def on_load_cpu(argv):
    return ["taskset", "-c", str(LOAD_CPU)] + argv


def wrk(port, seconds, connections, headers=(), latency=False):
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s"]
    for h in headers:
        argv += ["-H", h]
    if latency:
        argv.append("--latency")
    argv.append(f"http://127.0.0.1:{port}/")
    text = subprocess.run(on_load_cpu(argv), capture_output=True, text=True, check=True).stdout
    return parse_wrk(text), text


def h2load(port, seconds, headers=()):
    argv = ["h2load", "-t1", "-c8", "-m8", "-D", str(seconds)]
    for h in headers:
        argv += ["-H", h]
    argv.append(f"http://127.0.0.1:{port}/")
    text = subprocess.run(on_load_cpu(argv), capture_output=True, text=True, check=True).stdout
    return parse_h2load(text), text


def throughput(targets, rounds, seconds, raw):
    """Interleaved rounds; the order rotates so no target always runs first or last."""
    samples = {t["name"]: [] for t in targets}
    for r in range(rounds):
        order = targets[r % len(targets) :] + targets[: r % len(targets)]
        for t in order:
            wrk(t["port"], 1, 64, t.get("headers", ()))  # warm-up: pools, caches, CPU frequency
            before = cpu_seconds(t["pid"])
            result, text = wrk(t["port"], seconds, 64, t.get("headers", ()))
            used = cpu_seconds(t["pid"]) - before
            result["cpu_us_per_request"] = used * 1e6 / max(1, result["requests"])
            samples[t["name"]].append(result)
            raw.append({"section": "throughput", "target": t["name"], "round": r, "output": text})
    summary = {}
    for name, runs in samples.items():
        summary[name] = {
            "rps": statistics.median(x["rps"] for x in runs),
            "cpu_us_per_request": statistics.median(x["cpu_us_per_request"] for x in runs),
            "rounds": [round(x["rps"]) for x in runs],
            "errors": sum(x["non_2xx"] + x["socket_errors"] for x in runs),
        }
    return summary


def latency(targets, seconds, raw):
    """One connection, the proxy on the load CPU too (a wake-up across vCPUs costs ~100 µs
    here: latency is never compared across the split layout)."""
    result = {}
    for t in targets:
        if t.get("pid"):
            pin(t["pid"], LOAD_CPU)
        try:
            wrk(t["port"], 1, 1, t.get("headers", ()), latency=True)
            r, text = wrk(t["port"], seconds, 1, t.get("headers", ()), latency=True)
        finally:
            if t.get("pid"):
                pin(t["pid"], PROXY_CPU)
        raw.append({"section": "latency", "target": t["name"], "output": text})
        result[t["name"]] = {"p50_us": r["p50_us"], "p99_us": r["p99_us"], "rps": r["rps"]}
    direct = result.get("direct upstream")
    if direct:
        for name, r in result.items():
            r["added_p50_us"] = r["p50_us"] - direct["p50_us"]
            r["added_p99_us"] = r["p99_us"] - direct["p99_us"]
    return result


def settle_rss(pid, seconds=3.0, quiet=2.0):
    """VmRSS once it has not moved for `quiet` seconds (allocators give memory back a little
    later: mimalloc purges after a delay, Portico collects a second after connections close)."""
    last = rss_kb(pid)
    still_since = time.monotonic()
    deadline = still_since + seconds
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = rss_kb(pid)
        if abs(now - last) >= 64:
            last, still_since = now, time.monotonic()
        elif time.monotonic() - still_since >= quiet:
            break
    return last


def idle_memory(target, count):
    """`count` keep-alive connections, one request each (one at a time, so the upstream pool
    stays small), held open; VmRSS before, while held, after they close."""
    pid, port = target["pid"], target["port"]
    request = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
    before = settle_rss(pid)
    conns = []
    try:
        for _ in range(count):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(request)
            if not s.recv(4096):
                raise RuntimeError(f"{target['name']} closed an idle connection")
            conns.append(s)
        held = settle_rss(pid)
        # Every connection still open (none closed by the proxy while we measured).
        for s in conns[:: max(1, count // 100)]:
            s.sendall(request)
            if not s.recv(4096):
                raise RuntimeError(f"{target['name']} closed an idle connection")
    finally:
        for s in conns:
            s.close()
    after = settle_rss(pid, seconds=10.0)
    return {
        "connections": count,
        "rss_before_kb": before,
        "rss_held_kb": held,
        "rss_after_kb": after,
        "kb_per_connection": (held - before) / count,
        "after_vs_before": after / before if before else 0.0,
        "closed_at": time.monotonic(),
    }


# Pingora keeps a small object per timeout a request registered until its deadline passes, even
# after the request ended (upstream read and write, body reads, HTTP/2 sends: 60 s at most with
# the bench's config); Portico collects freed memory again once they have fired
# (src/memory.rs). "After timers" is read that long after the connections closed.
TIMER_HORIZON_S = 60 + 3


def after_timers(memory):
    """Each target's VmRSS once the longest request timer has fired since its connections
    closed (the targets idle meanwhile)."""
    for name, r in memory.items():
        wait = r["closed_at"] + TIMER_HORIZON_S - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        r["rss_after_timers_kb"] = rss_kb(r.pop("pid"))
        r["after_timers_vs_before"] = r["rss_after_timers_kb"] / r["rss_before_kb"] if r["rss_before_kb"] else 0.0
        r.pop("closed_at")


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def ratio(a, b):
    return a / b if b else float("nan")


def acceptance(result):
    """Issue 14's acceptance floors, computed from this run."""
    t, checks = result.get("throughput", {}), []
    nginx, base = t.get("nginx"), t.get("pingora baseline")
    plain, full = t.get("portico"), t.get("portico full chain")

    def check(name, value, op, floor):
        ok = value >= floor if op == ">=" else value <= floor
        checks.append({"check": name, "value": round(value, 3), "floor": f"{op} {floor}", "ok": ok})

    if plain and base:
        check("portico / pingora baseline rps", ratio(plain["rps"], base["rps"]), ">=", 0.95)
    if plain and nginx:
        check("portico / nginx rps", ratio(plain["rps"], nginx["rps"]), ">=", 0.65)
        check(
            "portico / nginx CPU per request",
            ratio(plain["cpu_us_per_request"], nginx["cpu_us_per_request"]),
            "<=",
            1.5,
        )
    if full and plain:
        check("full chain / portico rps", ratio(full["rps"], plain["rps"]), ">=", 0.85)
    if full and nginx:
        check("full chain / nginx rps", ratio(full["rps"], nginx["rps"]), ">=", 0.6)
    lat = result.get("latency", {})
    if "portico" in lat and "nginx" in lat and lat["nginx"].get("added_p50_us", 0) > 0:
        check(
            "portico / nginx added latency p50",
            ratio(lat["portico"]["added_p50_us"], lat["nginx"]["added_p50_us"]),
            "<=",
            1.5,
        )
    mem = result.get("memory", {}).get("portico")
    if mem:
        check("portico KB per idle connection", mem["kb_per_connection"], "<=", 16)
        check("portico RSS after close / before", mem.get("after_timers_vs_before", mem["after_vs_before"]), "<=", 1.2)
    return checks


def print_report(result):
    t = result.get("throughput")
    if t:
        nginx = t.get("nginx", {}).get("rps", 0)
        base = t.get("pingora baseline", {}).get("rps", 0)
        ncpu = t.get("nginx", {}).get("cpu_us_per_request", 0)
        print(f"\n== throughput, HTTP/1.1: median of {result['rounds']} rounds of {result['duration']}s "
              "(proxy on CPU0; wrk -t1 -c64 and upstream on CPU1) ==")
        print(f"{'':34}{'rps':>10}{'×nginx':>9}{'×pingora':>10}{'CPU µs/req':>12}{'×nginx':>8}  rounds")
        for name, r in t.items():
            print(
                f"{name:34}{r['rps']:>10.0f}{ratio(r['rps'], nginx):>9.2f}{ratio(r['rps'], base):>10.2f}"
                f"{r['cpu_us_per_request']:>12.1f}{ratio(r['cpu_us_per_request'], ncpu):>8.2f}  {r['rounds']}"
                + (f"  ERRORS {r['errors']}" if r["errors"] else "")
            )
        print(f"full chain: {', '.join(result['full_chain']) or '(none of its plugins exist yet)'}")
    lat = result.get("latency")
    if lat:
        print(f"\n== latency, one connection, everything on CPU1 ({result['duration']}s) ==")
        print(f"{'':34}{'p50 µs':>10}{'p99 µs':>10}{'added p50':>11}{'added p99':>11}")
        for name, r in lat.items():
            print(f"{name:34}{r['p50_us']:>10.1f}{r['p99_us']:>10.1f}"
                  f"{r.get('added_p50_us', 0):>11.1f}{r.get('added_p99_us', 0):>11.1f}")
    mem = result.get("memory")
    if mem:
        n = next(iter(mem.values()))["connections"]
        print(f"\n== memory: {n} idle keep-alive connections ==")
        print(f"{'':34}{'before MB':>10}{'held MB':>10}{'KB/conn':>9}{'after MB':>10}{'after/before':>14}"
              f"{'after timers MB':>17}{'/before':>9}")
        for name, r in mem.items():
            late = r.get("rss_after_timers_kb")
            print(f"{name:34}{r['rss_before_kb'] / 1024:>10.1f}{r['rss_held_kb'] / 1024:>10.1f}"
                  f"{r['kb_per_connection']:>9.2f}{r['rss_after_kb'] / 1024:>10.1f}{r['after_vs_before']:>14.2f}"
                  + (f"{late / 1024:>17.1f}{r['after_timers_vs_before']:>9.2f}" if late else ""))
    h2 = result.get("h2c")
    if h2:
        nginx = h2.get("nginx", {}).get("rps", 0)
        print(f"\n== throughput, h2c: h2load -c8 -m8 ({result['duration']}s) ==")
        for name, r in h2.items():
            print(f"{name:34}{r['rps']:>10.0f}{ratio(r['rps'], nginx):>9.2f}"
                  f"{r['cpu_us_per_request']:>12.1f} CPU µs/req"
                  + (f"  FAILED {r['failed'] + r['non_2xx']}" if r["failed"] + r["non_2xx"] else ""))
    checks = result.get("acceptance")
    if checks:
        print("\n== issue 14 acceptance ==")
        for c in checks:
            print(f"{'ok  ' if c['ok'] else 'MISS'} {c['check']:40} {c['value']:>8} (needs {c['floor']})")


# ---------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=int, default=5, help="seconds per measured run (5)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved throughput rounds (3)")
    ap.add_argument("--idle", type=int, default=10000, help="idle connections for memory (10000)")
    ap.add_argument("--json", default=os.path.join(ROOT, "target", "bench", "latest.json"))
    ap.add_argument("--skip-build", action="store_true", help="use the binaries already built")
    ap.add_argument("--only", nargs="+", choices=["throughput", "latency", "memory", "h2c"])
    ap.add_argument("--parse-samples", metavar="DIR", help="print the parsed samples as JSON, and exit")
    args = ap.parse_args()

    if args.parse_samples:
        print(json.dumps(parse_samples(args.parse_samples), indent=1, sort_keys=True))
        return
    if len(os.sched_getaffinity(0)) < 2 and os.cpu_count() < 2:
        sys.exit("the bench needs two CPUs (one for the proxy, one for the load)")
    sections = set(args.only or ["throughput", "latency", "memory", "h2c"])

    ensure_tools()
    build(args.skip_build)
    portico = os.path.join(ROOT, "target", "release", "portico")
    baseline = os.path.join(ROOT, "target", "release", "pingora-baseline")
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))
    if NOFILE < args.idle + 1000:
        sys.exit(f"{args.idle} idle connections need more open files than the limit ({NOFILE}): use --idle")
    os.sched_setaffinity(0, {LOAD_CPU})

    work = tempfile.mkdtemp(prefix="portico-bench.")
    procs = Processes(work)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    started = time.monotonic()
    try:
        ports = {k: free_port() for k in ("up", "nginx", "nginx_h2", "base", "plain", "plain_h2",
                                          "plain_admin", "full", "full_admin")}
        up = procs.start(
            "upstream",
            nginx_conf(work, "upstream", f"server {{ listen 127.0.0.1:{ports['up']}; "
                       "keepalive_requests 1000000; location / { return 200 'ok'; } }"),
            LOAD_CPU,
        )
        wait_port(ports["up"], up, procs, "upstream")
        full_chain = plugins_available(portico, work, ports["up"])

        nginx = procs.start(
            "nginx",
            nginx_conf(work, "proxy", f"""upstream up {{ server 127.0.0.1:{ports['up']}; keepalive 64; }}
  server {{ listen 127.0.0.1:{ports['nginx']}; keepalive_requests 1000000;
    location / {{ proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ''; }} }}
  server {{ listen 127.0.0.1:{ports['nginx_h2']} http2; keepalive_requests 1000000;
    location / {{ proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ''; }} }}"""),
            PROXY_CPU,
        )
        base = procs.start("baseline", [baseline, f"127.0.0.1:{ports['base']}", f"127.0.0.1:{ports['up']}"],
                           PROXY_CPU, env={**os.environ, "RUST_LOG": "error"})
        portico_conf(os.path.join(work, "plain.yaml"), [(ports["plain"], False), (ports["plain_h2"], True)],
                     ports["plain_admin"], ports["up"], [])
        portico_conf(os.path.join(work, "full.yaml"), [(ports["full"], False)], ports["full_admin"],
                     ports["up"], full_chain)
        env = {**os.environ, "RUST_LOG": "warn"}
        plain = procs.start("portico", [portico, "-c", os.path.join(work, "plain.yaml")], PROXY_CPU, env)
        full = procs.start("portico-full", [portico, "-c", os.path.join(work, "full.yaml")], PROXY_CPU, env)
        for name, port, proc in (("nginx", "nginx", nginx), ("baseline", "base", base),
                                 ("portico", "plain", plain), ("portico-full", "full", full)):
            wait_port(ports[port], proc, procs, name)
        # nginx's master forks the worker that does the work: measure the worker.
        deadline = time.monotonic() + 10
        while not children(nginx.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        nginx_worker = children(nginx.pid)[0]

        headers = []
        if any(name == "jwt" for name, _ in full_chain):
            headers = [f"Authorization: Bearer {rs256_token(os.path.join(ROOT, 'tests/fixtures/jwt/rsa.key'))}"]
        targets = [
            {"name": "nginx", "port": ports["nginx"], "pid": nginx_worker},
            {"name": "pingora baseline", "port": ports["base"], "pid": base.pid},
            {"name": "portico", "port": ports["plain"], "pid": plain.pid},
            {"name": "portico full chain", "port": ports["full"], "pid": full.pid, "headers": headers},
        ]
        # The full chain must answer 200 (a 401 from a bad token would measure the wrong thing).
        check, _ = wrk(ports["full"], 1, 1, headers)
        if check["non_2xx"]:
            sys.exit(f"the full-chain config does not answer 200:\n{procs.log_tail('portico-full')}")

        result = {
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "duration": args.duration,
            "rounds": args.rounds,
            "full_chain": [name for name, _ in full_chain],
            "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                  capture_output=True, text=True).stdout.strip(),
        }
        raw = []
        if "throughput" in sections:
            direct, text = wrk(ports["up"], args.duration, 64)
            raw.append({"section": "throughput", "target": "direct upstream", "output": text})
            result["direct_upstream_rps"] = direct["rps"]
            result["throughput"] = throughput(targets, args.rounds, args.duration, raw)
        if "latency" in sections:
            result["latency"] = latency(
                [{"name": "direct upstream", "port": ports["up"]}] + targets, args.duration, raw
            )
        if "memory" in sections:
            # Portico first: its timers' wait overlaps the other two measurements.
            order = [targets[2], targets[0], targets[1]]
            result["memory"] = {t["name"]: dict(idle_memory(t, args.idle), pid=t["pid"]) for t in order}
            after_timers(result["memory"])
        if "h2c" in sections:
            result["h2c"] = {}
            for name, port, pid in (("nginx", ports["nginx_h2"], nginx_worker),
                                    ("portico", ports["plain_h2"], plain.pid)):
                h2load(port, 1)  # warm-up
                before = cpu_seconds(pid)
                r, text = h2load(port, args.duration)
                r["cpu_us_per_request"] = (cpu_seconds(pid) - before) * 1e6 / max(1, r["requests"])
                result["h2c"][name] = r
                raw.append({"section": "h2c", "target": name, "output": text})
        result["acceptance"] = acceptance(result)
        result["elapsed_seconds"] = round(time.monotonic() - started, 1)
        print_report(result)
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({**result, "raw": raw}, f, indent=1)
        print(f"\n{result['elapsed_seconds']}s; results in {args.json}")
    finally:
        procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
