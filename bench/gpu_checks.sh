#!/usr/bin/env bash
# The checks only a machine with an NVIDIA GPU can make, as one short script:
#   1. the NVML probe: what fluxgymd's GPU rule reads, idle and under load;
#   2. bench/cuda_steps.py: steps/s in bf16 on the GPU against fp32 on the CPU;
#   3. the tiny LoRA job on CUDA: a straight run twice, and a run stopped with SIGTERM after
#      its first checkpoint then resumed; the LoRAs' SHA-256 say whether resume is bit-exact
#      on CUDA (and whether CUDA itself is deterministic here);
#   4. the daemon with gpu_probe = "auto" running that job to the end (the NVML rule on).
# Usage: bash bench/gpu_checks.sh [OUTDIR]  (uses the python on PATH; HF_HUB_OFFLINE=1)
set -u
OUT=${1:-${OUT:-$(mktemp -d)}}
mkdir -p "$OUT"
PY=${PY:-python3}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
W=$(mktemp -d)
trap 'kill -TERM $dpid 2>/dev/null; rm -rf "$W"' EXIT
dpid=

export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ -z "${SKIP_NVML:-}" ] && command -v nvidia-smi >/dev/null; then
echo "== 1. NVML probe"
nvidia-smi -L
$PY - <<'EOF'
import threading, time
import torch
from fluxgymd.probes import make_gpu_probe
p = make_gpu_probe("auto")
print("probe:", p.describe(), "| idle reading:", p.read(None), "| GPU 0 only:", p.read([0]),
      "| GPU 7 (absent):", p.read([7]))
stop = False
def load():
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    while not stop:
        a @ a
    torch.cuda.synchronize()
t = threading.Thread(target=load); t.start(); time.sleep(2)
readings = []
for _ in range(5):
    readings.append(p.read(None)); time.sleep(0.3)
stop = True; t.join()
print("under a matmul load:", readings)
EOF

echo "== 2. CUDA steps"
$PY bench/cuda_steps.py --steps 30
fi

echo "== 3. exact resume on CUDA"
$PY -m trainer.tiny "$W/model" >/dev/null && $PY -m trainer.tiny --dataset "$W/data" >/dev/null
cat > "$W/job.toml" <<EOF
[job]
name = "cuda-lora"
kind = "lora"
[train]
pretrained_model = "$W/model"
dataset_dir = "$W/data"
trigger_word = "fgx"
resolution = 64
max_train_steps = 60
train_batch_size = 2
num_repeats = 2
learning_rate = 1e-3
network_dim = 4
network_alpha = 4.0
t5xxl_max_token_length = 32
save_every_n_steps = 20
save_every_n_epochs = 0
log_every_n_steps = 20
EOF
for run in A B; do
  s=$(date +%s%N)
  $PY -m trainer "$W/job.toml" --output-dir "$W/$run" > "$OUT/train-$run.log" 2>&1
  echo "straight run $run: exit $? in $(( ($(date +%s%N) - s) / 1000000 )) ms"
done
$PY -m trainer "$W/job.toml" --output-dir "$W/R" > "$OUT/train-R1.log" 2>&1 &
tp=$!
for i in $(seq 600); do ls "$W/R/checkpoints" 2>/dev/null | grep -q '^step-' && break; sleep 0.1; done
kill -TERM $tp; wait $tp; echo "stopped run: exit $? after $(ls "$W/R/checkpoints")"
$PY -m trainer "$W/job.toml" --output-dir "$W/R" > "$OUT/train-R2.log" 2>&1
echo "resumed run: exit $?"
$PY - "$W" <<'EOF2'
import sys
from safetensors.torch import load_file
a, b, r = (load_file(f"{sys.argv[1]}/{x}/cuda-lora.safetensors") for x in "ABR")
def diff(x, y):
    return max((x[k].float() - y[k].float()).abs().max().item() for k in x)
print(f"max |A-B| (two straight runs) {diff(a, b):.3g}; max |A-R| (straight vs resumed) "
      f"{diff(a, r):.3g}; {len(a)} tensors")
EOF2
grep -h "resum" "$OUT/train-R2.log" | head -2

echo "== 4. the daemon, NVML rule on"
$PY -m fluxgymd --state-dir "$W/state" --runtime-dir "$W/run" --outputs-dir "$W/outputs" \
  > "$OUT/daemon.log" 2>&1 &
dpid=$!
CTL="$PY -m fluxgymctl --runtime-dir $W/run"
for i in $(seq 100); do $CTL ping >/dev/null 2>&1 && break; sleep 0.2; done
$CTL submit "$W/job.toml" --name gpu-job >/dev/null
$CTL wait gpu-job; echo "wait: exit $?"
$CTL show gpu-job | grep -i -E "state|gpu|reason" | head -8
kill -TERM $dpid; wait $dpid; dpid=
grep -i "gpu rule" "$OUT/daemon.log"
