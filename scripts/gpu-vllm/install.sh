# Runs on the GPU device machine; packed into the tar by prepare.sh, extracted to /root/w. Source it from the
# project root (the working directory of a device call):
#
#   source /root/w/install.sh && <command>
#
# First time on a machine: checks every wheel against SHA256SUMS and installs them into /tmp/site. Later times
# (same warm machine): skips that (marker /tmp/site/.gpu-vllm-installed). Every time: reinstalls the project from
# the current working tree into /tmp/proj (the tree may have changed since the last call), exports the environment,
# prints the versions and whether CUDA is available. Returns non-zero (never exits the caller's shell) on failure.
#   GPU_VLLM_SITE / GPU_VLLM_PROJ   install targets (default /tmp/site, /tmp/proj)

_gpu_vllm_install() {
  local here site proj src id t0 t1 t2 t3 b nsum nwhl
  here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
  site=${GPU_VLLM_SITE:-/tmp/site}
  proj=${GPU_VLLM_PROJ:-/tmp/proj}
  src=$(pwd)
  [ -f "$src/pyproject.toml" ] || { echo "gpu-vllm: no pyproject.toml in $src: source install.sh from the project root"; return 1; }
  [ -f "$here/SHA256SUMS" ] || { echo "gpu-vllm: no SHA256SUMS beside $here/install.sh: was the tar extracted?"; return 1; }
  id=$(sha256sum "$here/SHA256SUMS" | cut -c1-16)
  export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
  t0=$(date +%s.%N)
  if [ "$(cat "$site/.gpu-vllm-installed" 2>/dev/null)" = "$id" ]; then
    echo "gpu-vllm: wheels already installed in $site ($(head -1 "$here/SET")), not reinstalled"
    t1=$t0; t2=$t0
  else
    nsum=$(wc -l < "$here/SHA256SUMS"); nwhl=$(ls "$here"/wheels/*.whl 2>/dev/null | wc -l)
    [ "$nsum" = "$nwhl" ] || { echo "gpu-vllm: $nwhl wheels extracted, SHA256SUMS lists $nsum"; return 1; }
    (cd "$here" && sha256sum -c --quiet SHA256SUMS) \
      || { echo "gpu-vllm: wheel checksums differ (a piece missing, or pieces of two prepare runs?)"; return 1; }
    t1=$(date +%s.%N)
    rm -rf "$site"
    env -u PYTHONPATH python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
      "$here"/wheels/*.whl || { echo "gpu-vllm: pip install of the wheels failed"; return 1; }
    echo "$id" > "$site/.gpu-vllm-installed"
    t2=$(date +%s.%N)
  fi
  # The project, from a clean copy of the working tree (an in-tree build/ could carry stale files into the wheel).
  b=$(mktemp -d /tmp/gpu-vllm-src.XXXXXX)
  tar -C "$src" --anchored --exclude='./.s[0-9][0-9]' --exclude=./build --exclude=./.git \
      --no-anchored --exclude='*.egg-info' --exclude=__pycache__ -cf - . | tar -C "$b" -xf - \
    || { echo "gpu-vllm: copying the project failed"; rm -rf "$b"; return 1; }
  rm -rf "$proj"
  env -u PYTHONPATH python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir \
      --target "$proj" "$b" >/dev/null || { echo "gpu-vllm: pip install of the project ($src) failed"; rm -rf "$b"; return 1; }
  rm -rf "$b"
  t3=$(date +%s.%N)

  # The project first (its entry points are what vLLM loads as plugins), then vLLM & co., then the image.
  export PYTHONPATH=$proj:$site
  case ":$PATH:" in *":$proj/bin:"*) ;; *) export PATH=$proj/bin:$site/bin:$PATH ;; esac
  # torch 2.13 / 2.14 were built against cuDNN 9.20 / 9.24; the image has 9.19, which torch.backends.cudnn refuses
  # (nothing here uses cuDNN; 2.14's libtorch_cuda links the same cudnn* symbols as 2.13, which ran on 9.19).
  export PYTORCH_SKIP_CUDNN_COMPATIBILITY_CHECK=1
  # Otherwise the sampler of vLLM 0.32 / 0.33 imports flashinfer (not carried: ModuleNotFoundError at engine start;
  # carried: a JIT build of its sampling kernels with nvcc at engine start, minutes).
  export VLLM_USE_FLASHINFER_SAMPLER=${VLLM_USE_FLASHINFER_SAMPLER:-0}
  export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}      # the device has no network
  awk -v a="$t0" -v b="$t1" -v c="$t2" -v d="$t3" 'BEGIN{printf "gpu-vllm: ";
    if (c > a) printf "checksums %.1f s, wheels %.1f s, ", b-a, c-b; printf "project %.1f s\n", d-c}'
  # A full `import vllm` and of its OpenAI server (seconds) only right after installing the wheels; later calls read
  # vLLM's version.
  python3 - "$proj" "$([ "$t2" = "$t0" ] && echo 0 || echo 1)" <<'EOF' \
    || { echo "gpu-vllm: CUDA not available or version check failed"; return 1; }
import importlib.metadata as md, sys
import torch, triton
if sys.argv[2] == "1":
    import vllm
    vv = vllm.__version__
    # The OpenAI server imports more than the engine (uvicorn & co.); a missing one shows here, not at a server start.
    try:
        import vllm.entrypoints.openai.api_server  # noqa: F401
        print("gpu-vllm: OpenAI server imports: ok")
    except ImportError as e:
        print(f"gpu-vllm: OpenAI server imports: MISSING {e.name!r} ({e}); `vllm serve` and the server tests will fail")
else:
    vv = md.version("vllm")
ok = torch.cuda.is_available()
print(f"gpu-vllm: torch {torch.__version__} (CUDA {torch.version.cuda}), vllm {vv}, "
      f"triton {triton.__version__}" + (f", nccl {'.'.join(map(str, torch.cuda.nccl.version()))}" if ok else ""))
print(f"gpu-vllm: CUDA available: {ok}" + (f" ({torch.cuda.device_count()} x {torch.cuda.get_device_name(0)})" if ok else ""))
print("gpu-vllm: project " + ", ".join(f"{d.metadata['Name']} {d.version}" for d in md.distributions(path=[sys.argv[1]]))
      + f" in {sys.argv[1]}")
sys.exit(0 if ok else 1)
EOF
}
_gpu_vllm_install; _gpu_vllm_rc=$?
unset -f _gpu_vllm_install
(return 0 2>/dev/null) && return $_gpu_vllm_rc
exit $_gpu_vllm_rc
