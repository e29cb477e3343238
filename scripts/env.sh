# Sourced by the other scripts: where the torch install, weights and build
# cache live, and the environment that makes tch build against that torch.
#
# Everything heavy lives in a per-user cache outside the clone, keyed by
# version, so a fresh clone reuses it and a version bump rebuilds it.

TORCH_VERSION=2.13.0
TORCHVISION_VERSION=0.28.0
SAFETENSORS_VERSION=0.8.0

FINETUNED_CACHE=${FINETUNED_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/finetuned}
VENV="$FINETUNED_CACHE/torch-$TORCH_VERSION"
WEIGHTS_CACHE="$FINETUNED_CACHE/weights"
FIXTURES_CACHE="$FINETUNED_CACHE/fixtures"

export FINETUNED_CACHE
export FINETUNED_VENV="$VENV"
export LIBTORCH_USE_PYTORCH=1
export PATH="$VENV/bin:$PATH"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$FINETUNED_CACHE/target}
