#!/usr/bin/env bash
# Source this on a GPU machine before running CUDA-feature binaries:
#   . scripts/gpu-env.sh
# cudarc (built for CUDA 12.8, dynamic loading) looks for libnvrtc/libcublas under their
# unversioned names and .so.12/.so.11/...; images with CUDA 13 ship lib*.so.13 only (the
# toolkit or the nvidia-* wheels). This links the newest versioned libraries it finds under
# the unversioned names in /tmp/loraplane-culib and puts that, and their own folders (for
# libcublasLt and libnvrtc-builtins), on LD_LIBRARY_PATH. The driver (libcuda.so.1) is found
# as it is.
culib=/tmp/loraplane-culib
mkdir -p "$culib"
for name in nvrtc cublas cublasLt; do
  if [ ! -e "$culib/lib$name.so" ]; then
    found=$( (ldconfig -p 2>/dev/null | grep -o "/[^ ]*/lib$name\.so\.1[0-9][.0-9]*$"; \
              find / -xdev -name "lib$name.so.1[0-9]*" -not -path '/proc/*' 2>/dev/null) \
             | sort -V | tail -1)
    if [ -n "$found" ]; then
      ln -sf "$found" "$culib/lib$name.so"
      LD_LIBRARY_PATH="$(dirname "$found"):${LD_LIBRARY_PATH:-}"
    else
      echo "gpu-env: lib$name not found" >&2
    fi
  fi
done
export LD_LIBRARY_PATH="$culib:${LD_LIBRARY_PATH:-}"
ls -l "$culib" >&2
