"""The per-key RPM quota server: the split policy (shares within the limit, by demand, max-min fair), the
whole-second token buckets, and the RLQS servicer through a real gRPC server and client speaking as
Envoy does (reports per bucket, every stream one Envoy)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable

import grpc
import pytest
from envoy.service.rate_limit_quota.v3 import rlqs_pb2, rlqs_pb2_grpc
from envoy.type.v3 import ratelimit_strategy_pb2
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from control_plane.tenancy.quota import KEEP_ABOVE, QuotaServicer, UnknownKey, add_quota_servicer
from control_plane.tenancy.quota_split import MaxMinSplit, WholeSecondBucket, distinct_from, token_bucket_for
from control_plane.xds.auth import XdsAuthenticator
from tests.support.grpc_stream import StreamClient

pytestmark = pytest.mark.unit

SECRET = "quota-test-secret-0123456789"
Strategy = ratelimit_strategy_pb2.RateLimitStrategy
BucketAction = rlqs_pb2.RateLimitQuotaResponse.BucketAction


# The split policy
def random_demands(rng: random.Random, count: int) -> dict[int, float | None]:
    return {
        i: None if rng.random() < 0.15 else rng.choice([0.0, rng.uniform(0, 50), rng.uniform(0, 5000)])
        for i in range(count)
    }


def test_split_stays_within_the_limit_and_hands_it_all_out() -> None:
    rng = random.Random(7)
    split = MaxMinSplit()
    for _ in range(2000):
        limit = rng.choice([1, 7, 60, 600, rng.randint(1, 100_000)])
        demands = random_demands(rng, rng.randint(1, 8))
        shares = split.split(limit, demands)
        assert set(shares) == set(demands)
        assert all(share >= 0 for share in shares.values())
        assert sum(shares.values()) <= limit * (1 + 1e-12)
        assert sum(shares.values()) == pytest.approx(limit)  # nobody's leftover is lost


def test_split_is_max_min_fair_and_follows_demand() -> None:
    rng = random.Random(11)
    split = MaxMinSplit(headroom=1.25)
    for _ in range(2000):
        limit = rng.randint(10, 10_000)
        demands = random_demands(rng, rng.randint(2, 6))
        shares = split.split(limit, demands)
        wants = {s: float("inf") if d is None else d * 1.25 for s, d in demands.items()}
        for a in demands:
            for b in demands:
                if wants[a] <= wants[b]:  # more demand never gets less
                    assert shares[a] <= shares[b] + 1e-9
        # Max-min: a stream that got less than it wants got at least everyone else's share.
        for a, share in shares.items():
            if share < wants[a] - 1e-9:
                assert all(share >= other - 1e-9 for other in shares.values())
            else:
                assert share >= wants[a] - 1e-9


def test_split_examples() -> None:
    split = MaxMinSplit(headroom=1.25)
    assert split.split(600, {1: None, 2: None}) == {1: 300, 2: 300}  # new: an even share each
    assert split.split(600, {1: 100.0, 2: 5000.0}) == {1: 125, 2: 475}
    assert split.split(600, {1: 100.0, 2: 80.0}) == {1: 125 + 187.5, 2: 100 + 187.5}
    assert split.split(600, {1: 3000.0, 2: 1500.0}) == {1: 300, 2: 300}
    assert split.split(600, {}) == {}


def test_token_bucket_never_exceeds_the_share_and_stays_close_to_it() -> None:
    rng = random.Random(3)
    shares = [rng.uniform(0.02, 100_000) for _ in range(3000)] + [1, 5, 59, 60, 61, 97, 600, 1e6]
    for share in shares:
        bucket = token_bucket_for(share)
        assert bucket is not None
        assert bucket.fill_interval_s >= 1 and bucket.tokens_per_fill >= 1
        assert bucket.max_tokens == bucket.tokens_per_fill  # small bursts: buckets start full
        assert bucket.per_minute <= share * (1 + 1e-9)
        if share >= 1:
            assert bucket.per_minute >= share - max(0.02 * share, 1.0)
            assert bucket.fill_interval_s <= 60
        else:
            assert bucket.per_minute >= share * 0.98
    assert token_bucket_for(600) == WholeSecondBucket(10, 1, 10)
    assert token_bucket_for(300) == WholeSecondBucket(5, 1, 5)
    assert token_bucket_for(5) == WholeSecondBucket(1, 12, 1)
    assert token_bucket_for(0) is None
    assert token_bucket_for(1 / 7200) is None


def test_a_new_rate_with_the_same_tokens_changes_max_tokens() -> None:
    old = WholeSecondBucket(1, 12, 1)
    new = distinct_from(WholeSecondBucket(1, 6, 1), old)
    assert new == WholeSecondBucket(1, 6, 2)  # Envoy 1.40 would keep the old bucket otherwise
    assert distinct_from(WholeSecondBucket(2, 6, 2), old) == WholeSecondBucket(2, 6, 2)
    assert distinct_from(old, old) == old


# The servicer, through a real gRPC server and client
class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class RlqsClient(StreamClient[rlqs_pb2.RateLimitQuotaUsageReports, rlqs_pb2.RateLimitQuotaResponse]):
    """Speaks RLQS as Envoy 1.40 does: one stream, a report when a bucket appears, then all buckets."""

    def __init__(self, address: str, credential: str | None) -> None:
        super().__init__(address, credential)
        self._stub = rlqs_pb2_grpc.RateLimitQuotaServiceStub(self._channel)

    def start(self) -> None:
        self._open(self._stub.StreamRateLimitQuotas)

    def report(self, *usages: tuple[str, int, int], bucket_name: str = "key") -> None:
        report = rlqs_pb2.RateLimitQuotaUsageReports(domain="gateway")
        for key_id, allowed, denied in usages:
            usage = report.bucket_quota_usages.add(num_requests_allowed=allowed, num_requests_denied=denied)
            usage.bucket_id.bucket[bucket_name] = key_id
            usage.time_elapsed.seconds = 5  # truncated by Envoy: the server must not use it
        self._outbox.put_nowait(report)

    async def actions(self) -> dict[str, BucketAction]:
        response = await self.receive()
        return {action.bucket_id.bucket.get("key", ""): action for action in response.bucket_action}


def per_minute(action: BucketAction) -> float:
    tb = action.quota_assignment_action.rate_limit_strategy.token_bucket
    assert action.quota_assignment_action.rate_limit_strategy.HasField("token_bucket"), action
    assert tb.fill_interval.nanos == 0 and tb.fill_interval.seconds >= 1
    assert action.quota_assignment_action.assignment_time_to_live.seconds >= 1
    return 60.0 * tb.tokens_per_fill.value / tb.fill_interval.seconds


def blanket(action: BucketAction) -> int:
    strategy = action.quota_assignment_action.rate_limit_strategy
    assert strategy.HasField("blanket_rule"), action
    return int(strategy.blanket_rule)


Scenario = Callable[[QuotaServicer, str, str, Clock, dict[str, int | None]], Awaitable[None]]


def run(scenario: Scenario, idle_s: float = 120.0) -> None:
    async def main() -> None:
        clock = Clock()
        limits: dict[str, int | None] = {"k1": 600, "free": None}

        def limit_of(key_id: str) -> int | None:
            if key_id not in limits:
                raise UnknownKey(key_id)
            return limits[key_id]

        auth = XdsAuthenticator(SecretStr(SECRET), CollectorRegistry(), first_request_timeout_s=1.0)
        servicer = QuotaServicer(limit_of, authenticator=auth, clock=clock, idle_s=idle_s)
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        add_quota_servicer(server, servicer)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            await asyncio.wait_for(
                scenario(servicer, f"127.0.0.1:{port}", auth.log_token(), clock, limits), timeout=20
            )
        finally:
            await server.stop(grace=None)

    asyncio.run(main())


async def until(check: Callable[[], bool]) -> None:
    for _ in range(200):
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met within 4 s")


def test_two_envoys_share_a_key_within_its_limit_by_demand() -> None:
    async def scenario(
        servicer: QuotaServicer, address: str, token: str, clock: Clock, limits: dict[str, int | None]
    ) -> None:
        e1, e2 = RlqsClient(address, token), RlqsClient(address, token)
        e1.start()
        e1.report(("k1", 1, 0))  # the bucket's first request: answered at once, alone it gets L
        assert per_minute((await e1.actions())["k1"]) == 600

        e2.start()
        e2.report(("k1", 1, 0))  # a second Envoy: each gets an even share at once
        first = per_minute((await e2.actions())["k1"])
        pushed = per_minute((await e1.actions())["k1"])
        assert first == pushed == 300

        # 5 s later: Envoy 1 is asked for 3000 requests, Envoy 2 for 10 (120/min).
        clock.now += 5
        e1.report(("k1", 300, 2700))
        assert per_minute((await e1.actions())["k1"]) == 300  # e2's demand not known yet: even
        e2.report(("k1", 10, 0))
        e2_rate = per_minute((await e2.actions())["k1"])
        e1_rate = per_minute((await e1.actions())["k1"])
        assert e2_rate == 150  # its demand, with headroom
        assert e1_rate == 450  # the rest
        figures = servicer.snapshot()["k1"]
        assert sum(f.assigned_per_minute or 0 for f in figures.values()) <= 600
        assert {f.share_per_minute for f in figures.values()} == {150, 450}
        assert sorted(round(f.demand_per_minute or 0) for f in figures.values()) == [120, 36000]

        # A report whose shares barely move keeps the running buckets (no refill), but is answered.
        clock.now += 5
        e2.report(("k1", 11, 0))
        assert per_minute((await e2.actions())["k1"]) == 150
        assert sum(f.assigned_per_minute or 0 for f in servicer.snapshot()["k1"].values()) <= 600 * (
            1 + KEEP_ABOVE
        )

        servicer.limits_changed()  # no limit changed: the running buckets stay, nothing is sent
        with pytest.raises(TimeoutError):
            await e1.receive(timeout_s=0.3)

        # Envoy 1 goes away: Envoy 2 gets the whole limit.
        await e1.close()
        assert per_minute((await e2.actions())["k1"]) == 600
        await until(lambda: servicer.stream_count() == 1)
        await e2.close()

    run(scenario)


def test_unlimited_unknown_and_changed_keys() -> None:
    async def scenario(
        servicer: QuotaServicer, address: str, token: str, clock: Clock, limits: dict[str, int | None]
    ) -> None:
        e1, e2 = RlqsClient(address, token), RlqsClient(address, token)
        e1.start()
        e1.report(("free", 1, 0), ("nobody", 1, 0), ("k1", 1, 0), ("x" * 300, 1, 0))
        actions = await e1.actions()
        assert blanket(actions["free"]) == Strategy.ALLOW_ALL
        assert blanket(actions["nobody"]) == Strategy.DENY_ALL
        assert blanket(actions["x" * 300]) == Strategy.DENY_ALL
        assert per_minute(actions["k1"]) == 600
        e2.start()
        e2.report(("k1", 1, 0))
        await e2.actions()
        await e1.actions()

        # A key change: every Envoy gets its new assignment at once, without waiting for a report.
        limits["k1"] = 60
        limits["nobody"] = 1200
        servicer.limits_changed()
        one, two = await e1.actions(), await e2.actions()
        assert per_minute(one["k1"]) == per_minute(two["k1"]) == 30
        assert per_minute(one["nobody"]) == 1200
        assert "free" not in one  # unchanged: nothing sent

        del limits["k1"]  # revoked
        servicer.limits_changed()
        assert blanket((await e1.actions())["k1"]) == Strategy.DENY_ALL
        assert blanket((await e2.actions())["k1"]) == Strategy.DENY_ALL
        figures = servicer.snapshot()
        assert {f.action for f in figures["k1"].values()} == {"deny_all"}
        assert figures["free"][1].action == "allow_all" and figures["free"][1].limit is None
        await e1.close()
        await e2.close()

    run(scenario)


def test_idle_and_foreign_buckets_are_abandoned() -> None:
    async def scenario(
        servicer: QuotaServicer, address: str, token: str, clock: Clock, limits: dict[str, int | None]
    ) -> None:
        e1 = RlqsClient(address, token)
        e1.start()
        e1.report(("k1", 1, 0))
        await e1.actions()
        e1.report(("k1", 1, 0), bucket_name="other")
        response = await e1.receive()
        assert [a.HasField("abandon_action") for a in response.bucket_action] == [True]
        assert dict(response.bucket_action[0].bucket_id.bucket) == {"other": "k1"}

        clock.now += 5
        e1.report(("k1", 0, 0))
        assert per_minute((await e1.actions())["k1"]) == 600  # quiet, but not long enough
        clock.now += 31
        e1.report(("k1", 0, 0))
        assert (await e1.actions())["k1"].HasField("abandon_action")
        assert "k1" not in servicer.snapshot()
        e1.report(("k1", 1, 0))  # a new request: Envoy creates the bucket again
        assert per_minute((await e1.actions())["k1"]) == 600
        await e1.close()

    run(scenario, idle_s=30.0)


def test_streams_without_the_credential_are_refused() -> None:
    async def scenario(
        servicer: QuotaServicer, address: str, token: str, clock: Clock, limits: dict[str, int | None]
    ) -> None:
        for credential, code in (
            (None, grpc.StatusCode.UNAUTHENTICATED),
            ("not-a-token", grpc.StatusCode.UNAUTHENTICATED),
            ("xds1.wrong", grpc.StatusCode.PERMISSION_DENIED),
        ):
            client = RlqsClient(address, credential)
            client.start()
            client.report(("k1", 1, 0))
            assert await client.refused() == code
            await client.close()
        assert servicer.snapshot() == {}
        good = RlqsClient(address, token)
        good.start()
        good.report(("k1", 1, 0))  # RLQS reports carry no node: admitted all the same
        assert per_minute((await good.actions())["k1"]) == 600
        await good.close()

    run(scenario)
