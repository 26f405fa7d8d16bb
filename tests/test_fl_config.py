"""Config files, overrides and the errors users see."""

import tomllib

import pytest

from sparsefl import fl
from sparsefl.fl import config as flconfig


def test_defaults_are_the_documented_main_job():
    cfg = fl.load()
    assert (cfg.data.name, cfg.data.clients, cfg.data.alpha) == ("digits", 20, 0.5)
    assert (cfg.sparsity.method, cfg.sparsity.sparsity) == ("sparsyfed", 0.9)


def test_overrides_and_round_trip():
    cfg = fl.load(None, ["client.lr=0.05", "sparsity.method=topk", "model.hidden=[32, 16]",
                         "swa.enabled=true", 'run.name="x y"'])
    assert cfg.client.lr == 0.05 and cfg.sparsity.method == "topk"
    assert cfg.model.hidden == [32, 16] and cfg.swa.enabled and cfg.run.name == "x y"
    assert flconfig.from_dict(tomllib.loads(flconfig.dumps(cfg))) == cfg


@pytest.mark.parametrize("override, message", [
    ("client.lrr=1", "client.lrr: unknown key"),
    ("bogus.x=1", "bogus: unknown section"),
    ("client.lr=-1", "client.lr: must be > 0"),
    ("client.lr=nan", "client.lr: must be finite"),
    ("client.epochs=1.5", "client.epochs: must be an integer"),
    ("sparsity.method=magic", "sparsity.method: must be one of"),
    ("sparsity.sparsity=1.0", "sparsity.sparsity: must be in"),
    ("server.clients_per_round=99", "server.clients_per_round"),
    ("swa.enabled=yes", "swa.enabled: must be true or false"),
    ("model.hidden=[0]", "model.hidden"),
    ("noequals", "expected section.key=value"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(fl.ConfigError, match=message):
        fl.load(None, [override])


def test_sparsyfed_needs_beta_above_one():
    with pytest.raises(fl.ConfigError, match="sparsity.beta"):
        fl.load(None, ["sparsity.beta=1.0"])


def test_base_files_merge_table_by_table(tmp_path):
    (tmp_path / "base.toml").write_text('[client]\nlr = 0.2\nepochs = 3\n[run]\nrounds = 7\n')
    (tmp_path / "exp.toml").write_text('base = "base.toml"\n[client]\nlr = 0.4\n')
    cfg = fl.load(tmp_path / "exp.toml")
    assert (cfg.client.lr, cfg.client.epochs, cfg.run.rounds) == (0.4, 3, 7)
    (tmp_path / "loop.toml").write_text('base = "loop.toml"\n')
    with pytest.raises(fl.ConfigError, match="include each other"):
        fl.load(tmp_path / "loop.toml")
    (tmp_path / "bad.toml").write_text("[client\n")
    with pytest.raises(fl.ConfigError, match="not valid TOML"):
        fl.load(tmp_path / "bad.toml")


def test_every_shipped_config_loads():
    from pathlib import Path

    files = sorted((Path(__file__).parent.parent / "configs").rglob("*.toml"))
    assert len(files) >= 10
    for f in files:
        fl.load(f)


def test_every_key_is_documented_with_its_default():
    """docs/config.md is the config reference: one row per key, showing its default."""
    import dataclasses
    from pathlib import Path

    from sparsefl.fl.config import Config, _toml_value

    rows = {}
    for line in (Path(__file__).parent.parent / "docs" / "config.md").read_text().splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) > 3 and cells[1].startswith("`"):
            rows[cells[1].strip("`")] = cells[2].strip("`")
    cfg = Config()
    for section in dataclasses.fields(cfg):
        sec = getattr(cfg, section.name)
        for f in dataclasses.fields(sec):
            key = f"{section.name}.{f.name}"
            assert key in rows, f"{key} is missing from docs/config.md"
            value = getattr(sec, f.name)
            shown = rows[key]
            if isinstance(value, float):
                assert float(shown) == value, f"{key}: docs say {shown}, default is {value}"
            else:
                assert shown == _toml_value(value), f"{key}: docs say {shown}, default {value}"
