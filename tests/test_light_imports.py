"""The daemon and the CLI must stay light: never torch, diffusers, peft or transformers."""
import subprocess
import sys

HEAVY = ("torch", "diffusers", "peft", "transformers", "accelerate", "safetensors",
         "huggingface_hub")  # the Hub: a download job's child only
MODULES = ["fluxgymd.daemon", "fluxgymd.__main__", "fluxgymd.client", "fluxgymctl.cli",
           "fluxgymd.testing", "fluxgymctl.models"]


def test_no_heavy_imports():
    code = ("import sys\n" + "".join(f"import {m}\n" for m in MODULES)
            + f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_cli_does_not_import_rich_when_not_on_a_terminal():
    code = ("import sys, fluxgymctl.cli\n"
            "print('rich' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "False"


def test_the_cli_imports_only_what_its_command_needs():
    code = ("import sys, fluxgymctl.cli\n"
            "print(sorted(m for m in ('fluxgymctl.top', 'fluxgymctl.importer', "
            "'fluxgymd.fluxgym', 'fluxgymctl.queue', 'fluxgymctl.alerts', 'fluxgymctl.models') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_every_lazy_command_is_there():
    from click.testing import CliRunner

    from fluxgymctl.cli import LAZY, cli

    for name in LAZY:
        r = CliRunner().invoke(cli, [name, "--help"])
        assert r.exit_code == 0 and "Usage:" in r.output, (name, r.output)
    listed = CliRunner().invoke(cli, ["--help"]).output
    assert all(f"  {name} " in listed for name in LAZY), listed
