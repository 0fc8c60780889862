#!/usr/bin/env bash
# Download the wheels that benchmarks/gpu_session.sh installs on the GPU machine (which has no network)
# into .whl/ at the repository root. Run here, from anywhere:  bash benchmarks/fetch_wheels.sh
# Then name .whl in the device call's carry list (.whl/ is ignored by git, so it travels only when carried).
#
# Liger-Kernel (the HF + Liger column): a pure-Python wheel (py3-none-any). Its Requires-Dist are
# torch>=2.1.2 and triton>=2.3.1 (the rest are extras), both already on the GPU machine (torch
# 2.11.0+cu130, triton 3.6.0), so it is fetched alone (--no-deps). 0.8.x refuses to import under
# transformers < 5.0 and has v5 code paths; 0.8.5 was checked against transformers 5.17.0 / torch 2.11 /
# triton 3.6 here: apply_liger_kernel_to_llama(model=...) patches a tiny LlamaForCausalLM (rope, RMSNorm,
# SwiGLU, fused linear cross-entropy) and forward + backward reach every Triton launch (run on CPU
# with the launches stubbed; the kernels themselves need the GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
LIGER_VERSION=${LIGER_VERSION:-0.8.5}

# .gitignore already lists .whl/; keep it out of git even if that line goes away.
if ! git check-ignore -q .whl/probe.whl 2>/dev/null; then
  exclude=$(git rev-parse --git-path info/exclude)
  mkdir -p "$(dirname "$exclude")" && echo /.whl/ >> "$exclude"
fi

mkdir -p .whl
rm -f .whl/liger_kernel-*.whl  # one version of each package: two stop the whole install there
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "liger-kernel==$LIGER_VERSION"

for whl in .whl/*.whl; do
  echo "$whl ($(du -k "$whl" | cut -f1) KiB), needs:"
  python3 - "$whl" <<'EOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    for line in z.read(meta).decode().splitlines():
        if line.startswith("Requires-Dist:") and "extra ==" not in line:
            print("   ", line.split(":", 1)[1].strip())
EOF
done
