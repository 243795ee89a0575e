"""Runs devices/deploy/setup-jetson.sh hermetically: a copy whose /etc/nv_tegra_release path points at a temp file,
stubs on PATH for id, apt-get, python3 (venv with logging pip/python/edgeclf), useradd, install, getent. Every stub
appends its argv to a log. Nothing outside tmp_path is touched."""
import os
import stat
import subprocess
from pathlib import Path
from typing import List

SCRIPT = Path(__file__).resolve().parents[2] / "devices" / "deploy" / "setup-jetson.sh"


def _exe(p: Path, body: str) -> None:
    p.write_text("#!/bin/bash\n" + body + "\n")
    p.chmod(p.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def run_setup(tmp: Path, release: str, *args: str) -> List[List[str]]:
    log = tmp / "calls.log"
    stubs = tmp / "stubs"
    stubs.mkdir()
    rel = tmp / "nv_tegra_release"
    rel.write_text(release + "\n")
    script = tmp / "setup-jetson.sh"
    script.write_text(SCRIPT.read_text().replace("/etc/nv_tegra_release", str(rel)))
    logline = f'printf "%s\\x1f" "$(basename "$0")" "$@" >> {log}; echo >> {log}'
    _exe(stubs / "id", logline + '\nif [ "$1" = -u ]; then echo 0; elif [ "$1" = -gn ]; then echo edgeclf; fi; exit 0')
    for name in ("apt-get", "useradd", "install", "getent"):
        _exe(stubs / name, logline + "\nexit 0")
    _exe(stubs / "python3", logline + f"""
if [ "$1" = - ]; then cat >/dev/null; exit 0; fi
if [ "$1" = -m ] && [ "$2" = venv ]; then
  d="${{@: -1}}"; mkdir -p "$d/bin"
  for t in pip python edgeclf; do
    cat > "$d/bin/$t" <<'STUB'
#!/bin/bash
printf "%s\\x1f" "venv-$(basename "$0")" "$@" >> {log}; echo >> {log}
[ "$1" = show ] && exit 1
exit 0
STUB
    chmod +x "$d/bin/$t"
  done
  exit 0
fi
exit 0""")
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}"}
    r = subprocess.run(["bash", str(script), "--prefix", str(tmp / "opt"), *args], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    calls = []
    for line in log.read_text().splitlines():
        if line:
            calls.append(line.split("\x1f")[:-1])
    return calls


def pip_installs(calls: List[List[str]]) -> List[List[str]]:
    return [c[2:] for c in calls if c[:2] == ["venv-pip", "install"]]
