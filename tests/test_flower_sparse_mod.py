"""sparse_mod in process (no simulation): error feedback exact to the bit in every value
dtype, values beyond fp16's range, which arrays travel dense, and a node restart."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("flwr", reason="Flower not installed (pip install 'sparsefl[flower]')")

import numpy as np  # noqa: E402
from flower_messages import (  # noqa: E402
    copy_state,
    node_context,
    reply,
    server_identity,  # noqa: F401 - a fixture
    train_message,
)
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict  # noqa: E402

from sparsefl import codec  # noqa: E402
from sparsefl.flower import SparseStrategy, sparse_mod  # noqa: E402
from sparsefl.flower.sparse import PAYLOAD_KEY, STATE_KEY, is_dense  # noqa: E402


def _state_residual(ctxt: Context, numel: int) -> torch.Tensor:
    rec = ctxt.state.array_records.get(STATE_KEY)
    if rec is None:
        return torch.zeros(numel)
    return torch.cat([torch.from_numpy(a.reshape(-1)) for a in rec.to_numpy_ndarrays()])


def _sent(out: Message) -> tuple[torch.Tensor, torch.dtype]:
    data = out.content["arrays"][PAYLOAD_KEY].numpy().tobytes()
    chunks = codec.decode(data)
    dtype = chunks[0].values.dtype
    return torch.cat([c.to_dense(torch.float32) for c in chunks]), dtype


def _handler(new: dict[str, np.ndarray]):
    return lambda msg, ctxt: reply(msg, new)


@pytest.mark.parametrize("value_dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
def test_sent_plus_residual_is_the_update_bit_for_bit_over_20_rounds(value_dtype):
    gen = np.random.default_rng(0)
    shapes = {"conv.weight": (16, 8, 3, 3), "fc.weight": (10, 64)}
    numel = sum(int(np.prod(s)) for s in shapes.values())
    mod, ctxt = sparse_mod(density=0.05, value_dtype=value_dtype), node_context(1)
    model = {k: gen.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    for rnd in range(1, 21):
        # updates over 12 orders of magnitude: fp16's subnormals and rounding both happen
        scale = 10.0 ** gen.uniform(-9, 3, size=1)[0]
        new = {k: (a + scale * gen.standard_normal(a.shape)).astype(np.float32)
               for k, a in model.items()}
        old_res = _state_residual(ctxt, numel)
        update = torch.cat([torch.from_numpy((new[k] - model[k]).reshape(-1)) for k in shapes])
        owed = update + old_res  # what error feedback must account for, in float32
        out = mod(train_message(ArrayRecord({k: Array(v) for k, v in model.items()}),
                                rnd=rnd), ctxt, _handler(new))
        sent, dtype = _sent(out)
        assert dtype == value_dtype or (dtype == torch.float32 and scale > 1e3)
        res = _state_residual(ctxt, numel)
        assert torch.equal(sent + res, owed), (rnd, scale, (sent + res - owed).abs().max())
        assert int((sent != 0).sum()) <= int(0.05 * numel) + 1
        model = new


def test_a_value_beyond_fp16s_range_is_sent_exactly_not_as_inf():
    base = {"w": np.zeros(1000, np.float32)}
    new = {"w": np.zeros(1000, np.float32)}
    new["w"][7], new["w"][8] = 1e6, -70000.0
    ctxt = node_context(1)
    out = sparse_mod(density=0.01)(train_message(ArrayRecord({"w": Array(base["w"])})), ctxt,
                                   _handler(new))
    sent, dtype = _sent(out)
    assert dtype == torch.float32
    assert float(sent[7]) == 1e6 and float(sent[8]) == -70000.0
    assert torch.isfinite(sent).all()
    assert float(_state_residual(ctxt, 1000).abs().max()) == 0.0


def _bn_model() -> dict[str, np.ndarray]:
    gen = np.random.default_rng(1)
    return {"conv.weight": gen.standard_normal((8, 4, 3, 3)).astype(np.float32),
            "bn.weight": np.ones(8, np.float32), "bn.bias": np.zeros(8, np.float32),
            "bn.running_mean": gen.standard_normal(512).astype(np.float32),
            "bn.running_var": np.ones(512, np.float32),
            "bn.num_batches_tracked": np.array(2**40 + 3, dtype=np.int64),
            "head.weight": gen.standard_normal((10, 64)).astype(np.float64),
            "fc.weight": gen.standard_normal((10, 32)).astype(np.float32)}


def test_integer_bn_statistics_and_small_arrays_travel_dense_in_their_dtype():
    model = _bn_model()
    new = {k: v.copy() for k, v in model.items()}
    new["conv.weight"] += 0.5
    new["bn.running_mean"] += 1e-3
    new["bn.num_batches_tracked"] = np.array(2**40 + 17, dtype=np.int64)
    new["fc.weight"][0, :4] = 3.0
    # head.weight (float64) gets no update at all: it must come back bit-identical
    out = sparse_mod(density=0.1)(train_message(ArrayRecord({k: Array(v) for k, v in
                                                             model.items()})),
                                  node_context(1), _handler(new))
    rec = out.content["arrays"]
    assert list(rec.keys()) == [PAYLOAD_KEY, "bn.weight", "bn.bias", "bn.running_mean",
                                "bn.running_var", "bn.num_batches_tracked"]
    assert int(rec["bn.num_batches_tracked"].numpy()) == 2**40 + 17
    assert rec["bn.running_mean"].numpy().tobytes() == new["bn.running_mean"].tobytes()
    chunks = codec.decode(rec[PAYLOAD_KEY].numpy().tobytes())
    assert [c.numel for c in chunks] == [288, 640, 320]  # conv, head (float64), fc
    assert [is_dense(k, v) for k, v in model.items()] == [False, True, True, True, True, True,
                                                          False, False]


@pytest.mark.parametrize("mode", ["merge", "per_client"])
def test_the_server_returns_each_array_as_flower_would_from_dense_replies(
        mode, server_identity):  # noqa: F811 - the fixture
    from flower_messages import Grid
    from flwr.serverapp.strategy import FedAvg

    model = _bn_model()
    new = {k: v.copy() for k, v in model.items()}
    new["conv.weight"][0] += 1.0
    new["bn.num_batches_tracked"] = np.array(2**40 + 17, dtype=np.int64)
    strategy = SparseStrategy(FedAvg(fraction_evaluate=0.0, min_train_nodes=1,
                                      min_available_nodes=1), mode=mode)
    arrays = ArrayRecord({k: Array(v) for k, v in model.items()})
    msgs = list(strategy.configure_train(1, arrays, _config(), Grid([5])))
    ctxt = node_context(5)
    replies = [sparse_mod(density=0.5)(m, ctxt, _handler(new)) for m in msgs]
    out, _ = strategy.aggregate_train(1, replies)
    got = {k: a.numpy() for k, a in out.items()}
    # head.weight (float64, zero update) bit-identical: no float32 round trip
    assert got["head.weight"].dtype == np.float64
    assert got["head.weight"].tobytes() == model["head.weight"].tobytes()
    # the int64 counter above 2^24 exact (Flower's FedAvg itself makes it float64)
    assert float(got["bn.num_batches_tracked"]) == 2**40 + 17
    ref, _ = FedAvg().aggregate_train(1, [reply(m, new) for m in msgs])
    for k, a in ref.items():
        assert got[k].dtype == a.numpy().dtype, k
        np.testing.assert_array_equal(got[k], a.numpy(), err_msg=k)


def _config():
    from flwr.app import ConfigRecord

    return ConfigRecord({"lr": 0.1})


def test_dense_keys_choose_the_dense_arrays():
    model = _bn_model()
    new = {k: v + 1 for k, v in model.items()}
    for keys, dense in [(["conv.weight"], ["conv.weight", "bn.num_batches_tracked"]),
                        (lambda n, a: n.startswith("bn."),
                         [k for k in model if k.startswith("bn.")])]:
        out = sparse_mod(density=0.1, dense_keys=keys)(
            train_message(ArrayRecord({k: Array(v) for k, v in model.items()})),
            node_context(1), _handler(new))
        assert sorted(out.content["arrays"].keys()) == sorted([PAYLOAD_KEY, *dense])


def test_the_residual_survives_a_restart_into_a_new_context():
    base = {"w": np.zeros(100, np.float32), "b": np.zeros(300, np.float32)}
    new = {"w": np.arange(100, dtype=np.float32), "b": np.full(300, 0.5, np.float32)}
    ctxt = node_context(1)
    out = sparse_mod(density=0.1, value_dtype=torch.float32, dense_below=0)(
        train_message(ArrayRecord({k: Array(v) for k, v in base.items()})), ctxt,
        _handler(new))
    sent, _ = _sent(out)
    assert int((sent != 0).sum()) == 40
    res = _state_residual(ctxt, 400)
    full = torch.cat([torch.from_numpy(new["w"]), torch.from_numpy(new["b"])])
    assert torch.equal(sent + res, full)
    # the node restarts: a new Context from the saved state's bytes, a new mod
    restarted = node_context(1, copy_state(ctxt.state))
    assert restarted.state is not ctxt.state
    assert restarted.state[STATE_KEY] is not ctxt.state[STATE_KEY]
    out2 = sparse_mod(density=0.1, value_dtype=torch.float32, dense_below=0)(
        train_message(ArrayRecord({k: Array(v) for k, v in base.items()})), restarted,
        _handler(base))  # a zero update: only what was owed goes out
    sent2, _ = _sent(out2)
    assert int((sent2 != 0).sum()) == 40
    assert torch.equal(sent2[sent2 != 0], res[sent2 != 0])
    assert float(sent2[sent2 != 0].abs().min()) >= float(res.abs().sort().values[-40])
    assert torch.equal(sent2 + _state_residual(restarted, 400), res)


def test_other_messages_and_unknown_replies_pass_untouched():
    ctxt = node_context(1)
    base = {"w": np.zeros(400, np.float32)}
    other = {"v": np.ones(400, np.float32)}  # the reply's arrays are not the received ones
    out = sparse_mod()(train_message(ArrayRecord({"w": Array(base["w"])})), ctxt,
                       _handler(other))
    assert list(out.content["arrays"].keys()) == ["v"]
    with pytest.raises(ValueError, match="density"):
        sparse_mod(density=0.0)
    with pytest.raises(ValueError, match="value_dtype"):
        sparse_mod(value_dtype=torch.int8)
    assert isinstance(ctxt.state, RecordDict)
