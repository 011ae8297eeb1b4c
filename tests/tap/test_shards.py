"""How `meshlens tap --workers N` shares a capture's connections among its processes."""
from __future__ import annotations

from collections import Counter

from meshlens.tap.calls import shard_of


def test_connections_from_even_ephemeral_ports_to_one_server_port_spread_over_the_shards() -> None:
    # Linux (>= 4.6) gives connect() ephemeral ports of one parity: a bare port sum mod 2 put them all in one shard
    for shards in (2, 3, 4):
        counts = Counter(shard_of(p, 8080, shards) for p in range(32768, 60999, 2))
        assert len(counts) == shards and min(counts.values()) > 0.8 * sum(counts.values()) / shards, counts


def test_both_directions_of_a_connection_go_to_the_same_shard() -> None:
    assert all(shard_of(a, b, 4) == shard_of(b, a, 4) for a in range(40000, 40100) for b in (80, 8080, 50051))
