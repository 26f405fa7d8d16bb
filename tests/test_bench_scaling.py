"""Scaling benchmark (issue #7, item 3): it runs, and the streaming server's memory does
not grow with the number of clients while a buffering server's does."""

from __future__ import annotations

from sparsefl.bench import scaling


def test_streaming_server_memory_is_flat_in_client_count():
    n = 1_000_000
    payload_bytes = 8 * int(n * scaling.DENSITY)  # int32 index + fp32 value per entry
    # each probe's peak is the least of three fresh processes: a busy machine (CI beside
    # other jobs) only ever adds resident memory, here once 5 MB to one probe

    def least(c, mode):
        return min(scaling.server_memory(n, c, mode) for _ in range(3))

    # both counts fill the streaming server's group of 16 pending payloads
    stream = [least(c, "stream") for c in (32, 96)]
    buffered = [least(c, "buffer_all") for c in (32, 96)]
    # 64 more clients: a buffering server holds 64 more payloads (~25 MB here) ...
    assert buffered[1] - buffered[0] > 0.6 * 64 * payload_bytes, buffered
    # ... the streaming one at most a few payloads' worth of allocator noise
    assert stream[1] - stream[0] < 8 * payload_bytes, stream


def test_quick_sweep_writes_table_json_and_plot(tmp_path):
    text = scaling.main(str(tmp_path), quick=True, threads=1)
    assert "| aggregate |" in text and "server peak memory" in text
    for name in ("scaling.json", "scaling.md", "scaling.png"):
        assert (tmp_path / name).stat().st_size > 0
    res = scaling.run(sizes=(100_000, 400_000), clients=(3, 6), client_n=200_000,
                      memory_n=200_000, rounds=1, threads=1, progress=lambda m: None)
    # the bytes model: payload entries x 8 B + 8 B per element for base and out
    p = res["agg_size"][0]
    assert p["bytes"] == 8 * p["entries"] + 8 * p["n"]
    assert 0 < res["agg_fit"]["r2"] <= 1
