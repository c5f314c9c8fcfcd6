#!/usr/bin/env bash
# The package stands on its own: build a wheel of this tree, install it into a fresh venv
# outside the repository, and use it there.  Checks that
#   - the wheel holds piece_optim (the compiled extension included), piece_optim.kernels
#     (setup.py's one package_dir mapping of kernels/) and nothing from the repository
#     root (no top-level kernels, benchmarks or csrc_build);
#   - `import piece_optim` works from another folder, the CPU backend loads and steps,
#     the kernels import as piece_optim.kernels (and a top-level `kernels` does not);
#   - `piece-optim demo --help` and `piece-optim info` run.
# About 30 s on CI's 2 cores (the wheel reuses the objects of the editable build in build/;
# the fresh venv borrows torch and the other dependencies, see below).  PYTHON picks the
# interpreter (default python3); the venv is made from it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
start=$SECONDS

$PY -m pip wheel -q --no-build-isolation --no-deps -w "$tmp/dist" . >/dev/null
wheel=$(ls "$tmp"/dist/piece_optim-*.whl)
$PY - "$wheel" <<'EOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
tops = {n.split("/")[0] for n in names}
assert tops <= {"piece_optim", *(t for t in tops if t.endswith(".dist-info"))}, tops
for want in ("piece_optim/kernels/adamw.py", "piece_optim/_build_config.py",
             "piece_optim/backends/native.py"):
    assert want in names, want
assert any(n.startswith("piece_optim/_C.") for n in names), "no compiled extension"
print(f"wheel: {len(names)} files, top level {sorted(tops)}")
EOF

$PY -m venv "$tmp/venv"
VPY=$tmp/venv/bin/python
# The dependencies (torch, transformers, ...) come from the building interpreter's
# site-packages through a .pth *path* line, which appends that folder to sys.path after the
# venv's own: a wheel install of torch and transformers costs ~45 s on CI's 2 cores and
# tests pip, not us.  Python runs only the .pth files of the venv's own site-packages, so
# an editable install of the checkout there (its finder is started by a .pth) stays off.
deps=$($PY -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))')
vsite=$($VPY -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$deps" > "$vsite/_piece_optim_wheel_check_deps.pth"
$VPY -m pip install -q --no-deps "$wheel" 2>&1 | grep -v "^WARNING: Location" || true

repo=$PWD
cd "$tmp"  # outside the repository: nothing of the checkout is importable from here
REPO=$repo DEPS=$deps PIECE_OPTIM_NO_JIT=1 $VPY - <<'EOF'
import importlib.util, os, torch
import piece_optim as po
from piece_optim import backends
import sysconfig
site = sysconfig.get_paths()["purelib"]  # the fresh venv's, not the checkout's
assert po.__file__.startswith(os.path.join(site, "piece_optim")), (po.__file__, site)
import sys
# no sys.path entry is the checkout or inside it (a path *under* it: /tmp/ci1-venv is not
# inside /tmp/ci1), but for the borrowed dependencies' folder, which may be a venv that CI
# made inside the checkout
repo, deps = (os.path.realpath(os.environ[k]) for k in ("REPO", "DEPS"))
inside = [p for p in sys.path if (r := os.path.realpath(p or ".")) != deps
          and (r == repo or r.startswith(repo + os.sep))]
assert not inside, f"the checkout is on sys.path: {inside}"
cpu = backends.load("cpu")
assert cpu is not None, backends.explain("adamw")["cpu"]
p = torch.nn.Parameter(torch.randn(100))
opt = po.SparseAdamW([p], mask={p: torch.tensor([3, 50])}, lr=0.1, backend="cpu")
before = p.detach().clone()
p.grad = torch.randn(100)
opt.step()
assert (p.detach() != before).sum() == 2
spec = importlib.util.find_spec("piece_optim.kernels")
assert spec.origin.startswith(os.path.join(site, "piece_optim", "kernels")), spec.origin
assert importlib.util.find_spec("kernels") is None, "a top-level kernels package"
for name in ("benchmarks", "csrc_build"):
    assert importlib.util.find_spec(name) is None, name
print(f"installed: {po.__file__}, backends here {po.available_backends('cpu')}")
EOF
"$tmp/venv/bin/piece-optim" demo --help >/dev/null
"$tmp/venv/bin/piece-optim" info > "$tmp/info.txt"
head -3 "$tmp/info.txt"
echo "wheel_check: ok in $((SECONDS - start)) s"
