"""Settings layers: defaults < config.toml < THOX_* environment < command line, with precise refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.settings import SettingsError, default_home, load_settings


def test_defaults_follow_the_profile(tmp_path: Path) -> None:
    sim = load_settings(home=tmp_path, env={})
    assert (sim.api.inference_port, sim.api.cluster_port, sim.bind_host) == (8080, 5381, "127.0.0.1")
    device = load_settings({"profile": "device"}, home=tmp_path, env={})
    assert device.bind_host == "0.0.0.0"
    assert sim.model_cache_dir == tmp_path.resolve() / "cache"


def test_layers_override_in_order(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text(
        'default_model = "a"\n[api]\ninference_port = 1000\ncluster_port = 1001\n[engine]\nthreads = 3\n'
    )
    env = {"THOX_API_CLUSTER_PORT": "2001", "THOX_ENGINE_THREADS": "4"}
    settings = load_settings({"engine.threads": 5}, home=tmp_path, env=env)
    assert settings.default_model == "a"
    assert settings.api.inference_port == 1000  # file
    assert settings.api.cluster_port == 2001  # environment beats file
    assert settings.engine.threads == 5  # command line beats both


def test_home_comes_from_thox_home() -> None:
    assert default_home({"THOX_HOME": "/srv/thox"}) == Path("/srv/thox")


@pytest.mark.parametrize(
    ("toml", "env", "overrides", "message"),
    [
        ("[api]\nport = 1\n", {}, {}, "unknown setting 'api.port' in"),
        ("", {"THOX_API_INFERENCE_PORT": "99999"}, {}, "api.inference_port"),
        ("", {}, {"profile": "cloud"}, "profile"),
        ("[api\n", {}, {}, "not valid TOML"),
        ("", {}, {"engine.max_context": 1}, "engine.max_context"),
        ('[engine]\nexecutor = "cuda-magic"\n', {}, {}, "no executor named 'cuda-magic'; known: onnxruntime"),
    ],
)
def test_bad_settings_are_refused_with_the_key(
    tmp_path: Path, toml: str, env: dict[str, str], overrides: dict[str, object], message: str
) -> None:
    (tmp_path / "config.toml").write_text(toml)
    with pytest.raises(SettingsError, match=message.replace("[", r"\[")):
        load_settings(overrides, home=tmp_path, env=env)


def test_the_readme_documents_every_setting_and_whether_it_applies_live() -> None:
    from agent.live_config import LIVE_KEYS
    from agent.settings import known_keys

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    readme = readme[readme.index("## Configuration") :]
    readme = readme[: readme.index("\n## ")]
    rows = {
        line.split("|")[1].strip().strip("`"): line.split("|")[3].strip()
        for line in readme.splitlines()
        if line.startswith("| `")
    }
    for key in known_keys():
        assert key in rows, f"README's configuration table lacks {key}"
        assert rows[key] == ("yes" if key in LIVE_KEYS else "restart"), key
