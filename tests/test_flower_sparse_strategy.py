"""SparseStrategy in process (no simulation): no reply crashes the server (named cases and
a 2,000-reply fuzz), the strategy matrix against the inner strategy on dense replies, and
the sparse downlink, exact to the bit against the dense one."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("flwr", reason="Flower not installed (pip install 'sparsefl[flower]')")

import numpy as np  # noqa: E402
from flower_messages import (  # noqa: E402
    Grid,
    node_context,
    reply,
    run_node,
    server_identity,  # noqa: F401 - a fixture
)
from flwr.app import (  # noqa: E402
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import (  # noqa: E402
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
)

from sparsefl import codec  # noqa: E402
from sparsefl.flower import SparseStrategy, sparse_mod  # noqa: E402
from sparsefl.flower.sparse import DOWN_KEY, PAYLOAD_KEY  # noqa: E402

NODES = [11, 12, 13, 14]
SHAPES = {"conv.weight": (16, 8, 3, 3), "conv.bias": (16,), "bn.running_mean": (16,),
          "bn.num_batches_tracked": (), "fc.weight": (10, 64), "fc.bias": (10,)}
MIN = {"min_train_nodes": 1, "min_evaluate_nodes": 1, "min_available_nodes": 1,
       "fraction_evaluate": 0.0}


def _model(seed: int = 0) -> dict[str, np.ndarray]:
    gen = np.random.default_rng(seed)
    out = {k: gen.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    out["bn.num_batches_tracked"] = np.array(100, dtype=np.int64)
    return out


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


def _trained(msg: Message, node: int, rnd: int) -> dict[str, np.ndarray]:
    """A deterministic stand-in for local training: received arrays + a node/round update
    (a few large entries, many small: what top-k is for)."""
    got = {k: a.numpy() for k, a in msg.content["arrays"].items()}
    gen = np.random.default_rng(1000 * rnd + node)
    out = {}
    for k, a in got.items():
        if a.dtype.kind == "f":
            d = 1e-3 * gen.standard_normal(a.shape)
            d.reshape(-1)[gen.integers(0, max(a.size, 1), size=max(a.size // 20, 1))] += 0.5
            out[k] = (a + d).astype(a.dtype)
        else:
            out[k] = a + 10
    return out


def _handler(rnd: int, seen: dict | None = None):
    def handler(msg: Message, ctxt) -> Message:
        node = msg.metadata.dst_node_id
        if seen is not None:
            seen[(rnd, node)] = {k: a.numpy().copy() for k, a in msg.content["arrays"].items()}
        return reply(msg, _trained(msg, node, rnd), weight=10 + node, train_loss=0.1 * node)
    return handler


def _good_replies(strategy: SparseStrategy, rnd: int, arrays: ArrayRecord, contexts: dict,
                  nodes=NODES) -> list[Message]:
    msgs = list(strategy.configure_train(rnd, arrays, ConfigRecord({}), Grid(nodes)))
    mod = sparse_mod(density=0.05)
    msgs.sort(key=lambda m: m.metadata.dst_node_id)  # flwr samples in random order
    return [run_node(mod, m, contexts[m.metadata.dst_node_id], _handler(rnd)) for m in msgs]


def _arrays_of(result) -> dict[str, np.ndarray]:
    arrays, _ = result
    return {k: a.numpy() for k, a in arrays.items()}


# ------------------------------------------------------------ no reply crashes ---------
def _without_metrics(m: Message) -> Message:
    return Message(RecordDict({"arrays": m.content["arrays"]}), reply_to=_instr(m))


def _instr(m: Message) -> Message:
    """A stand-in instruction for re-making a reply from `m` with other content."""
    from flwr.app import Metadata

    md = m.metadata
    return Message(RecordDict(), metadata=Metadata(
        run_id=md.run_id, message_id=md.reply_to_message_id, src_node_id=md.dst_node_id,
        dst_node_id=md.src_node_id, reply_to_message_id="", group_id=md.group_id,
        created_at=md.created_at, ttl=3600.0, message_type=md.message_type))


def _with_weight(m: Message, w) -> Message:
    metrics = MetricRecord(dict(m.content["metrics"]))
    if w is None:
        del metrics["num-examples"]
    else:
        metrics["num-examples"] = w
    return Message(RecordDict({"arrays": m.content["arrays"], "metrics": metrics}),
                   reply_to=_instr(m))


def _two_records(m: Message) -> Message:
    return Message(RecordDict({"arrays": m.content["arrays"], "more": m.content["arrays"],
                               "metrics": m.content["metrics"]}), reply_to=_instr(m))


def _garbled_array(m: Message) -> Message:
    """A dense array whose bytes are not an np.save file (as a broken node might send)."""
    rec = m.content["arrays"]
    arrays = {k: rec[k] for k in rec}
    name = next(k for k in arrays if k != PAYLOAD_KEY)
    arrays[name] = Array(dtype="float32", shape=(3,), stype="numpy.ndarray", data=b"garbage")
    return Message(RecordDict({"arrays": ArrayRecord(arrays), "metrics": m.content["metrics"]}),
                   reply_to=_instr(m))


BAD = {
    "no MetricRecord": _without_metrics,
    "an array's bytes garbled": _garbled_array,
    "no weight key": lambda m: _with_weight(m, None),
    "weight 0": lambda m: _with_weight(m, 0),
    "weight -5": lambda m: _with_weight(m, -5.0),
    "weight NaN": lambda m: _with_weight(m, float("nan")),
    "weight inf": lambda m: _with_weight(m, float("inf")),
    "weight a list": lambda m: _with_weight(m, [1.0, 2.0]),
    "two ArrayRecords": _two_records,
}


@pytest.mark.parametrize("inner", [FedAvg, FedMedian], ids=["merge", "per_client"])
def test_a_bad_reply_is_dropped_with_its_reason_and_the_round_goes_on(inner,
                                                                      server_identity):  # noqa: F811
    arrays = _record(_model())
    for what, bad in BAD.items():
        ref_s = SparseStrategy(inner(**MIN))
        ctx = {n: node_context(n) for n in NODES}
        good = _good_replies(ref_s, 1, arrays, ctx)
        ref = _arrays_of(ref_s.aggregate_train(1, good[1:]))
        s = SparseStrategy(inner(**MIN))
        ctx = {n: node_context(n) for n in NODES}
        replies = _good_replies(s, 1, arrays, ctx)
        replies[0] = bad(replies[0])
        got = _arrays_of(s.aggregate_train(1, replies))
        assert [n for n, _ in s.dropped[1]] == [NODES[0]], what
        for k in ref:
            np.testing.assert_array_equal(got[k], ref[k], err_msg=f"{what}: {k}")
        assert s.merged[1]["dropped"] == 1


def test_a_payload_for_another_model_or_nothing_usable(server_identity):  # noqa: F811
    arrays = _record(_model())
    s = SparseStrategy(FedAvg(**MIN))
    ctx = {n: node_context(n) for n in NODES}
    replies = _good_replies(s, 1, arrays, ctx)
    other = SparseStrategy(FedAvg(**MIN))
    small = _record({"w": np.zeros((30, 30), np.float32)})
    foreign = _good_replies(other, 1, small, {n: node_context(n) for n in NODES})
    got = s.aggregate_train(1, [foreign[0], *replies[1:]])
    assert "do not match" in s.dropped[1][0][1] or "not the model" in s.dropped[1][0][1]
    assert all(np.isfinite(a).all() for a in _arrays_of(got).values() if a.dtype.kind == "f")
    # nothing usable: the round reports what the inner strategy reports for no replies
    s2 = SparseStrategy(FedAvg(**MIN))
    replies = _good_replies(s2, 1, arrays, {n: node_context(n) for n in NODES})
    assert s2.aggregate_train(1, [_with_weight(m, 0) for m in replies]) == \
        FedAvg(**MIN).aggregate_train(1, [])
    assert len(s2.dropped[1]) == len(NODES)


_MUTATIONS = ["flip", "truncate", "extend", "random", "dtype", "rename", "extra", "drop_array",
              "weight", "metric_key", "metadata", "second_metrics", "shape"]


def _mutate(m: Message, gen: np.random.Generator) -> tuple[Message, str, bool]:
    """One random mutation of a good sparse reply: (reply, kind, must it be dropped)."""
    kind = _MUTATIONS[int(gen.integers(len(_MUTATIONS)))]
    rec = m.content["arrays"]
    arrays = {k: rec[k].numpy().copy() for k in rec}
    metrics = MetricRecord(dict(m.content["metrics"]))
    payload = arrays[PAYLOAD_KEY]
    must_drop = True
    if kind == "flip":
        pos = gen.integers(0, payload.size, size=int(gen.integers(1, 5)))
        payload[pos] ^= gen.integers(1, 256, size=pos.size).astype(np.uint8)
    elif kind == "truncate":
        arrays[PAYLOAD_KEY] = payload[:int(gen.integers(0, payload.size))]
    elif kind == "extend":
        arrays[PAYLOAD_KEY] = np.concatenate(
            [payload, gen.integers(0, 256, int(gen.integers(1, 64))).astype(np.uint8)])
    elif kind == "random":
        arrays[PAYLOAD_KEY] = gen.integers(0, 256, payload.size).astype(np.uint8)
    elif kind == "dtype":
        arrays[PAYLOAD_KEY] = payload.astype([np.int8, np.float32, np.int64][
            int(gen.integers(3))])
    elif kind == "rename":
        k = [k for k in arrays if k != PAYLOAD_KEY][0]
        arrays["renamed." + k] = arrays.pop(k)
    elif kind == "extra":
        arrays["extra"] = np.ones(3, np.float32)
    elif kind == "drop_array":
        del arrays[[k for k in arrays if k != PAYLOAD_KEY][int(gen.integers(len(arrays) - 1))]]
    elif kind == "shape":
        k = [k for k in arrays if k != PAYLOAD_KEY and arrays[k].size > 1][0]
        arrays[k] = arrays[k].reshape(-1)[:-1]
    elif kind == "weight":
        w = [0, -1, float("nan"), float("inf"), -float("inf"), 7.5][int(gen.integers(6))]
        metrics["num-examples"] = w
        must_drop = w != 7.5
    elif kind == "metric_key":
        metrics["surprise"] = 1.0
    elif kind == "metadata":
        must_drop = False
    content = RecordDict({"arrays": _record(arrays), "metrics": metrics})
    if kind == "second_metrics":
        content["metrics2"] = MetricRecord({"x": 1.0})
    out = Message(content, reply_to=_instr(m))
    if kind == "metadata":  # what a relay may change without touching the content
        out.metadata.group_id = str(gen.integers(100))
        out.metadata.ttl = float(gen.integers(1, 10**6))
    return out, kind, must_drop


def _replay(rnd: int, arrays: ArrayRecord, replies: list[Message],
            s: SparseStrategy | None = None):
    s = s or SparseStrategy(FedAvg(**MIN), downlink=False)
    list(s.configure_train(rnd, arrays, ConfigRecord({}), Grid(NODES)))
    return s.aggregate_train(rnd, replies)


def test_fuzz_2000_mutated_replies_no_exception_no_garbage(server_identity):  # noqa: F811
    gen = np.random.default_rng(0)
    arrays = _record(_model())
    ctx = {n: node_context(n) for n in NODES[:3]}
    base = SparseStrategy(FedAvg(**MIN), downlink=False)
    good = _good_replies(base, 1, arrays, ctx, NODES[:3])
    ref_without = _arrays_of(_replay(1, arrays, good[1:]))
    ref_with = _arrays_of(_replay(1, arrays, good))
    ref_heavier = _arrays_of(_replay(1, arrays, [_with_weight(good[0], 7.5), *good[1:]]))
    kinds: dict[str, list[int]] = {}
    for trial in range(2000):
        bad, kind, must_drop = _mutate(good[0], gen)
        s = SparseStrategy(FedAvg(**MIN), downlink=False)
        got = _arrays_of(_replay(1, arrays, [bad, *good[1:]], s))
        dropped = len(s.dropped.get(1, []))
        tally = kinds.setdefault(kind, [0, 0])
        tally[dropped] += 1
        if must_drop:
            assert dropped == 1, (trial, kind)
            want = ref_without
        else:
            assert dropped == 0, (trial, kind, s.dropped)
            want = ref_heavier if kind == "weight" else ref_with
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"{trial} {kind} {k}")
    print("fuzz (kind: [kept, dropped]):", kinds)
    assert sum(sum(v) for v in kinds.values()) == 2000


# ------------------------------------------------------------- strategy matrix ---------
INNERS = {"FedAvg": lambda: FedAvg(**MIN), "FedProx": lambda: FedProx(**MIN),
          "FedAvgM": lambda: FedAvgM(**MIN, server_momentum=0.9),
          "FedAdam": lambda: FedAdam(**MIN), "FedMedian": lambda: FedMedian(**MIN),
          "FedTrimmedAvg": lambda: FedTrimmedAvg(**MIN, beta=0.25),
          "Krum": lambda: Krum(**MIN, num_malicious_nodes=1)}


def _decoded_dense(m: Message, sent: ArrayRecord) -> Message:
    """The reference's view of a sparse reply: decoded on its own, sent + update."""
    rec = m.content["arrays"]
    names = list(sent.keys())
    sparse_names = [n for n in names if n not in rec]
    chunks = codec.decode(rec[PAYLOAD_KEY].numpy().tobytes())
    upd = dict(zip(sparse_names, chunks))
    dtypes = dict(m.content.config_records.get("sparsefl-dtypes") or {})
    out = {}
    for n in names:
        if n in rec:
            out[n] = rec[n].numpy()
        else:
            a = sent[n].numpy()
            out[n] = (a + upd[n].to_dense(torch.float32).numpy().reshape(a.shape)).astype(
                dtypes.get(n, a.dtype))
    return Message(RecordDict({"arrays": _record(out), "metrics": m.content["metrics"]}),
                   reply_to=_instr(m))


@pytest.mark.parametrize("name", list(INNERS))
def test_strategy_matrix_equals_the_inner_strategy_on_decoded_replies(name,
                                                                      server_identity):  # noqa: F811
    wrapped, ref = SparseStrategy(INNERS[name]()), INNERS[name]()
    ctx = {n: node_context(n) for n in NODES}
    arrays = _record(_model())
    mod = sparse_mod(density=0.05)
    for rnd in (1, 2, 3):
        msgs = list(wrapped.configure_train(rnd, arrays, ConfigRecord({}), Grid(NODES)))
        list(ref.configure_train(rnd, arrays, ConfigRecord({}), Grid(NODES)))
        assert list(wrapped._sent) == [rnd]
        replies = [run_node(mod, m, ctx[m.metadata.dst_node_id], _handler(rnd)) for m in msgs]
        assert not any(r.has_error() for r in replies)
        dense = [_decoded_dense(r, arrays) for r in replies]
        got, metrics = wrapped.aggregate_train(rnd, replies)
        want, _ = ref.aggregate_train(rnd, dense)
        assert not wrapped._sent and not wrapped.dropped
        for k in want:
            np.testing.assert_allclose(got[k].numpy().astype(np.float64),
                                       want[k].numpy().astype(np.float64), rtol=2e-6,
                                       atol=2e-6, err_msg=f"{name} round {rnd} {k}")
        assert metrics["sparsefl-sparse"] == len(NODES)
        arrays = want
    # a round configured but never aggregated leaves nothing behind
    wrapped.configure_train(4, arrays, ConfigRecord({}), Grid(NODES))
    wrapped.configure_train(5, arrays, ConfigRecord({}), Grid(NODES))
    assert list(wrapped._sent) == [5]


# --------------------------------------------------------------------- downlink ---------
def _run(downlink: bool, absent: dict[int, set[int]], rounds: int = 6, inner=None):
    """Rounds of a 4-node federation in process; absent[round] = nodes whose message is
    lost that round (they do not train and do not reply)."""
    s = SparseStrategy((inner or (lambda: FedAvg(**MIN)))(), downlink=downlink)
    ctx = {n: node_context(n) for n in NODES}
    arrays = _record(_model())
    mod = sparse_mod(density=0.05)
    seen: dict = {}
    for rnd in range(1, rounds + 1):
        msgs = list(s.configure_train(rnd, arrays, ConfigRecord({}), Grid(NODES)))
        msgs.sort(key=lambda m: m.metadata.dst_node_id)  # the same sums in both runs
        replies = [run_node(mod, m, ctx[m.metadata.dst_node_id], _handler(rnd, seen))
                   for m in msgs if m.metadata.dst_node_id not in absent.get(rnd, set())]
        assert not any(r.has_error() for r in replies), [r.error for r in replies
                                                         if r.has_error()]
        arrays, _ = s.aggregate_train(rnd, replies)
    return s, seen, arrays


@pytest.mark.parametrize("inner", ["FedAvg", "FedAdam"])
def test_sparse_downlink_is_exact_and_smaller(inner, server_identity):  # noqa: F811
    """FedAdam's arrays are float64 (and its int64 counter too): their changes travel as
    32-bit words, exact to the bit like float32's."""
    absent = {2: {12}, 3: {12, 13}, 4: {13}}
    sparse, seen_s, final_s = _run(True, absent, inner=INNERS[inner])
    dense, seen_d, final_d = _run(False, absent, inner=INNERS[inner])
    assert seen_s.keys() == seen_d.keys()
    for key in seen_d:  # every node saw exactly the model the dense downlink gave it
        for k in seen_d[key]:
            assert seen_s[key][k].tobytes() == seen_d[key][k].tobytes(), (key, k)
            assert seen_s[key][k].dtype == seen_d[key][k].dtype
    for k, a in final_d.items():
        assert final_s[k].numpy().tobytes() == a.numpy().tobytes()
    for rnd in range(3, 7):
        print(f"round {rnd}: downlink {sparse.downlink_bytes[rnd]} vs dense "
              f"{dense.downlink_bytes[rnd]}; uplink {sparse.uplink_bytes[rnd]}")
        assert sparse.downlink_bytes[rnd] < dense.downlink_bytes[rnd]
    # a node that missed rounds 2-3 got the change since round 1, not the full model
    assert sparse.downlink_bytes[4] < dense.downlink_bytes[4]


def test_a_float32_reply_to_float64_arrays_stays_sparse_and_keeps_its_dtype(
        server_identity):  # noqa: F811
    """A torch model loads FedAdam's float64 arrays and answers float32: the mod still
    sends a payload, and the server rebuilds float32, as the dense reply had it."""
    wrapped, ref = SparseStrategy(INNERS["FedAdam"]()), INNERS["FedAdam"]()
    ctx = {n: node_context(n) for n in NODES}
    arrays = _record(_model())
    mod = sparse_mod(density=0.05)

    def as_torch(rnd):
        inner = _handler(rnd)

        def handler(msg, ctxt):
            out = inner(msg, ctxt)
            rec = out.content["arrays"]
            cast = {k: (a.numpy().astype(np.float32) if a.numpy().dtype.kind == "f"
                        else a.numpy()) for k, a in rec.items()}
            return reply(msg, cast, weight=out.content["metrics"]["num-examples"],
                         train_loss=out.content["metrics"]["train_loss"])
        return handler

    for rnd in (1, 2, 3):
        msgs = list(wrapped.configure_train(rnd, arrays, ConfigRecord({}), Grid(NODES)))
        list(ref.configure_train(rnd, arrays, ConfigRecord({}), Grid(NODES)))
        replies = [run_node(mod, m, ctx[m.metadata.dst_node_id], as_torch(rnd)) for m in msgs]
        assert all(PAYLOAD_KEY in r.content["arrays"] for r in replies)
        dense = [_decoded_dense(r, arrays) for r in replies]
        got, _ = wrapped.aggregate_train(rnd, replies)
        want, _ = ref.aggregate_train(rnd, dense)
        for k in want:
            assert got[k].numpy().dtype == want[k].numpy().dtype, (rnd, k)
            np.testing.assert_allclose(got[k].numpy(), want[k].numpy(), rtol=2e-6, atol=2e-6)
        arrays = want
    assert any(a.numpy().dtype == np.float64 for a in arrays.values())  # FedAdam's output


def test_a_node_that_lost_its_model_gets_the_full_model_next_round(server_identity):  # noqa: F811
    s = SparseStrategy(FedAvg(**MIN))
    ctx = {n: node_context(n) for n in NODES}
    arrays = _record(_model())
    mod = sparse_mod(density=0.05)
    # round 2 is full for all: FedAvg made the int64 counter float64 (a dtype change)
    for rnd in (1, 2, 3, 4):
        if rnd == 3:
            ctx[11] = node_context(11)  # node 11 restarts with nothing
        msgs = list(s.configure_train(rnd, arrays, ConfigRecord({}), Grid(NODES)))
        tags = {m.metadata.dst_node_id: m.content[DOWN_KEY]["base"] for m in msgs}
        replies = [run_node(mod, m, ctx[m.metadata.dst_node_id], _handler(rnd)) for m in msgs]
        failed = [r for r in replies if r.has_error()]
        if rnd <= 2:
            assert not any(tags.values()) and not failed
        elif rnd == 3:
            assert all(tags.values()) and [r.metadata.src_node_id for r in failed] == [11]
            assert "full model next round" in failed[0].error.reason
        else:
            assert tags[11] == "" and all(tags[n] for n in NODES[1:]) and not failed
        arrays, _ = s.aggregate_train(rnd, replies)


def test_a_downlink_that_inflates_past_a_model_is_refused():
    import zlib

    from sparsefl.flower.sparse import _apply_delta

    held = _record({"w": np.zeros(10, np.float32)})
    bomb = ArrayRecord({PAYLOAD_KEY: Array(np.frombuffer(zlib.compress(b"\0" * (8 << 20)),
                                                         dtype=np.uint8).copy())})
    with pytest.raises(ValueError, match="inflate"):
        _apply_delta(held, bomb)
