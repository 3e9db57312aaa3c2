"""Gateways without engines in front of workers: separate processes on loopback, one Redis
(quotas, cache, registry) and one PostgreSQL (accounts, ledger).

Four workers serve demo-chat with a small KV cache each (41 blocks of 128 tokens), so that
a worker holds its quarter of the conversations of the affinity test, not all of them;
three gateways hold no engines: two route with prefix affinity, one round-robin (the
baseline).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import re
import secrets
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import httpx
import openai
import psutil
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from billing.pricing import device_cost
from tests.conftest import (
    Collector,
    Deployment,
    Gateway,
    free_port,
    start_gateway,
    stop_gateway,
    wait_ready,
)
from tests.gateway.test_crash import ledger_ids
from tests.support.admin import Admin
from tests.support.waits import events_of
from tests.support.workers import (
    WorkerProcess,
    kill_worker,
    start_worker,
    stop_worker,
    wait_worker,
)

MODELS = """
[[models]]
name = "demo-chat"
source = "{data_dir}/models/demo-chat"
kind = "chat"

[models.engine]
max_model_len = 4096
dtype = "float32"
kv_cache_gb = 0.01
max_num_seqs = 64
extra = { enforce_eager = true }
"""


@dataclass
class Fleet:
    deployment: Deployment
    name: str
    models: Path
    folder: Path
    workers: dict[str, WorkerProcess]
    affinity: list[Gateway]
    round_robin: Gateway
    env: dict[str, str]

    @property
    def gateways(self) -> list[Gateway]:
        return [*self.affinity, self.round_robin]

    def start_worker(self, worker_id: str) -> WorkerProcess:
        """Start a worker of the fleet (wait for it with `wait_worker`)."""
        worker = start_worker(
            self.env,
            worker_id,
            free_port(),
            self.models,
            self.folder / f"{worker_id}-{len(self.workers)}.log",
            TOLLGATE_DEVICE_COST_PER_HOUR="0.90" if worker_id == "w1" else "0.30",
            TOLLGATE_HEARTBEAT_S="0.5",
        )
        self.workers[worker_id] = worker
        return worker

    def finished(self) -> int:
        return sum(w.finished() for w in self.workers.values() if w.process.poll() is None)


@pytest.fixture(scope="module")
def fleet(
    deployment: Deployment, gateway: Gateway, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fleet]:
    folder = tmp_path_factory.mktemp("fleet")
    models = folder / "fleet.toml"
    models.write_text(MODELS)
    name = f"fleet-{secrets.token_hex(4)}"
    env = {
        **deployment.env,
        "TOLLGATE_DEPLOYMENT": name,
        "OTEL_SERVICE_NAME": "tollgate-worker-test",
        # Redis shares two cores with the engines, three gateways and the clients.
        "TOLLGATE_QUOTA_TIMEOUT_MS": "3000",
    }
    fleet = Fleet(deployment, name, models, folder, {}, [], None, env)  # type: ignore[arg-type]
    try:
        for worker_id in ("w1", "w2", "w3", "w4"):
            fleet.start_worker(worker_id)
        gateway_env = {
            "TOLLGATE_ENGINES": "workers",
            "TOLLGATE_DEPLOYMENT": name,
            "TOLLGATE_QUOTA_TIMEOUT_MS": "3000",
        }
        fleet.affinity = [
            start_gateway(deployment, folder / f"gateway-{i}.log", **gateway_env) for i in (1, 2)
        ]
        fleet.round_robin = start_gateway(
            deployment, folder / "gateway-rr.log", TOLLGATE_ROUTING="round_robin", **gateway_env
        )
        for worker in fleet.workers.values():
            wait_worker(worker)
        for gw in fleet.gateways:
            wait_ready(gw)
            wait_models(gw)
        yield fleet
    finally:
        for gw in fleet.gateways:
            stop_gateway(gw)
        for worker in fleet.workers.values():
            stop_worker(worker)


def wait_models(gw: Gateway, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        models = httpx.get(gw.base_url + "/readyz", timeout=5).json()["models"]
        if models.get("demo-chat", {}).get("ready"):
            return
        assert time.monotonic() < deadline, models
        time.sleep(0.2)


def routed(gw: Gateway, token: str) -> dict[tuple[str, str], float]:
    """The gateway's routing counters: (worker, reason) to requests."""
    text = httpx.get(
        gw.base_url + "/metrics", headers={"authorization": f"Bearer {token}"}, timeout=10
    ).text
    pattern = r'^tollgate_routed_requests_total\{reason="(\w+)",worker="([\w-]+)"\} (\S+)$'
    return {(w, r): float(v) for r, w, v in re.findall(pattern, text, re.M)}


_clients: dict[tuple[str, str], openai.OpenAI] = {}


def client(gw: Gateway, key: str) -> openai.OpenAI:
    """One client per gateway and key, closed with the module (an unclosed one leaks its
    sockets into whichever test collects them)."""
    api = _clients.get((gw.api_url, key))
    if api is None:
        api = openai.OpenAI(base_url=gw.api_url, api_key=key, max_retries=0, timeout=120)
        _clients[gw.api_url, key] = api
    return api


@pytest.fixture(scope="module", autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    for api in _clients.values():
        api.close()
    _clients.clear()


def test_gateways_hold_no_engines_and_serve_the_workers_models(fleet: Fleet, admin: Admin) -> None:
    key = admin.key(admin.tenant("fleet-basics"))
    for gw in fleet.gateways:
        children = psutil.Process(gw.process.pid).children(recursive=True)
        assert not children, [c.name() for c in children]
        assert [m.id for m in client(gw, key).models.list().data] == ["demo-chat"]
    answer = client(fleet.affinity[0], key).chat.completions.create(
        model="demo-chat",
        messages=[{"role": "user", "content": "hello over the wire"}],
        max_tokens=8,
        extra_body={"ignore_eos": True},
    )
    assert answer.usage is not None
    assert answer.usage.completion_tokens == 8
    stream = client(fleet.affinity[1], key).chat.completions.create(
        model="demo-chat",
        messages=[{"role": "user", "content": "a stream over the wire"}],
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 12
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    # A prompt too long for the model is refused by the gateway, before any worker.
    with pytest.raises(openai.BadRequestError) as refused:
        client(fleet.affinity[0], key).completions.create(
            model="demo-chat", prompt=[5] * 4090, max_tokens=100
        )
    assert "context length" in refused.value.message
    placement = httpx.get(
        fleet.affinity[0].base_url + "/admin/v1/placement",
        headers={"authorization": f"Bearer {fleet.deployment.admin_token}"},
    ).json()
    assert placement["resident"] == ["demo-chat"]


def test_workers_refuse_unsigned_stale_and_replayed_calls(fleet: Fleet) -> None:
    from serving.signing import Signer

    worker = fleet.workers["w1"]
    path = "/internal/v1/tokenize"
    body = b'{"model": "demo-chat", "text": "hello"}'
    assert httpx.post(worker.url + path, content=body).status_code == 401
    wrong = Signer(b"not the deployment's secret, but long enough").headers("POST", path, body)
    assert httpx.post(worker.url + path, content=body, headers=wrong).status_code == 401
    signer = Signer(fleet.env["TOLLGATE_SECRET"].encode())
    headers = signer.headers("POST", path, body)
    answer = httpx.post(worker.url + path, content=body, headers=headers)
    assert answer.status_code == 200
    assert isinstance(answer.json(), list)
    assert httpx.post(worker.url + path, content=body, headers=headers).status_code == 401
    tampered = signer.headers("POST", path, body)
    assert httpx.post(worker.url + path, content=body + b" ", headers=tampered).status_code == 401
    stale = signer.headers("POST", path, body)
    stale["x-tollgate-timestamp"] = str(int(time.time()) - 120)
    assert httpx.post(worker.url + path, content=body, headers=stale).status_code == 401
    # Not on any address but loopback unless told.
    assert re.match(r"http://127\.0\.0\.1:\d+$", worker.url)


def conversations(
    gw: Gateway, key: str, system: str, rng: random.Random
) -> tuple[int, int, list[str]]:
    """Eight conversations of four turns sharing ``system``, all at once. Prompt and cached
    tokens over every turn, and the answers' request ids."""
    words = "alpha beta gamma delta omega sigma kappa lambda theta zeta".split()  # noqa: SIM905

    def text(n: int) -> str:
        return " ".join(rng.choice(words) + str(rng.randrange(100)) for _ in range(n))

    # A conversation opens on a document of its own (some 1,400 tokens), then asks about it.
    users = [[text(260)] + [text(15) for _ in range(3)] for _ in range(8)]
    totals = [0, 0]
    ids: list[str] = []
    lock = threading.Lock()
    api = client(gw, key)

    def run(c: int) -> None:
        messages = [{"role": "system", "content": system}]
        for text in users[c]:
            messages.append({"role": "user", "content": text})
            raw = api.chat.completions.with_raw_response.create(
                model="demo-chat",
                messages=messages,  # type: ignore[arg-type]
                max_tokens=24,
                extra_body={"ignore_eos": True},
            )
            answer = raw.parse()
            assert answer.usage is not None
            assert answer.usage.prompt_tokens_details is not None
            with lock:
                totals[0] += answer.usage.prompt_tokens
                totals[1] += answer.usage.prompt_tokens_details.cached_tokens or 0
                ids.append(raw.headers["x-request-id"])
            messages.append({"role": "assistant", "content": answer.choices[0].message.content})

    threads = [threading.Thread(target=run, args=(c,)) for c in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return totals[0], totals[1], ids


def test_affinity_raises_the_cached_share_over_round_robin(fleet: Fleet, admin: Admin) -> None:
    # Runs before the tests that load the gateways: the peaks checked below are its own.
    key = admin.key(admin.tenant("fleet-affinity"))
    token = fleet.deployment.admin_token
    rng = random.Random(7)  # noqa: S311 (made-up prompts)
    words = "system rules answer briefly politely precisely and always cite".split()  # noqa: SIM905

    def system() -> str:
        return " ".join(rng.choice(words) + str(rng.randrange(1000)) for _ in range(46))

    # Two rounds of each, interleaved: round-robin's share moves with where turns happen to
    # land (from 0.2 to 0.35 a round here), so the bar is held over both.
    gw = fleet.affinity[0]
    prompt_rr = cached_rr = prompt_aff = cached_aff = 0
    per_worker: Counter[str] = Counter()
    for _ in range(2):
        rr_before = routed(fleet.round_robin, token)
        prompt, cached, _ = conversations(fleet.round_robin, key, system(), rng)
        prompt_rr, cached_rr = prompt_rr + prompt, cached_rr + cached
        round_rr = cached / prompt
        rr = {k: v - rr_before.get(k, 0) for k, v in routed(fleet.round_robin, token).items()}
        before = routed(gw, token)
        prompt, cached, _ = conversations(gw, key, system(), rng)
        prompt_aff, cached_aff = prompt_aff + prompt, cached_aff + cached
        after = {k: v - before.get(k, 0) for k, v in routed(gw, token).items()}
        print(f"cached share: affinity {cached / prompt:.3f}, round robin {round_rr:.3f}; {after}")
        # Round robin spread the 32 requests evenly.
        assert sorted(rr.values()) == [8, 8, 8, 8], rr
        for (worker, _), count in after.items():
            per_worker[worker] += count
    share_rr, share_aff = cached_rr / prompt_rr, cached_aff / prompt_aff
    print(f"cached share over both rounds: affinity {share_aff:.3f}, round robin {share_rr:.3f}")
    assert share_aff >= 2 * share_rr, (share_aff, share_rr)
    # Affinity kept conversations together over every worker, and no worker took more than
    # its bound of requests in flight at once.
    assert sum(per_worker.values()) == 64, per_worker
    assert len(per_worker) == 4, per_worker
    text = httpx.get(gw.base_url + "/metrics", headers={"authorization": f"Bearer {token}"}).text
    peaks = [float(v) for v in re.findall(r"^tollgate_route_peak_inflight\S* (\S+)$", text, re.M)]
    # Eight conversations at a time over four workers: a bound of ceil(1.5 * 9 / 4) = 4.
    assert max(peaks) <= 4, peaks


def test_engine_time_is_billed_at_the_rate_of_the_worker_that_served_it(
    fleet: Fleet, admin: Admin
) -> None:
    # w1 declares $0.90 per device-hour, the others $0.30: round robin reaches them all.
    tenant = admin.tenant("fleet-devices")
    api = client(fleet.round_robin, admin.key(tenant))
    for i in range(6):
        api.completions.create(
            model="demo-chat",
            prompt=f"device time {i}",
            max_tokens=8,
            extra_body={"ignore_eos": True},
        )
    rows = events_of(admin, tenant, 6, timeout=30)
    rates: Counter[Decimal] = Counter()
    for row in rows:
        assert row["device"] == "cpu", row
        assert row["gpu_ms"] > 0, row
        hour_usd = Decimal(row["device_hour_usd"])
        rates[hour_usd] += 1
        assert Decimal(row["device_cost_usd"]) == device_cost(row["gpu_ms"], hour_usd) > 0
        # Its cost is its tokens at demo-chat's price (if it has one) plus its engine time.
        tokens_usd = Decimal(row["cost_usd"]) - Decimal(row["device_cost_usd"])
        assert tokens_usd > 0 if row["price_id"] is not None else tokens_usd == 0, row
    assert set(rates) == {Decimal("0.9"), Decimal("0.3")}, rates
    invoice = admin.http.get("/billing/invoices", params={"tenant": tenant}).json()
    lines = {Decimal(line["unit_price_per_hour"]): line for line in invoice["device_lines"]}
    assert set(lines) == {Decimal("0.9"), Decimal("0.3")}, invoice
    exact = sum((Decimal(row["cost_usd"]) for row in rows), Decimal(0))
    assert Decimal(invoice["exact_total_usd"]) == exact
    for hour_usd, line in lines.items():
        ms = sum(r["gpu_ms"] for r in rows if Decimal(r["device_hour_usd"]) == hour_usd)
        assert line["seconds"] == pytest.approx(ms / 1000, abs=1e-5)
        assert line["device"] == "cpu"


async def test_rpm_is_exact_across_three_gateways(fleet: Fleet, admin: Admin) -> None:
    tenant = admin.tenant("fleet-rpm", rpm=100)
    key = admin.key(tenant)
    before = fleet.finished()
    targets = itertools.cycle(fleet.gateways)
    clients = {
        gw.api_url: httpx.AsyncClient(
            base_url=gw.api_url,
            headers={"authorization": f"Bearer {key}"},
            timeout=300,
            limits=httpx.Limits(max_connections=400, max_keepalive_connections=400),
        )
        for gw in fleet.gateways
    }
    body = {"model": "demo-chat", "prompt": "hello", "max_tokens": 1}
    try:
        answers = await asyncio.gather(
            *(clients[next(targets).api_url].post("/completions", json=body) for _ in range(600))
        )
    finally:
        for c in clients.values():
            await c.aclose()
    statuses = Counter(a.status_code for a in answers)
    assert statuses == {200: 100, 429: 500}, statuses
    remaining = sorted(
        int(a.headers["x-ratelimit-remaining-requests"]) for a in answers if a.status_code == 200
    )
    assert remaining == list(range(100))
    by_gateway = Counter(str(a.request.url.port) for a in answers if a.status_code == 429)
    assert len(by_gateway) == 3, by_gateway
    deadline = time.monotonic() + 30
    while fleet.finished() - before < 100:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.2)
    await asyncio.sleep(1.0)
    assert fleet.finished() - before == 100
    ids = ledger_ids(
        fleet.affinity[0].base_url,
        fleet.deployment.admin_token,
        tenant,
        {a.headers["x-request-id"] for a in answers},
    )
    assert len(ids) == len(set(ids)) == 600


async def test_identical_requests_on_two_gateways_share_one_generation(
    fleet: Fleet, admin: Admin
) -> None:
    tenant = admin.tenant("fleet-flight")
    key = admin.key(tenant)
    before = fleet.finished()
    body = {
        "model": "demo-chat",
        "messages": [{"role": "user", "content": f"one answer for all {secrets.token_hex(4)}"}],
        "max_tokens": 64,
        "temperature": 0,
        "ignore_eos": True,
    }
    async with (
        httpx.AsyncClient(headers={"authorization": f"Bearer {key}"}, timeout=120) as http,
    ):
        answers = await asyncio.gather(
            *(
                http.post(fleet.affinity[i % 2].api_url + "/chat/completions", json=body)
                for i in range(20)
            )
        )
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    texts = {a.json()["choices"][0]["message"]["content"] for a in answers}
    assert len(texts) == 1
    statuses = Counter(a.headers["x-tollgate-cache"] for a in answers)
    assert statuses["miss"] == 1
    assert statuses["miss"] + statuses["shared"] + statuses["hit"] == 20
    await asyncio.sleep(1.0)
    assert fleet.finished() - before == 1
    ids = ledger_ids(
        fleet.affinity[0].base_url,
        fleet.deployment.admin_token,
        tenant,
        {a.headers["x-request-id"] for a in answers},
    )
    assert len(ids) == 20


def _spans(collector: Collector) -> list[tuple[str, str, str, str, dict[str, object]]]:
    spans = []
    for body in collector.bodies("traces"):
        request = ExportTraceServiceRequest.FromString(body)
        for resource in request.resource_spans:
            service = next(
                a.value.string_value
                for a in resource.resource.attributes
                if a.key == "service.name"
            )
            for scope in resource.scope_spans:
                for span in scope.spans:
                    attrs = {
                        a.key: a.value.string_value or a.value.int_value for a in span.attributes
                    }
                    spans.append(
                        (service, span.name, span.trace_id.hex(), span.parent_span_id.hex(), attrs)
                    )
    return spans


def test_one_trace_covers_gateway_and_worker(
    fleet: Fleet, admin: Admin, otlp_collector: Collector
) -> None:
    key = admin.key(admin.tenant("fleet-trace"))
    raw = client(fleet.affinity[0], key).chat.completions.with_raw_response.create(
        model="demo-chat",
        messages=[{"role": "user", "content": "follow me across the hop"}],
        max_tokens=4,
    )
    request_id = raw.headers["x-request-id"]
    deadline = time.monotonic() + 20
    while True:
        spans = _spans(otlp_collector)
        server = [s for s in spans if s[4].get("tollgate.request_id") == request_id]
        trace = server[0][2] if server else None
        worker = [s for s in spans if s[2] == trace and s[0] == "tollgate-worker-test"]
        if server and worker:
            break
        assert time.monotonic() < deadline, "no worker span joined the gateway's trace"
        time.sleep(0.3)
    in_trace = [s for s in spans if s[2] == trace]
    names = {(s[0], s[1]) for s in in_trace}
    assert ("tollgate-test", "route") in names, names
    assert ("tollgate-worker-test", "worker.generate") in names, names
    route = next(s for s in in_trace if s[1] == "route")
    assert route[4]["tollgate.worker"] in fleet.workers
    generate = next(s for s in in_trace if s[1] == "worker.generate")
    assert generate[4]["gen_ai.request.model"] == "demo-chat"
    # No key, token or prompt text in any span of either process.
    for s in in_trace:
        flat = json.dumps(s[4])
        assert key not in flat
        assert "follow me" not in flat


class Load:
    """Streams and plain requests through both affinity gateways until told to stop."""

    def __init__(self, fleet: Fleet, key: str) -> None:
        self.fleet, self.key = fleet, key
        self.stop = threading.Event()
        self.ok: list[str] = []
        self.cut: list[str] = []
        self.errors: list[str] = []
        self.lock = threading.Lock()

    def run(self, i: int) -> None:
        gw = self.fleet.affinity[i % 2]
        api = client(gw, self.key)
        n = 0
        while not self.stop.is_set():
            n += 1
            stream = i % 2 == 0
            try:
                if stream:
                    raw = api.chat.completions.with_raw_response.create(
                        model="demo-chat",
                        messages=[{"role": "user", "content": f"load {i} {n}"}],
                        max_tokens=48,
                        stream=True,
                        extra_body={"ignore_eos": True},
                    )
                    request_id = raw.headers["x-request-id"]
                    tokens = sum(1 for c in raw.parse() if c.choices and c.choices[0].delta.content)
                    target = self.ok if tokens == 48 else self.cut
                else:
                    raw = api.completions.with_raw_response.create(
                        model="demo-chat",
                        prompt=f"load {i} {n}",
                        max_tokens=16,
                        extra_body={"ignore_eos": True},
                    )
                    request_id = raw.headers["x-request-id"]
                    assert raw.parse().usage.completion_tokens == 16  # type: ignore[union-attr]
                    target = self.ok
                with self.lock:
                    target.append(request_id)
            except openai.APIError as exc:
                with self.lock:
                    self.errors.append(f"{type(exc).__name__}: {exc}")


def test_a_worker_killed_under_load_loses_only_streams_past_their_first_token(
    fleet: Fleet, admin: Admin
) -> None:
    tenant = admin.tenant("fleet-sigkill")
    load = Load(fleet, admin.key(tenant))
    threads = [threading.Thread(target=load.run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    time.sleep(4)
    kill_worker(fleet.workers["w1"])
    time.sleep(6)
    load.stop.set()
    for t in threads:
        t.join(120)
    # Requests that had not had their first token went to w2 and succeeded; a stream the
    # kill cut after its first token ended early with an error event (the openai client
    # raises on it), nothing else failed.
    assert len(load.ok) > 20, load.ok
    assert all("stopped during the answer" in e or "APIError" in e for e in load.errors), (
        load.errors
    )
    assert len(load.errors) <= 8, load.errors
    ids = ledger_ids(fleet.affinity[0].base_url, fleet.deployment.admin_token, tenant, set(load.ok))
    assert len(ids) == len(set(ids)), "an event was written twice"
    # Every event is an answer, or one of the (at most 8) requests the kill cut.
    assert len(ids) - len(load.ok) - len(load.cut) <= len(load.errors) + 8
    # The others answer now; w1 left the registry when its heartbeat expired.
    deadline = time.monotonic() + 10
    while True:
        placement = httpx.get(
            fleet.affinity[0].base_url + "/admin/v1/placement",
            headers={"authorization": f"Bearer {fleet.deployment.admin_token}"},
        ).json()
        if placement["budget_gb"] and fleet_workers(fleet) == ["w2", "w3", "w4"]:
            break
        assert time.monotonic() < deadline
        time.sleep(0.5)


def fleet_workers(fleet: Fleet) -> list[str]:
    text = httpx.get(
        fleet.affinity[0].base_url + "/metrics",
        headers={"authorization": f"Bearer {fleet.deployment.admin_token}"},
    ).text
    return re.findall(r'^tollgate_route_inflight\{worker="([\w-]+)"\}', text, re.M)


def test_a_draining_worker_finishes_its_streams_and_gets_no_new_ones(
    fleet: Fleet, admin: Admin
) -> None:
    # w1 was killed by the test before: w2 drains while streams run on it, the others take
    # the rest.
    key = admin.key(admin.tenant("fleet-drain"))
    w2 = fleet.workers["w2"]
    results: list[int] = []

    def stream(i: int) -> None:
        chunks = client(fleet.affinity[i % 2], key).chat.completions.create(
            model="demo-chat",
            messages=[{"role": "user", "content": f"drain me {i} " * 20}],
            max_tokens=300,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        usage = [c.usage.completion_tokens for c in chunks if c.usage is not None]
        results.append(usage[-1] if usage else 0)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while int(w2.ready()["models"]["demo-chat"]["running"]) == 0:  # type: ignore[index]
        assert time.monotonic() < deadline, "no stream reached w2"
        time.sleep(0.05)
    on_w2 = int(w2.ready()["models"]["demo-chat"]["running"])  # type: ignore[index]
    w2_before = w2.finished()
    w2.process.send_signal(15)
    time.sleep(0.5)
    # New requests during the drain all go elsewhere.
    token = fleet.deployment.admin_token
    before = routed(fleet.affinity[0], token)
    api = client(fleet.affinity[0], key)
    for i in range(6):
        answer = api.completions.create(
            model="demo-chat", prompt=f"while draining {i}", max_tokens=4
        )
        assert answer.usage is not None
        assert answer.usage.completion_tokens == 4
    sent = {k: v - before.get(k, 0) for k, v in routed(fleet.affinity[0], token).items()}
    assert sum(sent.values()) == 6, sent
    assert not any(v for (w, _), v in sent.items() if w == "w2"), sent
    for t in threads:
        t.join(120)
    assert results == [300] * 8, results
    # It ends as uvicorn ends on a signal (the signal raised again once the drain is done).
    assert w2.process.wait(60) in (0, -15), w2.log()[-3000:]
    log = w2.log()
    assert "draining: " in log
    assert "drain timed out" not in log
    assert "worker w2 stopped" in log
    print(f"streams on w2 when it drained: {on_w2}; w2 finished {w2_before} before")
    deadline = time.monotonic() + 10
    while "w2" in fleet_workers(fleet):
        assert time.monotonic() < deadline, fleet_workers(fleet)
        time.sleep(0.3)
