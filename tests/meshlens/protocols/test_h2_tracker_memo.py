"""The tracker's memo of header blocks (h2_tracker MEMO_BLOCKS): a block decodes to what hpack alone
decodes it to, whatever came before it, and leaves the table as hpack alone leaves it."""
from __future__ import annotations

import pytest
from hpack import Decoder, Encoder, HPACKError
from hypothesis import given, settings
from hypothesis import strategies as st

from meshlens.protocols.h2_tracker import MAX_HEADER_LIST_BYTES, MEMO_BLOCK_BYTES, MEMO_BLOCKS, _Side

# few names and values, so that the same bytes come again, meaning the same fields or (an index
# into a table that moved since) others
POOL = [(b":path", b"/a"), (b":path", b"/b"), (b"x-id", b"1"), (b"x-id", b"2"), (b"te", b"trailers"),
        (b"user-agent", b"u" * 40)]


def first_of_each_name(fields: list) -> dict[bytes, bytes]:
    headers: dict[bytes, bytes] = {}
    for name, value in fields:
        headers.setdefault(bytes(name), bytes(value))
    return headers


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.lists(st.tuples(st.integers(0, len(POOL) - 1), st.booleans()), min_size=1, max_size=3),
                          st.one_of(st.just([]), st.lists(st.sampled_from([0, 40, 64, 80, 128, 4096]), max_size=2))),
                max_size=40))
def test_memo_decodes_as_hpack_alone_whatever_the_order(blocks: list) -> None:
    """Each block: fields from POOL (each indexed, or sent never-indexed), some after table size updates."""
    encoder, side = Encoder(), _Side(True)
    reference = Decoder(max_header_list_size=MAX_HEADER_LIST_BYTES)
    for fields, resizes in blocks:
        for size in resizes:
            encoder.header_table_size = size
        block = encoder.encode([(*POOL[i], sensitive) for i, sensitive in fields], huffman=True)
        try:
            expected = first_of_each_name(reference.decode(block, raw=True))
        except HPACKError:  # (hpack's encoder and decoder disagree after some size updates)
            with pytest.raises(HPACKError):
                side.decode(block)
            return  # the tracker gives up on the connection here
        assert side.decode(block) == expected
        assert list(side.decoder.header_table.dynamic_entries) == list(reference.header_table.dynamic_entries)
        assert side.decoder.header_table.maxsize == reference.header_table.maxsize


def test_a_repeated_block_that_leaves_the_table_as_it_was_is_not_decoded_again() -> None:
    encoder, side = Encoder(), _Side(True)
    request = [(b":method", b"GET"), (b":path", b"/items"), (b"user-agent", b"bench")]
    first = encoder.encode(request)  # adds its fields to the table
    again = encoder.encode(request)  # indexes them: the table stays as it was
    assert side.decode(first) == dict(request)
    assert side.decode(again) == dict(request) and list(side.memo) == [again]
    assert side.decode(again) is side.memo[again]


@pytest.mark.parametrize("table", [4096, 64])  # 64: room for one entry, so an entry added evicts the last
def test_a_table_that_changed_empties_the_memo(table: int) -> None:
    encoder, side = Encoder(), _Side(True)
    encoder.header_table_size = table
    side.decode(encoder.encode([(b"x-id", b"1")]))
    newest = encoder.encode([(b"x-id", b"1")])  # index 62: the newest entry
    assert side.decode(newest) == {b"x-id": b"1"} and newest in side.memo
    side.decode(encoder.encode([(b"x-id", b"2")]))  # now the newest entry
    assert side.decode(newest) == {b"x-id": b"2"}  # the same bytes, another field


def test_a_table_shrunk_and_grown_again_in_one_block_empties_the_memo() -> None:
    """Two size updates (RFC 7541 4.2): the same size after, the same newest entry, one entry fewer."""
    encoder, side = Encoder(), _Side(True)
    side.decode(encoder.encode([(b"x-id", b"1")]))
    side.decode(encoder.encode([(b"x-id", b"2")]))  # the table: x-id 2, x-id 1
    older = encoder.encode([(b"x-id", b"1")])  # index 63
    assert side.decode(older) == {b"x-id": b"1"} and older in side.memo
    encoder.header_table_size = 40  # room for x-id 2 only
    encoder.header_table_size = 4096
    assert side.decode(encoder.encode([(b"x-id", b"2")])) == {b"x-id": b"2"}
    with pytest.raises(HPACKError):  # index 63 is gone: hpack refuses it, and so does the tracker
        side.decode(older)


def test_a_size_update_is_followed_when_its_block_comes_again() -> None:
    encoder, side, reference = Encoder(), _Side(True), Decoder()
    side.decoder.max_allowed_table_size = reference.max_allowed_table_size = 8192
    encoder.header_table_size = 8192
    grow = encoder.encode([(b"x-id", b"1", True)])  # never indexed: only the size changes
    encoder.header_table_size = 4096
    shrink = encoder.encode([(b"x-id", b"1", True)])
    for block in (grow, shrink, grow):
        assert side.decode(block) == first_of_each_name(reference.decode(block, raw=True))
    assert side.decoder.header_table.maxsize == reference.header_table.maxsize == 8192


def test_a_smaller_announced_table_is_checked_again() -> None:
    """SETTINGS_HEADER_TABLE_SIZE lowered below the table the encoder keeps: hpack refuses the next
    block (the encoder had to shrink its table first), memo or not."""
    encoder, side = Encoder(), _Side(True)
    side.decode(encoder.encode([(b"x-id", b"1")]))
    again = encoder.encode([(b"x-id", b"1")])
    side.decode(again)
    assert again in side.memo
    side.decoder.max_allowed_table_size = 100
    with pytest.raises(HPACKError):
        side.decode(again)


def test_the_memo_is_bounded() -> None:
    encoder, side = Encoder(), _Side(True)
    side.decode(encoder.encode([(b"x-id", b"1")]))
    for i in range(MEMO_BLOCKS + 10):  # never indexed: the table does not move
        side.decode(encoder.encode([(b"x-id", b"1"), (b"n", str(i).encode(), True)]))
    assert len(side.memo) == MEMO_BLOCKS
    long = encoder.encode([(b"x-id", b"1"), (b"big", b"v" * MEMO_BLOCK_BYTES, True)], huffman=False)
    assert len(long) > MEMO_BLOCK_BYTES
    side.memo.clear()
    assert side.decode(long)[b"big"] == b"v" * MEMO_BLOCK_BYTES and not side.memo
