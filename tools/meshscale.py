#!/usr/bin/env python3
"""Drive a mesh of real `meshwork node` processes on loopback and measure it.

usage: meshscale.py SCENARIO N [--min A --max B] [--seeds one|three|chain] [--keys] [--idle MIN]
SCENARIO: form (formation only), churn, partition, all (docs/testing.md says what each does).
Environment: MESHWORK (the binary, default target/release/meshwork), RUN (the directory for
logs and key files, default /tmp/meshscale), BASE (added to the ports 17000+i and 19000+i).
Node i listens on 127.0.0.1; every process started is killed at the end (also on SIGTERM).
"""
import argparse, collections, json, os, random, signal, subprocess, sys, threading, time, urllib.request

BIN = os.environ.get("MESHWORK", "target/release/meshwork")
RUN = os.environ.get("RUN", "/tmp/meshscale")
BASE = int(os.environ.get("BASE", "0"))  # added to the ports: 17000+i (peers), 19000+i (admin)
T0 = time.time()


def log(*a):
    print(f"[{time.time() - T0:7.1f}s]", *a, flush=True)


def http(method, url, body=None, timeout=5):
    req = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read() or b"null")
    except Exception as e:  # noqa: BLE001
        return {"_error": str(e)}


class Mesh:
    def __init__(self, n, mn, mx, seeds, keys):
        self.n, self.mn, self.mx, self.seeds_mode, self.keys = n, mn, mx, seeds, keys
        self.procs, self.ids, self.dead_ids = {}, {}, set()
        os.makedirs(RUN, exist_ok=True)

    def seed_of(self, i):
        return {"one": [0] if i else [], "three": [s for s in (0, 1, 2) if s != i],
                "chain": [i - 1] if i else []}[self.seeds_mode]

    def start(self, i):
        args = [BIN, "node", "--listen", f"tcp://127.0.0.1:{BASE + 17000 + i}", "--admin", f"127.0.0.1:{BASE + 19000 + i}"]
        if self.mn is not None:
            args += ["--min-peers", str(self.mn), "--max-peers", str(self.mx)]
        if self.keys:
            args += ["--key", f"{RUN}/n{i}.key"]
        for s in self.seed_of(i):
            args += ["--seed", f"tcp://127.0.0.1:{BASE + 17000 + s}"]
        f = open(f"{RUN}/n{i}.log", "ab")
        self.procs[i] = subprocess.Popen(args, stdout=f, stderr=f)
        for _ in range(200):
            st = http("GET", f"http://127.0.0.1:{BASE + 19000 + i}/status", timeout=1)
            if "node_id" in st:
                if i in self.ids and self.ids[i] != st["node_id"]:
                    self.dead_ids.add(self.ids[i])
                self.ids[i] = st["node_id"]
                self.dead_ids.discard(st["node_id"])
                return
            time.sleep(0.05)
        raise RuntimeError(f"node {i} did not start")

    def kill9(self, i):
        p = self.procs.pop(i)
        p.send_signal(signal.SIGKILL)
        p.wait()
        if not self.keys:
            self.dead_ids.add(self.ids[i])

    def shutdown(self, i):
        http("POST", f"http://127.0.0.1:{BASE + 19000 + i}/shutdown", b"")
        self.procs.pop(i).wait(timeout=30)
        if not self.keys:
            self.dead_ids.add(self.ids[i])

    def stop_all(self):
        for p in self.procs.values():
            p.send_signal(signal.SIGKILL)
        for p in self.procs.values():
            p.wait()
        self.procs.clear()

    def statuses(self):
        out = {}

        def get(i):
            out[i] = http("GET", f"http://127.0.0.1:{BASE + 19000 + i}/status")

        ts = [threading.Thread(target=get, args=(i,)) for i in list(self.procs)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        return out

    def analyze(self):
        sts = self.statuses()
        id2i = {self.ids[i]: i for i in self.procs}
        adj, bad, dead_listed = {}, [], {}
        for i, st in sts.items():
            if "_error" in st:
                bad.append(i)
                continue
            adj[i] = {id2i[p["node_id"]] for p in st["peers"]
                      if p["state"] in ("connected", "unresponsive") and p.get("via") is None
                      and p["node_id"] in id2i}
            d = [p["node_id"][:8] + ":" + p["state"] for p in st["peers"] if p["node_id"] in self.dead_ids]
            if d:
                dead_listed[i] = d
        asym = [(a, b) for a in adj for b in adj[a] if b in adj and a not in adj[b]]
        und = {i: {j for j in s if j in adj and i in adj[j]} for i, s in adj.items()}
        seen, comps = set(), []
        for i in und:
            if i not in seen:
                comp, todo = set(), [i]
                while todo:
                    x = todo.pop()
                    if x not in comp:
                        comp.add(x)
                        todo.extend(und[x] - comp)
                seen |= comp
                comps.append(comp)
        diam = 0
        if len(comps) == 1:
            for s in und:
                dist, q = {s: 0}, collections.deque([s])
                while q:
                    x = q.popleft()
                    for y in und[x]:
                        if y not in dist:
                            dist[y] = dist[x] + 1
                            q.append(y)
                diam = max(diam, max(dist.values()))
        mn, mx = self.mn or 4, self.mx or 16
        deg = {i: len(s) for i, s in adj.items()}
        return {"deg": deg, "short": [i for i, d in deg.items() if d < mn],
                "over": [i for i, d in deg.items() if d > mx], "asym": asym,
                "comps": sorted(len(c) for c in comps), "diam": diam, "bad": bad,
                "dead_listed": dead_listed, "sts": sts}

    def wait_healthy(self, what, timeout=120, dead_gone=True):
        t, a, first = time.time(), None, ""
        while time.time() - t < timeout:
            a = self.analyze()
            if (not a["short"] and not a["over"] and not a["asym"] and len(a["comps"]) == 1
                    and not a["bad"] and (not dead_gone or not a["dead_listed"])):
                if time.time() - t > 5:
                    log(f"{what}: 5 s after the start of the wait it was " + first)
                log(f"{what}: OK after {time.time() - t:.1f}s; " + summary(a))
                return time.time() - t, a
            if time.time() - t < 5:
                first = summary(a)
            time.sleep(0.5)
        log(f"{what}: NOT OK after {timeout}s; " + summary(a))
        return None, a

    def broadcast(self, frm=None):
        frm = frm if frm is not None else min(self.procs)
        body = f"bc-{time.time():.6f}"
        r = http("POST", f"http://127.0.0.1:{BASE + 19000 + frm}/broadcast", body.encode())
        time.sleep(3)
        counts = {}
        for i in self.procs:
            if i != frm:
                ev = http("GET", f"http://127.0.0.1:{BASE + 19000 + i}/events")
                counts[i] = sum(1 for e in ev.get("events", []) if e["payload"] == body)
        miss = [i for i, c in counts.items() if c == 0]
        dup = [i for i, c in counts.items() if c > 1]
        log(f"broadcast from {frm} {r}: {len(counts) - len(miss)}/{len(counts)} got it; missing {miss}; duplicated {dup}")
        return miss, dup

    def block_groups(self, groups, verb="block"):
        for g in groups:
            for h in groups:
                if h is not g:
                    for i in g:
                        for j in h:
                            http("POST", f"http://127.0.0.1:{BASE + 19000 + i}/peers/{self.ids[j]}/{verb}", b"")

    def resources(self):
        rows = []
        for i, p in self.procs.items():
            with open(f"/proc/{p.pid}/stat") as f:
                fs = f.read().rsplit(")", 1)[1].split()
            rows.append((i, int(fs[11]) + int(fs[12]), int(fs[21]) * 4, int(fs[17]),
                         len(os.listdir(f"/proc/{p.pid}/fd"))))
        return rows


def summary(a):
    if a is None:
        return "-"
    d = sorted(a["deg"].values())
    s = (f"nodes={len(d)} deg min/med/mean/max={d[0]}/{d[len(d) // 2]}/{sum(d) / len(d):.1f}/{d[-1]}"
         f" comps={a['comps']} diam={a['diam']} hist={dict(sorted(collections.Counter(d).items()))}")
    for k in ("short", "over", "asym", "bad"):
        if a[k]:
            s += f" {k.upper()}={a[k][:10]}"
    if a["dead_listed"]:
        most = max(a["dead_listed"].items(), key=lambda kv: len(kv[1]))
        states = collections.Counter(x.rsplit(":", 1)[1] for d in a["dead_listed"].values() for x in d)
        s += (f" DEAD_LISTED on {len(a['dead_listed'])} nodes ({dict(sorted(states.items()))}),"
              f" most on node {most[0]}: {len(most[1])} {most[1][:4]}")
    return s + " seeds=" + ",".join(f"{i}:{a['deg'][i]}" for i in (0, 1, 2) if i in a["deg"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("scenario", choices=["form", "churn", "partition", "all"])
    ap.add_argument("n", type=int)
    ap.add_argument("--min", type=int)
    ap.add_argument("--max", type=int)
    ap.add_argument("--seeds", default="one", choices=["one", "three", "chain"])
    ap.add_argument("--keys", action="store_true")
    ap.add_argument("--idle", type=float, default=0.0, help="minutes of idle monitoring at the end")
    o = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # so that `finally` stops the nodes
    m, rnd = Mesh(o.n, o.min, o.max, o.seeds, o.keys), random.Random(1)
    try:
        log(f"start {o.n} nodes min/max={o.min}/{o.max} seeds={o.seeds} keys={o.keys}")
        for i in range(o.n):
            m.start(i)
        log("all started")
        m.wait_healthy("formation", 180)
        time.sleep(10)
        log("10 s later: " + summary(m.analyze()))
        m.broadcast()
        if o.scenario in ("churn", "all"):
            for wave, how in enumerate(["kill -9", "shutdown", "kill -9"]):
                victims = sorted(rnd.sample(sorted(m.procs), int(o.n * 0.25)))
                log(f"wave {wave}: {how} {len(victims)} nodes {victims}")
                for v in victims:
                    (m.kill9 if how == "kill -9" else m.shutdown)(v)
                m.wait_healthy(f"wave {wave} survivors pools+graph", 120, dead_gone=False)
                m.wait_healthy(f"wave {wave} dead ids gone", 30)
                m.broadcast()
                for v in victims:
                    m.start(v)
                m.wait_healthy(f"wave {wave} restarted", 180, dead_gone=False)
                m.broadcast()
        if o.scenario in ("partition", "all"):
            for k in (2, 3):
                idx = sorted(m.procs)
                rnd.shuffle(idx)
                groups = [idx[g::k] for g in range(k)]
                log(f"partition into {k} groups of {[len(g) for g in groups]}")
                m.block_groups(groups)
                time.sleep(30)
                log("partitioned 30 s: " + summary(m.analyze()))
                m.block_groups(groups, "unblock")
                m.wait_healthy(f"heal of {k} groups", 300, dead_gone=False)
                m.broadcast()
        if o.idle:
            r0, t0 = {r[0]: r for r in m.resources()}, time.time()
            sizes0 = {i: os.path.getsize(f"{RUN}/n{i}.log") for i in m.procs}
            log("idle start: rss KiB max", max(r[2] for r in r0.values()), "threads max",
                max(r[3] for r in r0.values()), "fds max", max(r[4] for r in r0.values()))
            end = time.time() + o.idle * 60
            while time.time() < end:
                time.sleep(min(240, end - time.time()))
                r1 = m.resources()
                cpu = sorted((r[1] - r0[r[0]][1]) / (time.time() - t0) for r in r1)  # ticks/s = % of a core
                rss = sorted(r[2] for r in r1)
                log(f"idle {(time.time() - t0) / 60:.1f} min: cpu% med/max={cpu[len(cpu) // 2]:.2f}/{cpu[-1]:.2f}"
                    f" rss KiB min/med/max={rss[0]}/{rss[len(rss) // 2]}/{rss[-1]}"
                    f" threads max={max(r[3] for r in r1)} fds min/max={min(r[4] for r in r1)}/{max(r[4] for r in r1)}")
                log("idle graph: " + summary(m.analyze()))
            lines = {}
            for i in m.procs:
                with open(f"{RUN}/n{i}.log", "rb") as f:
                    f.seek(sizes0[i])
                    for ln in f.read().splitlines():
                        key = b" ".join(ln.split()[1:4])[:90]
                        lines[key] = lines.get(key, 0) + 1
            tot = sum(lines.values())
            log(f"log lines while idle: {tot}, {tot / len(m.procs) / o.idle:.2f} per node-minute; top:",
                sorted(lines.items(), key=lambda kv: -kv[1])[:8])
            m.broadcast()
    finally:
        m.stop_all()
        log("stopped")


if __name__ == "__main__":
    main()
