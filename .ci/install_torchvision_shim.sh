#!/usr/bin/env bash
# Put .ci/torchvision_cpu_shim.py into the active Python's site-packages with a .pth hook.
set -euo pipefail
site=$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
cp "$(dirname "$0")/torchvision_cpu_shim.py" "$site/_torchvision_cpu_shim.py"
echo "import _torchvision_cpu_shim; _torchvision_cpu_shim.install()" > "$site/_torchvision_cpu_shim.pth"
