"""GPU pools (``airflow_wmltrain.service.pools``, ``wmltrain pools``): names, slots, create/update logic."""

from __future__ import annotations

from typing import Any

import pytest

from airflow_wmltrain.cli.main import build_parser
from airflow_wmltrain.errors import ClientError, GpuCapacityError, ResourceError
from airflow_wmltrain.service.api import AirflowApi, ApiConflictError, ApiNotFoundError
from airflow_wmltrain.service.pools import (
    CREATE,
    UNCHANGED,
    UPDATE,
    HostGpus,
    capacity,
    host_slug,
    pool_names,
    pool_slots,
    sync_pool,
    sync_pools,
)
from airflow_wmltrain.settings import Settings, parse_resource_classes


class PoolApi(AirflowApi):
    """Answers the pool endpoints from a dict, as Airflow's REST API v2 does, and logs the calls."""

    def __init__(self, pools: dict[str, dict[str, Any]] | None = None, *, race: bool = False) -> None:
        super().__init__("http://airflow.test", "admin", "pw")
        self.pools = pools or {}
        self.race = race  # another client creates the pool between our GET and our POST
        self.calls: list[str] = []

    def call(
        self, method: str, path: str, *, params: Any = None, body: Any = None, idempotent: bool | None = None
    ) -> Any:
        self.calls.append(f"{method} {path}")
        name = path.removeprefix("/pools/") if path.startswith("/pools/") else None
        if method == "GET" and name is not None:
            if name not in self.pools:
                raise ApiNotFoundError("HTTP 404: not found", status=404)
            return dict(self.pools[name])
        if method == "POST" and path == "/pools":
            if self.race:
                self.pools[body["name"]] = {"name": body["name"], "slots": 1, "include_deferred": False}
            if body["name"] in self.pools:
                raise ApiConflictError("HTTP 409", status=409)
            self.pools[body["name"]] = {"description": None, **body}
            return self.pools[body["name"]]
        if method == "PATCH" and name is not None:
            assert idempotent is True
            assert sorted(params["update_mask"]) == ["include_deferred", "slots"]
            assert body.pop("pool") == name  # Airflow 3.3 refuses a PATCH without the name (422)
            self.pools[name].update(body)
            return self.pools[name]
        raise AssertionError(f"unexpected call {method} {path}")


FOUR = HostGpus("unix:///run/gpu/docker.sock", ("0", "1", "2", "3"))


def test_pool_slots_are_the_gpus_of_the_resource_class() -> None:
    settings = Settings()
    assert [pool_slots(c, settings) for c in ("small", "medium", "large")] == [1, 2, 4]
    custom = Settings(resource_classes=parse_resource_classes("one=1,eight=8,cpu=0"))
    assert pool_slots("eight", custom) == 8
    known = r"'huge' is not a resource class .*one \(1 GPU\(s\)\), eight"
    with pytest.raises(ResourceError, match=known) as err:
        pool_slots("huge", custom)
    assert err.value.code == "C104"
    with pytest.raises(ResourceError, match=r"asks for no GPU.*default_pool"):
        pool_slots("cpu", custom)


def test_pool_names_one_host_several_hosts_and_refusals() -> None:
    assert pool_names(["unix:///var/run/docker.sock"]) == ["wmltrain_gpus"]
    assert pool_names(["tcp://gpu-a:2376", "ssh://user@GPU.b.example"]) == [
        "wmltrain_gpus_gpu_a",
        "wmltrain_gpus_gpu_b_example",
    ]
    assert pool_names(["tcp://a:1", "tcp://b:1"], "gpus_{index}") == ["gpus_1", "gpus_2"]
    two_sockets = ["unix:///var/run/docker.sock", "unix:///run/gpu/docker.sock"]
    assert pool_names(two_sockets) == ["wmltrain_gpus_1", "wmltrain_gpus_2"]
    assert host_slug("unix:///run/wmltrain-gpu/docker.sock") == "local"
    refusals = [
        (["tcp://a:1", "tcp://b:1"], "gpus", "the same pool"),
        (["tcp://a:1"], "gpus_{gpu}", "unknown placeholder"),
        (["tcp://a:1"], "gpus {host}", "not a pool name"),
        (["tcp://a:1"], "gpus_{", "not a name pattern"),
        (["tcp://a:1", "tcp://a:1"], None, "given twice"),
        ([], None, "no Docker host"),
    ]
    for urls, pattern, message in refusals:
        with pytest.raises(ClientError, match=message) as err:
            pool_names(urls, pattern)
        assert err.value.code == "C100"
        assert str(err.value).startswith(("--pool: ", "--docker-url: "))


def test_a_missing_pool_is_created_with_one_slot_per_gpu_and_include_deferred() -> None:
    api = PoolApi()
    change = sync_pool(api, "wmltrain_gpus", FOUR, settings=Settings())
    assert change.action == CREATE
    assert change.slots == 4
    assert change.too_large == ()
    assert api.pools["wmltrain_gpus"]["slots"] == 4
    assert api.pools["wmltrain_gpus"]["include_deferred"] is True
    assert "unix:///run/gpu/docker.sock" in api.pools["wmltrain_gpus"]["description"]
    assert change.describe().startswith("wmltrain_gpus: created: 4 slots, include_deferred")
    again = sync_pool(api, "wmltrain_gpus", FOUR, settings=Settings())
    assert again.action == UNCHANGED
    assert api.calls[-1] == "GET /pools/wmltrain_gpus"


def test_an_existing_pool_gets_the_slots_and_include_deferred_and_keeps_its_description() -> None:
    api = PoolApi({"p": {"name": "p", "slots": 2, "include_deferred": False, "description": "mine"}})
    change = sync_pool(api, "p", FOUR, settings=Settings())
    assert change.action == UPDATE
    assert change.previous == {"slots": 2, "include_deferred": False}
    assert api.pools["p"] == {"name": "p", "slots": 4, "include_deferred": True, "description": "mine"}
    assert "(was 2 slots, include_deferred False)" in change.describe()
    only_deferred = PoolApi({"p": {"name": "p", "slots": 4, "include_deferred": False}})
    assert sync_pool(only_deferred, "p", FOUR, settings=Settings()).action == UPDATE
    assert only_deferred.pools["p"]["include_deferred"] is True


def test_a_pool_created_meanwhile_is_updated_not_failed() -> None:
    api = PoolApi(race=True)
    assert sync_pool(api, "p", FOUR, settings=Settings()).action == CREATE
    assert api.pools["p"]["slots"] == 4
    assert api.pools["p"]["include_deferred"] is True
    assert api.calls == ["GET /pools/p", "POST /pools", "PATCH /pools/p"]


def test_dry_run_changes_nothing_and_says_what_it_would_do() -> None:
    api = PoolApi({"old": {"name": "old", "slots": 1, "include_deferred": True}})
    created = sync_pool(api, "new", FOUR, settings=Settings(), dry_run=True)
    updated = sync_pool(api, "old", FOUR, settings=Settings(), dry_run=True)
    assert (created.action, updated.action) == (CREATE, UPDATE)
    assert all(call.startswith("GET ") for call in api.calls)
    assert "new" not in api.pools
    assert api.pools["old"]["slots"] == 1
    assert "would be created" in created.describe()
    assert "would be updated" in updated.describe()
    assert created.to_dict()["dry_run"] is True
    assert created.to_dict()["gpus"] == ["0", "1", "2", "3"]


def test_resource_classes_larger_than_the_host_are_named() -> None:
    two = HostGpus("tcp://small-host:2376", ("0", "1"))
    change = sync_pool(PoolApi(), "p", two, settings=Settings())
    assert change.too_large == ("large",)
    assert "large need more GPUs" in change.describe()


def test_ahead_adds_slots_beyond_the_gpus_and_is_not_counted_as_gpus() -> None:
    api = PoolApi()
    change = sync_pool(api, "p", FOUR, settings=Settings(), ahead=4)
    assert (change.slots, change.ahead, api.pools["p"]["slots"]) == (8, 4, 8)
    assert change.describe().startswith("p: created: 8 slots (+4 to stage runs ahead), include_deferred")
    assert change.too_large == ()  # a large run needs 4 GPUs, not 4 slots: the host has them
    two = sync_pool(PoolApi(), "q", HostGpus("tcp://h:2376", ("0", "1")), settings=Settings(), ahead=4)
    assert two.too_large == ("large",)
    with pytest.raises(ClientError, match="--ahead must be 0 or more") as err:
        sync_pool(api, "p", FOUR, settings=Settings(), ahead=-1)
    assert err.value.code == "C100"


def test_a_bad_name_is_refused_before_any_host_or_pool_is_touched() -> None:
    api = PoolApi()
    with pytest.raises(ClientError, match="the same pool"):
        sync_pools(api, ["tcp://a.invalid:1", "tcp://b.invalid:1"], settings=Settings(), pattern="same")
    assert api.calls == []


def test_a_host_without_gpus_is_refused() -> None:
    assert capacity("tcp://h:1", ["0", "1"]) == HostGpus("tcp://h:1", ("0", "1"))
    with pytest.raises(GpuCapacityError, match=r"offers no GPU.*leave this host out") as err:
        capacity("tcp://h:1", [])
    assert err.value.code == "S100"


def test_the_command_takes_several_hosts() -> None:
    hosts = ["--docker-url", "tcp://a:1", "--docker-url", "tcp://b:1"]
    args = build_parser().parse_args(["pools", *hosts, "--pool", "g_{index}", "--dry-run"])
    assert args.docker_url == ["tcp://a:1", "tcp://b:1"]
    assert args.pool == "g_{index}"
    assert args.dry_run


def test_shared_makes_one_pool_of_all_the_hosts_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """GPU hosts whose Celery workers share a queue: one pool, the sum of their GPUs (issue 12)."""
    found = {"unix:///run/a.sock": ("0", "1", "2", "3"), "tcp://b:2376": ("0", "1")}
    monkeypatch.setattr(
        "airflow_wmltrain.service.pools.host_gpus",
        lambda url, settings, image=None: HostGpus(url, found[url]),
    )
    api = PoolApi()
    (change,) = sync_pools(api, list(found), settings=Settings(), shared=True, ahead=2)
    assert change.pool == "wmltrain_gpus"
    assert (change.slots, api.pools["wmltrain_gpus"]["slots"]) == (8, 8)
    assert "unix:///run/a.sock, tcp://b:2376" in change.describe()
    assert change.too_large == ()  # the largest host has the 4 GPUs of a large run
    (named,) = sync_pools(PoolApi(), ["tcp://b:2376"], settings=Settings(), shared=True, pattern="gpus")
    assert (named.pool, named.slots, named.too_large) == ("gpus", 2, ("large",))
    args = build_parser().parse_args(["pools", "--docker-url", "tcp://b:2376", "--shared"])
    assert args.shared
