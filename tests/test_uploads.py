"""Inputs streamed through the coordinator in parts (`network.uploads`): a reader gets each part as it
arrives, uploads are bounded, checked part by part, dropped when they stall, and scoped to their client."""

from __future__ import annotations

import asyncio

import pytest

from depin_jupyter.errors import TrustError
from depin_jupyter.network.relay import InputStore
from depin_jupyter.network.uploads import InputDesk, Uploads
from depin_jupyter.protocol.constants import PART_BYTES, owner_scoped, part_count


def _parts(data: bytes) -> list[bytes]:
    return [data[i * PART_BYTES:(i + 1) * PART_BYTES] for i in range(part_count(len(data)))]


def test_part_count_covers_every_byte_and_the_empty_payload():
    assert part_count(0) == 1 and part_count(1) == 1 and part_count(PART_BYTES) == 1
    assert part_count(PART_BYTES + 1) == 2 and part_count(3 * PART_BYTES) == 3


def test_a_reader_gets_each_part_as_soon_as_it_arrives_not_when_the_whole_input_is_in():
    data = bytes(range(256)) * (PART_BYTES * 2 // 256) + b"tail"

    async def main() -> None:
        desk = InputDesk(InputStore(10 * PART_BYTES))
        assert desk.offer("alice", {"k": len(data)}, 10 * PART_BYTES, 60.0) == {"held": [], "stream": ["k"]}
        parts = _parts(data)
        reader = asyncio.ensure_future(desk.read("alice", "k", 0, 60.0))
        await asyncio.sleep(0.01)
        assert not reader.done()  # nothing arrived yet: it waits
        await desk.put("alice", "k", parts[0], 0, 10 * PART_BYTES, len(data))
        first = await asyncio.wait_for(reader, 5)
        assert first == {"count": 3, "data": parts[0]}  # while parts 1 and 2 are still on their way
        later = asyncio.ensure_future(desk.read("alice", "k", 2, 60.0))
        await desk.put("alice", "k", parts[2], 2, 10 * PART_BYTES, len(data))
        assert (await asyncio.wait_for(later, 5))["data"] == parts[2]  # out of order is fine
        assert desk.store.peek(owner_scoped("alice", "k")) is None  # not held whole yet
        await desk.put("alice", "k", parts[1], 1, 10 * PART_BYTES, len(data))
        # whole now: held for reuse, no longer an upload, and read from the store
        assert len(desk.uploads) == 0 and desk.has("alice", ["k"]) == ["k"]
        got = [(await desk.read("alice", "k", i, 60.0)) for i in range(3)]
        assert b"".join(g["data"] for g in got) == data and {g["count"] for g in got} == {3}
        assert desk.offer("alice", {"k": len(data)}, 10 * PART_BYTES, 60.0) == {"held": ["k"], "stream": []}

    asyncio.run(main())


def test_inputs_are_scoped_to_their_client():
    """A content key is guessable: another client can neither see, read nor overwrite what alice sent."""

    async def main() -> None:
        desk = InputDesk(InputStore(10 * PART_BYTES))
        assert await desk.put("alice", "k", b"alice's", None, 10 * PART_BYTES) == "OK"
        assert desk.has("mallory", ["k"]) == [] and desk.has("alice", ["k"]) == ["k"]
        assert await desk.read("mallory", "k", 0, 0.05) is None
        assert await desk.put("mallory", "k", b"planted", None, 10 * PART_BYTES) == "OK"
        assert (await desk.read("alice", "k", 0, 0.05))["data"] == b"alice's"
        desk.offer("alice", {"u": 10}, 10 * PART_BYTES, 60.0)
        with pytest.raises(TrustError, match="no upload"):  # parts only for an upload one offered oneself
            await desk.put("mallory", "u", b"x" * 10, 0, 10 * PART_BYTES, 10)

    asyncio.run(main())


def test_parts_that_do_not_belong_are_refused():
    ups = Uploads()
    assert ups.open("k", PART_BYTES + 10, 10 * PART_BYTES)
    with pytest.raises(TrustError, match="out of range"):
        ups.put("k", 2, b"x" * 10, PART_BYTES + 10, 10 * PART_BYTES)
    with pytest.raises(TrustError, match="not 10"):
        ups.put("k", 1, b"x" * 11, PART_BYTES + 10, 10 * PART_BYTES)
    assert ups.put("k", 1, b"x" * 10, PART_BYTES + 10, 10 * PART_BYTES) is None
    with pytest.raises(TrustError, match="not 5"):  # the size is fixed by the first part
        ups.put("k", 0, b"x" * 5, 5, 10 * PART_BYTES)
    with pytest.raises(TrustError, match="no upload"):
        ups.put("nope", 0, b"", 0, 10 * PART_BYTES)


def test_the_first_part_corrects_the_offered_size_within_the_limit():
    ups = Uploads()
    assert ups.open("k", 100, 1000)  # the offer names the array's bytes; the serialized input is a bit more
    assert ups.put("k", 0, b"x" * 120, 120, 1000) == b"x" * 120
    assert ups.open("big", 100, 1000)
    with pytest.raises(TrustError):
        ups.put("big", 0, b"x" * 1001, 1001, 1000)


def test_open_uploads_are_bounded():
    ups = Uploads()
    assert ups.open("a", 600, 1000) and not ups.open("b", 600, 1000) and ups.open("c", 400, 1000)
    assert ups.nbytes == 1000
    ups.close("a")
    assert ups.open("b", 600, 1000)


def test_a_stalled_upload_is_dropped_and_its_reader_told_so():
    async def main() -> None:
        ups = Uploads()
        ups.open("k", 2 * PART_BYTES, 10 * PART_BYTES)
        ups.put("k", 0, b"x" * PART_BYTES, 2 * PART_BYTES, 10 * PART_BYTES)
        assert (await ups.read("k", 0, 0.2))[:2] == (2, b"x" * PART_BYTES)
        assert await asyncio.wait_for(ups.read("k", 1, 0.2), 5) is None  # part 1 never comes
        assert "k" not in ups
        with pytest.raises(TrustError, match="no upload"):
            ups.put("k", 1, b"x" * PART_BYTES, 2 * PART_BYTES, 10 * PART_BYTES)
        ups.open("old", 10, 100)
        await asyncio.sleep(0.05)
        assert ups.expire(0.01) == 1 and len(ups) == 0

    asyncio.run(main())


def test_a_result_in_parts_is_never_a_mix_of_two_runs_and_is_handed_over_to_its_asker_only():
    from depin_jupyter.network.results import ResultParts

    async def main() -> None:
        rp = ResultParts()
        total, limit = 2 * PART_BYTES, 10 * PART_BYTES
        whole, began = rp.receive("k", "tls://a:1", 0, b"a" * PART_BYTES, total, limit, limit, 60.0)
        assert whole is None and began
        first = await rp.arriving.read("k", 0, 60.0)
        # the run moved to another volunteer (the first left): its parts start over, in a new generation
        whole, began = rp.receive("k", "tls://b:2", 0, b"b" * PART_BYTES, total, limit, limit, 60.0)
        assert whole is None and began
        second = await rp.arriving.read("k", 0, 60.0)
        assert second[1] == b"b" * PART_BYTES and second[2] != first[2]
        whole, began = rp.receive("k", "tls://b:2", 1, b"b" * PART_BYTES, total, limit, limit, 60.0)
        assert whole == b"b" * total and not began and rp.gens["k"] == second[2] and len(rp.arriving) == 0
        with pytest.raises(TrustError, match="relay is full"):
            rp.receive("big", "tls://b:2", 0, b"x", 11 * PART_BYTES, limit, limit, 60.0)
        # handed over in parts: to its asker only, dropped once every part was read
        assert rp.hand_over("small", b"tiny", "sci") == {"payload": b"tiny"}
        assert rp.hand_over("k", whole, "sci") == {"parts": 2, "nbytes": total}
        assert rp.handed("k", "eve") is None and rp.handed("k", "sci") == whole
        rp.served("k", 0, 2)
        rp.served("k", 1, 2)
        assert rp.handed("k", "sci") is None and rp.nbytes == 0
        # parts its client read while they arrived are not kept again
        rp.served("m", 0, 2)
        rp.served("m", 1, 2)
        assert rp.hand_over("m", b"m" * total, "sci") == {"parts": 2, "nbytes": total}
        assert rp.handed("m", "sci") is None

    asyncio.run(main())
