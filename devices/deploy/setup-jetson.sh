#!/usr/bin/env bash
# Set up edgeclf's device side on a Jetson (JetPack 5.1.x or 6.x), for `edgeclf run` and the systemd unit.
#
# - OpenCV: JetPack's system build (it has GStreamer, for CSI cameras and capture pipelines); never the pip wheel,
#   which lacks GStreamer and would shadow the system one. So: no [cv] extra.
# - TensorRT: JetPack's (python3-libnvinfer); Polygraphy from pip. Both seen by a venv made with
#   --system-site-packages.
# - onnxruntime-gpu (TensorRT and CUDA execution providers) is optional: pass --ort-gpu-wheel with a wheel for this
#   JetPack from the Jetson Zoo (https://elinux.org/Jetson_Zoo#ONNX_Runtime); otherwise the CPU onnxruntime from
#   PyPI is installed as the fallback backend.
#
# Usage: sudo ./setup-jetson.sh [--source DIR|--package SPEC] [--ort-gpu-wheel FILE_OR_URL] [--prefix /opt/edgeclf]
#                               [--user edgeclf] [--no-service-user]
# Runs as root (apt, /opt). Idempotent: re-running upgrades edgeclf in place.
set -euo pipefail

PREFIX=/opt/edgeclf
SOURCE=edgeclf   # --source DIR installs that folder instead
PACKAGE=""       # --package SPEC: installed as given (its extras are the caller's)
ORT_GPU_WHEEL=""
SERVICE_USER=edgeclf
MAKE_USER=1
# The unit's CacheDirectory=edgeclf and StateDirectory=edgeclf, and its EDGECLF_ENGINE_CACHE.
CACHE_DIR=/var/cache/edgeclf
STATE_DIR=/var/lib/edgeclf
ENGINE_CACHE=$CACHE_DIR/engines

die() { echo "setup-jetson: $*" >&2; exit 2; }

while [ $# -gt 0 ]; do
  case "$1" in
    --source) [ $# -ge 2 ] || die "--source needs a folder"; SOURCE="$2"; shift 2 ;;
    --package) [ $# -ge 2 ] || die "--package needs a pip spec"; PACKAGE="$2"; shift 2 ;;
    --ort-gpu-wheel) [ $# -ge 2 ] || die "--ort-gpu-wheel needs a wheel file or URL"; ORT_GPU_WHEEL="$2"; shift 2 ;;
    --prefix) [ $# -ge 2 ] || die "--prefix needs a folder"; PREFIX="$2"; shift 2 ;;
    --user) [ $# -ge 2 ] || die "--user needs a name"; SERVICE_USER="$2"; shift 2 ;;
    --no-service-user) MAKE_USER=0; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

[ "$(id -u)" -eq 0 ] || die "run as root (sudo): it installs apt packages and writes $PREFIX"
if [ "$MAKE_USER" -eq 0 ] && ! id "$SERVICE_USER" >/dev/null 2>&1; then
  die "--no-service-user: user $SERVICE_USER does not exist; create it first, or leave --no-service-user out"
fi
[ -r /etc/nv_tegra_release ] || die "/etc/nv_tegra_release is missing: this is not a Jetson with JetPack (on x86: pip install 'edgeclf[ort,cv]')"
release=$(head -n1 /etc/nv_tegra_release)
echo "setup-jetson: $release"
case "$release" in
  *R35*|*R36*) ;;
  *) die "this L4T is not JetPack 5 or 6 (edgeclf needs Python 3.8+ and TensorRT 8.5+): $release" ;;
esac

# sign: the unit may require signed bundles (EDGECLF_TRUSTED_KEY). No [ort] with an onnxruntime-gpu wheel: the CPU
# onnxruntime is another distribution owning the same onnxruntime/ folder, and pip would write it over the GPU one.
if [ -z "$PACKAGE" ]; then
  if [ -n "$ORT_GPU_WHEEL" ]; then PACKAGE="$SOURCE[dicom,sign]"; else PACKAGE="$SOURCE[ort,dicom,sign]"; fi
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update
# python3-libnvinfer: TensorRT's Python bindings; nvidia-opencv: JetPack's OpenCV (built with GStreamer, with its
# Python module); gstreamer tools and plugins for v4l2src/nvarguscamerasrc pipelines; v4l-utils for v4l2-ctl.
apt-get install -y --no-install-recommends python3-venv python3-pip python3-libnvinfer nvidia-opencv \
  gstreamer1.0-tools gstreamer1.0-plugins-good v4l-utils

python3 - <<'PY'
import re, sys
import cv2, tensorrt
if not re.search(r"GStreamer:\s*YES", cv2.getBuildInformation()):
    sys.exit("setup-jetson: the system OpenCV has no GStreamer; is a pip OpenCV installed for root? (pip3 uninstall opencv-python)")
print(f"setup-jetson: system OpenCV {cv2.__version__} with GStreamer, TensorRT {tensorrt.__version__}")
PY

# --system-site-packages: the venv sees JetPack's cv2 and tensorrt; numpy comes from the system too.
python3 -m venv --system-site-packages "$PREFIX/venv"
"$PREFIX/venv/bin/pip" install --upgrade pip
if [ -n "$ORT_GPU_WHEEL" ]; then
  "$PREFIX/venv/bin/pip" install "$ORT_GPU_WHEEL"
fi
# No [cv] extra: opencv-python-headless from PyPI has no GStreamer and would shadow the system OpenCV.
# numpy<2: JetPack's OpenCV and TensorRT bindings are built against numpy 1.x; without the pin, onnxruntime's
# numpy>=1.21.6 makes pip put numpy 2 in the venv (JetPack 6's system numpy is 1.21.5) and cv2 stops importing there.
"$PREFIX/venv/bin/pip" install "$PACKAGE" polygraphy "numpy<2"
if "$PREFIX/venv/bin/pip" show opencv-python-headless opencv-python >/dev/null 2>&1; then
  echo "setup-jetson: warning: a pip OpenCV is installed in the venv and shadows the system one; pip uninstall it" >&2
fi
# What the service will import, from the venv: JetPack's cv2 and tensorrt next to the venv's numpy, and with a GPU
# wheel its execution providers (a later pip step may have replaced it).
EDGECLF_ORT_GPU="$ORT_GPU_WHEEL" "$PREFIX/venv/bin/python" - <<'PY'
import os, sys
try:
    import cv2, numpy, tensorrt
except ImportError as exc:
    sys.exit(f"setup-jetson: the venv cannot import JetPack's OpenCV or TensorRT ({exc}); numpy there is a pip one? "
             "(pip install 'numpy<2' in the venv)")
print(f"setup-jetson: venv sees OpenCV {cv2.__version__}, TensorRT {tensorrt.__version__}, numpy {numpy.__version__}")
if os.environ.get("EDGECLF_ORT_GPU"):
    import onnxruntime
    have = onnxruntime.get_available_providers()
    if "CUDAExecutionProvider" not in have:
        sys.exit(f"setup-jetson: onnxruntime in the venv has {have}, not the GPU wheel's providers: a CPU onnxruntime was "
                 "installed over it (pip uninstall onnxruntime onnxruntime-gpu, then re-run with --ort-gpu-wheel)")
PY

if [ "$MAKE_USER" -eq 1 ] && ! id "$SERVICE_USER" >/dev/null 2>&1; then
  # video: /dev/video* and the Jetson GPU nodes; render where the release has that group.
  groups=video
  if getent group render >/dev/null; then groups=video,render; fi
  useradd --system --home-dir "$STATE_DIR" --shell /usr/sbin/nologin --groups "$groups" "$SERVICE_USER"
fi
install -d -m 0755 "$PREFIX"
# systemd makes the unit's cache and state folders only when the service starts; the build-engine step below
# runs before that, as the service user: make them now, owned as systemd would (User=, its primary group).
install -d -m 0755 -o "$SERVICE_USER" -g "$(id -gn "$SERVICE_USER")" "$CACHE_DIR" "$ENGINE_CACHE" "$STATE_DIR"

"$PREFIX/venv/bin/edgeclf" devices detect || true
echo "setup-jetson: done. Next: copy your bundle to $PREFIX/bundle, then"
echo "  sudo -u $SERVICE_USER EDGECLF_ENGINE_CACHE=$ENGINE_CACHE $PREFIX/venv/bin/edgeclf build-engine --bundle $PREFIX/bundle"
echo "  $PREFIX/venv/bin/edgeclf bundle check $PREFIX/bundle --backend trt"
echo "  install devices/deploy/edgeclf-run.service (see its header)"
if [ "$SERVICE_USER" != edgeclf ]; then
  echo "  and set User=$SERVICE_USER in it (systemctl edit edgeclf-run)"
fi
