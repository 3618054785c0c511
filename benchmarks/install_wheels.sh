#!/usr/bin/env bash
# Install the comparison packages carried as wheels in .whl/ into a site folder, for a GPU machine without network:
#   .whl/*.whl               fla-core, xformers, the CUDA 12 runtime (whatever is there)
#   .whl/fa4/small/*.whl     flash-attn 4 and its small dependencies (flash-attn-4, nvidia-cutlass-dsl,
#                            nvidia-cutlass-dsl-libs-base/-core, apache-tvm-ffi, torch-c-dlpack-ext, quack-kernels)
#   cu13.tar.xz.part-*       nvidia-cutlass-dsl-libs-cu13 unzipped, tar | xz -9, split in parts (a wheel too large
#                            to carry at once); looked for in the folders of $FA4_PARTS (default: .whl/fa4), checked
#                            against the sha256 in .whl/fa4/cu13.sha256 (or the first cu13.sha256 found there)
# flash-attn 4 is installed only when its small wheels and every part are there (a partial install would not import).
# Usage (repo root): eval "$(bash benchmarks/install_wheels.sh [SITE])"     SITE: default /tmp/site
#   prints the export lines (PYTHONPATH, LD_LIBRARY_PATH) on stdout, progress on stderr; exit status 1 on a failure.
#   FA4_PARTS must reach the script: eval "$(FA4_PARTS='DIR ...' bash benchmarks/install_wheels.sh)", or export it
#   (FA4_PARTS=... eval "$(...)" sets it for eval only, after the script has run).
set -uo pipefail
case ${1:-} in
-h | --help) sed -n '2,14s/^# \{0,1\}//p' "$0" && exit 0 ;;
esac
site=${1:-/tmp/site}
say() { echo "install_wheels.sh: $*" >&2; }
mkdir -p "$site" || exit 1
shopt -s nullglob
wheels=(.whl/*.whl)
fa4_small=(.whl/fa4/small/*.whl)
parts=() sums=()
for dir in ${FA4_PARTS:-.whl/fa4}; do
    parts+=("$dir"/cu13.tar.xz.part-*)
    [[ -f $dir/cu13.sha256 ]] && sums+=("$dir/cu13.sha256")
done
[[ -f .whl/fa4/cu13.sha256 ]] && sums=(.whl/fa4/cu13.sha256 "${sums[@]}")
fa4=0
if ((${#fa4_small[@]})); then
    # the parts in name order (part-aa, part-ab, ...), one of each name
    mapfile -t parts < <(for p in "${parts[@]}"; do echo "${p##*/} $p"; done | sort -u -k1,1 | cut -d' ' -f2-)
    if ((${#parts[@]} == 0 || ${#sums[@]} == 0)); then
        say "flash-attn 4 skipped: its wheels are here but not the cu13 parts and cu13.sha256 (looked in ${FA4_PARTS:-.whl/fa4})"
    elif [[ $(cat "${parts[@]}" | sha256sum | cut -d' ' -f1) != $(cut -d' ' -f1 "${sums[0]}") ]]; then
        say "flash-attn 4 skipped: the parts ${parts[*]##*/} do not make the archive of ${sums[0]} (a part missing?)"
    else
        fa4=1
        wheels+=("${fa4_small[@]}")
    fi
fi
if ((${#wheels[@]})); then
    say "pip install --target $site: ${wheels[*]##*/}"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "${wheels[@]}" \
        || exit 1
fi
path=$site
if ((fa4)); then
    say "unpacking nvidia-cutlass-dsl-libs-cu13 from ${parts[*]##*/}"
    cat "${parts[@]}" | xz -d | tar -x -C "$site" || exit 1
    # the wheel's .pth file adds this folder to sys.path, but .pth files are only read in site-packages
    path=$site:$site/nvidia_cutlass_dsl/dsl_packages
fi
echo "export PYTHONPATH=$path\${PYTHONPATH:+:\$PYTHONPATH}"
if [[ -d $site/nvidia/cuda_runtime/lib ]]; then # xformers' PyPI wheel is built against the CUDA 12 runtime
    echo "export LD_LIBRARY_PATH=$site/nvidia/cuda_runtime/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
fi
