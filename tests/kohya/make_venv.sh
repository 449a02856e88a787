#!/bin/sh
# The test virtualenv for kohya sd-scripts (a documented step of the tests' setup, never a
# change to sd-scripts itself). Usage: make_venv.sh SD_SCRIPTS_DIR VENV_DIR
#
# - torch is pinned first (torch==2.13.0, the CPU wheel here), or sd-scripts' requirements
#   pull a CUDA build of gigabytes.
# - torchvision beside it (sd-scripts imports it; its requirements do not name it).
# - sd-scripts' own requirements.txt follows, without its `-e .` line: its scripts import
#   `library` from their own folder, and the checkout stays untouched (it may be read-only).
# - On a CPU machine the registry's torchvision is a CUDA build whose _meta_registrations.py
#   registers fake kernels for nms/qnms even when its C ops did not load, which fails at
#   import ("operator torchvision::nms does not exist"). Those two registrations are guarded
#   with torchvision.extension._has_ops(). With a CUDA torch nothing is patched.
# `.complete` is written last, so a killed setup is never mistaken for a finished one: the
# next run starts it again.
set -eu
sd="$1"; venv="$2"
test -f "$venv/.complete" && exit 0
tmp="$venv"
rm -rf "$tmp"
python3 -m venv "$tmp"
"$tmp/bin/python" -m pip install -q torch==2.13.0 torchvision
grep -v '^-e ' "$sd/requirements.txt" > "$tmp/requirements.txt"
"$tmp/bin/python" -m pip install -q -r "$tmp/requirements.txt" torch==2.13.0
meta=$("$tmp/bin/python" -c 'import importlib.util as u; print(u.find_spec("torchvision").submodule_search_locations[0])')/_meta_registrations.py
if ! "$tmp/bin/python" -c 'import torch, torchvision' 2>/dev/null; then
    "$tmp/bin/python" - "$meta" <<'PY'
import re, sys
path = sys.argv[1]
src = open(path).read()
for op in ("nms", "qnms"):
    src = re.sub(r'^@torch\.library\.register_fake\("torchvision::%s"\)\n' % op,
                 '@(torch.library.register_fake("torchvision::%s") if torchvision.extension._has_ops() else (lambda f: f))\n' % op,
                 src, flags=re.M)
if "import torchvision\n" not in src:
    src = "import torchvision\n" + src
open(path, "w").write(src)
PY
    "$tmp/bin/python" -c 'import torch, torchvision'
fi
touch "$venv/.complete"
