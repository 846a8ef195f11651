import numpy as np
import pytest

from crisp_ext.config import ConfigError, PickerConfig, config_to_toml, load_config, save_config
from crisp_ext.types import Micrograph, Particles, micrographs_by_id


def test_config_round_trips_toml_yaml_json(tmp_path):
    cfg = PickerConfig.paper().updated({"train.epochs": 3, "particle.diameter_A": 190.0})
    p = save_config(cfg, tmp_path / "config.toml")
    assert load_config(p) == cfg
    import json

    import yaml
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    (tmp_path / "c.json").write_text(json.dumps(cfg.to_dict()))
    assert load_config(tmp_path / "c.yaml") == cfg == load_config(tmp_path / "c.json")


def test_partial_config_and_errors(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[train]\nepochs = 7\n[model]\nencoder = "resnet18"\n')
    cfg = load_config(p)
    assert cfg.train.epochs == 7 and cfg.model.encoder == "resnet18" and cfg.train.lr == PickerConfig().train.lr
    p.write_text("[train]\nepoch = 7\n")
    with pytest.raises(ValueError, match="train.epoch"):
        load_config(p)
    p.write_text('[train]\nepochs = "many"\n')
    with pytest.raises(ValueError, match="train.epochs"):
        load_config(p)
    with pytest.raises(ConfigError, match="nothing.here"):
        PickerConfig().updated({"nothing.here": 1})
    assert "[centres]" in config_to_toml(PickerConfig())
    for bad in ("sometimes", -0.1, True):  # centres.refine: auto or a width >= 0
        with pytest.raises(ConfigError, match="centres.refine"):
            PickerConfig().updated({"centres.refine": bad})
    assert PickerConfig().updated({"centres.refine": 0}).centres.refine == 0
    p.write_text('[centres]\nrefine = 0.25\n')  # a model directory's saved choice
    assert load_config(p).centres.refine == 0.25


def test_particles_grouping_and_concat():
    p = Particles(["a", "b", "a"], [1, 2, 3], [4, 5, 6], score=[0.1, 0.2, 0.3])
    assert p.micrograph_ids() == ["a", "b"] and len(p.for_micrograph("a")) == 2
    assert np.allclose(p.for_micrograph("a").xy, [[1, 4], [3, 6]])
    q = Particles.for_one("c", np.array([[7.0, 8.0]]))
    both = Particles.concat([p, q])
    assert len(both) == 4 and np.isnan(both.score[-1])
    with pytest.raises(ValueError):
        Particles(["a"], [1, 2], [3])


def test_micrograph_ids_unique(tmp_path):
    with pytest.raises(ValueError, match="twice"):
        micrographs_by_id([Micrograph("x", tmp_path / "a.mrc"), Micrograph("x", tmp_path / "b.mrc")])


def test_option_parsing_lives_in_the_config():
    from crisp_ext.config import ConfigError, parse_diameter, parse_overrides
    from crisp_ext.errors import InputError

    assert issubclass(ConfigError, InputError)
    assert parse_diameter("190A") == parse_diameter("190 Å") == parse_diameter("190angstrom") == (190.0, None)
    assert parse_diameter("27px") == parse_diameter("27 pixels") == (None, 27.0)
    assert parse_diameter("150", default_unit="A") == (150.0, None)
    assert parse_diameter("1.5e2", default_unit="px") == (None, 150.0)
    for bad in ("150", "-3A", "0px", "big", "27 furlongs"):
        with pytest.raises(ConfigError, match="diameter"):
            parse_diameter(bad)
    assert parse_overrides(["a.b=1,c.d=x", "m.ch=[64, 32]", "e.f=true", "g.h=none"]) == {
        "a.b": 1, "c.d": "x", "m.ch": [64, 32], "e.f": True, "g.h": "none"}
    for bad in (["novalue"], ["=3"]):
        with pytest.raises(ConfigError, match="KEY=VALUE"):
            parse_overrides(bad)


def test_config_file_errors_are_one_line_config_errors(tmp_path):
    from crisp_ext.config import ConfigError

    for name, text in (("c.toml", "[train\nepochs = 3"), ("c.json", '{"train": {"epochs": 3,}}'),
                       ("c.yaml", "train: [1, 2"), ("c.toml", "[train]\nepochs = 'many'")):
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(ConfigError) as info:
            load_config(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")
