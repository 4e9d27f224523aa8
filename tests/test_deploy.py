"""deploy/: no Docker or cluster here, so the layouts are checked by parsing: YAML structure, object
references, cron syntax, systemd sections, and every `lsti ...` command line against the real CLI
parser (a renamed command or option fails here)."""

from __future__ import annotations

import argparse
import configparser
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
K8S = DEPLOY / "k8s"
SYSTEMD = DEPLOY / "systemd"


def cli_parser() -> argparse.ArgumentParser:
    """The real `lsti` parser."""
    from streams.cli.main import build_parser

    return build_parser()


def lsti_invocations(command: str | list[str]) -> list[list[str]]:
    """Argument lists of every `lsti ...` call in an exec list or a shell line."""
    if isinstance(command, list):
        words = command
        if words and Path(words[0]).name in ("sh", "bash") and "-c" in words:
            return lsti_invocations(" ".join(words[words.index("-c") + 1 :]))
        return [words[1:]] if words and Path(words[0]).name == "lsti" else []
    lexer = shlex.shlex(command.replace("$$", "$"), posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    out, current = [], []
    for tok in list(lexer) + [";"]:
        if set(tok) <= set(";&|"):
            if current and Path(current[0]).name == "lsti":
                out.append(current[1:])
            current = []
        else:
            current.append(tok)
    return out


def check_lsti_args(args: list[str], where: str) -> str:
    """Parse with the real CLI; placeholders (${VAR}, %i) get sample values first."""
    args = [re.sub(r"\$\{?\w+\}?", "0", a).replace("%i", "1") for a in args]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            ns = cli_parser().parse_args(args)
    except SystemExit:
        pytest.fail(f"{where}: `lsti {' '.join(args)}` is not a valid lsti command line: {err.getvalue()}")
    return ns.command


# -- docker compose -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    docs = list(yaml.safe_load_all((DEPLOY / "docker-compose.yml").read_text()))
    assert len(docs) == 1
    return docs[0]


def _named_volumes(service: dict) -> list[str]:
    out = []
    for v in service.get("volumes", []):
        src = v.get("source") if isinstance(v, dict) else v.split(":")[0]
        if src and not src.startswith((".", "/", "~", "$")):
            out.append(src)
    return out


def test_compose_structure(compose):
    services, volumes = compose["services"], compose.get("volumes") or {}
    assert services["kafka"]["image"] == "apache/kafka:3.9.2"
    env = services["kafka"]["environment"]
    assert "broker" in env["KAFKA_PROCESS_ROLES"] and "controller" in env["KAFKA_PROCESS_ROLES"]
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith(f"{env['KAFKA_NODE_ID']}@")
    for name, svc in services.items():
        for vol in _named_volumes(svc):
            assert vol in volumes, f"service {name} uses undeclared volume {vol}"
        deps = svc.get("depends_on") or {}
        for dep in deps:
            assert dep in services, f"service {name} depends on unknown service {dep}"
    workers = {n: s for n, s in services.items() if check_cmd(s) == "run"}
    assert len(workers) >= 2
    state_volumes = set()
    for name, svc in workers.items():
        assert "kafka:9092" in svc["command"]
        assert svc["environment"]["LSTI_WORKER_DIR"] == "/state"
        mounts = {v.split(":")[1]: v for v in svc["volumes"]}
        assert mounts["/artifacts"].endswith(":ro"), f"{name} must mount artifacts read-only"
        state_volumes.add(mounts["/state"].split(":")[0])
    assert len(state_volumes) == len(workers), "each worker needs its own RocksDB volume"
    nightly = [n for n, s in services.items() if check_cmd(s) == "nightly"]
    assert nightly and all(services[n].get("profiles") for n in nightly)


def check_cmd(svc: dict) -> str | None:
    """The lsti subcommand a compose service runs (entrypoint is `lsti` in the image)."""
    cmd = svc.get("command")
    if cmd is None:
        return None
    entry = svc.get("entrypoint")
    calls = lsti_invocations(entry + cmd) if entry else [cmd]
    commands = {check_lsti_args(c, f"compose service {svc.get('image')}") for c in calls}
    assert len(commands) == 1
    return commands.pop()


def test_compose_commands_exist(compose):
    seen = {name: check_cmd(svc) for name, svc in compose["services"].items() if name != "kafka"}
    assert {"run", "nightly", "train"} <= set(seen.values())


# -- kubernetes ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def k8s_docs() -> list[dict]:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(kust["resources"]) == files, "kustomization.yaml must list every manifest"
    docs = []
    for f in files:
        docs += [d for d in yaml.safe_load_all((K8S / f).read_text()) if d is not None]
    return docs


def _by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def _containers(doc: dict) -> list[dict]:
    spec = doc["spec"]["jobTemplate"]["spec"] if doc["kind"] == "CronJob" else doc["spec"]
    return spec["template"]["spec"]["containers"]


def test_k8s_objects_are_well_formed(k8s_docs):
    kinds = {d["kind"] for d in k8s_docs}
    assert {"Namespace", "ConfigMap", "StatefulSet", "Service", "CronJob", "PersistentVolumeClaim"} <= kinds
    ns = _by_kind(k8s_docs, "Namespace")[0]["metadata"]["name"]
    for d in k8s_docs:
        assert d.get("apiVersion") and d.get("kind") and d.get("metadata", {}).get("name"), d
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") == ns, d["metadata"]["name"]


def test_k8s_statefulset_service_and_references(k8s_docs):
    sts = _by_kind(k8s_docs, "StatefulSet")[0]
    services = {s["metadata"]["name"]: s for s in _by_kind(k8s_docs, "Service")}
    headless = services[sts["spec"]["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None"
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert sts["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert headless["spec"]["selector"].items() <= labels.items()
    templates = {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}
    assert templates
    pvcs = {p["metadata"]["name"] for p in _by_kind(k8s_docs, "PersistentVolumeClaim")}
    configmaps = {c["metadata"]["name"] for c in _by_kind(k8s_docs, "ConfigMap")}
    for doc in [sts, *_by_kind(k8s_docs, "CronJob")]:
        pod = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"] if doc["kind"] == "CronJob" else \
            doc["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for v in volumes.values():
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in pvcs
        for c in pod["containers"]:
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes or (doc is sts and m["name"] in templates), m["name"]
            for src in c.get("envFrom", []):
                if "configMapRef" in src:
                    assert src["configMapRef"]["name"] in configmaps
    worker = _containers(sts)[0]
    mounts = {m["mountPath"]: m for m in worker["volumeMounts"]}
    assert mounts["/artifacts"].get("readOnly") is True
    assert mounts["/state"]["name"] in templates
    assert any(p["name"] == "web" for p in worker["ports"])


CRON_RANGES = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]


def valid_cron(expr: str) -> bool:
    """Standard 5-field cron: *, */n, a, a-b, a-b/n and comma lists, each within its field's range."""
    fields = expr.split()
    if len(fields) != 5:
        return False
    for field, (lo, hi) in zip(fields, CRON_RANGES, strict=True):
        for part in field.split(","):
            m = re.fullmatch(r"(\*|(\d+)(?:-(\d+))?)(?:/(\d+))?", part)
            if not m:
                return False
            if m.group(2) is not None:
                a, b = int(m.group(2)), int(m.group(3) or m.group(2))
                if not (lo <= a <= b <= hi):
                    return False
            if m.group(4) is not None and int(m.group(4)) < 1:
                return False
    return True


def test_cron_validator():
    assert valid_cron("0 2 * * *") and valid_cron("*/15 0-6 1,15 * 1-5")
    assert not valid_cron("0 2 * *") and not valid_cron("60 2 * * *") and not valid_cron("0 24 * * *")
    assert not valid_cron("0 2 * * * *") and not valid_cron("*/0 2 * * *")


def test_k8s_cronjob_schedule(k8s_docs):
    cron = _by_kind(k8s_docs, "CronJob")[0]
    assert valid_cron(cron["spec"]["schedule"])
    assert cron["spec"]["schedule"] == "0 2 * * *"
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"


def test_k8s_commands_exist(k8s_docs):
    seen = set()
    for doc in k8s_docs:
        if doc["kind"] not in ("StatefulSet", "CronJob", "Deployment", "Job"):
            continue
        for c in _containers(doc):
            calls = lsti_invocations(c.get("command", []) + c.get("args", []))
            assert calls, f"{doc['metadata']['name']}/{c['name']} runs no lsti command"
            seen |= {check_lsti_args(a, f"{doc['kind']} {doc['metadata']['name']}") for a in calls}
    assert seen == {"run", "nightly"}


def test_k8s_schemas(k8s_docs):
    """Against the Kubernetes OpenAPI schemas, when kubernetes-validate is installed (optional)."""
    kv = pytest.importorskip("kubernetes_validate")
    for d in k8s_docs:
        kv.validate(d, "1.30", strict=True)


# -- systemd ------------------------------------------------------------------------------------


def unit(name: str) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # systemd keys are case-sensitive
    cp.read_string((SYSTEMD / name).read_text())
    return cp


def test_systemd_units():
    names = {p.name for p in SYSTEMD.iterdir()}
    assert names == {"lsti-worker@.service", "lsti-nightly.service", "lsti-nightly.timer", "lsti-kafka.service"}
    commands = {}
    for name in sorted(n for n in names if n.endswith(".service")):
        u = unit(name)
        assert {"Unit", "Service"} <= set(u.sections()), name
        assert u["Unit"].get("Description"), name
        exec_start = u["Service"]["ExecStart"].lstrip("-@+!")
        calls = lsti_invocations(exec_start)
        assert len(calls) == 1, name
        commands[name] = check_lsti_args(calls[0], name)
    assert commands == {"lsti-worker@.service": "run", "lsti-nightly.service": "nightly",
                        "lsti-kafka.service": "broker"}
    worker = unit("lsti-worker@.service")
    assert "%i" in (SYSTEMD / "lsti-worker@.service").read_text()
    assert worker["Install"]["WantedBy"] and unit("lsti-kafka.service")["Install"]["WantedBy"]
    assert unit("lsti-nightly.service")["Service"]["Type"] == "oneshot"
    timer = unit("lsti-nightly.timer")
    assert timer["Timer"]["OnCalendar"] == "*-*-* 02:00:00"
    assert timer["Timer"].get("Unit", "lsti-nightly.service") == "lsti-nightly.service"
    assert timer["Install"]["WantedBy"] == "timers.target"


def test_dockerfile():
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\s*$", text, re.M)
    assert "download.pytorch.org/whl/cpu" in text and "pip install ." in text
    assert re.search(r'^ENTRYPOINT \["lsti"\]', text, re.M)
