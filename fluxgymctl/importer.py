"""`fluxgymctl import`: a FluxGym output folder (train.sh or .bat, dataset.toml,
sample_prompts.txt) as a fluxgymd job file."""
from __future__ import annotations

import os

import click
import tomli_w

from . import render
from .context import Ctx, command, fail
from .exitcodes import Exit
from fluxgymd.fluxgym import FluxGymImportError, locate, read_script, without
from fluxgymd.fluxgym import as_kohya as to_kohya
from fluxgymd.fluxgym import as_lora as to_lora

# FluxGym's model flags and the [train] keys they fill; --base-model replaces them all
MODEL_KEYS = {"pretrained_model_name_or_path": "pretrained_model", "clip_l": "clip_l",
              "t5xxl": "t5xxl", "ae": "ae"}


def _maps(ctx: Ctx, items: tuple[str, ...]) -> list[tuple[str, str]]:
    out = []
    for item in items:
        old, sep, new = item.partition("=")
        if not sep or not old or not new:
            fail(ctx, Exit.USAGE, f"--map {item!r}: use OLD=NEW (a path prefix and its "
                 "replacement here)", "usage")
        out.append((old, new))
    return out


@click.command("import", short_help="A FluxGym train.sh as a job file.")
@click.argument("path")
@click.option("--name", help="The job's name (default: the script's --output_name).")
@click.option("--as-lora", is_flag=True, help="A job for fluxgymd's own trainer (kind = "
              "\"lora\"), FluxGym's settings mapped to its keys.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the job file "
              "here (default: standard output).")
@click.option("--tokenizers", type=click.Path(file_okay=False), help="A folder with FLUX.1's "
              "tokenizer/ and tokenizer_2/ (sd-scripts fetches them from the hub; fluxgymd "
              "does not): written as train.tokenizers.")
@click.option("--sd-scripts", "sd_scripts", type=click.Path(file_okay=False), help="Your "
              "sd-scripts checkout, for a kohya job (default: FluxGym's, beside its outputs/).")
@click.option("--base-model", metavar="NAME", help="Name the model by catalog name (fluxgymctl "
              "models list) instead of FluxGym's model files: fluxgymd fetches what is not on "
              "disk first, and the job waits for it.")
@click.option("--submit", "submit_", is_flag=True, help="Also submit the job.")
@click.option("--map", "maps", multiple=True, metavar="OLD=NEW", help="Replace the path "
              "prefix OLD (FluxGym's machine) with NEW (this one); repeatable.")
@command
def import_(ctx: Ctx, path: str, name: str | None, as_lora: bool, output: str | None,
            tokenizers: str | None, sd_scripts: str | None, base_model: str | None,
            submit_: bool, maps: tuple[str, ...]) -> None:
    """Read PATH (a FluxGym output folder, or its train.sh / train.bat), with the
    dataset.toml and sample_prompts.txt it names, and write a job file: a kind = "kohya"
    job that runs the same sd-scripts with the same arguments under fluxgymd, or with
    --as-lora one for fluxgymd's own trainer.

    Paths that do not exist here are reported with their flags, and so is every setting
    that has no counterpart."""
    try:
        script = read_script(locate(path))
        if as_lora:
            imp = to_lora(script, _maps(ctx, maps), name)
        else:
            ky = to_kohya(script, _maps(ctx, maps), name,
                          os.path.abspath(sd_scripts) if sd_scripts else None)
    except FluxGymImportError as e:
        fail(ctx, Exit.USAGE, str(e), "usage")
    source = os.path.abspath(script.path)
    if base_model:  # the catalog's files instead of FluxGym's: none of theirs is needed here
        if as_lora:
            for key in MODEL_KEYS.values():
                imp.train.pop(key, None)
            imp.train["base_model"] = base_model
            imp.missing = [m for m in imp.missing if m.split(":")[0][2:] not in MODEL_KEYS]
        else:
            ky.kohya["args"] = without(ky.kohya["args"], {f"--{f}": 1 for f in MODEL_KEYS})
            ky.kohya["base_model"] = base_model
            ky.missing = [m for m in ky.missing if m.split(":")[0][2:] not in MODEL_KEYS]
    if as_lora:
        if tokenizers:
            imp.train["tokenizers"] = os.path.abspath(tokenizers)
        doc = {"job": {"name": imp.name, "kind": "lora", "description": f"imported from {source}"},
               "train": imp.train}
        head = [f"# Imported from {source} by fluxgymctl import --as-lora."]
        head += [f"# No counterpart here: {x}" for x in imp.no_counterpart]
        missing = imp.missing
        notes = imp.notes + [f"no counterpart: {x}" for x in imp.no_counterpart]
    else:
        notes = list(ky.notes)
        if ky.dataset_copy is not None:
            if output:
                copy = os.path.splitext(os.path.abspath(output))[0] + ".dataset.toml"
                with open(copy, "w", encoding="utf-8") as fh:
                    fh.write(ky.dataset_copy)
                args = ky.kohya["args"]
                args[args.index("--dataset_config") + 1] = copy
                notes.append(f"dataset.toml with its paths remapped written to {copy}")
            else:
                notes.append("the dataset.toml names paths that --map changes: give -o FILE "
                             "so its remapped copy can be written beside the job")
        doc = {"job": {"name": ky.name, "kind": "kohya", "description": f"imported from {source}"},
               "kohya": ky.kohya}
        checkout = ky.kohya.get("sd_scripts", "")
        head = [f"# Imported from {source} by fluxgymctl import.",
                "# fluxgymd adds --output_dir, --save_state and the state intervals itself.",
                "# fluxgymd runs kohya jobs only from the checkouts its administrator allows:",
                f"#   checkouts = [\"{checkout}\"] under [kohya] in fluxgymd.toml, then reload."]
        notes.append(f"fluxgymd runs it only if it allows this checkout: checkouts = "
                     f"[\"{checkout}\"] under [kohya] in its fluxgymd.toml (then systemctl "
                     "reload fluxgymd)")
        missing = ky.missing
    head += [f"# Not found here: {x}" for x in missing]
    text = "\n".join(head) + "\n\n" + tomli_w.dumps(doc).rstrip("\n") + "\n"
    for x in missing:
        click.echo(f"fluxgymctl: not found here: {x} (use --map OLD=NEW or edit the job)",
                   err=True)
    for x in notes:
        click.echo(f"fluxgymctl: {x}", err=True)
    if output:
        with open(output, "w", encoding="utf-8") as fh:
            fh.write(text)
        if not ctx.json:
            click.echo(f"wrote {output}", err=True)
    elif not submit_:
        click.echo(text, nl=False)
    if submit_:
        job = ctx.call("submit", text=text, source=os.path.abspath(output or source),
                       name=None, priority=0)
        if ctx.json:
            return render.emit_json(job)
        click.echo(f"job {job['id']} ({job['name']}) {job['state']}; follow it with: "
                   f"fluxgymctl logs -f {job['name']}")
