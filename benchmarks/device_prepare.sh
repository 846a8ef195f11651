#!/bin/bash
# Before a session with the device machine (no internet there; its image has CUDA PyTorch, timm, scipy,
# scikit-image, pandas, matplotlib but not the packages below): wheels of what crisp-ext needs beyond that image,
# at this checkout's versions, and EMPIAR-10017, into .device/ (git-ignored, about 45 MB; carried to the device).
#     bash benchmarks/device_prepare.sh        then run benchmarks/device_figures.sh there (its header says how)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${DATA:-../shared/data}
PACKAGES="segmentation-models-pytorch mrcfile starfile trackpy looseversion dask distributed partd locket tblib zict
tornado importlib_metadata"
mkdir -p .device/wheels .device/data
pins=$("$PY" - $PACKAGES <<'PYEOF'
import sys
from importlib.metadata import version, PackageNotFoundError
out = []
for name in sys.argv[1:]:
    try:
        out.append(f"{name}=={version(name)}")
    except PackageNotFoundError:
        out.append(name)
print(" ".join(out))
PYEOF
)
"$PY" -m pip wheel -q --no-deps -w .device/wheels $pins
rm -rf .device/data/empiar10017
cp -r "$DATA/empiar10017" .device/data/
du -sh .device/wheels .device/data
