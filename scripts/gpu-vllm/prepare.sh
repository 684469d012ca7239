#!/usr/bin/env bash
# Pack real vLLM (CUDA build) for the GPU device machine, which has no network.
#
#   cd <project root> && bash scripts/gpu-vllm/prepare.sh [0.32|0.33]     (default 0.32)
#
# Reads wheels-<version>.txt (beside this script), downloads what is not cached yet (cp312, manylinux x86_64, no
# dependency resolution: the list is complete), writes one tar with wheels/, SHA256SUMS, SET and install.sh, and
# splits it into 45 MiB pieces, one per top-level folder .s00, .s01, ... of the project root (each staging call
# carries one folder; the project itself travels with every call, and both together must stay under 64 MiB).
# Prints the device calls to make.
#
#   GPU_VLLM_CACHE   wheel cache, downloads go there (default ~/.cache/gpu-vllm/wheels)
#   GPU_VLLM_REUSE   another folder of wheels, used in place when it has one (default /tmp/whl)
#   GPU_VLLM_PREFIX  path of the project root inside the folder the device tool sends, when that is not the project
#                    root itself (e.g. "sub/dir/"): only changes the printed calls (carry paths, a leading cd)
set -euo pipefail

VER=${1:-0.32}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
LIST="$HERE/wheels-$VER.txt"
[ -f "$LIST" ] || { echo "no wheel list $LIST (have: $(cd "$HERE" && ls wheels-*.txt | tr '\n' ' '))" >&2; exit 1; }
# The project root: the working directory when it has a pyproject.toml, else the folder two levels above this
# script (it lives in <project root>/scripts/gpu-vllm).
ROOT=$(pwd -P)
[ -f "$ROOT/pyproject.toml" ] || ROOT=$(cd "$HERE/../.." && pwd -P)
[ -f "$ROOT/pyproject.toml" ] || { echo "run this from the project root (no pyproject.toml in $ROOT)" >&2; exit 1; }
CACHE=${GPU_VLLM_CACHE:-$HOME/.cache/gpu-vllm/wheels}
REUSE=${GPU_VLLM_REUSE:-/tmp/whl}
PREFIX=${GPU_VLLM_PREFIX:-}
PIECE=${PIECE:-45M}                     # MiB; a piece + the tree sent with each call (~14 MB) must stay under 64 MiB
mkdir -p "$CACHE"

# --- 1. the wheels -------------------------------------------------------------------------------------------
PLAT=""
for p in manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_26 manylinux_2_24 manylinux_2_18 \
         manylinux_2_17 manylinux2014 manylinux_2_5 manylinux1; do PLAT="$PLAT --platform ${p}_x86_64"; done
PIP=${PIP:-python3 -m pip}
W=$(mktemp -d /tmp/gpu-vllm-pack.XXXXXX)
trap 'rm -rf "$W"' EXIT
mkdir -p "$W/wheels"
find_wheel() {   # name version -> path of a cached wheel, or nothing
  local pat
  pat="$(echo "$1" | tr '-' '_')-$2-*.whl"
  for d in "$CACHE" "$REUSE"; do
    [ -d "$d" ] || continue
    find "$d" -maxdepth 1 -iname "$pat" | head -1 | grep . && return 0
  done
  return 0
}
n=0
while read -r spec; do
  name=${spec%%==*}; ver=${spec##*==}
  [ "$name" != "$spec" ] || { echo "bad line in $LIST: $spec (want name==version)" >&2; exit 1; }
  f=$(find_wheel "$name" "$ver")
  if [ -z "$f" ]; then
    echo "downloading $spec"
    $PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
      --abi abi3 --abi none $PLAT -d "$CACHE" "$spec"
    f=$(find_wheel "$name" "$ver")
    [ -n "$f" ] || { echo "no wheel for $spec after download" >&2; exit 1; }
  fi
  ln -s "$f" "$W/wheels/$(basename "$f")"
  n=$((n+1))
done < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' "$LIST" | grep .)

(cd "$W" && sha256sum wheels/*.whl > SHA256SUMS)
{ echo "wheels-$VER.txt: $n wheels"; date -u +"packed %Y-%m-%dT%H:%M:%SZ"; } > "$W/SET"
cp "$HERE/install.sh" "$W/install.sh"
bytes=$(du -bL "$W/wheels" | tail -1 | cut -f1)

# --- 2. tar -> pieces .s00 .s01 ... ---------------------------------------------------------------------------
rm -rf "$ROOT"/.s[0-9][0-9]
export ROOT
tar -C "$W" -chf - install.sh SET SHA256SUMS wheels \
  | split -b "$PIECE" -d -a 2 --filter='d="$ROOT/.s${FILE#p}"; mkdir -p "$d" && cat > "$d/$FILE"' - p
pieces=$(ls -d "$ROOT"/.s[0-9][0-9] | wc -l)
last=$(printf '%02d' $((pieces - 1)))
tarbytes=$(cat "$ROOT"/.s[0-9][0-9]/p[0-9][0-9] | wc -c)
maxp=$(stat -c %s "$ROOT"/.s[0-9][0-9]/p[0-9][0-9] | sort -n | tail -1)

# --- 3. keep the pieces out of git (never touches .gitignore) -------------------------------------------------
top=$(git -C "$ROOT" rev-parse --show-toplevel 2>/dev/null || true)
if [ -n "$top" ] && [ "$(cd "$top" && pwd -P)" = "$ROOT" ]; then
  ex=$(git -C "$ROOT" rev-parse --git-path info/exclude)
  case "$ex" in /*) ;; *) ex="$ROOT/$ex" ;; esac
  mkdir -p "$(dirname "$ex")" && touch "$ex"
  grep -qxF '/.s[0-9]*/' "$ex" || echo '/.s[0-9]*/' >> "$ex"
  tree=$(git -C "$ROOT" ls-files -co --exclude-standard -z | (cd "$ROOT" && xargs -0 -r du -cb 2>/dev/null) \
         | awk '$2=="total"{s+=$1} END{print s+0}')
else
  echo "note: $ROOT is not the top of a git checkout; .s00-.s$last were not added to any exclude file."
  echo "      Whatever sends this folder to the device must ignore them, or every call carries all pieces."
  tree=$(cd "$ROOT" && du -sb --exclude='.s[0-9][0-9]' --exclude=.git . | cut -f1)
fi

# --- 4. what to run --------------------------------------------------------------------------------------------
mib() { awk -v b="$1" 'BEGIN{printf "%.1f MiB", b/1048576}'; }
echo
echo "wheels-$VER.txt: $n wheels, $(mib "$bytes"); tar $(mib "$tarbytes") -> $pieces pieces of at most $PIECE" \
     "(.s00 .. .s$last in $ROOT)"
echo "project tree sent with every call: $(mib "$tree"); largest call: $(mib $((tree + maxp))) of 64 MiB"
[ $((tree + maxp)) -lt 67108864 ] || echo "WARNING: piece + project tree exceed 64 MiB: the calls will be refused"
cdp=""; [ -n "$PREFIX" ] && cdp="cd ${PREFIX%/} && "
echo
echo "Device calls, back to back (several run calls in one tool-call block; the machine is given back 30 s after"
echo "a call ends). Each must print NN+1; a smaller count means a fresh machine: start again at .s00."
for i in $(seq 0 $((pieces - 2))); do
  s=$(printf '%02d' "$i")
  echo "  run carry=[\"$PREFIX.s$s\"] timeout_s=60 command: ${cdp}mkdir -p /root/stash && mv .s$s/* /root/stash/ && ls /root/stash | wc -l"
done
echo "Final call (joins, checks and installs, then runs your command):"
echo "  run carry=[\"$PREFIX.s$last\"] command: ${cdp}mkdir -p /root/stash && mv .s$last/* /root/stash/ && mkdir -p /root/w && cat /root/stash/p* | tar -x -C /root/w && source /root/w/install.sh && <command>"
echo "  e.g. <command> = VLLM_TARGET_DEVICE=cuda VLLM_USE_V2_MODEL_RUNNER=0 timeout -s INT -k 20 400 python3 -P -m pytest tests/vllm/test_vllm_blocks.py -v -rfE --tb=short -p no:cacheprovider 2>&1 | tee \$OUT/pytest.txt"
echo "  with timeout_s >= the command's own limit + 60 (the install takes ~45 s)"
echo "Later calls on the same warm machine (reinstalls the project from the tree sent):"
echo "  run command: ${cdp}source /root/w/install.sh && <command>"
