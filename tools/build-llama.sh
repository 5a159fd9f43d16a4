#!/usr/bin/env bash
# Builds llama-cpp-python, at the version requirements-dev.txt pins, into a wheel cache
# outside the repository, for the CPU features every x86-64 CI machine has (AVX2, FMA,
# F16C) instead of the building machine's (-march=native): a wheel built natively where
# the CPU reports AMX executes `ldtilecfg` and dies of a general protection fault on a VM
# that reports AMX without granting it. Keyed by the pin and this script.
#
#   tools/build-llama.sh PYTHON   # prints the directory holding the wheel on stdout
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
python=$1
pin=$(grep -E '^llama-cpp-python(\[[a-z,]+\])?==' "$here/../requirements-dev.txt" | sed -E 's/^llama-cpp-python(\[[a-z,]+\])?==//')
key=$(printf '%s\n' "$pin" | cat - "$here/build-llama.sh" | sha256sum | cut -c1-16)
dir="${TROUPE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/troupe}/llama-cpp-python-$pin-$key"

if compgen -G "$dir/llama_cpp_python-$pin-*.whl" >/dev/null; then echo "$dir"; exit 0; fi

mkdir -p "$dir.tmp"
start=$(date +%s)
echo ">> building llama-cpp-python $pin for portable x86-64 (a few minutes, once)" >&2
CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
-DGGML_BMI2=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \
  "$python" -m pip wheel --quiet --disable-pip-version-check --no-deps --no-cache-dir \
  --no-binary llama-cpp-python -w "$dir.tmp" "llama-cpp-python==$pin" >&2
rm -rf "$dir"
mv "$dir.tmp" "$dir"
echo ">> llama-cpp-python built in $(( $(date +%s) - start ))s into $dir" >&2
echo "$dir"
