"""A hostile tenant against `adapterkit serve`, while another tenant runs steady traffic.

    python bench/serve_hostile.py            # about 2 minutes on 2 CPU cores
    python bench/serve_hostile.py --quick    # smoke run

The server (bundled MiniLM, keys for tenants acme and globex) runs on 127.0.0.1 in a subprocess.
Globex, the victim, sends single-text classify requests in a closed loop the whole time: first
alone (its baseline), then while acme sends each attack of issue 15 in turn — a backtracking target
pattern, labels as a dict, a huge head and rank, a zip bomb, NaN weights, a failing install followed
by a valid one, 200 MB chunked bodies with and without a key, half-open connections, a rank-384
adapter under traffic, DELETE/PUT races. Writes bench/results/serve_hostile.json:
    victim_error_rate          failed victim requests during the attacks (target 0)
    victim_p99_ratio           victim p99 under attack / victim p99 alone (target <= 1.5)
    max_rss_growth_mb          server RSS during the attacks over its RSS before (target <= 200)
    server_alive               /healthz answers at the end
    stale_answers_after_delete answers from deleted weights after the DELETE returned (target 0)
and each attack's status codes, so a regression shows which attack it was.
"""

from __future__ import annotations

import argparse
import bisect
import io
import json
import multiprocessing
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import httpx  # noqa: E402
import psutil  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import free_port, percentile, start_server  # noqa: E402

import adapterkit as ak  # noqa: E402
from adapterkit.serve.testing import load_minilm, make_adapter, tar_bytes  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "serve_hostile.json"
KEYS = {"key-acme-0001": {"tenant": "acme"}, "key-globex-001": {"tenant": "globex"}}
ACME = {"X-API-Key": "key-acme-0001"}
GLOBEX = {"X-API-Key": "key-globex-001"}


def victim_loop(url: str, stop, out) -> None:
    """Globex's steady traffic, in a process of its own (as another tenant's client would be), so that
    the attacker's client threads here do not hold its GIL: (start, latency, status) per request."""
    log = []
    with httpx.Client(timeout=30) as client:
        client.post(f"{url}/v1/classify", headers=GLOBEX, json={"adapter": "victim", "inputs": ["warm up"]})
        out.put("ready")
        while not stop.is_set():
            sent = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process on the machine
            start = time.perf_counter()
            try:
                status = client.post(f"{url}/v1/classify", headers=GLOBEX,
                                     json={"adapter": "victim", "inputs": ["the service was friendly"]}).status_code
            except httpx.HTTPError:
                status = 0
            log.append((sent, time.perf_counter() - start, status))
            time.sleep(0.01)
    out.put(log)


class Victim:
    """The victim process, and the phases it ran through (each request belongs to the phase it began in)."""

    def __init__(self, url: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.stop, self.queue = ctx.Event(), ctx.Queue()
        self.proc = ctx.Process(target=victim_loop, args=(url, self.stop, self.queue), daemon=True)
        self.phases: list[tuple[float, str]] = [(0.0, "alone")]
        self.log: list[tuple[str, float, int]] = []

    @property
    def phase(self) -> str:
        return self.phases[-1][1]

    @phase.setter
    def phase(self, name: str) -> None:
        self.phases.append((time.monotonic(), name))

    def start(self) -> None:
        self.proc.start()
        assert self.queue.get(timeout=120) == "ready"
        self.phases = [(time.monotonic(), "alone")]

    def finish(self) -> None:
        self.stop.set()
        raw = self.queue.get(timeout=60)
        self.proc.join(30)
        starts = [t for t, _ in self.phases]
        self.log = [(self.phases[max(0, bisect.bisect_right(starts, sent) - 1)][1], lat, status) for sent, lat, status in raw]


class RSS(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.proc, self.samples, self.phase, self.stop = psutil.Process(pid), [], "alone", threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.samples.append((self.phase, self.proc.memory_info().rss))
            except psutil.Error:
                return
            time.sleep(0.05)


def upload(client: httpx.Client, name: str, data: bytes, kind: str = "application/x-tar") -> int:
    return client.put(f"/v1/adapters/{name}", content=data, headers={**ACME, "content-type": kind}).status_code


def changed(files: dict[str, bytes], change) -> bytes:
    manifest = json.loads(files["adapter.json"])
    change(manifest)
    return tar_bytes({**files, "adapter.json": json.dumps(manifest).encode()})


def chunked_post(url: str, headers: dict, megabytes: int) -> tuple[int, int]:
    sent = [0]

    def body():
        for _ in range(megabytes):
            sent[0] += 1
            yield b"0" * (1 << 20)

    try:
        status = httpx.post(f"{url}/v1/classify", content=body(), headers=headers, timeout=60).status_code
    except httpx.HTTPError:
        status = 0  # the server hung up on the body
    return status, sent[0]


def half_open(url_port: int, count: int, wait_s: float) -> int:
    """Open `count` connections that never finish their headers; how many the server closed by `wait_s`."""
    socks = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", url_port), timeout=5)
        s.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\n")
        socks.append(s)
    time.sleep(wait_s)
    closed = 0
    for s in socks:
        s.settimeout(0.2)
        try:
            closed += s.recv(1) == b""
        except (TimeoutError, OSError):
            pass
        s.close()
    return closed


def delete_race(client: httpx.Client, url: str, files: dict[str, bytes], rounds: int) -> tuple[int, int]:
    """One client's traffic on "flip" while it is deleted and uploaded again; answers from deleted versions after a
    DELETE returned are stale. Then PUT and DELETE race; afterwards the adapter is either gone or serves."""
    stale, inconsistent = 0, 0
    for _ in range(rounds):
        assert upload(client, "flip", tar_bytes(files)) == 201
        old = client.get("/v1/adapters/flip", headers=ACME).json()["version"]
        deleted_at = [None]
        answers = []
        stop = threading.Event()

        def hammer(stop: threading.Event = stop, answers: list = answers) -> None:
            with httpx.Client(base_url=url, timeout=30) as c:
                while not stop.is_set():
                    sent = time.monotonic()
                    r = c.post("/v1/classify", headers=ACME, json={"adapter": "flip", "inputs": ["x"]})
                    answers.append((sent, r.status_code, r.json().get("version") if r.status_code == 200 else None))

        threads = [threading.Thread(target=hammer)]  # one client of acme, as the victim is one of globex
        for t in threads:
            t.start()
        time.sleep(0.3)
        assert client.delete("/v1/adapters/flip", headers=ACME).status_code == 200
        deleted_at[0] = time.monotonic()
        upload(client, "flip", tar_bytes(files))
        time.sleep(0.3)
        stop.set()
        for t in threads:
            t.join(30)
        stale += sum(1 for sent, status, version in answers if sent > deleted_at[0] and version == old)
        put = threading.Thread(target=upload, args=(client, "flip", tar_bytes(files)))
        put.start()
        client.delete("/v1/adapters/flip", headers=ACME)
        put.join(60)
        record = client.get("/v1/adapters/flip", headers=ACME)
        if record.status_code == 200:
            served = client.post("/v1/classify", headers=ACME, json={"adapter": "flip", "inputs": ["x"]})
            inconsistent += not record.json()["versions"] or served.status_code != 200
        client.delete("/v1/adapters/flip", headers=ACME)
    return stale, inconsistent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    alone_s, rounds = (5, 2) if args.quick else (20, 10)
    work = Path(tempfile.mkdtemp(prefix="adapterkit-hostile-"))
    builder = ak.adapt(load_minilm())
    victim = make_adapter(builder, "victim", work / "src" / "victim", seed=1, scale=0.3)
    good = make_adapter(builder, "good", work / "src" / "good", seed=2, scale=0.3)
    big = make_adapter(builder, "big", work / "src" / "big", config=ak.LoRA(r=384, targets=["query", "value"]),
                       seed=3, scale=0.01)
    files = {f.name: f.read_bytes() for f in good.iterdir()}
    big_files = {f.name: f.read_bytes() for f in big.iterdir()}
    nan = load_file(good / "adapter.safetensors")
    key = next(iter(nan))
    nan[key] = nan[key].clone().fill_(float("nan"))
    save_file(nan, work / "nan.safetensors")
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for k, v in files.items():
            zf.writestr(k, v)
        with zf.open("padding.txt", "w", force_zip64=True) as member:  # 1 GiB of zeros, written in pieces
            for _ in range(1024):
                member.write(bytes(1 << 20))

    keys = work / "keys.json"
    keys.write_text(json.dumps(KEYS))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(work / "store", port, threads=2, max_batch=32, max_wait_ms=5, extra=("--keys", str(keys)))
    results: dict = {"attacks": {}}
    try:
        with httpx.Client(base_url=url, timeout=120) as client:
            assert client.put("/v1/adapters/victim", content=tar_bytes({f.name: f.read_bytes() for f in victim.iterdir()}),
                              headers={**GLOBEX, "content-type": "application/x-tar"}).status_code == 201
            rss, traffic = RSS(proc.pid), Victim(url)
            rss.start()
            traffic.start()
            time.sleep(alone_s)
            # the floor: the same victim beside one benign acme client on an ordinary adapter
            traffic.phase = rss.phase = "benign_peer"
            assert upload(client, "peer", tar_bytes(files)) == 201
            stop_peer = threading.Event()

            def peer() -> None:
                with httpx.Client(base_url=url, timeout=30) as c:
                    while not stop_peer.is_set():
                        c.post("/v1/classify", headers=ACME, json={"adapter": "peer", "inputs": ["x"]})

            peer_thread = threading.Thread(target=peer)
            peer_thread.start()
            time.sleep(alone_s)
            stop_peer.set()
            peer_thread.join(30)
            attacks = results["attacks"]
            t0 = time.perf_counter()
            traffic.phase = rss.phase = "backtracking_pattern"
            attacks["backtracking_pattern"] = upload(client, "regex", changed(
                files, lambda m: m["config"].update(targets=["re:(.|\\w)*Q"])))
            attacks["backtracking_pattern_s"] = round(time.perf_counter() - t0, 2)
            traffic.phase = rss.phase = "labels_dict"
            attacks["labels_dict"] = upload(client, "labels", changed(files, lambda m: m.update(labels={"a": 0})))
            traffic.phase = rss.phase = "huge_head"
            attacks["huge_head"] = upload(client, "head", changed(
                files, lambda m: (m.update(labels=None), m.update(head={"num_labels": 3_000_000}))))
            traffic.phase = rss.phase = "huge_rank"
            attacks["huge_rank"] = upload(client, "rank", changed(files, lambda m: m["config"].update(r=50000)))
            traffic.phase = rss.phase = "zip_bomb_1gib"
            attacks["zip_bomb_1gib"] = upload(client, "bomb", bomb.getvalue(), "application/zip")
            traffic.phase = rss.phase = "nan_weights"
            attacks["nan_weights"] = upload(client, "nan", tar_bytes({**files, "adapter.safetensors":
                                                                       (work / "nan.safetensors").read_bytes()}))
            traffic.phase = rss.phase = "meta_5_then_valid"
            attacks["meta_5_then_valid"] = [upload(client, "meta", changed(files, lambda m: m.update(meta=5))),
                                            upload(client, "meta", tar_bytes(files))]
            traffic.phase = rss.phase = "chunked_200mb_no_key"
            attacks["chunked_200mb_no_key"] = chunked_post(url, {"content-type": "application/json"}, 200)
            traffic.phase = rss.phase = "chunked_200mb_with_key"
            attacks["chunked_200mb_with_key"] = chunked_post(url, {**ACME, "content-type": "application/json"}, 200)
            traffic.phase = rss.phase = "half_open_closed_of_50"
            attacks["half_open_closed_of_50"] = half_open(port, 50, 12.0 if not args.quick else 11.0)
            traffic.phase = rss.phase = "rank_384_upload"
            attacks["rank_384_upload"] = upload(client, "big", tar_bytes(big_files))
            traffic.phase = rss.phase = "rank_384_traffic"
            for _ in range(40 if not args.quick else 10):
                client.post("/v1/classify", headers=ACME, json={"adapter": "big", "inputs": ["x"] * 4})
            traffic.phase = rss.phase = "delete_put_race"
            stale, inconsistent = delete_race(client, url, files, rounds)
            attacks["delete_put_rounds"], attacks["delete_put_inconsistent"] = rounds, inconsistent
            results["stale_answers_after_delete"] = stale
            traffic.finish()
            rss.stop.set()
            alive = client.get("/healthz", timeout=10).status_code == 200
    finally:
        proc.terminate()
        proc.wait(30)
    alone = [lat for phase, lat, status in traffic.log if phase == "alone" and status == 200]
    attacked = [(lat, status) for phase, lat, status in traffic.log if phase not in ("alone", "benign_peer")]
    peer_side = [lat for phase, lat, status in traffic.log if phase == "benign_peer" and status == 200]
    quiet = [lat for phase, lat, status in traffic.log
             if phase not in ("alone", "benign_peer", "rank_384_traffic", "delete_put_race")]
    by_attack: dict[str, list[float]] = {}
    for phase, lat, _ in traffic.log:
        by_attack.setdefault(phase, []).append(lat)
    base_rss = statistics.median(r for phase, r in rss.samples if phase == "alone")
    results.update({
        "victim_requests": {"alone": len(alone), "attack": len(attacked)},
        "victim_error_rate": sum(s != 200 for _, s in attacked) / max(1, len(attacked)),
        "victim_p99_alone_ms": round(1000 * percentile(alone, 99), 1),
        "victim_p99_attack_ms": round(1000 * percentile([lat for lat, _ in attacked], 99), 1),
        "max_rss_growth_mb": round((max(r for phase, r in rss.samples if phase not in ("alone", "benign_peer")) - base_rss) / 2**20, 1),
        "server_alive": alive,
        "victim_p99_ms_by_phase": {k: round(1000 * percentile(v, 99), 1) for k, v in by_attack.items()},
    })
    results["victim_p99_ratio"] = round(results["victim_p99_attack_ms"] / results["victim_p99_alone_ms"], 3)
    # Two phases have acme send real traffic (its rank-384 adapter; the adapter it deletes and uploads
    # again): beside that the victim shares the model thread with a peer, as it does with a benign one.
    results["victim_p99_ratio_vs_benign_peer"] = round(
        results["victim_p99_attack_ms"] / (1000 * percentile(peer_side, 99)), 3)
    results["victim_p99_ratio_attacks_without_traffic"] = round(
        1000 * percentile(quiet, 99) / results["victim_p99_alone_ms"], 3)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
