"""The deployed catalog's store: seeding from the models file, and changes through the API."""

from __future__ import annotations

from gateway.db import AccountStore


async def test_a_models_file_seeds_once_and_its_changes_replace_its_own_entries(
    store: AccountStore,
) -> None:
    deployment = "seeding"
    assert await store.seed_catalog(deployment, "d1", {"a": '{"v":1}', "b": '{"v":1}'})
    assert not await store.seed_catalog(deployment, "d1", {"a": '{"v":1}', "b": '{"v":1}'})
    assert await store.deployed_models(deployment) == [("a", 1, '{"v":1}'), ("b", 1, '{"v":1}')]
    # The operator deploys c and changes b through the API.
    assert await store.put_model(deployment, "c", '{"v":1}') == (1, True)
    assert await store.put_model(deployment, "b", '{"v":2}') == (2, False)
    # A new file: a changes, its b and c are gone from the file. b and c were the API's last.
    assert await store.seed_catalog(deployment, "d2", {"a": '{"v":3}'})
    assert await store.deployed_models(deployment) == [
        ("a", 2, '{"v":3}'),
        ("b", 2, '{"v":2}'),
        ("c", 1, '{"v":1}'),
    ]
    # A third file without a: the file's own entry goes.
    assert await store.seed_catalog(deployment, "d3", {})
    assert [name for name, _, _ in await store.deployed_models(deployment)] == ["b", "c"]
    assert await store.delete_model(deployment, "b")
    assert not await store.delete_model(deployment, "b")
    # Deployments are apart.
    assert await store.deployed_models("another") == []
