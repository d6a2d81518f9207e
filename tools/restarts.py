#!/usr/bin/env python3
"""Restart the nodes of a small mesh one at a time and time how soon each is back.

usage: restarts.py [ROUNDS]   (default 1; 6 restarts a round)
Environment: MESHWORK (the binary, default target/release/meshwork), MIN and MAX
(--min-peers/--max-peers, default 2 and 4), RUN (logs, default /tmp/restarts).
Starts 8 `meshwork node` processes on 127.0.0.1 (peers on 12000+i, admin on 13000+i:
below the ephemeral port range, away from meshscale.py's 17000/19000), node 1 serving
the demo service, node i seeded with node i-1 (every third with node 0). Each round
stops nodes 3, 5, 6, 4, 7, 2 in turn (kill -9 and POST /shutdown alternately), starts
each again a second later (a fresh id: no --key) and prints how long after its start
it had its first peer, its first RPC answer from node 1's service and its first
broadcast taken; `{}` means none of them within 20 s. docs/testing.md has figures.
"""
import json, os, signal, subprocess, sys, time, urllib.request

BIN = os.environ.get("MESHWORK", "target/release/meshwork")
RUN = os.environ.get("RUN", "/tmp/restarts")
P, A, N = 12000, 13000, 8


def http(method, url, body=None, timeout=3):
    req = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, None
    except Exception as e:  # noqa: BLE001
        return 0, {"_error": str(e)}


procs = {}


def start(i):
    args = [BIN, "node", "--listen", f"tcp://127.0.0.1:{P + i}", "--admin", f"127.0.0.1:{A + i}",
            "--min-peers", os.environ.get("MIN", "2"), "--max-peers", os.environ.get("MAX", "4")]
    if i:
        args += ["--seed", f"tcp://127.0.0.1:{P + (i - 1 if i % 3 else 0)}"]
    if i == 1:
        args += ["--serve-demo"]
    procs[i] = subprocess.Popen(args, stdout=open(f"{RUN}/n{i}.log", "ab"), stderr=subprocess.STDOUT)
    deadline = time.time() + 10
    while http("GET", f"http://127.0.0.1:{A + i}/status")[0] != 200:
        if time.time() > deadline:
            raise RuntimeError(f"node {i} did not start (see {RUN}/n{i}.log)")
        time.sleep(0.01)


def main():
    os.makedirs(RUN, exist_ok=True)
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    alone = total = 0
    try:
        for i in range(N):
            start(i)
        time.sleep(3)
        for r in range(rounds):
            for k, i in enumerate([3, 5, 6, 4, 7, 2]):
                how = ["kill", "shutdown"][k % 2]
                if how == "kill":
                    procs[i].send_signal(signal.SIGKILL)
                else:
                    http("POST", f"http://127.0.0.1:{A + i}/shutdown")
                procs[i].wait(timeout=15)
                time.sleep(1)
                t0 = time.time()
                start(i)
                first = {}
                while time.time() - t0 < 20 and len(first) < 3:
                    now = time.time() - t0
                    c, st = http("GET", f"http://127.0.0.1:{A + i}/status")
                    if c == 200 and st["pool"]["connected"] > 0:
                        first.setdefault("peer", now)
                    if http("POST", f"http://127.0.0.1:{A + i}/rpc/demo/echo", b'["x"]')[0] == 200:
                        first.setdefault("rpc", now)
                    if http("POST", f"http://127.0.0.1:{A + i}/broadcast", b"x")[0] == 200:
                        first.setdefault("broadcast", now)
                    time.sleep(0.02)
                total += 1
                alone += "peer" not in first
                print(f"round {r} node {i} {how:8}", {k: round(v, 2) for k, v in first.items()}, flush=True)
    finally:
        for p in procs.values():
            p.kill()
    print(f"{alone} of {total} restarted nodes had no peer within 20 s")


if __name__ == "__main__":
    main()
