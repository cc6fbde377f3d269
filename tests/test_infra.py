"""infra/: Ansible roles applied twice to this machine, a live SLURM cluster running the project's
sbatch script, Kubernetes manifests, the Dockerfile, shell scripts.

The tools come from Debian (slurm-wlm, munge, shellcheck, kubectl) and PyPI (ansible-core,
ansible-lint, kubernetes-validate); .ci/run installs them. A missing tool skips its tests with a
reason naming it, except under CI (env CI set), where it fails them.
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from infra_apt_repo import SignedAptRepos

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
ANSIBLE = INFRA / "ansible"
VERSIONS_FILE = ANSIBLE / "group_vars" / "all" / "versions.yml"
PLAYBOOKS = [
    "setup_nvidia_drivers.yml",
    "setup_docker.yml",
    "setup_slurm.yml",
    "setup_k3s.yml",
    "site.yml",
]
# GPU facts of the one node (this machine) in each idempotence scenario.
SCENARIOS = {
    "0 GPUs": {"gpu_count": 0},
    "8 GPUs": {"gpu_count": 8, "gpu_type": "h100"},
    "8 GPUs, MIG": {
        "gpu_count": 8,
        "gpu_type": "h100",
        "gpu_mig_enabled": True,
        "gpu_mig_profile": "1g.10gb",
        "gpu_mig_instance_ids": [7, 8, 9, 10, 11, 12, 13],
    },
}
# MIG changes what the slurm and k3s roles write, not what the driver and docker roles do (those
# are covered by "8 GPUs"): the MIG scenario applies the playbooks of the roles that read it.
PLAYBOOK_OF = {
    "0 GPUs": "site.yml",
    "8 GPUs": "site.yml",
    "8 GPUs, MIG": "setup_slurm.yml setup_k3s.yml",
}
# What a scenario's slurm.conf declares for the node.
EXPECTED_GRES = {"0 GPUs": None, "8 GPUs": "gpu:h100:8", "8 GPUs, MIG": "gpu:1g.10gb:56"}
# Fixed system paths the roles write (the rest is moved into a temporary folder by the test's vars).
SYSTEM_PATHS = [
    Path("/etc/apt/sources.list.d") / f"{name}.sources"
    for name in ("nvidia-cuda", "docker", "nvidia-container-toolkit")
] + [
    *(
        Path("/etc/apt/keyrings") / f"{n}.asc"
        for n in ("nvidia-cuda", "docker", "nvidia-container-toolkit")
    ),
    Path("/etc/modprobe.d/blacklist-nouveau.conf"),
    Path("/etc/modprobe.d"),
    Path("/etc/systemd/system/k3s.service"),
]
URL = re.compile(r"https?://")


def require(*tools: str) -> None:
    """Skip (fail under CI) when a command-line tool is missing."""
    missing = [t for t in tools if shutil.which(t) is None]
    if not missing:
        return
    message = f"missing tool(s): {', '.join(missing)} (.ci/run installs them)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def run(cmd: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)


# --- shell scripts, URLs, Dockerfile ------------------------------------------------------------


def shell_scripts() -> list[Path]:
    """Every tracked or new shell script of the repository (by extension or shebang)."""
    files = run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"], 60, cwd=REPO, check=True
    ).stdout.split()
    scripts = []
    for name in files:
        path = REPO / name
        if not path.is_file():
            continue
        if path.suffix in (".sh", ".sbatch"):
            scripts.append(path)
            continue
        with path.open("rb") as f:
            first = f.readline(100)
        if re.match(rb"#!\s*/(usr/)?bin/(env\s+)?(ba|da)?sh\b", first):
            scripts.append(path)
    return sorted(scripts)


def test_shellcheck_every_script() -> None:
    require("shellcheck")
    scripts = shell_scripts()
    names = {str(p.relative_to(REPO)) for p in scripts}
    assert {"run_train.sh", ".ci/run", "infra/slurm/train.sbatch"} <= names
    result = run(["shellcheck", "--external-sources", *map(str, scripts)], 120, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr


def files_with_urls(paths: list[Path]) -> list[str]:
    """'file:line' of each literal http(s) URL in these files."""
    return [
        f"{p.relative_to(REPO)}:{n}"
        for p in paths
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if URL.search(line)
    ]


def test_urls_only_in_the_versions_file() -> None:
    infra_files = [p for p in INFRA.rglob("*") if p.is_file() and p != VERSIONS_FILE]
    infra_files += [REPO / "Dockerfile", REPO / ".dockerignore"]
    assert files_with_urls(infra_files) == []
    # The check finds what it looks for: the versions file does hold the URLs.
    assert len(files_with_urls([VERSIONS_FILE])) >= 8


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    instructions, pending = [], ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        keyword, _, args = (pending + line).strip().partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        pending = ""
    assert not pending, "Dockerfile ends inside a continued line"
    return instructions


def test_dockerfile() -> None:
    """What can be checked without a Docker engine: known instructions, a base image first, every
    COPY source present and not excluded by .dockerignore, RUN lines clean under shellcheck."""
    require("shellcheck")
    instructions = dockerfile_instructions((REPO / "Dockerfile").read_text())
    known = {"FROM", "ARG", "ENV", "WORKDIR", "COPY", "RUN", "CMD", "ENTRYPOINT", "LABEL", "EXPOSE"}
    assert {k for k, _ in instructions} <= known
    assert next(k for k, _ in instructions if k != "ARG") == "FROM"
    ignored = [
        line.strip().strip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copied = []
    for keyword, args in instructions:
        if keyword == "COPY":
            *sources, _dest = args.split()
            copied += [s for s in sources if not s.startswith("--")]
    assert copied, "the Dockerfile copies nothing"
    for source in copied:
        assert (REPO / source).exists(), f"COPY source {source} does not exist"
        assert source.strip("/") not in ignored, f"COPY source {source} is in .dockerignore"
    script = "\n".join(args for keyword, args in instructions if keyword == "RUN")
    result = run(["shellcheck", "--shell", "sh", "-"], 60, input=script)
    assert result.returncode == 0, result.stdout
    entry = json.loads(next(args for keyword, args in instructions if keyword == "CMD"))
    assert (REPO / entry[0]).is_file()


# --- Kubernetes ---------------------------------------------------------------------------------


def kubernetes_validate(files: list[Path]) -> str:
    """Problems `kubernetes-validate --strict` finds in these manifests ('' if none). It only warns
    on a kind it has no schema for (exit 0): here that is a failure too."""
    result = run(["kubernetes-validate", "--strict", "--quiet", *map(str, files)], 120)
    output = result.stdout + result.stderr
    unknown = [line for line in output.splitlines() if "Couldn't find schema" in line]
    return output if result.returncode != 0 or unknown else ""


@pytest.fixture(scope="module")
def rendered_overlays(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    require("kubectl")
    out = tmp_path_factory.mktemp("k8s")
    rendered = {}
    for overlay in ("one-node", "multi-node"):
        result = run(["kubectl", "kustomize", str(INFRA / "k8s" / "overlays" / overlay)], 120)
        assert result.returncode == 0, result.stderr
        rendered[overlay] = out / f"{overlay}.yaml"
        rendered[overlay].write_text(result.stdout)
    return rendered


def test_kustomize_overlays(rendered_overlays: dict[str, Path]) -> None:
    for overlay, nodes in (("one-node", 1), ("multi-node", 4)):
        docs = {d["kind"]: d for d in yaml.safe_load_all(rendered_overlays[overlay].read_text())}
        assert sorted(docs) == ["ConfigMap", "Job", "Service"]
        job = docs["Job"]
        assert job["spec"]["completionMode"] == "Indexed"
        assert job["spec"]["completions"] == job["spec"]["parallelism"] == nodes
        pod = job["spec"]["template"]["spec"]
        container = pod["containers"][0]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["NNODES"] == str(nodes)
        assert "--node_rank $(NODE_RANK)" in env["TORCHRUN_ARGS"]
        # The generated ConfigMap (hashed name) is the one the Job reads.
        assert (
            container["envFrom"][0]["configMapRef"]["name"] == docs["ConfigMap"]["metadata"]["name"]
        )
        assert docs["ConfigMap"]["data"]["NCCL_DEBUG"] == "WARN"
        # Pods resolve as <job>-<index>.<service>: the subdomain is the headless Service.
        assert docs["Service"]["spec"]["clusterIP"] == "None"
        assert pod["subdomain"] == docs["Service"]["metadata"]["name"]


def test_kubernetes_validate_strict(rendered_overlays: dict[str, Path]) -> None:
    require("kubernetes-validate")
    base = INFRA / "k8s" / "base"
    manifests = [base / "job.yaml", base / "service.yaml", *rendered_overlays.values()]
    assert kubernetes_validate(manifests) == ""


def test_kubernetes_validate_rejects_unknown_kind_and_field(tmp_path: Path) -> None:
    require("kubernetes-validate")
    job = yaml.safe_load((INFRA / "k8s" / "base" / "job.yaml").read_text())
    unknown_kind = tmp_path / "unknown_kind.yaml"
    unknown_kind.write_text(yaml.safe_dump({**job, "kind": "TrainingJob"}))
    unknown_field = tmp_path / "unknown_field.yaml"
    unknown_field.write_text(yaml.safe_dump({**job, "spec": {**job["spec"], "nodes": 4}}))
    assert "Couldn't find schema for kind TrainingJob" in kubernetes_validate([unknown_kind])
    assert "nodes" in kubernetes_validate([unknown_field])


# --- Ansible: lint, syntax ----------------------------------------------------------------------


def test_ansible_lint_production() -> None:
    require("ansible-lint")
    # No rule may be skipped: no lint config with skip lists, no inline noqa.
    assert not list(REPO.glob(".ansible-lint*")) and not list(ANSIBLE.glob(".ansible-lint*"))
    for path in ANSIBLE.rglob("*"):
        if path.is_file():
            assert "noqa" not in path.read_text(), f"{path} silences a rule"
    result = run(
        ["ansible-lint", "--offline", "--profile", "production", "--nocolor", str(ANSIBLE)],
        300,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "Profile 'production' was required, and it passed" in result.stdout + result.stderr


def test_playbook_syntax() -> None:
    require("ansible-playbook")
    result = run(["ansible-playbook", "--syntax-check", *PLAYBOOKS], 120, cwd=ANSIBLE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert [f"playbook: {p}" for p in PLAYBOOKS] == re.findall(r"playbook: \S+", result.stdout)


# --- Ansible: applied twice to this machine -----------------------------------------------------


def slug(scenario: str) -> str:
    return re.sub(r"\W+", "-", scenario)


def versions() -> dict:
    return yaml.safe_load(VERSIONS_FILE.read_text())


class Localhost:
    """This machine as a one-node cluster: the versions file pointed at local signed repositories
    and a local k3s binary, every path the roles let us move moved into `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        v = versions()
        branch = v["nvidia_driver_branch"]
        driver = [
            p.replace("{{ nvidia_driver_branch }}", branch) for p in v["nvidia_driver_packages"]
        ]
        fabric = [
            p.replace("{{ nvidia_driver_branch }}", branch)
            for p in v["nvidia_fabricmanager_packages"]
        ]
        toolkit = ["nvidia-container-toolkit", "nvidia-container-toolkit-base"]
        toolkit += ["libnvidia-container-tools", "libnvidia-container1"]
        docker = {"docker-ce": v["docker_version"], "docker-ce-cli": v["docker_version"]}
        docker["containerd.io"] = v["containerd_version"]
        self.held_packages = {
            **dict.fromkeys(driver + fabric, "1.0-1"),
            **dict.fromkeys(toolkit, v["nvidia_container_toolkit_version"]),
            **docker,
        }
        # apt downloads as user _apt: the repositories must lie where it can read them.
        self.apt_root = Path(tempfile.mkdtemp(prefix="titan-mla-apt-"))
        self.apt_root.chmod(0o755)
        repos = self.repos = SignedAptRepos(self.apt_root)
        key = f"file://{repos.key_file}"
        k3s = root / "download" / "k3s"
        k3s.parent.mkdir()
        k3s.write_text("#!/bin/sh\necho k3s stand-in\n")
        (k3s.parent / "sha256sum-amd64.txt").write_text(
            f"{hashlib.sha256(k3s.read_bytes()).hexdigest()}  k3s\n"
        )
        self.mirror = {
            "nvidia_cuda_repo_url": repos.add("cuda", dict.fromkeys(driver + fabric, "1.0-1")),
            "nvidia_cuda_repo_key_url": key,
            "nvidia_container_toolkit_repo_url": repos.add(
                "toolkit", dict.fromkeys(toolkit, v["nvidia_container_toolkit_version"])
            ),
            "nvidia_container_toolkit_repo_key_url": key,
            "docker_repo_url": repos.add("docker", docker, suite="bookworm", component="stable"),
            "docker_repo_key_url": key,
            "k3s_binary_url": f"file://{k3s}",
            "k3s_binary_checksum": f"sha256:file://{k3s.parent}/sha256sum-amd64.txt",
        }
        self.dev = root / "dev"
        self.dev.mkdir()
        self.existing_system_paths = {p for p in SYSTEM_PATHS if p.exists()}

    def vars_for(self, scenario: str) -> dict:
        state = self.root / slug(scenario)
        state.mkdir(exist_ok=True)  # the munge key's folder (the munge package makes /etc/munge)
        return {
            **self.mirror,
            "slurm_munge_key": "titan-mla-infra-test-key-" + "x" * 32,
            "k3s_token": "titan-mla-infra-test-token",
            "slurm_user": "root",
            "slurm_cgroup": False,
            "slurm_config_dir": str(state / "etc-slurm"),
            "slurm_state_dir": str(state / "slurmctld"),
            "slurm_spool_dir": str(state / "slurmd"),
            "slurm_log_dir": str(state / "log"),
            "slurm_run_dir": str(state / "run"),
            "slurm_munge_key_path": str(state / "munge.key"),
            "slurm_munge_socket": str(state / "munge" / "munge.socket"),
            "slurm_gpu_device_dir": str(self.dev),
            "docker_config_dir": str(state / "etc-docker"),
            "k3s_install_path": str(state / "bin" / "k3s"),
            "k3s_config_dir": str(state / "etc-k3s"),
            "k3s_data_dir": str(state / "k3s"),
        }

    def inventory(self, scenario: str) -> Path:
        host = {
            "ansible_connection": "local",
            "ansible_python_interpreter": "/usr/bin/python3",
            **SCENARIOS[scenario],
        }
        groups = ["gpu_nodes", "docker_hosts", "slurm_controller", "slurm_compute", "k3s_server"]
        inventory = {"all": {"children": {g: {"hosts": {"localhost": host}} for g in groups}}}
        inventory["all"]["children"]["k3s_agent"] = {"hosts": {}}
        path = self.root / f"inventory-{slug(scenario)}.yml"
        path.write_text(yaml.safe_dump(inventory))
        return path

    def apply(self, scenario: str) -> str:
        """The scenario's playbook on this machine; its output."""
        extra = self.root / f"vars-{slug(scenario)}.json"
        extra.write_text(json.dumps(self.vars_for(scenario)))
        inventory = str(self.inventory(scenario))
        cmd = [
            "ansible-playbook",
            "-i",
            inventory,
            "-e",
            f"@{extra}",
            *PLAYBOOK_OF[scenario].split(),
        ]
        env = {
            **os.environ,
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_PIPELINING": "1",
            # Facts gathered once per scenario, not once per play (4 plays in site.yml).
            "ANSIBLE_GATHERING": "smart",
            "ANSIBLE_CACHE_PLUGIN": "jsonfile",
            "ANSIBLE_CACHE_PLUGIN_CONNECTION": str(self.root / "facts" / slug(scenario)),
        }
        result = run(cmd, 600, cwd=ANSIBLE, env=env)
        assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
        return result.stdout

    def clean(self) -> None:
        """Remove what the roles put on this machine outside `root`."""
        installed = [p for p in self.held_packages if dpkg_status(p).endswith("installed")]
        if installed:
            holds = "".join(f"{p} install\n" for p in installed)
            subprocess.run(["dpkg", "--set-selections"], input=holds, text=True, check=True)
            subprocess.run(["dpkg", "--purge", *installed], check=True, capture_output=True)
        for path in SYSTEM_PATHS:  # files before their folders
            if path in self.existing_system_paths or not path.exists():
                continue
            if path.is_dir():
                path.rmdir()
            else:
                path.unlink()
        self.repos.stop_agent()
        shutil.rmtree(self.apt_root)


def dpkg_status(package: str) -> str:
    """dpkg's selection and state of a package ('hold ok installed'), '' when unknown."""
    result = run(["dpkg-query", "-W", "-f=${Status}", package], 60)
    return result.stdout.strip() if result.returncode == 0 else ""


def recap(output: str) -> dict[str, int]:
    """The localhost line of a play recap: {'ok': 31, 'changed': 0, ...}."""
    line = re.findall(r"^localhost\s+:\s+(.*)$", output, re.MULTILINE)[-1]
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line)}


@pytest.fixture(scope="module")
def localhost(tmp_path_factory: pytest.TempPathFactory):
    require("ansible-playbook", "dpkg-deb", "gpg", "apt-get")
    if os.geteuid() != 0:
        pytest.skip("the roles are applied to this machine: needs root")
    machine = Localhost(tmp_path_factory.mktemp("localhost"))
    machine.applied = {}
    yield machine
    machine.clean()


def applied(localhost: Localhost, scenario: str) -> tuple[str, str]:
    """site.yml applied twice for a scenario (once per test session): both outputs."""
    if scenario not in localhost.applied:
        localhost.applied[scenario] = (localhost.apply(scenario), localhost.apply(scenario))
    return localhost.applied[scenario]


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_roles_idempotent_on_localhost(localhost: Localhost, scenario: str) -> None:
    first, second = applied(localhost, scenario)
    assert recap(first)["failed"] == 0 and recap(first)["changed"] > 0
    assert recap(second)["failed"] == 0
    assert recap(second)["changed"] == 0, second[-6000:]
    # No systemd here: the service tasks are skipped, not run.
    for service in ("munge", "slurmctld", "slurmd", "k3s"):
        assert re.search(rf"TASK \[\w+ : Run {service}\][^\n]*\nskipping: \[localhost\]", second), (
            service
        )
    settings = localhost.vars_for(scenario)
    gpus = SCENARIOS[scenario]["gpu_count"]
    if PLAYBOOK_OF[scenario] == "site.yml":
        for package in localhost.held_packages:
            if package.startswith(("docker-ce", "containerd")) or gpus:
                assert dpkg_status(package) == "hold ok installed", package
        daemon = json.loads((Path(settings["docker_config_dir"]) / "daemon.json").read_text())
        assert ("nvidia" in daemon.get("runtimes", {})) == bool(gpus)
    slurm_conf = (Path(settings["slurm_config_dir"]) / "slurm.conf").read_text()
    node_line = next(line for line in slurm_conf.splitlines() if line.startswith("NodeName="))
    gres = re.search(r"Gres=(\S+)", node_line)
    assert (gres and gres.group(1)) == EXPECTED_GRES[scenario]
    manifests = Path(settings["k3s_data_dir"]) / "server" / "manifests"
    assert sorted(p.name for p in manifests.iterdir()) == sorted(
        ["kube-prometheus-stack.yaml", "dcgm-exporter.yaml"]
        + (["gpu-operator.yaml", "nvidia-runtimeclass.yaml"] if gpus else [])
    )
    for manifest in manifests.iterdir():
        chart = yaml.safe_load(manifest.read_text())
        if chart["kind"] == "HelmChart":
            values = yaml.safe_load(chart["spec"]["valuesContent"])
            assert (
                chart["spec"]["repo"]
                == versions()[f"{chart['metadata']['name'].replace('-', '_')}_chart_repo"]
            )
            if chart["metadata"]["name"] == "gpu-operator":
                env = {e["name"]: e["value"] for e in values["toolkit"]["env"]}
                assert env["CONTAINERD_SOCKET"] == "/run/k3s/containerd/containerd.sock"
                assert env["CONTAINERD_CONFIG"].endswith("/agent/etc/containerd/config.toml")
                assert values["mig"]["strategy"] == ("mixed" if "MIG" in scenario else "single")
            if chart["metadata"]["name"] == "dcgm-exporter":
                assert values["serviceMonitor"]["enabled"] is True
            if chart["metadata"]["name"] == "kube-prometheus-stack":
                assert (
                    values["prometheus"]["prometheusSpec"][
                        "serviceMonitorSelectorNilUsesHelmValues"
                    ]
                    is False
                )
    if gpus:
        require("kubernetes-validate")
        assert kubernetes_validate([manifests / "nvidia-runtimeclass.yaml"]) == ""


# --- SLURM: the rendered configuration, a live cluster ------------------------------------------


def make_gpu_devices(dev: Path, scenario: str) -> None:
    """Character devices standing in for the node's /dev/nvidiaN (and MIG capability devices), so
    slurmd checks gres.conf against device files as on a GPU node."""
    facts = SCENARIOS[scenario]
    minors = {f"nvidia{g}": (195, g) for g in range(facts["gpu_count"])}
    if facts.get("gpu_mig_enabled"):
        (dev / "nvidia-caps").mkdir(exist_ok=True)
        for g in range(facts["gpu_count"]):
            for gi in facts["gpu_mig_instance_ids"]:
                cap = 3 + 135 * g + 9 * gi
                minors[f"nvidia-caps/nvidia-cap{cap}"] = (237, cap)
    for name, (major, minor) in minors.items():
        if not (dev / name).exists():
            os.mknod(dev / name, 0o600 | 0o020000, os.makedev(major, minor))


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_slurmd_parses_rendered_gres(localhost: Localhost, scenario: str) -> None:
    require("slurmd", "timeout")
    applied(localhost, scenario)
    make_gpu_devices(localhost.dev, scenario)
    conf = Path(localhost.vars_for(scenario)["slurm_config_dir"]) / "slurm.conf"
    env = {**os.environ, "SLURM_CONF": str(conf)}
    result = run(["timeout", "60", "slurmd", "-G"], 90, env=env)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "error" not in out, out
    counts = re.findall(r"Gres Name=gpu Type=(\S+) Count=(\d+)", out)
    expected = EXPECTED_GRES[scenario]
    if expected is None:
        assert counts == []
    else:
        gpu_type, count = expected.split(":")[1:]
        assert {t for t, _ in counts} == {gpu_type}
        assert sum(int(c) for _, c in counts) == int(count)


class SlurmCluster:
    """munged, slurmctld and slurmd on this machine (one node), from the configuration the slurm
    role rendered for the 0-GPU scenario. Daemons run in the foreground as our children."""

    def __init__(self, settings: dict) -> None:
        self.conf = Path(settings["slurm_config_dir"]) / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        munge_dir = Path(settings["slurm_munge_socket"]).parent
        munge_dir.mkdir(mode=0o755, exist_ok=True)
        log_dir = Path(settings["slurm_log_dir"])
        self.daemons: list[subprocess.Popen] = []
        self.logs = [log_dir / "munged.log", log_dir / "slurmctld.log", log_dir / "slurmd.log"]
        self._start(
            [
                "munged",
                "--foreground",
                "--force",
                f"--socket={settings['slurm_munge_socket']}",
                f"--key-file={settings['slurm_munge_key_path']}",
                f"--log-file={self.logs[0]}",
                f"--pid-file={munge_dir / 'munged.pid'}",
                f"--seed-file={munge_dir / 'munged.seed'}",
            ]
        )
        self.wait_for(lambda: Path(settings["slurm_munge_socket"]).exists(), "munged's socket")
        self._start(["slurmctld", "-D", "-c"])
        self.wait_for(lambda: self.scontrol("ping").returncode == 0, "slurmctld")
        self._start(["slurmd", "-D"])
        self.wait_for(lambda: "State=IDLE" in self.scontrol("show", "node").stdout, "an idle node")

    def _start(self, cmd: list[str]) -> None:
        self.daemons.append(
            subprocess.Popen(
                cmd, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
        )

    def scontrol(self, *args: str) -> subprocess.CompletedProcess:
        return run(["scontrol", *args], 30, env=self.env)

    def wait_for(self, ready, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [d.args[0] for d in self.daemons if d.poll() is not None]
            assert not dead and time.monotonic() < deadline, f"no {what}: {self.log_tails()}"
            time.sleep(0.5)

    def log_tails(self) -> str:
        return "\n".join(f"{p.name}: {p.read_text()[-1500:]}" for p in self.logs if p.exists())

    def stop(self) -> None:
        # A job still running (the test timed out) goes first, then the daemons.
        run(["scancel", "--full", f"--user={os.getuid()}"], 30, env=self.env)
        for daemon in reversed(self.daemons):
            daemon.terminate()
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()


@pytest.mark.slow
def test_sbatch_trains_on_a_live_slurm_cluster(localhost: Localhost, tmp_path: Path) -> None:
    """infra/slurm/train.sbatch, unchanged, trains the debug config on CPU through torchrun."""
    require("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel")
    applied(localhost, "0 GPUs")
    cluster = SlurmCluster(localhost.vars_for("0 GPUs"))
    try:
        log = tmp_path / "job.out"
        result = run(
            [
                "sbatch",
                "--wait",
                "--time=10",
                f"--output={log}",
                "infra/slurm/train.sbatch",
                "--training.steps",
                "3",
                "--job.dump_folder",
                str(tmp_path / "outputs"),
            ],
            480,
            cwd=REPO,
            # As a user's shell: without the test session's Triton interpreter (conftest sets it),
            # CPU ranks take the PyTorch reference ops.
            env={k: v for k, v in cluster.env.items() if k != "TRITON_INTERPRET"},
        )
        out = log.read_text() if log.exists() else ""
        assert result.returncode == 0, (
            result.stdout + result.stderr + out[-6000:] + cluster.log_tails()
        )
        node = re.search(r"NodeAddr=(\S+)", cluster.scontrol("show", "node").stdout).group(1)
        assert re.search(
            rf"train\.sbatch: job \d+, 1 node\(s\) x 1 rank\(s\), head \S+ \({re.escape(node)}\)",
            out,
        )
        assert re.search(r"step:\s*3\b", out), out[-4000:]
    finally:
        cluster.stop()
