import subprocess
import sys
from pathlib import Path

import pytest

from fluxgymd.config import KEYS, ConfigError, load

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, text):
    p = tmp_path / "fluxgymd.toml"
    p.write_text(text)
    return p


def test_defaults_need_no_root_and_put_outputs_in_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load(None, {}, env={"HOME": str(tmp_path)})
    assert cfg.outputs_dir == tmp_path / "outputs"
    assert cfg.state_dir == tmp_path / ".local" / "state" / "fluxgymd"
    assert cfg.max_concurrent_jobs == 1


def test_systemd_directories_are_the_defaults_under_systemd(tmp_path):
    env = {"STATE_DIRECTORY": "/var/lib/fluxgymd", "RUNTIME_DIRECTORY": "/run/fluxgymd"}
    cfg = load(None, {}, env=env)
    assert cfg.state_dir == Path("/var/lib/fluxgymd")
    assert cfg.runtime_dir == Path("/run/fluxgymd")
    assert cfg.outputs_dir == Path("/var/lib/fluxgymd/outputs")


def test_precedence_flag_over_env_over_file_over_default(tmp_path):
    f = write(tmp_path, "[daemon]\nmax_concurrent_jobs = 3\n[logs]\nbackups = 7\n")
    env = {"FLUXGYM_MAX_CONCURRENT_JOBS": "4", "FLUXGYM_LOGS_MAX_BYTES": "8192"}
    assert load(f, {}, env={}).max_concurrent_jobs == 3
    assert load(f, {}, env=env).max_concurrent_jobs == 4
    assert load(f, {"max_concurrent_jobs": 5}, env=env).max_concurrent_jobs == 5
    cfg = load(f, {}, env=env)
    assert (cfg.log_backups, cfg.log_max_bytes) == (7, 8192)
    assert cfg.kill_grace_s == 30.0  # default


def test_config_file_from_environment(tmp_path):
    f = write(tmp_path, "[watchdog]\nkill_grace_s = 2\n")
    assert load(None, {}, env={"FLUXGYM_CONFIG": str(f)}).kill_grace_s == 2.0


@pytest.mark.parametrize("text,message", [
    ("[daemon]\nmax_concurent_jobs = 2\n", "unknown key daemon.max_concurent_jobs (did you mean 'max_concurrent_jobs'?)"),
    ("[deamon]\n", "unknown section [deamon] (did you mean 'daemon'?)"),
    ("[logs]\nkill_grace_s = 2\n", "did you mean 'watchdog.kill_grace_s'?"),
    ("[daemon]\nmax_concurrent_jobs = \"two\"\n", "daemon.max_concurrent_jobs must be int"),
    ("[daemon]\nmax_concurrent_jobs = 0\n", "must be at least 1"),
    ("[daemon]\nlog_level = \"loud\"\n", "must be one of debug, info"),
    ("[daemon\n", "not valid TOML"),
])
def test_mistakes_name_the_key_and_suggest(tmp_path, text, message):
    with pytest.raises(ConfigError) as e:
        load(write(tmp_path, text), {}, env={})
    assert message in str(e.value)


def test_command_jobs_are_off_unless_switched_on(tmp_path):
    env = {"HOME": str(tmp_path)}
    assert load(None, {}, env=env).allow_command_jobs is False
    f = write(tmp_path, "[daemon]\nallow_command_jobs = true\n")
    assert load(f, {}, env=env).allow_command_jobs is True
    assert load(None, {}, env={**env, "FLUXGYM_ALLOW_COMMAND_JOBS": "yes"}).allow_command_jobs
    assert not load(f, {}, env={**env, "FLUXGYM_ALLOW_COMMAND_JOBS": "0"}).allow_command_jobs
    assert load(None, {"allow_command_jobs": True}, env=env).allow_command_jobs
    with pytest.raises(ConfigError, match="allow_command_jobs must be true or false, got 1"):
        load(write(tmp_path, "[daemon]\nallow_command_jobs = 1\n"), {}, env=env)
    with pytest.raises(ConfigError, match="FLUXGYM_ALLOW_COMMAND_JOBS: daemon.allow_command_"):
        load(None, {}, env={**env, "FLUXGYM_ALLOW_COMMAND_JOBS": "maybe"})


def test_bad_environment_value_is_named(tmp_path):
    with pytest.raises(ConfigError, match="environment FLUXGYM_MAX_CONCURRENT_JOBS"):
        load(None, {}, env={"FLUXGYM_MAX_CONCURRENT_JOBS": "many", "HOME": str(tmp_path)})


def test_too_long_runtime_dir_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="too long"):
        load(None, {"runtime_dir": "/tmp/" + "x" * 120}, env={"HOME": str(tmp_path)})


def test_every_key_is_documented_in_the_shipped_config():
    text = (REPO / "etc" / "fluxgymd.toml").read_text()
    for key in KEYS:
        assert f"# {key.name} =" in text or f"{key.name} =" in text, key.name
    # and the shipped file is itself valid
    load(REPO / "etc" / "fluxgymd.toml", {}, env={"HOME": "/nonexistent"})


def test_daemon_exits_2_on_a_bad_config(tmp_path):
    f = write(tmp_path, "[daemon]\nmax_concurent_jobs = 2\n")
    r = subprocess.run([sys.executable, "-m", "fluxgymd", "--config", str(f)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert "did you mean 'max_concurrent_jobs'" in r.stderr


def test_kohya_checkouts_from_the_file_and_the_environment(tmp_path):
    f = write(tmp_path, '[kohya]\ncheckouts = ["/opt/fluxgym/sd-scripts/", '
                        '{ path = "/srv/sd", python = "/srv/env/bin/python" }]\n')
    assert load(f, {}, env={}).kohya_checkouts == (
        ("/opt/fluxgym/sd-scripts", ""), ("/srv/sd", "/srv/env/bin/python"))
    env = {"FLUXGYM_KOHYA_CHECKOUTS": "/a/sd:/b/sd"}
    assert load(f, {}, env=env).kohya_checkouts == (("/a/sd", ""), ("/b/sd", ""))
    assert load(None, {}, env={}).kohya_checkouts == ()
    for bad, why in (('"/opt/sd"', "must be a list"), ('["sd-scripts"]', "absolute path"),
                     ('[{ path = "/sd", pyton = "/p" }]', "is not a folder"),
                     ('[3]', "is not a folder")):
        with pytest.raises(ConfigError, match=why):
            load(write(tmp_path, f"[kohya]\ncheckouts = {bad}\n"), {}, env={})


def test_models_entries_in_the_config_join_the_shipped_catalog(tmp_path):
    f = write(tmp_path, '[models]\ndir = "/data/models"\n[models.mine]\nrepo = "me/mine"\n'
                        'file = "mine.sft"\npart = "transformer"\nneeds = ["ae"]\n'
                        '[models.ae]\nrepo = "me/vae"\nfile = "ae.sft"\n')
    cfg = load(f, {}, env={})
    assert str(cfg.models_dir) == "/data/models"
    assert cfg.models["mine"].files == ("mine.sft",) and cfg.models["mine"].needs == ("ae",)
    assert cfg.models["ae"].repo == "me/vae"  # replaces the shipped one
    assert cfg.models["flux-dev"].repo == "cocktailpeanut/xulf-dev"
    for bad, why in (('[models.x]\nrepo = "me/x"\n', "must name files"),
                     ('[models.x]\nrepo = "nope"\nfile = "a"\n', "repo must be a Hub repo id"),
                     ('[models.x]\nrepo = "me/x"\nfile = "a"\nneeds = ["ghost"]\n',
                      "needs ghost"),
                     ('[models.x]\nrepo = "me/x"\nfile = "../a"\n', "must name files")):
        with pytest.raises(ConfigError, match=why):
            load(write(tmp_path, bad), {}, env={})
