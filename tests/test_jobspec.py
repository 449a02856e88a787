import os

import pytest

from fluxgymd import jobspec
from fluxgymd.kinds import Policy
from fluxgymd.protocol import ErrorCode, FluxgymError

OPEN = Policy(allow_command_jobs=True)  # these tests are about the file, not who may run it


def problems(text, source=""):
    with pytest.raises(FluxgymError) as e:
        jobspec.parse(text, source, policy=OPEN)
    assert e.value.code is ErrorCode.INVALID_JOB
    return e.value.details or [e.value.message]


def test_minimal_command_job():
    spec = jobspec.parse('[job]\nname = "hello"\nkind = "command"\n'
                         '[command]\nargv = ["python3", "-c", "print(1)"]\n', policy=OPEN)
    assert spec["name"] == "hello" and spec["command"]["argv"][0] == "python3"
    assert spec["command"]["progress"] == "tqdm"


def test_every_mistake_is_reported_at_once(tmp_path):
    errs = problems('[job]\nname = "Bad Name"\nkind = "comand"\ncolour = 1\n'
                    '[comand]\nx = 1\n')
    text = "\n".join(errs)
    assert "job.name 'Bad Name' is not allowed" in text
    assert "job.kind 'comand' is unknown" in text
    assert "unknown key job.colour" in text
    assert "unknown section [comand] (did you mean 'command'?)" in text


@pytest.mark.parametrize("body,message", [
    ('[command]\nargv = []', "command.argv is empty"),
    ('[command]\nargv = "python3"', "command.argv must be a list"),
    ('[command]\nargv = ["no-such-program-xyz"]', "is not on the daemon's PATH"),
    ('[command]\nargv = ["./missing.sh"]', "does not exist"),
    ('[command]\nargv = ["true"]\ncwd = "nowhere"', "is not a directory"),
    ('[command]\nargv = ["true"]\nenv = {A = 1}', "command.env.A must be a string"),
    ('[command]\nargv = ["true"]\nprogress = "bars"', "command.progress 'bars' is unknown"),
    ('[command]\nargv = ["true"]\nargz = 1', "unknown key command.argz (did you mean 'argv'?)"),
    ('', "a command job needs a [command] section"),
    ('[command]\nargv = ["true"]\n[train]\nx = 1', "[train] is only for kind = \"lora\""),
])
def test_command_section_mistakes(tmp_path, body, message):
    src = tmp_path / "j.toml"
    errs = problems('[job]\nname = "j"\nkind = "command"\n' + body, str(src))
    assert any(message in e for e in errs), errs


def test_relative_paths_are_relative_to_the_job_file(tmp_path):
    script = tmp_path / "run.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    os.chmod(script, 0o755)
    spec = jobspec.parse('[job]\nname = "j"\nkind = "command"\n[command]\nargv = ["./run.sh"]\n'
                         'cwd = "."', str(tmp_path / "j.toml"), policy=OPEN)
    assert spec["command"]["argv"] == [str(script)]
    assert spec["command"]["cwd"] == str(tmp_path)


def test_not_executable_script(tmp_path):
    (tmp_path / "run.sh").write_text("echo hi\n")
    errs = problems('[job]\nname = "j"\nkind = "command"\n[command]\nargv = ["./run.sh"]',
                    str(tmp_path / "j.toml"))
    assert any("not executable" in e for e in errs)


def test_lora_job_needs_train_and_existing_paths(tmp_path):
    errs = problems('[job]\nname = "l"\nkind = "lora"\n', str(tmp_path / "j.toml"))
    assert any("needs a [train] section" in e for e in errs)
    errs = problems('[job]\nname = "l"\nkind = "lora"\n[train]\ndataset_dir = "imgs"\n',
                    str(tmp_path / "j.toml"))
    assert any(f"train.dataset_dir: {tmp_path / 'imgs'} does not exist" in e for e in errs)


def test_invalid_toml_is_one_clear_error():
    with pytest.raises(FluxgymError, match="not valid TOML"):
        jobspec.parse("[job\n", "x.toml")


@pytest.mark.parametrize("name", ["..", ".", "../x", "a/b", "-x", "X", "a" * 65, "", "a b"])
def test_names_that_could_escape_or_confuse_are_refused(tmp_path, name):
    assert jobspec.check_name(name) is not None
    with pytest.raises(FluxgymError):
        jobspec.output_dir(tmp_path, name)


def test_output_dir_stays_under_the_root(tmp_path):
    assert jobspec.output_dir(tmp_path, "my-lora.v2") == tmp_path.resolve() / "my-lora.v2"


def test_name_override_is_validated():
    errs = problems('[job]\nkind = "command"\n[command]\nargv = ["true"]\n')
    assert any("missing job.name" in e for e in errs)
    spec = jobspec.parse('[job]\nkind = "command"\n[command]\nargv = ["true"]\n',
                         name_override="given", policy=OPEN)
    assert spec["name"] == "given"


def test_command_jobs_are_refused_unless_the_policy_allows_them():
    text = '[job]\nname = "c"\nkind = "command"\n[command]\nargv = ["true"]\n'
    with pytest.raises(FluxgymError) as e:
        jobspec.parse(text, "c.toml", policy=Policy(config_file="/etc/fluxgymd/fluxgymd.toml"))
    assert e.value.code is ErrorCode.FORBIDDEN
    assert "allow_command_jobs = true under [daemon] in /etc/fluxgymd/fluxgymd.toml" in \
        e.value.message
    with pytest.raises(FluxgymError) as e:
        jobspec.parse(text, "c.toml")  # no policy given: nothing but lora jobs
    assert e.value.code is ErrorCode.FORBIDDEN
