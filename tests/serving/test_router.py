"""The router's decisions on a fleet it is told about (no engines: the fleet tests run real
workers; these pin down the rules)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from serving.placement import DeviceOffer, choose_device
from serving.router import BLOCK, Route, Router, prefix_hashes
from serving.signing import SignatureError, Signer, Verifier
from serving.wire import ModelOnWorker, WorkerInfo


def worker(worker_id: str, state: str = "ready", **fields: object) -> WorkerInfo:
    model = ModelOnWorker(name="m", state=state, memory_gb=10.0, inflight=0, spec=b"{}")
    defaults: dict[str, object] = {
        "url": f"http://{worker_id}",
        "device_kind": "cpu",
        "cost_per_hour": "1",
        "budget_gb": 80.0,
        "used_gb": 0.0,
        "models": [model],
    }
    return WorkerInfo(id=worker_id, **{**defaults, **fields})  # type: ignore[arg-type]


def test_prompts_share_the_hashes_of_the_blocks_they_share() -> None:
    a = list(range(10 * BLOCK))
    b = a[: 6 * BLOCK] + [7] * (4 * BLOCK)
    ha, hb = prefix_hashes("m", a), prefix_hashes("m", b)
    assert ha[:6] == hb[:6]
    assert not set(ha[6:]) & set(hb[6:])
    assert prefix_hashes("other", a)[0] != ha[0]
    assert prefix_hashes("m", a, salt="tenant")[0] != ha[0]


def conversation(rng: random.Random, system: list[int], turns: int) -> list[list[int]]:
    prompts, history = [], list(system)
    for _ in range(turns):
        history += [rng.randrange(1000) for _ in range(6 * BLOCK)]
        prompts.append(list(history))
        history += [rng.randrange(1000) for _ in range(BLOCK)]
    return prompts


def send(router: Router, prompt: list[int]) -> Route:
    """Route ``prompt`` and start it on the chosen worker."""
    hashes = prefix_hashes("m", prompt)
    route = router.choose("m", hashes)
    assert route is not None
    router.started(route, hashes)
    return route


def test_conversations_divide_among_workers_and_stay_home() -> None:
    rng = random.Random(1)  # noqa: S311 (made-up prompts)
    router = Router()
    router.update([worker("a"), worker("b")])
    system = [rng.randrange(1000) for _ in range(8 * BLOCK)]
    chats = [conversation(rng, system, 5) for _ in range(8)]
    homes: dict[int, set[str]] = {c: set() for c in range(8)}
    for turn in range(5):
        for c in range(8):
            route = send(router, chats[c][turn])
            homes[c].add(route.worker.id)
            router.ended(route.worker.id)
    assert all(len(h) == 1 for h in homes.values()), homes  # every turn at home
    per_worker = [sum(1 for h in homes.values() if w in h) for w in "ab"]
    assert per_worker == [4, 4]


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize(
    ("workers", "one_off", "expected"),
    [("abc", False, [2, 3, 3]), ("abcd", True, [2, 2, 2, 2])],
    ids=["three workers", "four workers after a one-off request"],
)
def test_conversations_opened_at_once_divide_evenly(
    seed: int, workers: str, one_off: bool, expected: list[int]
) -> None:
    """Eight conversations on one system prompt, their first turns all in flight together
    (the second arrives before anything showed where the shared part ends), then their next
    turns: an even share of conversations a worker, every turn at home, nothing counted
    twice. Under some seeds a later conversation's first turn lands where the first one
    started: it is a conversation of its own, not the first one's next turn. A short
    request before them weighs its one block, not a conversation's dozens."""
    rng = random.Random(seed)  # noqa: S311 (made-up prompts)
    router = Router()
    router.update([worker(w) for w in workers])
    if one_off:
        router.ended(send(router, [rng.randrange(1000) for _ in range(12)]).worker.id)
    system = [rng.randrange(1000) for _ in range(4 * BLOCK)]
    chats = [conversation(rng, system, 4) for _ in range(8)]
    homes: dict[int, set[str]] = {c: set() for c in range(8)}
    for turn in range(4):
        routes = [send(router, chats[c][turn]) for c in range(8)]
        for c, route in enumerate(routes):
            homes[c].add(route.worker.id)
        for route in routes:
            router.ended(route.worker.id)
    assert all(len(h) == 1 for h in homes.values()), homes
    per_worker = sorted(sum(1 for h in homes.values() if w in h) for w in workers)
    assert per_worker == expected, homes
    held: Counter[str] = Counter()
    for home, _, blocks in router._sessions.values():
        held[home] += blocks
    assert router._held == dict(held)
    assert len(router._sessions) == 8 + one_off


def test_no_worker_takes_more_than_its_bound() -> None:
    rng = random.Random(2)  # noqa: S311 (made-up schedule)
    router = Router(balance=0.25)
    router.update([worker("a"), worker("b"), worker("c")])
    same = prefix_hashes("m", [1] * (4 * BLOCK))  # one hot prompt: affinity wants one worker
    for _ in range(60):
        if rng.random() < 0.3 and router.inflight:
            router.ended(rng.choice(sorted(router.inflight)))
            continue
        total = sum(router.inflight.values())
        route = router.choose("m", same)
        assert route is not None
        bound = -(-(1.25 * (total + 1)) // 3)
        assert router.inflight.get(route.worker.id, 0) + 1 <= bound
        router.started(route, same)
    assert len(router.peak_inflight) == 3


def test_failed_draining_and_unknown_workers_are_left_out() -> None:
    router = Router()
    router.update([worker("a"), worker("b", draining=True), worker("c", state="failed")])
    hashes = prefix_hashes("m", [1, 2, 3])
    route = router.choose("m", hashes)
    assert route is not None
    assert route.worker.id == "a"
    router.mark_down("a")
    assert router.choose("m", hashes) is None
    assert router.choose("unknown", hashes) is None


def test_a_model_resident_nowhere_goes_where_it_fits_cheapest() -> None:
    router = Router()
    router.update(
        [
            worker("big-gpu", state="cold", cost_per_hour="4.00", budget_gb=80, used_gb=0),
            worker("small-gpu", state="cold", cost_per_hour="1.00", budget_gb=24, used_gb=20),
            worker("cpu", state="cold", cost_per_hour="0.20", budget_gb=64, used_gb=10),
        ]
    )
    route = router.choose("m", prefix_hashes("m", [1]))
    assert route is not None
    assert (route.worker.id, route.reason) == ("cpu", "placement")
    offers = [DeviceOffer("a", 5.0, 0.5), DeviceOffer("b", 40.0, 3.0)]
    assert choose_device(10.0, offers) == "b"  # only b holds it without an eviction
    assert choose_device(2.0, offers) == "a"


def test_signatures() -> None:
    signer, verifier = Signer(b"s" * 40), Verifier(b"s" * 40)
    headers = signer.headers("POST", "/internal/v1/generate", b"{}")
    verifier.verify("POST", "/internal/v1/generate", b"{}", headers)
    for method, path, body, h in [
        ("POST", "/internal/v1/generate", b"{}", headers),  # replayed
        ("POST", "/internal/v1/embed", b"{}", signer.headers("POST", "/x", b"{}")),
        ("POST", "/internal/v1/generate", b"{}", {}),
    ]:
        try:
            verifier.verify(method, path, body, h)
        except SignatureError:
            continue
        raise AssertionError(f"accepted {path} {h}")
