"""A signed local apt repository of empty packages named like the real ones, for the infra tests.

The Ansible roles add NVIDIA's and Docker's repositories, install pinned packages from them and hold
those; pointing the versions file at this repository (file:// URLs) lets the tests run those tasks
for real on a machine that cannot reach the vendors.
"""

import hashlib
import os
import subprocess
from email.utils import formatdate
from pathlib import Path


def build_deb(package: str, version: str, out_dir: Path) -> Path:
    """An empty Architecture: all package `package` at `version` (an epoch is allowed)."""
    root = out_dir / f"{package}-root"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: {package}\nVersion: {version}\nArchitecture: all\n"
        "Maintainer: titan-mla tests <tests@invalid>\n"
        f"Description: stand-in for {package} (infra tests)\n"
    )
    deb = out_dir / f"{package}_{version.split(':')[-1]}_all.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(root), str(deb)],
        check=True,
        capture_output=True,
    )
    return deb


def _index_entry(deb: Path, repo_root: Path) -> str:
    fields = subprocess.run(
        ["dpkg-deb", "--field", str(deb)], check=True, capture_output=True, text=True
    ).stdout.strip()
    data = deb.read_bytes()
    return (
        f"{fields}\nFilename: {deb.relative_to(repo_root)}\nSize: {len(data)}\n"
        f"SHA256: {hashlib.sha256(data).hexdigest()}\n"
    )


def _release(index_dir: Path, files: list[Path], extra: str = "") -> None:
    lines = "".join(
        f" {hashlib.sha256(f.read_bytes()).hexdigest()} {f.stat().st_size} {f.relative_to(index_dir)}\n"
        for f in files
    )
    (index_dir / "Release").write_text(
        f"{extra}Date: {formatdate(usegmt=True)}\nArchitectures: amd64 all\nSHA256:\n{lines}"
    )


class SignedAptRepos:
    """gpg-signed repositories under `root`, one per name, and the public key that verifies them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.gnupg_home = root / ".gnupg"
        self.gnupg_home.mkdir(mode=0o700, parents=True)
        self._gpg("--quick-gen-key", "titan-mla infra tests", "ed25519", "sign", "never")
        self.key_file = root / "repo-key.asc"
        self.key_file.write_bytes(self._gpg("--armor", "--export"))

    def _gpg(self, *args: str) -> bytes:
        env = {**os.environ, "GNUPGHOME": str(self.gnupg_home)}
        cmd = ["gpg", "--batch", "--pinentry-mode", "loopback", "--passphrase", "", *args]
        return subprocess.run(cmd, check=True, capture_output=True, env=env).stdout

    def add(
        self, name: str, packages: dict[str, str], suite: str = "/", component: str = ""
    ) -> str:
        """A repository of `packages` ({name: version}) and its URL. suite "/" makes a flat
        repository (as NVIDIA's); otherwise a dists/<suite>/<component> one (as Docker's)."""
        repo = self.root / name
        pool = repo / "pool"
        pool.mkdir(parents=True)
        debs = [build_deb(p, v, pool) for p, v in packages.items()]
        if suite == "/":
            index_dir, packages_file, extra = repo, repo / "Packages", ""
        else:
            index_dir = repo / "dists" / suite
            packages_file = index_dir / component / "binary-amd64" / "Packages"
            extra = f"Suite: {suite}\nCodename: {suite}\nComponents: {component}\n"
        packages_file.parent.mkdir(parents=True, exist_ok=True)
        packages_file.write_text("\n".join(_index_entry(d, repo) for d in debs))
        _release(index_dir, [packages_file], extra)
        self._gpg(
            "--yes",
            "--clearsign",
            "--output",
            str(index_dir / "InRelease"),
            str(index_dir / "Release"),
        )
        return f"file://{repo}/" if suite == "/" else f"file://{repo}"

    def stop_agent(self) -> None:
        """gpg started an agent for this keyring: stop it."""
        env = {**os.environ, "GNUPGHOME": str(self.gnupg_home)}
        subprocess.run(
            ["gpgconf", "--kill", "gpg-agent"], env=env, check=False, capture_output=True
        )
